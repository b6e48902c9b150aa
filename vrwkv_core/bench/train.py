"""`vrwkv bench train`: what one training step costs with full finetuning, LoRA and state tuning.

For the LM alone (no towers; RWKV-7 0.1B shape by default: L12 D768, vocab 65536, untied head,
191M parameters, random weights), each method trains `steps` AdamW steps on random ids
[batch, T] after one warm-up step, as the trainer would run it: gradient checkpointing on
(hardware.grad_checkpoint; `grad_checkpoint=False` keeps every block's activations) and the
head + loss only on the labelled positions (the answer: the last `labelled` share of each
sample). It reports trainable parameters (and their share of the LM's), peak memory and the
median step time. Peak memory: on CUDA the allocator's peak above what was allocated before
the model; on CPU the process's peak RSS (ru_maxrss, its high-water mark restarted once the
model is built so init temporaries do not count) above its RSS before the model, each method
in a fresh spawned process so one method's peak cannot mask another's, with glibc told to
give freed large blocks back (MALLOC_MMAP_THRESHOLD_), so the RSS follows live tensors.

- full: every LM weight but the embedding trains (the released finetune freezes rwkv.emb);
- lora: rank `rank` adapters through `peft` on the recipe's default targets (att r/k/v/o, ffn value);
- lora-all: the same on all six matrices (ffn key too);
- lora-att: the same on the time mix's four matrices only;
- state: the learned initial WKV state [L, H, N, N] only.

    python -c "from vrwkv_core.bench.train import run_train_bench; print(run_train_bench(n_layer=2, n_embd=128, vocab=1000, T=32))"
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch

from vrwkv_core.checkpoint.adapters import inject
from vrwkv_core.config import DEFAULT_PEFT_TARGETS, PEFT_TARGETS, PeftSection, RWKVSection
from vrwkv_core.data.conversation import IGNORE_INDEX
from vrwkv_core.kernels.head_loss import linear_cross_entropy
from vrwkv_core.model.rwkv.rwkv7 import RWKV7

METHODS = ("full", "lora", "lora-all", "lora-att", "state")
LORA_TARGETS = {"lora": list(DEFAULT_PEFT_TARGETS), "lora-all": list(PEFT_TARGETS),
                "lora-att": [t for t in PEFT_TARGETS if t.startswith("att.")]}  # fmt: skip
WHAT = {"full": "all but emb", "lora": "default: att + ffn.value (5 matrices)", "lora-all": "att + ffn (6 matrices)",
        "lora-att": "att only (4 matrices)",
        "state": "initial WKV state"}  # fmt: skip
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc: a fixed threshold also stops its dynamic raising


def _rss_bytes() -> int:
    """The current resident set size (Linux /proc), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak_rss() -> None:
    """Restarts the peak RSS from the current RSS (Linux >= 4.0), so temporaries of building the
    model and its init are not counted as training memory; a no-op where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def answer_labels(ids: torch.Tensor, labelled: float) -> torch.Tensor:
    """Labels [B, T] for ids [B, T+1] laid out as the trainer's (position t predicts labels[t+1]):
    the last `labelled` share of each sample is the answer, the rest IGNORE_INDEX."""
    labels = ids[:, :-1].clone()
    n = max(1, round(labelled * (labels.shape[1] - 1)))
    labels[:, : labels.shape[1] - n] = IGNORE_INDEX
    return labels


def labelled_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """Mean next-token CE with the head applied only where labels are set and in vocabulary
    blocks, as the trainer's `sequence_loss` does (bench/ may not import train/): no [B, T, V]
    logits for the prompt, no [rows, V] logits held for the answer."""
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX  # [B, T-1]
    return linear_cross_entropy(hidden[:, :-1][valid], head.weight, targets[valid]).mean()


def build_lm(method: str, cfg: dict[str, Any]) -> tuple[RWKV7, int]:
    """The LM on cfg's device, set up for the method (frozen parts, adapters or learned state,
    grad checkpointing as cfg says) in training mode; (lm, its parameter count before adapters)."""
    section = RWKVSection(n_layer=cfg["n_layer"], n_embd=cfg["n_embd"], vocab_size=cfg["vocab"],
                          head_size=cfg["head_size"], wkv_backend="auto")  # fmt: skip
    with torch.device(cfg["device"]):
        lm = RWKV7(section)
        total = sum(p.numel() for p in lm.parameters())
        if method == "full":
            lm.emb.requires_grad_(False)
        elif method == "state":
            lm.requires_grad_(False)
            lm.enable_state_tuning()
        else:
            lm.requires_grad_(False)
            inject(lm, PeftSection(method="lora", r=cfg["rank"], alpha=cfg["alpha"], targets=LORA_TARGETS[method]))
    lm.grad_checkpoint = cfg["grad_checkpoint"]
    return lm.train(), total


@contextlib.contextmanager
def _returning_malloc() -> Iterator[None]:
    """Environment for a spawned child whose glibc malloc gives freed blocks of >= 64 KiB back to
    the OS: by default it raises that threshold to 32 MiB after the first frees and keeps
    freed activations in the heap, so the peak RSS would count the allocator's hoard."""
    old = os.environ.get(MMAP_ENV)
    os.environ[MMAP_ENV] = str(64 * 1024)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(MMAP_ENV, None)
        else:
            os.environ[MMAP_ENV] = old


