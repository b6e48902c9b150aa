"""The registry of artifacts vrwkv knows by name: checkpoints, vision towers, data sets.

Each `Artifact` names a Hugging Face hub repo (or, for files that are not on the hub,
where they come from and how to place them), its files, their approximate sizes, a
pinned sha256 where one is known, and the folder they go to under `--dir`.
Sizes are the hub listing's rounded figures (the exact size comes from the hub at
download time); they feed `vrwkv download --list` and the disk-space check offline.

Extra artifacts (a mirror, a private checkpoint, the tests' fake ones) come from a JSON
file named by the environment variable VRWKV_REGISTRY:
`{"artifacts": [{"name", "kind", "repo_id", "repo_type", "files": [{"filename", "size", "sha256"}], ...}]}`.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vrwkv_core.errors import DownloadError

KINDS = ("model", "tower", "dataset", "eval-data")
REPO_TYPES = ("model", "dataset")
REGISTRY_ENV = "VRWKV_REGISTRY"

_GB = 1_000_000_000
_MB = 1_000_000


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an artifact: its path in the repo (or under the placement folder)."""

    filename: str
    size: int | None = None
    """Approximate size in bytes (hub listing); None when unknown."""
    sha256: str | None = None
    """Pinned hash; when None the hub's LFS sha256 is recorded at download time."""


@dataclass(frozen=True)
class Artifact:
    """A named thing `vrwkv download` can fetch (or explain how to fetch)."""

    name: str
    kind: str
    description: str
    repo_id: str | None
    """Hugging Face hub repo id; None when the files are not on the hub (see `source`)."""
    files: tuple[ArtifactFile, ...]
    repo_type: str = "model"
    revision: str | None = None
    """Branch, tag or commit to fetch; None means the repo's default branch."""
    subdir: str = ""
    """Folder under `--dir` the files go to; empty means the artifact's name."""
    source: str | None = None
    """Where the files come from when they are not on the hub (URLs)."""
    notes: str = ""
    """How to place or use the files after download."""
    alternatives: tuple[str, ...] = field(default=())
    """Hub repos holding the same data in another format (for reference)."""

    @property
    def main_file(self) -> str:
        return self.files[0].filename

    @property
    def on_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def placement(self) -> str:
        return self.subdir or self.name

    @property
    def size(self) -> int | None:
        """Approximate total bytes, or None if any file's size is unknown."""
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]

    @property
    def url(self) -> str | None:
        if self.repo_id is None:
            return None
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return f"https://huggingface.co/{prefix}{self.repo_id}"

    def file(self, filename: str) -> ArtifactFile:
        for f in self.files:
            if f.filename == filename:
                return f
        raise KeyError(filename)


def _hub(name: str, kind: str, description: str, repo_id: str, *files: ArtifactFile, **kw: object) -> Artifact:
    return Artifact(name=name, kind=kind, description=description, repo_id=repo_id,  # type: ignore[arg-type]
                    files=tuple(files), **kw)


def _external(name: str, description: str, subdir: str, source: str, notes: str, *files: str, **kw: object) -> Artifact:
    return Artifact(
        name=name,
        kind="eval-data",
        description=description,
        repo_id=None,
        files=tuple(ArtifactFile(f) for f in files),
        subdir=subdir,
        source=source,
        notes=notes,
        **kw,  # type: ignore[arg-type]
    )


def _models(repo_id: str, *rows: tuple) -> tuple[Artifact, ...]:
    """Single-file models of one hub repo, a row each: (name, description, filename, MB[, sha256])."""
    return tuple(_hub(name, "model", description, repo_id, ArtifactFile(filename, mb * _MB, *sha))
                 for name, description, filename, mb, *sha in rows)  # fmt: skip


_F = ArtifactFile
_RWKV7 = "BlinkDL/rwkv-7-world"
_RWKV6 = "BlinkDL/rwkv-6-world"
_VRWKV = "howard-hou/visualrwkv-6"
_COCO_VAL = "http://images.cocodataset.org/zips/val2014.zip"

