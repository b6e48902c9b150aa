"""`vrwkv bench generate`: RNN-mode generation vs re-encoding, and the image-state cache.

Two comparisons, each on one set of random weights in this process
(`torch.set_num_threads(threads)`):

1. Generation with `image_rows` random embeddings standing in for projected image
   features (towers excluded) + `prompt_tokens` ids, then `new_tokens` greedy tokens:
   RNN mode (prefill once, one state-carried step per token) against re-encoding the
   whole sequence for every new token (the research code's method; logits of the last
   position only, which favours it). In float32 both must produce the same tokens
   (asserted); in bf16 the two summation orders drift apart after some tokens, and the
   row reports how many leading tokens agree.
   The LM is RWKV-7 0.1B-shaped (L12 D768, `lm="0b1"`), `small` (L6 D512) or `tiny` (L2 D128).
2. Time to first token of a second question about the same image, with the image-state
   cache (the question's few tokens) against without it (towers + image prefill again),
   through `ChatSession`, on the released 0b1 layout (`cache_towers="full"`: DINOv2-L,
   SigLIP-SO400M, SAM-B, 1024 image tokens, ~1B parameters) or with the `tiny` tower at
   1024 image tokens (`cache_towers="tiny"`: the LM side of the cost only).

`quant` (fp16, int8, int4) quantizes the language model of both comparisons.

    python -c "from vrwkv_core.bench.generate import run_generate_bench; print(run_generate_bench())"
"""

from __future__ import annotations

import time
from typing import Any

import torch
from PIL import Image

from vrwkv_core.bench.lm import random_rwkv7_weights
from vrwkv_core.config import ModelSection, RWKVSection, TinyTowerSection, VisionSection
from vrwkv_core.infer.chat import ChatSession
from vrwkv_core.infer.loading import resolve_device, resolve_dtype
from vrwkv_core.infer.quantize import quantize
from vrwkv_core.model.rwkv.rwkv7 import RWKV7
from vrwkv_core.model.visual_rwkv import VisualRWKV
from vrwkv_core.progress import Progress

LM_SHAPES = {
    "0b1": RWKVSection(n_layer=12, n_embd=768),  # the released 0.1B
    "small": RWKVSection(n_layer=6, n_embd=512),
    "tiny": RWKVSection(n_layer=2, n_embd=128),
}


