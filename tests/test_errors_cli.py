"""Careless and hostile inputs through the real CLI: one clear line, the right exit code, nothing lost.

Each row of CASES builds its inputs in a fresh folder and returns the argv; the test runs
`vrwkv_cli.main.run(argv)` in-process and checks the exit code, that stderr names the
file/key/value, that there is no traceback and at most a few lines, and that every file
that existed before the run has the same sha256 afterwards.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

import pytest

from helpers import REPO

# --------------------------------------------------------------------------- helpers


def _sha_tree(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _png(mode: str = "RGB", size: tuple[int, int] = (32, 32), fmt: str = "PNG", **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt, **kw)
    return buf.getvalue()


def _noise_png(side: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


def _recipe(c: Path, data: Path, extra: list[str] | None = None) -> Path:
    """The tiny recipe pointed at `data`, writing into c/out (1 step, tiny batch)."""
    text = (REPO / "recipes/tiny.yaml").read_text()
    text = text.replace("root: data/shapes", f"root: {data}").replace("out_dir: out/tiny/pretrain", f"out_dir: {c / 'out'}")
    text = text.replace("max_steps: 150", "max_steps: 1").replace("val_every_steps: 75", "val_every_steps: 0")
    text = text.replace("synthetic: true", "synthetic: false")
    path = c / "r.yaml"
    path.write_text(text + "".join(f"{line}\n" for line in extra or []))
    return path


def _records(n: int = 3, image: str = "img0.png") -> list[dict]:
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
    return [{"id": str(i), "image": image, "conversations": conv} for i in range(n)]


def _images(c: Path) -> Path:
    (c / "imgs").mkdir()
    (c / "imgs/img0.png").write_bytes(_png())
    return c / "imgs"


def _tar(path: Path, members: list[tuple[str, bytes | str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = str(data)
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))  # type: ignore[arg-type]
    return path


class Ctx:
    """What a case's setup gets: its folder, the shared data and the tiny model."""

    def __init__(self, c: Path, env: dict) -> None:
        self.c, self.env = c, env

    @property
    def data(self) -> Path:
        return self.env["data"]

    @property
    def model(self) -> Path:
        return self.env["model"]

    def data_copy(self) -> Path:
        dst = self.c / "data"
        shutil.copytree(self.data, dst)
        return dst

    def model_copy(self, with_ckpt: bool = False) -> Path:
        dst = self.c / "m"
        dst.mkdir()
        for f in self.model.iterdir():
            if f.is_file() and (with_ckpt or not f.name.endswith(".ckpt")):
                shutil.copy2(f, dst / f.name)
        return dst

    def chat(self, *extra: str, image: str | None = None) -> list[str]:
        img = image or str(self.data / "images/eval_00000.png")
        return ["chat", "--model", str(self.model), "--image", img, "--prompt", "hi", "--max-new-tokens", "1", *extra]

    def eval(self, data: Path, *extra: str) -> list[str]:
        return ["eval", "--model", str(self.model), "--benchmark", "shapes", "--data-root", str(data),
                "--out", str(self.c / "ev"), "--max-new-tokens", "1", *extra]  # fmt: skip


# --------------------------------------------------------------------------- the table
# (id, setup(ctx) -> argv, exit code, words stderr must contain (case-insensitive))

Case = tuple[str, Callable[[Ctx], list[str]], int, tuple[str, ...]]
CASES: list[Case] = []


def case(name: str, code: int = 1, *mention: str) -> Callable:
    def deco(fn: Callable[[Ctx], list[str]]) -> Callable:
        CASES.append((name, fn, code, mention))
        return fn

    return deco