BUILTIN: tuple[Artifact, ...] = (
    # RWKV-7 World language models (the LM inside VisualRWKV v7.00).
    *_models(_RWKV7,
             ("rwkv7-world-0b1", "RWKV-7 World 0.1B (L12 D768)",
              "RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth", 382,
              "60c98129b9529963bff2c164b8ab4bd17c19332ae06dc2dcae32aa3a3739295a"),
             ("rwkv7-world-0b4", "RWKV-7 World 0.4B (L24 D1024)",
              "RWKV-x070-World-0.4B-v2.9-20250107-ctx4096.pth", 902),
             ("rwkv7-world-1b5", "RWKV-7 World 1.5B (L24 D2048)",
              "RWKV-x070-World-1.5B-v3-20250127-ctx4096.pth", 3060)),
    # Released VisualRWKV v7.00 (towers + projector + RWKV-7 in one fp16 .pth).
    *_models(_VRWKV,
             ("visualrwkv-v0700-0b1", "VisualRWKV v7.00 0.1B (towers included)",
              "VisualRWKV-v0700-0B1-v1.0-20250109.pth", 2052),
             ("visualrwkv-v0700-0b4", "VisualRWKV v7.00 0.4B (towers included)",
              "VisualRWKV-v0700-0B4-v1.0-20250109.pth", 2576),
             ("visualrwkv-v0700-1b5", "VisualRWKV v7.00 1.5B (towers included)",
              "VisualRWKV-v0700-1B5-v1.0-20250204.pth", 4733)),
    # Vision towers (timm), for building a new model from an RWKV-7 checkpoint.
    _hub("dinov2-l14-reg4", "tower", "DINOv2-L/14 reg4, timm vit_large_patch14_reg4_dinov2.lvd142m",
         "timm/vit_large_patch14_reg4_dinov2.lvd142m", _F("model.safetensors", 1220 * _MB),
         notes="trained at 518 px; position embeddings are resampled to 448 when loaded"),
    _hub("siglip-so400m-14-384", "tower", "SigLIP SO400M/14-384, timm vit_so400m_patch14_siglip_384.webli",
         "timm/vit_so400m_patch14_siglip_384.webli", _F("model.safetensors", 1710 * _MB),
         notes="trained at 384 px; position embeddings are resampled to 448 when loaded"),
    _hub("sam-vit-b", "tower", "SAM ViT-B image encoder, timm samvit_base_patch16.sa1b",
         "timm/samvit_base_patch16.sa1b", _F("model.safetensors", 358 * _MB),
         notes="Meta's sam_vit_b_01ec64.pth (sha256 ec2df627...c912) is not on the hub; timm's file is used"),
    # Training data (LLaVA-1.5).
    _hub("llava-pretrain", "dataset", "LLaVA-Pretrain 558k captions + images (stage 1)",
         "liuhaotian/LLaVA-Pretrain", _F("blip_laion_cc_sbu_558k.json", 181 * _MB),
         _F("images.zip", 27_400 * _MB), repo_type="dataset",
         notes="unzip images.zip inside the folder (creates images/); data.image_folder points there"),
    _hub("llava-instruct-mix665k", "dataset", "LLaVA-1.5 instruction mix 665k (stage 2 conversations)",
         "liuhaotian/LLaVA-Instruct-150K", _F("llava_v1_5_mix665k.json", 1030 * _MB), repo_type="dataset",
         notes="images are not on the hub: coco/train2017 (images.cocodataset.org/zips/train2017.zip), "
               "gqa/images (downloads.cs.stanford.edu/nlp/data/gqa/images.zip), ocr_vqa/images (LLaVA's "
               "OCR-VQA script), textvqa/train_images (dl.fbaipublicfiles.com/textvqa/images/"
               "train_val_images.zip), vg/VG_100K and vg/VG_100K_2 (cs.stanford.edu Visual Genome "
               "images.zip, images2.zip); place them under the image folder with those names"),
    # LLaVA-1.5 evaluation data: not on the hub in LLaVA's layout. Placement follows LLaVA's
    # playground/data/eval tree; the lmms-lab repos hold the same benchmarks as parquet.
    _external("llava-eval", "LLaVA-1.5 eval.zip: question files (llava_*.jsonl) for every benchmark", ".",
              "https://drive.google.com/file/d/1atZSBBrAX54yYpxtVVW33zFvcnaHeFPy (linked from "
              "github.com/haotian-liu/LLaVA docs/Evaluation.md)",
              "unzip eval.zip into the eval data root (it creates textvqa/, vqav2/, gqa/, scienceqa/, pope/ ...)",
              "textvqa/llava_textvqa_val_v051_ocr.jsonl", "pope/llava_pope_test.jsonl"),
    _external("eval-textvqa", "TextVQA 0.5.1 val annotations + images", "textvqa",
              "https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_val.json and "
              "https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip",
              "put TextVQA_0.5.1_val.json in textvqa/ and unzip the images there (train_images/)",
              "TextVQA_0.5.1_val.json", alternatives=("lmms-lab/textvqa",)),
    _external("eval-vqav2", "VQAv2 val questions + annotations, COCO val2014 images", "vqav2",
              "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Annotations_Val_mscoco.zip, "
              "v2_Questions_Val_mscoco.zip (same folder), " + _COCO_VAL,
              "unzip the two zips into vqav2/ and the images into vqav2/val2014/; test-dev scores come "
              "from the EvalAI server (LLaVA's vqav2 answers_upload)",
              "v2_mscoco_val2014_annotations.json", "v2_OpenEnded_mscoco_val2014_questions.json",
              alternatives=("lmms-lab/VQAv2",)),
    _external("eval-gqa", "GQA testdev-balanced questions + images", "gqa",
              "https://downloads.cs.stanford.edu/nlp/data/gqa/questions1.2.zip and "
              "https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip",
              "put testdev_balanced_questions.json in gqa/ and the images in gqa/images/",
              "testdev_balanced_questions.json", alternatives=("lmms-lab/GQA",)),
    _external("eval-scienceqa", "ScienceQA problems, splits and test images", "scienceqa",
              "https://github.com/lupantech/ScienceQA (data/scienceqa: problems.json, pid_splits.json; "
              "images via its tools/download.sh)",
              "put problems.json and pid_splits.json in scienceqa/ and the images in scienceqa/images/test/",
              "problems.json", "pid_splits.json", alternatives=("lmms-lab/ScienceQA", "derek-thomas/ScienceQA")),
    _external("eval-pope", "POPE COCO annotations (adversarial, popular, random)", "pope",
              "https://github.com/AoiDragon/POPE/tree/e3e39262c85a6a83f26cf5094022a782cb0df58d/output/coco and "
              + _COCO_VAL,
              "put coco_pope_{adversarial,popular,random}.json in pope/coco/ and the images in pope/val2014/",
              "coco/coco_pope_adversarial.json", "coco/coco_pope_popular.json", "coco/coco_pope_random.json",
              alternatives=("lmms-lab/POPE",)),
    # VisualRWKV v6.0 (CLIP ViT-L/14-336 inside) and its RWKV-6 World LMs.
    *_models(_VRWKV,
             ("visualrwkv-v060-1b6", "VisualRWKV v6.0 1.6B (CLIP tower included)",
              "VisualRWKV-v060-1B6-v1.0-20240612.pth", 3810),
             ("visualrwkv-v060-3b", "VisualRWKV v6.0 3B (CLIP tower included)",
              "VisualRWKV-v060-3B-v1.0-20240612.pth", 6810),
             ("visualrwkv-v060-7b", "VisualRWKV v6.0 7B (CLIP tower included)",
              "VisualRWKV-v060-7B-v1.0-20240612.pth", 15_900)),
    *_models(_RWKV6,
             ("rwkv6-world-1b6", "RWKV-6 World 1.6B (L24 C2048)",
              "RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth", 3200),
             ("rwkv6-world-3b", "RWKV-6 World 3B (L32 C2560)", "RWKV-x060-World-3B-v2.1-20240417-ctx4096.pth", 6200),
             ("rwkv6-world-7b", "RWKV-6 World 7B (L32 C4096)",
              "RWKV-x060-World-7B-v2.1-20240507-ctx4096.pth", 15_300)),
    _hub("clip-vit-l14-336", "tower", "OpenAI CLIP ViT-L/14-336 (transformers layout)",
         "openai/clip-vit-large-patch14-336", _F("pytorch_model.bin", 1710 * _MB), _F("config.json", 5000),
         notes="the released VisualRWKV v6.0 files already contain this tower"),
)


