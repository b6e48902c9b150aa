"""Known artifacts (checkpoints, vision towers, data sets) and verified downloads.

    from vrwkv_core.hub import download, resolve
    path = download("rwkv7-world-0b1")              # huggingface_hub cache, sha256-checked
    path = resolve("hub:visualrwkv-v0700-0b1")      # local file, or DownloadError naming the command

`registry` holds the names, `fetch` talks to the hub, `integrity` owns what is on disk
(hash checks and the record of verified files that lets `--verify` work offline).
"""

from vrwkv_core.hub.fetch import download, offline, resolve
from vrwkv_core.hub.integrity import FileCheck, VerifyReport, find_local, local_status, verify
from vrwkv_core.hub.registry import Artifact, ArtifactFile, get_artifact, list_artifacts

__all__ = [
    "Artifact",
    "ArtifactFile",
    "FileCheck",
    "VerifyReport",
    "download",
    "find_local",
    "get_artifact",
    "list_artifacts",
    "local_status",
    "offline",
    "resolve",
    "verify",
]
