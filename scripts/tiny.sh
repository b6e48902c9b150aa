#!/usr/bin/env bash
# The main job on its embedded default: the tiny recipe on synthetic shapes, end to end on
# CPU. Each step is a plain vrwkv command (the README's CLI tour explains them); steps are
# added here as their capabilities land.
set -euo pipefail
vrwkv env --no-build
vrwkv pretrain recipes/tiny.yaml --print-config