def _from_dict(entry: dict, origin: str) -> Artifact:
    """Builds an Artifact from one JSON registry entry, naming the file and key on errors."""
    try:
        name = str(entry["name"])
        files = tuple(
            ArtifactFile(str(f["filename"]), f.get("size"), f.get("sha256"))
            if isinstance(f, dict) else ArtifactFile(str(f))
            for f in entry["files"]
        )
        art = Artifact(
            name=name,
            kind=str(entry.get("kind", "model")),
            description=str(entry.get("description", "")),
            repo_id=entry.get("repo_id"),
            files=files,
            repo_type=str(entry.get("repo_type", "model")),
            revision=entry.get("revision"),
            subdir=str(entry.get("subdir", "")),
            source=entry.get("source"),
            notes=str(entry.get("notes", "")),
        )
    except (KeyError, TypeError) as err:
        raise DownloadError(f"{origin}: registry entry {entry!r:.80} lacks or mistypes key {err}") from err
    if art.kind not in KINDS:
        raise DownloadError(f"{origin}: artifact '{name}' has kind '{art.kind}', expected one of {', '.join(KINDS)}")
    if art.repo_type not in REPO_TYPES:
        raise DownloadError(f"{origin}: artifact '{name}' has repo_type '{art.repo_type}', expected model or dataset")
    if not files:
        raise DownloadError(f"{origin}: artifact '{name}' lists no files")
    return art