RANGES = [
    ("pretrain.lr_init=-1", "pretrain.lr_init", "> 0"), ("pretrain.lr_init=0", "pretrain.lr_init", "> 0"),
    ("pretrain.lr_init=nan", "pretrain.lr_init", "> 0"), ("data.ctx_len=0", "data.ctx_len", ">= 1"),
    ("data.num_workers=-1", "data.num_workers", ">= 0"), ("pretrain.grad_clip=-1", "pretrain.grad_clip", ">= 0"),
    ("pretrain.max_steps=0", "pretrain.max_steps", ">= 1"), ("pretrain.micro_batch=0", "pretrain.micro_batch", ">= 1"),
    ("finetune.grad_accum=0", "finetune.grad_accum", ">= 1"), ("pretrain.warmup_steps=-1", "pretrain.warmup_steps", ">= 0"),
    ("pretrain.save_every_steps=-5", "pretrain.save_every_steps", ">= 0"),
    ("finetune.val_every_steps=-1", "finetune.val_every_steps", ">= 0"),
    ("pretrain.weight_decay=-0.1", "pretrain.weight_decay", ">= 0"), ("pretrain.lr_final=-1", "pretrain.lr_final", ">= 0"),
    ("pretrain.lr_final=1", "pretrain.lr_final", "<= pretrain.lr_init"), ("pretrain.out_dir=''", "pretrain.out_dir", "empty"),
    ("model.vision.image_size=0", "model.vision.image_size", ">= 1"), ("data.val_fraction=1", "data.val_fraction", "[0, 1)"),
    ("pretrain.l2wrap=-1", "pretrain.l2wrap", ">= 0"), ("model.vision.tiny.patch_size=0", "model.vision.tiny.patch_size", ">= 1"),
    ("hardware.ds_bucket_mb=0", "hardware.ds_bucket_mb", ">= 1"), ("model.rwkv.dim_ffn=0", "model.rwkv.dim_ffn", ">= 1"),
    ("pretrain.seed=-1", "pretrain.seed", "[0, 4294967295]"), ("model.rwkv.head_size=0", "model.rwkv.head_size", ">= 1"),
    ("pretrain.max_bad_steps=0", "pretrain.max_bad_steps", ">= 1"), ("hardware.devices=0", "hardware.devices", ">= 1"),
]
for override, key, allowed in RANGES:
    CASES.append((f"recipe {override}", lambda x, o=override: ["pretrain", str(_recipe(x.c, x.data)), o], 1,
                  ("r.yaml", key, allowed)))  # fmt: skip


@case("recipe vocab_size differs from the tokenizer", 1, "model.rwkv.vocab_size", "1000", "65536")
def _(x: Ctx) -> list[str]:
    return ["pretrain", str(_recipe(x.c, x.data)), "model.rwkv.vocab_size=1000"]


@case("recipe invalid utf-8", 1, "r.yaml:", "not utf-8", "byte")
def _(x: Ctx) -> list[str]:
    (x.c / "r.yaml").write_bytes(b"name: tiny\n# \xff\xfe\n")
    return ["pretrain", "r.yaml", "--print-config"]


@case("recipe alias bomb", 1, "r.yaml", "aliases")
def _(x: Ctx) -> list[str]:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    (x.c / "r.yaml").write_text("\n".join(lines) + "\n")
    return ["pretrain", "r.yaml", "--print-config"]


@case("recipe over 1 MB", 1, "r.yaml", "larger than")
def _(x: Ctx) -> list[str]:
    (x.c / "r.yaml").write_text("name: tiny\n#" + "x" * (1 << 20) + "\n")
    return ["pretrain", "r.yaml", "--print-config"]


@case("recipe is a folder", 1, "r.yaml", "folder")
def _(x: Ctx) -> list[str]:
    (x.c / "r.yaml").mkdir()
    return ["pretrain", "r.yaml", "--print-config"]


@case("override with a NUL byte", 1, "override", "out_dir")
def _(x: Ctx) -> list[str]:
    return ["pretrain", str(_recipe(x.c, x.data)), "pretrain.out_dir=a\x00b"]


@case("--resume with --overwrite", 2, "--resume")
def _(x: Ctx) -> list[str]:
    return ["pretrain", str(_recipe(x.c, x.data)), "--resume", "--overwrite"]


