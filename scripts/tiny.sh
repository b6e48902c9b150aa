#!/usr/bin/env bash
# The main job on its embedded default: the tiny recipe on synthetic shapes, end to end on
# CPU (prepare, pretrain, finetune, eval, chat answer). Each step is a plain vrwkv command;
# the README's CLI tour explains them. Re-running reuses data/shapes, retrains into
# out/tiny (--overwrite: replacing the previous run is the point here) and re-answers the
# benchmark (answers of the previous model are dropped).
# TINY_OVERRIDES="pretrain.seed=1 finetune.seed=1" adds recipe key=value overrides to both stages.
set -euo pipefail
read -ra overrides <<< "${TINY_OVERRIDES:-}"
vrwkv env --no-build
[ -d data/shapes ] || vrwkv prepare-data synthetic-shapes --out data/shapes
vrwkv pretrain recipes/tiny.yaml --overwrite "${overrides[@]}"   # retrains by design: replaces out/tiny/pretrain
vrwkv finetune recipes/tiny.yaml --overwrite "${overrides[@]}"
rm -rf out/tiny/eval
vrwkv eval --model out/tiny/finetune --benchmark shapes --data-root data/shapes --out out/tiny/eval
vrwkv chat --model out/tiny/finetune --image data/shapes/images/eval_00000.png \
  --prompt "How many shapes are there?"