def _extra() -> list[Artifact]:
    path = os.environ.get(REGISTRY_ENV)
    if not path:
        return []
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise DownloadError(f"{REGISTRY_ENV}={path}: cannot read it ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise DownloadError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
    entries = data.get("artifacts") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DownloadError(f"{path}: expected an object with an 'artifacts' list")
    return [_from_dict(e, path) for e in entries]


def list_artifacts() -> list[Artifact]:
    """Every known artifact: the built-ins, then those of $VRWKV_REGISTRY (which cannot shadow a built-in)."""
    arts = list(BUILTIN)
    names = {a.name for a in arts}
    for art in _extra():
        if art.name in names:
            raise DownloadError(f"{os.environ[REGISTRY_ENV]}: artifact '{art.name}' would shadow a built-in")
        names.add(art.name)
        arts.append(art)
    return arts


def strip_prefix(name: str) -> str:
    """`hub:NAME` -> `NAME` (the form recipes use)."""
    return name[4:] if name.startswith("hub:") else name


def get_artifact(name: str) -> Artifact:
    """The artifact called `name` (or `hub:name`); DownloadError with suggestions if unknown."""
    key = strip_prefix(name)
    arts = {a.name: a for a in list_artifacts()}
    if key in arts:
        return arts[key]
    close = difflib.get_close_matches(key, list(arts), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise DownloadError(f"unknown artifact '{key}'", hint=hint + "`vrwkv download --list` shows every name")