def _lm(shape: str, device: torch.device, dtype: torch.dtype):
    return RWKV7.from_state_dict(random_rwkv7_weights(LM_SHAPES[shape], seed=0), device=device, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bench_rnn_vs_reencode(
    lm_shape: str = "0b1",
    image_rows: int = 1024,
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quant: str | None = None,
) -> list[dict[str, Any]]:
    """Rows for RNN mode and re-encoding on the same weights and inputs (greedy)."""
    device = torch.device(device)
    lm = _lm(lm_shape, device, dtype)
    if quant:
        quantize(lm, quant)
    g = torch.Generator().manual_seed(1)
    image = (torch.randn(1, image_rows, lm.n_embd, generator=g) * 0.5).to(device, dtype)  # [1, R, C]
    ids = torch.randint(300, 60000, (1, prompt_tokens), generator=g).to(device)
    prompt = torch.cat([image, lm.emb(ids)], dim=1)  # image rows first, as in the v7.00 prompt
    out, state = lm(embeds=prompt[:, :64], logits="last")  # warm-up (a CUDA kernel builds here)
    lm(ids[:, :1], state=state, logits="last")

    _sync(device)
    t0 = time.perf_counter()
    out, state = lm(embeds=prompt, logits="last")
    rnn_tokens = [int(out[0, -1].argmax())]
    _sync(device)
    rnn_ttft = time.perf_counter() - t0
    for _ in range(new_tokens - 1):
        out, state = lm(torch.tensor([[rnn_tokens[-1]]], device=device), state=state, logits="last")
        rnn_tokens.append(int(out[0, -1].argmax()))
    _sync(device)
    rnn_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    re_tokens: list[int] = []
    re_ttft = 0.0
    for _ in range(new_tokens):
        new = lm.emb(torch.tensor([re_tokens], dtype=torch.long, device=device)) if re_tokens else prompt[:, :0]
        out, _ = lm(embeds=torch.cat([prompt, new], dim=1), logits="last")
        re_tokens.append(int(out[0, -1].argmax()))
        if len(re_tokens) == 1:
            _sync(device)
            re_ttft = time.perf_counter() - t0
    _sync(device)
    re_s = time.perf_counter() - t0
    same = next((i for i, (a, b) in enumerate(zip(rnn_tokens, re_tokens)) if a != b), new_tokens)
    if same < new_tokens and dtype == torch.float32 and not quant:  # bf16 activations drift as bf16 does
        raise AssertionError(f"greedy outputs differ at new token {same}: RNN {rnn_tokens[same]} vs re-encode {re_tokens[same]}")
    what = f"{lm_shape} LM, {image_rows} image rows + {prompt_tokens} tokens, {new_tokens} new"
    common = {"case": what, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "quant": quant}
    return [
        {**common, "method": "re-encode per token", "seconds": round(re_s, 3), "ttft_s": round(re_ttft, 4),
         "tokens_per_s": round(new_tokens / re_s, 2), "speedup": 1.0},
        {**common, "method": "RNN mode", "seconds": round(rnn_s, 3), "ttft_s": round(rnn_ttft, 4),
         "tokens_per_s": round(new_tokens / rnn_s, 2), "speedup": round(re_s / rnn_s, 1),
         "same_tokens": f"{same}/{new_tokens}"},
    ]  # fmt: skip


CACHE_MODELS = {
    # the released 0b1 layout: dino + siglip at 448, sam at 1024
    "full": ModelSection(rwkv=LM_SHAPES["0b1"], vision=VisionSection(), tokens_per_image=1024),
    # 256 / 8 = 32x32 patches = 1024 image tokens, like the released models
    "tiny": ModelSection(rwkv=LM_SHAPES["0b1"], tokens_per_image=1024, vision=VisionSection(
        towers=["tiny"], image_size=256, tiny=TinyTowerSection(width=64, depth=2, heads=2, patch_size=8))),
}


def _cache_model_cfg(towers: str) -> ModelSection:
    if towers not in CACHE_MODELS:
        raise ValueError(f"cache_towers must be one of {', '.join(CACHE_MODELS)}, got {towers!r}")
    return CACHE_MODELS[towers]


@torch.no_grad()
def bench_image_cache(
    towers: str = "full",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    quant: str | None = None,
) -> list[dict[str, Any]]:
    """TTFT of a second question about the same image: cached image state vs none."""

    device = torch.device(device)
    cfg = _cache_model_cfg(towers)
    with torch.device("cpu"):
        vlm = VisualRWKV(cfg)
    vlm.rwkv.load_state_dict(random_rwkv7_weights(cfg.rwkv, seed=0))
    vlm = vlm.to(device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in vlm.parameters())  # before quantization turns matrices into buffers
    if quant:
        quantize(vlm, quant)
    g = torch.Generator().manual_seed(2)
    pixels = (torch.rand(480, 640, 3, generator=g) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    questions = ["What is in the image?", "What color is the largest object?"]

    def ttft(session: ChatSession, question: str) -> float:
        session.reset()
        result = session.ask(question, max_new_tokens=1).run()
        _sync(device)
        assert result.ttft_s is not None
        return result.ttft_s

    cached = ChatSession(vlm, cache_size=4)
    cached.add_image(image)
    ttft(cached, questions[0])  # the first question fills the cache
    with_cache = min(ttft(cached, questions[1]) for _ in range(repeats))
    assert cached.cache_hits == repeats
    uncached = ChatSession(vlm, cache_size=0)  # (the model is warm from the first question)
    uncached.add_image(image)
    without = ttft(uncached, questions[1])
    common = {"case": f"second question, 0b1 LM + {towers} towers ({n_params / 1e9:.2f}B params), 1024 image tokens",
              "device": str(device), "dtype": str(dtype).removeprefix("torch."), "quant": quant}  # fmt: skip
    return [
        {**common, "method": "no image cache", "ttft_s": round(without, 4), "speedup": 1.0},
        {**common, "method": "image-state cache", "ttft_s": round(with_cache, 4), "speedup": round(without / with_cache, 1)},
    ]


def run_generate_bench(
    threads: int = 2,
    lm: str = "auto",
    cache_towers: str = "auto",
    device: str = "auto",
    dtype: str = "fp32",
    progress: Progress | None = None,
    quant: str | None = None,
) -> list[dict[str, Any]]:
    """Both comparisons; rows with `method`, timings and `speedup` over the slow method.

    "auto" picks what finishes in about two minutes: on CPU the `small` LM and the `tiny`
    tower for the cache rows (the full towers take minutes per image there), on CUDA the
    0.1B-shaped LM and the full released tower set.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if lm == "auto":
        lm = "0b1" if dev.type == "cuda" else "small"
    if cache_towers == "auto":
        cache_towers = "full" if dev.type == "cuda" else "tiny"
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if progress is not None:
            progress.log(f"RNN mode vs re-encoding ({lm} LM) ...")
        rows = bench_rnn_vs_reencode(lm, device=dev, dtype=dt, quant=quant)
        if progress is not None:
            progress.log(f"image-state cache ({cache_towers} towers) ...")
        rows += bench_image_cache(cache_towers, device=dev, dtype=dt, quant=quant)
    finally:
        torch.set_num_threads(old_threads)
    return rows


__all__ = ["bench_image_cache", "bench_rnn_vs_reencode", "run_generate_bench"]