def measure(method: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """One method's row (runs in this process; see `run_train_bench` for fresh processes)."""
    importlib.import_module("peft")  # before the baseline: its import (transformers) is not training memory
    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_bytes()
    lm, total = build_lm(method, cfg)
    params = [p for p in lm.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type in ("cpu", "cuda"))
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["T"] + 1), device=device)
    labels = answer_labels(ids, cfg["labelled"])
    if not cuda:
        _reset_peak_rss()
    times = []
    for step in range(cfg["steps"] + 1):  # step 0 warms up (allocations, kernel builds)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        hidden, _ = lm(ids[:, :-1], logits="hidden")
        labelled_loss(hidden, labels, lm.head).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()) - before
    return {"method": method, "trains": WHAT[method], "trainable": trainable, "lm_params": total,
            "trainable_pct": round(100 * trainable / total, 3), "peak_mib": round(peak / 2**20, 1),
            "step_s": round(statistics.median(times), 4)}  # fmt: skip


def _child(method: str, cfg: dict[str, Any], queue: Any) -> None:
    try:
        queue.put(measure(method, cfg))
    except BaseException as err:  # reported by the parent as one line
        queue.put({"method": method, "error": f"{type(err).__name__}: {err}"})


def run_train_bench(
    n_layer: int = 12, n_embd: int = 768, vocab: int = 65536, head_size: int = 64, T: int = 512, batch: int = 1,
    steps: int = 2, rank: int = 64, alpha: float = 128.0, threads: int = 2, device: str = "auto",
    methods: tuple[str, ...] = METHODS, grad_checkpoint: bool = True, labelled: float = 0.25,
) -> list[dict[str, Any]]:  # fmt: skip
    """Rows {method, trains, trainable, lm_params, trainable_pct, peak_mib, step_s, mem_vs_full}, one
    per method. `labelled`: the share of each sample that is the answer (loss positions), in (0, 1]."""
    if not 0.0 < labelled <= 1.0:
        raise ValueError(f"labelled must be in (0, 1], got {labelled}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = {"n_layer": n_layer, "n_embd": n_embd, "vocab": vocab, "head_size": head_size, "T": T, "batch": batch,
           "steps": steps, "rank": rank, "alpha": alpha, "threads": threads, "device": device,
           "grad_checkpoint": grad_checkpoint, "labelled": labelled}  # fmt: skip
    rows = []
    ctx = mp.get_context("spawn")
    for method in methods:
        if device.startswith("cuda"):
            rows.append(measure(method, cfg))  # the allocator's peak resets per method
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(method, cfg, queue))
        with _returning_malloc():
            proc.start()
        row = queue.get()
        proc.join()
        if "error" in row:
            raise RuntimeError(f"bench train {method}: {row['error']}")
        rows.append(row)
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        r["mem_vs_full"] = round(r["peak_mib"] / full["peak_mib"], 3) if full and full["peak_mib"] > 0 else None
    return rows
