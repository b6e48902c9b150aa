"""Training forward that runs each shared image prefix once and branches the RNN state.

Records about the same image (one question each, say) all start with the same tokens up to
the image's last placeholder: "User: <16 image rows>". A transformer must run that prefix
for every record; RWKV's whole past is its state, so `branched_hidden` runs each distinct
prefix once, copies its final state to every record that shares it, and runs only the rest
of each record from there. The rests (and the records without an image, from the model's
start state) are grouped into a few length buckets, so a batch of short questions is not
padded to its longest one. The result is the same hidden sequence
[B, T, C] as the plain forward (up to float rounding: the chunked kernel splits the
sequence at another place), so the loss and its gradients are unchanged; only the work is
less. The sampler's `group_size` (`data.dataset.ResumableSampler`) puts records of one
image into the same batch, which is what makes prefixes shared.

    hidden = branched_hidden(model, batch)   # batch from data.dataset.collate
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vrwkv_core.data.conversation import IMAGE_TOKEN_ID, PAD_TOKEN_ID
from vrwkv_core.model.rwkv.state import RWKVState

if TYPE_CHECKING:
    from vrwkv_core.model.visual_rwkv import VisualRWKV

MAX_BUCKETS = 4  # each bucket is one more forward call: a few cover the usual length spread


def length_buckets(lengths: list[int], max_buckets: int = MAX_BUCKETS) -> list[list[int]]:
    """Row indices split into at most `max_buckets` groups of similar length, chosen to
    minimise the padded total sum(len(group) * max length in group) (a small dynamic
    programme over the sorted distinct lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    distinct = sorted(set(lengths))
    count = [sum(1 for n in lengths if n == d) for d in distinct]
    D = len(distinct)
    k_max = min(max_buckets, D)
    # cost[j][k]: least padded total of distinct[:j] in k buckets; cut[j][k]: where the last one starts
    inf = float("inf")
    cost = [[inf] * (k_max + 1) for _ in range(D + 1)]
    cut = [[0] * (k_max + 1) for _ in range(D + 1)]
    cost[0][0] = 0
    for j in range(1, D + 1):
        for k in range(1, k_max + 1):
            rows = 0
            for i in range(j - 1, -1, -1):  # the last bucket holds distinct[i:j]
                rows += count[i]
                c = cost[i][k - 1] + rows * distinct[j - 1]
                if c < cost[j][k]:
                    cost[j][k], cut[j][k] = c, i
    k = min(range(1, k_max + 1), key=lambda kk: cost[D][kk]) if D else 0
    bounds, j = [], D
    while k > 0:
        bounds.append((cut[j][k], j))
        j, k = cut[j][k], k - 1
    groups, pos = [], 0
    for lo, hi in reversed(bounds):
        n = sum(count[lo:hi])
        groups.append(order[pos : pos + n])
        pos += n
    return groups


def prefix_lengths(input_ids: torch.Tensor) -> list[int]:
    """Per row, the position right after its last image placeholder (0 without images)."""
    B, T = input_ids.shape
    is_image = input_ids == IMAGE_TOKEN_ID
    last = torch.where(is_image, torch.arange(T, device=input_ids.device), torch.full_like(input_ids, -1)).amax(dim=1)
    return (last + 1).tolist()


def _row_images(images: Any, counts: list[int], rows: list[int]) -> Any:
    """The stacked images (tensor or {tower: tensor}) of `rows`, in row order."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    pick = torch.tensor([i for r in rows for i in range(starts[r], starts[r + 1])], dtype=torch.long)
    if isinstance(images, dict):
        return {key: t[pick.to(t.device)] for key, t in images.items()}
    return images[pick.to(images.device)]


def branched_hidden(model: "VisualRWKV", batch: dict[str, Any]) -> torch.Tensor:
    """The LM's final hidden states [B, T, C] for a collated batch, each distinct image prefix
    run once (see the module docstring). Positions past a row's length are zeros."""
    ids = batch["input_ids"]
    B, T = ids.shape
    lengths = [int(n) for n in batch["lengths"]]
    keys = [int(k) for k in batch["image_keys"]]
    counts = [int(c) for c in batch["image_counts"]]
    plen = prefix_lengths(ids)

    # distinct prefixes: the same images (their key) and the same tokens up to the last one
    prefix_of: list[int] = []  # row -> prefix index, -1 for rows without images
    firsts: list[int] = []  # prefix index -> first row that has it
    seen: dict[tuple, int] = {}
    for r in range(B):
        if plen[r] == 0:
            prefix_of.append(-1)
            continue
        key = (keys[r], tuple(ids[r, : plen[r]].tolist()))
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(r)
        prefix_of.append(seen[key])

    pieces: list[torch.Tensor] = []  # flattened [n*len, C] hidden blocks, gathered at the end
    offset = 0
    where = torch.full((B, T), -1, dtype=torch.long)  # (row, t) -> row of torch.cat(pieces)
    states: list[RWKVState] = []
    runs = sorted(range(len(firsts)), key=lambda u: plen[firsts[u]])  # prefixes by length, run order
    first_row = {}  # prefix index -> its first row in torch.cat(pieces)
    for P in sorted({plen[r] for r in firsts}):
        rows = [firsts[u] for u in runs if plen[firsts[u]] == P]
        embeds = model.embed(ids[rows, :P], _row_images(batch["images"], counts, rows),
                             torch.tensor([counts[r] for r in rows]), bool(batch.get("partial_images")))
        h, st = model.rwkv(embeds=embeds, logits="hidden")
        pieces.append(h.reshape(-1, h.shape[-1]))
        states.append(st)
        for j, r in enumerate(rows):
            first_row[prefix_of[r]] = offset + j * P
        offset += len(rows) * P
    for r in range(B):
        if prefix_of[r] >= 0:
            where[r, : plen[r]] = first_row[prefix_of[r]] + torch.arange(plen[r])
    # the rests, each from its prefix's state or, without an image, from the model's start
    # state, all in one set of length buckets; their embeddings in one lookup (each lookup's
    # backward writes a vocabulary-sized gradient), and each bucket gathered with one index (a
    # slice per row would add a batch-sized gradient per row)
    token_embeds = model.embed(ids.masked_fill(ids == IMAGE_TOKEN_ID, PAD_TOKEN_ID))  # prefixes are not read from it
    token_embeds = torch.cat([token_embeds.reshape(B * T, -1), token_embeds.new_zeros(1, token_embeds.shape[-1])])
    rows = [r for r in range(B) if lengths[r] > plen[r]]
    state_row = {u: i for i, u in enumerate(runs)}  # RWKVState.cat(states) holds the prefixes in run order
    fresh = [r for r in rows if prefix_of[r] < 0]  # text-only rows: after the prefixes in the cat
    if fresh:
        states.append(model.rwkv.start_state(len(fresh), token_embeds))
    fresh_row = {r: len(runs) + j for j, r in enumerate(fresh)}
    state_of = {r: state_row[prefix_of[r]] if prefix_of[r] >= 0 else fresh_row[r] for r in rows}
    start = RWKVState.cat(states) if states else None
    for bucket in length_buckets([lengths[r] - plen[r] for r in rows]):
        sel = [rows[i] for i in bucket]
        S = max(lengths[r] - plen[r] for r in sel)
        pick = torch.full((len(sel), S), B * T, dtype=torch.long)  # B * T: the zero row
        for j, r in enumerate(sel):
            pick[j, : lengths[r] - plen[r]] = r * T + plen[r] + torch.arange(lengths[r] - plen[r])
        rest = token_embeds.index_select(0, pick.view(-1).to(token_embeds.device)).view(len(sel), S, -1)
        h, _ = model.rwkv(embeds=rest, state=start.select([state_of[r] for r in sel]), logits="hidden")
        pieces.append(h.reshape(-1, h.shape[-1]))
        for j, r in enumerate(sel):
            n = lengths[r] - plen[r]
            where[r, plen[r] : plen[r] + n] = offset + j * S + torch.arange(n)
        offset += len(sel) * S
    flat = torch.cat(pieces + [pieces[0].new_zeros(1, pieces[0].shape[-1])])
    where[where < 0] = offset  # padding reads the zero row
    return flat.index_select(0, where.view(-1).to(flat.device)).view(B, T, -1)


__all__ = ["branched_hidden", "length_buckets", "prefix_lengths", "MAX_BUCKETS"]