@case("out_dir is a file", 1, "out", "is a file")
def _(x: Ctx) -> list[str]:
    (x.c / "out").write_text("precious")
    return ["pretrain", str(_recipe(x.c, x.data))]


@case("fresh pretrain into a finished run", 1, "already holds a run", "--overwrite")
def _(x: Ctx) -> list[str]:
    shutil.copytree(x.model_copy(), x.c / "out")
    return ["pretrain", str(_recipe(x.c, x.data))]


@case("second run while the out_dir lock is held", 1, ".lock", f"process {os.getpid()}")
def _(x: Ctx) -> list[str]:
    (x.c / "out").mkdir()
    (x.c / "out/.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    return ["pretrain", str(_recipe(x.c, x.data)), "--overwrite"]


@case("lock held on another host", 1, ".lock", "host elsewhere")
def _(x: Ctx) -> list[str]:
    (x.c / "out").mkdir()
    (x.c / "out/.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    return ["pretrain", str(_recipe(x.c, x.data)), "--overwrite"]


@case("resume: garbage manifest, bit-flipped last.ckpt, no prev", 1, "no intact checkpoint", "last.ckpt", "crc")
def _(x: Ctx) -> list[str]:
    out = x.c / "out"
    out.mkdir()
    (out / "checkpoints.json").write_text("garbage{")
    data = bytearray((x.model / "last.ckpt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "last.ckpt").write_bytes(bytes(data))
    return ["pretrain", str(_recipe(x.c, x.data)), "--resume"]


@case("records empty", 1, "no usable records in", "pretrain.jsonl")
def _(x: Ctx) -> list[str]:
    d = x.data_copy()
    (d / "pretrain.jsonl").write_text("")
    return ["pretrain", str(_recipe(x.c, d))]


@case("records all invalid", 1, "no usable records in", "3 rejected", "rejects.jsonl")
def _(x: Ctx) -> list[str]:
    d = x.data_copy()
    (d / "pretrain.jsonl").write_bytes(b'{"x": 1}\n[1, 2]\n{"conversations": "\xff"}\n')
    return ["pretrain", str(_recipe(x.c, d))]


@case("records whose images escape the folder", 1, "no usable records in", "rejects.jsonl")
def _(x: Ctx) -> list[str]:
    d = x.data_copy()
    recs = [json.loads(line) for line in (d / "pretrain.jsonl").read_text().splitlines()]
    for i, rec in enumerate(recs):
        rec["image"] = "../../../../../../etc/passwd" if i % 2 else "/etc/passwd"
    (d / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return ["pretrain", str(_recipe(x.c, d))]


@case("finetune: init_from config.yaml not UTF-8", 1, "config.yaml:1", "not utf-8")
def _(x: Ctx) -> list[str]:
    m = x.model_copy()
    (m / "config.yaml").write_bytes(b"name: \xff\n")
    return ["finetune", str(_recipe(x.c, x.data, [f"finetune: {{init_from: {m}, out_dir: {x.c / 'ft'}}}"]))]


CHAT_OPTIONS = [("--temperature", "nan", "temperature"), ("--temperature", "-1", "temperature"),
                ("--top-p", "0", "top_p"), ("--top-p", "1.5", "top_p"), ("--top-k", "-1", "top_k"),
                ("--presence-penalty", "inf", "presence_penalty"), ("--frequency-penalty", "nan", "frequency_penalty")]
for opt, val, key in CHAT_OPTIONS:
    CASES.append((f"chat {opt} {val}", lambda x, o=opt, v=val: x.chat(o, v), 1, (key, val)))
CASES.append(("chat --max-new-tokens 0", lambda x: x.chat("--max-new-tokens", "0"), 2, ("max-new-tokens",)))


def _img_case(name: str, payload: Callable[[], bytes], mention: str) -> None:
    def fn(x: Ctx) -> list[str]:
        (x.c / "img.png").write_bytes(payload())
        return x.chat(image=str(x.c / "img.png"))

    CASES.append((f"chat image {name}", fn, 1, ("img.png", mention)))


_img_case("0-byte", lambda: b"", "not an image")
_img_case("truncated", lambda: _noise_png(64)[:2000], "cannot decode")


@case("chat image decompression bomb", 1, "img.png", "pixels")
def _(x: Ctx) -> list[str]:
    from PIL import Image

    Image.new("1", (20000, 20000)).save(x.c / "img.png")
    return x.chat(image=str(x.c / "img.png"))


@case("chat image missing", 1, "nothere.png", "not found")
def _(x: Ctx) -> list[str]:
    return x.chat(image=str(x.c / "nothere.png"))


@case("chat model config.yaml not UTF-8", 1, "config.yaml:1", "not utf-8")
def _(x: Ctx) -> list[str]:
    m = x.model_copy()
    (m / "config.yaml").write_bytes(b"name: \xff\n")
    return ["chat", "--model", str(m), "--prompt", "hi"]


@case("eval questions not UTF-8", 1, "questions.jsonl:", "not utf-8")
def _(x: Ctx) -> list[str]:
    d = x.data_copy()
    with open(d / "eval/questions.jsonl", "ab") as f:
        f.write(b'{"question_id": 99, "text": "\xff"}\n')
    return x.eval(d)


@case("eval questions empty", 1, "no questions in", "questions.jsonl")
def _(x: Ctx) -> list[str]:
    d = x.data_copy()
    (d / "eval/questions.jsonl").write_text("\n")
    return x.eval(d)


@case("eval answers not UTF-8 on resume", 1, "answers.jsonl:1", "not utf-8")
def _(x: Ctx) -> list[str]:
    (x.c / "ev").mkdir()
    (x.c / "ev/answers.jsonl").write_bytes(b'{"question_id": 0, "text": "\xff"}\n')
    return x.eval(x.data)


@case("eval --out is a file", 1, "ev", "hint")
def _(x: Ctx) -> list[str]:
    (x.c / "ev").write_text("precious")
    return x.eval(x.data)


@case("eval --batch-size 0", 1, "--batch-size")
def _(x: Ctx) -> list[str]:
    return x.eval(x.data, "--batch-size", "0")


@case("eval --max-new-tokens 0", 2, "max-new-tokens")
def _(x: Ctx) -> list[str]:
    return x.eval(x.data, "--max-new-tokens", "0")


@case("eval --shard 3/2", 1, "--shard")
def _(x: Ctx) -> list[str]:
    return x.eval(x.data, "--shard", "3/2")


@case("eval score: answers not UTF-8", 1, "a.jsonl:2", "not utf-8")
def _(x: Ctx) -> list[str]:
    (x.c / "a.jsonl").write_bytes(b'{"question_id": 0, "text": "red"}\n{"question_id": 1, "text": "\xff"}\n')
    return ["eval", "score", "shapes", "--answers", "a.jsonl", "--annotations", str(x.data / "eval/answers.json")]


@case("eval score: annotations not UTF-8", 1, "ann.json:1", "not utf-8")
def _(x: Ctx) -> list[str]:
    (x.c / "a.jsonl").write_text('{"question_id": 0, "text": "red"}\n')
    (x.c / "ann.json").write_bytes(b'{"0": ["\xff"]}')
    return ["eval", "score", "shapes", "--answers", "a.jsonl", "--annotations", "ann.json"]


@case("eval score: annotations not JSON", 1, "ann.json:1", "not valid json")
def _(x: Ctx) -> list[str]:
    (x.c / "a.jsonl").write_text('{"question_id": 0, "text": "red"}\n')
    (x.c / "ann.json").write_text('{"0": ["red"')
    return ["eval", "score", "shapes", "--answers", "a.jsonl", "--annotations", "ann.json"]


@case("eval score: answers missing", 1, "nope.jsonl", "not found")
def _(x: Ctx) -> list[str]:
    return ["eval", "score", "shapes", "--answers", "nope.jsonl", "--annotations", str(x.data / "eval/answers.json")]


@case("eval score: submission under a file", 1, "f", "hint")
def _(x: Ctx) -> list[str]:
    (x.c / "f").write_text("x")
    (x.c / "a.jsonl").write_text('{"question_id": 1, "text": "yes", "prompt": "q"}\n')
    (x.c / "q.jsonl").write_text('{"question_id": 1, "image": "a.jpg", "text": "q"}\n')
    return ["eval", "score", "vqav2-testdev", "--answers", "a.jsonl", "--annotations", "q.jsonl", "--submission", "f/s.json"]


@case("eval merge: damaged run.json", 1, "run.json", "damaged")
def _(x: Ctx) -> list[str]:
    (x.c / "ev").mkdir()
    (x.c / "ev/run.json").write_text("[1, 2")
    (x.c / "ev/answers.jsonl").write_text("")
    return ["eval", "merge", "--out", "ev"]


@case("export --out is the model's own weights", 1, "model.safetensors", "destroy")
def _(x: Ctx) -> list[str]:
    m = x.model_copy()
    return ["export", str(m), "--out", str(m / "model.safetensors")]


@case("export --out is a hard link to the model's weights", 1, "w.pth", "destroy")
def _(x: Ctx) -> list[str]:
    m = x.model_copy()
    os.link(m / "model.safetensors", x.c / "w.pth")
    return ["export", str(m), "--out", "w.pth"]


@case("export --out is a folder", 1, "outdir", "folder")
def _(x: Ctx) -> list[str]:
    (x.c / "outdir").mkdir()
    return ["export", str(x.model), "--out", "outdir"]


@case("export --out under a file", 1, "f", "hint")
def _(x: Ctx) -> list[str]:
    (x.c / "f").write_text("x")
    return ["export", str(x.model), "--out", "f/x.pth"]


@case("export: model dir missing", 1, "nomodel")
def _(x: Ctx) -> list[str]:
    return ["export", "nomodel", "--out", "x.pth"]


@case("export --dtype int3", 2, "int3")
def _(x: Ctx) -> list[str]:
    return ["export", str(x.model), "--out", "x.pth", "--dtype", "int3"]


@case("llava --json not UTF-8 (array)", 1, "d.json:1", "not utf-8")
def _(x: Ctx) -> list[str]:
    _images(x.c)
    (x.c / "d.json").write_bytes(json.dumps(_records()).encode()[:-1] + b', "\xff"]')
    return ["prepare-data", "llava", "--json", "d.json", "--image-folder", "imgs", "--out", "o", "--workers", "1"]


@case("llava --json not UTF-8 (jsonl)", 1, "d.jsonl:4", "not utf-8")
def _(x: Ctx) -> list[str]:
    _images(x.c)
    good = b"".join(json.dumps(r).encode() + b"\n" for r in _records())
    (x.c / "d.jsonl").write_bytes(good + b'{"id": "\xff"}\n')
    return ["prepare-data", "llava", "--json", "d.jsonl", "--image-folder", "imgs", "--out", "o", "--workers", "1"]


@case("llava --out is a file", 1, "o", "is a file")
def _(x: Ctx) -> list[str]:
    _images(x.c)
    (x.c / "d.json").write_text(json.dumps(_records()))
    (x.c / "o").write_text("precious")
    return ["prepare-data", "llava", "--json", "d.json", "--image-folder", "imgs", "--out", "o", "--workers", "1"]


@case("llava image paths escape the folder", 1, "escapes the image folder", "rejects.jsonl")
def _(x: Ctx) -> list[str]:
    _images(x.c)
    (x.c / "d.json").write_text(json.dumps(_records(3, "../../../../../../etc/hostname")))
    return ["prepare-data", "llava", "--json", "d.json", "--image-folder", "imgs", "--out", "o", "--workers", "1"]


@case("llava image path with a NUL byte", 1, "d.json", "rejects.jsonl")
def _(x: Ctx) -> list[str]:
    _images(x.c)
    (x.c / "d.json").write_text(json.dumps(_records(3, "a\x00b.png")))
    return ["prepare-data", "llava", "--json", "d.json", "--image-folder", "imgs", "--out", "o", "--workers", "1"]


@case("llava --image-folder is a file", 1, "imgs", "is a file")
def _(x: Ctx) -> list[str]:
    (x.c / "imgs").write_text("x")
    (x.c / "d.json").write_text(json.dumps(_records()))
    return ["prepare-data", "llava", "--json", "d.json", "--image-folder", "imgs", "--out", "o", "--workers", "1"]


@case("llava --max-reject-fraction 2", 1, "--max-reject-fraction", "[0, 1]")
def _(x: Ctx) -> list[str]:
    _images(x.c)
    (x.c / "d.json").write_text(json.dumps(_records()))
    return ["prepare-data", "llava", "--json", "d.json", "--image-folder", "imgs", "--out", "o", "--workers", "1",
            "--max-reject-fraction", "2"]  # fmt: skip


@case("llava empty array", 1, "d.json", "no records")
def _(x: Ctx) -> list[str]:
    _images(x.c)
    (x.c / "d.json").write_text("[]")
    return ["prepare-data", "llava", "--json", "d.json", "--image-folder", "imgs", "--out", "o", "--workers", "1"]


@case("extract: a file entry, then a child of the same name", 1, "a.tar", "1 unsafe", "'a/b'")
def _(x: Ctx) -> list[str]:
    _tar(x.c / "a.tar", [("a", b"file", tarfile.REGTYPE), ("a/b", b"child", tarfile.REGTYPE)])
    return ["prepare-data", "extract", "a.tar", "--out", "o"]


@case("extract: traversal, absolute and links in one line", 1, "a.tar", "13 unsafe", "and 10 more")
def _(x: Ctx) -> list[str]:
    members = [("../evil", b"x", tarfile.REGTYPE), ("/abs", b"x", tarfile.REGTYPE), ("ln", "/etc/passwd", tarfile.SYMTYPE),
               ("ok.txt", b"fine", tarfile.REGTYPE)] + [(f"../e{i}", b"x", tarfile.REGTYPE) for i in range(10)]
    _tar(x.c / "a.tar", members)  # type: ignore[arg-type]
    return ["prepare-data", "extract", "a.tar", "--out", "o"]


@case("extract --out is a file", 1, "o", "is a file")
def _(x: Ctx) -> list[str]:
    _tar(x.c / "a.tar", [("ok.txt", b"fine", tarfile.REGTYPE)])
    (x.c / "o").write_text("precious")
    return ["prepare-data", "extract", "a.tar", "--out", "o"]


@case("extract: random bytes", 1, "a.tar", "not a zip or tar")
def _(x: Ctx) -> list[str]:
    (x.c / "a.tar").write_bytes(b"\x01\x02not an archive" * 300)
    return ["prepare-data", "extract", "a.tar", "--out", "o"]


@case("extract: truncated tar.gz", 1, "a.tar.gz", "damaged")
def _(x: Ctx) -> list[str]:
    raw = _tar(x.c / "t.tar", [("ok.txt", os.urandom(20000), tarfile.REGTYPE)]).read_bytes()
    gz = gzip.compress(raw)
    (x.c / "a.tar.gz").write_bytes(gz[: len(gz) // 2])
    return ["prepare-data", "extract", "a.tar.gz", "--out", "o"]


@case("extract: zip with a traversal member", 1, "a.zip", "1 unsafe", "../../x.txt")
def _(x: Ctx) -> list[str]:
    with zipfile.ZipFile(x.c / "a.zip", "w") as z:
        z.writestr("../../x.txt", "x")
        z.writestr("ok.txt", "fine")
    return ["prepare-data", "extract", "a.zip", "--out", "o"]


@case("synthetic-shapes --out is a file", 1, "o", "is a file")
def _(x: Ctx) -> list[str]:
    (x.c / "o").write_text("precious")
    return ["prepare-data", "synthetic-shapes", "--out", "o", "--train", "2", "--eval", "1"]


for argv, opt in [(["bench", "wkv", "-T", "-5"], "-T"), (["bench", "wkv", "--threads", "0"], "--threads"),
                  (["bench", "wkv", "-B", "0"], "-B"), (["bench", "wkv", "-H", "0"], "-H"),
                  (["bench", "lm", "--threads", "0"], "--threads"), (["bench", "lm", "-T", "0"], "-T"),
                  (["bench", "lm", "--decode-tokens", "0"], "--decode-tokens"),
                  (["bench", "generate", "--threads", "-1"], "--threads")]:
    CASES.append((" ".join(argv), lambda x, a=argv: a, 2, (opt,)))


@case("download --dir is a file", 1, "d", "is a file")
def _(x: Ctx) -> list[str]:
    (x.c / "d").write_text("x")
    return ["download", "rwkv7-world-0b1", "--dir", "d"]


@case("download --dir under a file", 1, "d/sub", "which is a file")
def _(x: Ctx) -> list[str]:
    (x.c / "d").write_text("x")
    return ["download", "rwkv7-world-0b1", "--dir", "d/sub"]


@case("download unknown name", 1, "nosuch-model")
def _(x: Ctx) -> list[str]:
    return ["download", "nosuch-model"]


# --------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def env(tiny_trained) -> dict:
    return {"data": tiny_trained["data"], "model": tiny_trained["pretrain"]}


@pytest.mark.parametrize("name,setup,code,mention", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(name, setup, code, mention, env, tmp_path, monkeypatch, capsys):
    from vrwkv_cli.main import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = setup(Ctx(tmp_path, env))
    before = _sha_tree(tmp_path)
    got = run(argv)
    out, err = capsys.readouterr()
    assert got == code, f"exit {got}, expected {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip() and "━" not in line]  # progress bars aside
    assert len(lines) <= (6 if code == 2 else 4), err  # Typer's usage box is 5 lines
    for word in mention:
        assert word.lower() in err.lower(), f"{word!r} not in: {err}"
    after = _sha_tree(tmp_path)
    assert {k: after.get(k) for k in before} == before, "a file that existed before the run changed"


def test_shared_model_untouched(env):
    """The cases read the shared model; none may have changed it (they ran before this one)."""
    cfg = env["model"] / "config.yaml"
    assert cfg.is_file() and (env["model"] / "model.safetensors").is_file()
    assert "Traceback" not in cfg.read_text()


def test_chat_save_under_a_file_keeps_the_session(env, tmp_path, monkeypatch, capsys):
    """/save into a path whose folder is a file is one error line; the next question still works."""
    from vrwkv_cli.main import run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("x")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/save f/state\nhi again\n/save ok/state\n/quit\n"))
    code = run(["chat", "--model", str(env["model"]), "--max-new-tokens", "1"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in out + err
    assert "f/state: cannot save the chat state" in err and "a part of the path is a file" in err
    assert (tmp_path / "ok/state").is_file() and (tmp_path / "f").read_text() == "x"


def test_eval_drops_a_torn_last_answer_and_reports_escaping_images(env, tmp_path, monkeypatch, capsys):
    """A crash mid-line leaves a torn last line: resume drops it, keeps the good ones, and a
    question whose image escapes the image folder is reported by its id, not read."""
    from vrwkv_cli.main import run

    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    qs = [json.loads(line) for line in (data / "eval/questions.jsonl").read_text().splitlines()]
    qs[1]["image"], qs[1]["question_id"] = "../../../../../etc/passwd", "escape-me"
    (data / "eval/questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    ev = tmp_path / "ev"
    argv = ["eval", "--model", str(env["model"]), "--benchmark", "shapes", "--data-root", str(data), "--out", str(ev),
            "--max-new-tokens", "1", "--limit", "3"]  # fmt: skip
    assert run(argv) == 0
    good = (ev / "answers.jsonl").read_bytes()
    (ev / "answers.jsonl").write_bytes(good + b'{"question_id": "to')
    capsys.readouterr()
    assert run(argv) == 0
    out, err = capsys.readouterr()
    assert "escape-me" in err and "escapes" in err
    assert (ev / "answers.jsonl").read_bytes() == good  # torn line dropped, answered ones kept
    assert len(good.splitlines()) == 2  # the escaping question was never answered


@pytest.mark.parametrize("kind", ["CMYK jpeg", "16-bit png", "palette+alpha png", "animated gif"])
def test_odd_but_valid_images_work(kind, tmp_path):
    """CMYK, 16-bit, palette with transparency and animated GIFs (first frame) load as RGB."""
    from PIL import Image

    from vrwkv_core.infer import load_image

    path = tmp_path / "img"
    if kind == "CMYK jpeg":
        Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, "JPEG")
    elif kind == "16-bit png":
        Image.new("I;16", (16, 16), 65535).save(path, "PNG")
    elif kind == "palette+alpha png":
        Image.new("P", (16, 16), 3).save(path, "PNG", transparency=0)
    else:
        frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
        frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=50)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (16, 16)
    if kind == "CMYK jpeg":
        assert im.getpixel((8, 8))[0] > 200 and im.getpixel((8, 8))[1] < 60  # CMY(0,1,1) is red
    if kind == "animated gif":
        assert im.getpixel((8, 8))[0] > 200 and im.getpixel((8, 8))[1] < 60  # the first (red) frame


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    """A lock whose process is gone (on this host) is replaced with a warning; ours is removed after."""
    from vrwkv_core.train.outdir import OutDirLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    logs: list[str] = []

    class P:
        def log(self, m: str) -> None:
            logs.append(m)

    with OutDirLock(tmp_path, P()) as lock:  # type: ignore[arg-type]
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid() and lock.held
    assert not (tmp_path / ".lock").exists()
    assert len(logs) == 1 and f"process {dead.pid}" in logs[0] and "stale" in logs[0]


def test_resume_falls_back_to_an_intact_prev_without_a_manifest(tiny_trained, tmp_path):
    """Garbage manifest, damaged last.ckpt, intact prev.ckpt: prev is taken, with a warning."""
    from vrwkv_core.train.checkpoints import find_resumable

    src = tiny_trained["pretrain"]
    (tmp_path / "prev.ckpt").write_bytes((src / "last.ckpt").read_bytes())
    data = bytearray((src / "last.ckpt").read_bytes())
    data[len(data) // 3] ^= 0x01
    (tmp_path / "last.ckpt").write_bytes(bytes(data))
    (tmp_path / "checkpoints.json").write_text("{not json")
    path, entry, warnings = find_resumable(tmp_path)
    assert path.name == "prev.ckpt" and entry is None
    assert any("skipped last.ckpt" in w and "CRC" in w for w in warnings)
    assert any("falling back to prev.ckpt (step 6)" in w for w in warnings)


@pytest.mark.slow
def test_ctrl_c_during_training_saves_and_exits_130(tiny_trained, tmp_path):
    """SIGINT mid-run: the step finishes, last.ckpt is saved, one line, exit code 130; --resume continues."""
    import time

    out = tmp_path / "out"
    overrides = [o for o in tiny_trained["overrides"] if not o.startswith("pretrain.")] + [
        f"pretrain.out_dir={out}", "pretrain.max_steps=100000", "pretrain.micro_batch=2", "pretrain.val_every_steps=0",
        "pretrain.save_every_steps=0"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", "from vrwkv_cli.main import main; main()", "pretrain",
                             str(REPO / "recipes/tiny.yaml"), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not (out / ".lock").exists():
        time.sleep(0.5)
    time.sleep(15)  # into the training loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(last) == 1 and "interrupted at step" in last[0] and "resume with --resume" in last[0]
    assert (out / "last.ckpt").is_file() and not (out / ".lock").exists()
