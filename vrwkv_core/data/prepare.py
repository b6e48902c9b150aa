"""`prepare-data llava`: check a LLaVA JSON/JSONL file and its images, write clean data.

Outputs in `out_dir` (each written atomically):
- `data.jsonl`    good records, normalised (image always a list, markers at the front
                  of human turns, roles lower case), in source order or shuffled;
- `rejects.jsonl` `{index, line, id, reason, detail}` per rejected record;
- `stats.json`    counts, the reject-reason histogram, length percentiles (tokens when
                  `tokens_per_image` is given, else characters), records/s, and under
                  `rounds` what `--max-rounds` did (`rounds.py`: the original's clean + split);
- `lengths.png`   a histogram of those lengths.

Memory stays bounded on a 665k-record file: the input is streamed (see `sources.py`),
records go to worker processes (`RecordPipeline`) in chunks of 256 with at most four
chunks per worker in flight (plain `Pool.imap` would read the whole input ahead), and
results are written as they come back, in source order. Only one int per record (its length) and, when shuffling, one
file offset per good record are kept.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import sys
import time
from array import array
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from vrwkv_core.data.conversation import Tokenizer
from vrwkv_core.data.rounds import RoundStats, split_rounds
from vrwkv_core.data.sources import SourceItem, detect_format, iter_records
from vrwkv_core.data.validate import INVALID_JSON, CheckResult, ImageLimits, RecordChecker, make_checker
from vrwkv_core.errors import DataError
from vrwkv_core.fsutil import atomic_open, atomic_write_text
from vrwkv_core.progress import Progress
from vrwkv_core.tokenizer import RWKVTokenizer

CHUNK_SIZE = 256
INFLIGHT_PER_WORKER = 4


@dataclass
class PrepareReport:
    """What `prepare_llava` wrote; `stats` is the content of stats.json."""

    out_dir: Path
    records: int
    accepted: int
    rejected: int
    reject_reasons: dict[str, int]
    stats: dict[str, Any] = field(default_factory=dict)


def _default_tokenizer_factory() -> Tokenizer:
    return RWKVTokenizer()


def _check_chunk_with(checker: RecordChecker, chunk: list[tuple]) -> list[CheckResult]:
    out = []
    for index, line, record, error in chunk:
        if error is not None:
            res = CheckResult(index=index, line=line, reason=INVALID_JSON, detail=error)
        else:
            res = checker.check(index, line, record)
            if res.record is not None:
                # serialise in the worker: the parent only writes strings
                res.record_json = json.dumps(res.record, ensure_ascii=False)
                res.record = None
        out.append(res)
    return out


_WORKER_CHECKER: RecordChecker | None = None


def _init_worker(*args: Any) -> None:
    global _WORKER_CHECKER
    _WORKER_CHECKER = make_checker(*args)


def _check_chunk(chunk: list[tuple]) -> list[CheckResult]:
    assert _WORKER_CHECKER is not None
    return _check_chunk_with(_WORKER_CHECKER, chunk)


def _chunks(items: Iterable[SourceItem], size: int) -> Iterator[list[tuple]]:
    chunk: list[tuple] = []
    for it in items:
        chunk.append((it.index, it.line, it.record, it.error))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class RecordPipeline:
    """Checks chunks of records in order, in this process or in worker processes.

    On Linux the workers are forked, all at construction time, and inherit one checker
    (and its tokenizer) built here: callers build the pipeline before starting threads
    (the CLI's progress bar runs one), and scripts need no `__main__` guard as with spawn.
    A worker that dies (a decoder crash, the OOM killer) fails the run instead of hanging it.
    """

    def __init__(
        self,
        image_folder: str | os.PathLike,
        *,
        workers: int = 1,
        limits: ImageLimits = ImageLimits(),
        tokenizer_factory: Callable[[], Tokenizer] | None = None,
        tokens_per_image: int | None = None,
        ctx_len: int | None = None,
    ) -> None:
        global _WORKER_CHECKER
        init_args = (str(image_folder), limits, tokenizer_factory, tokens_per_image, ctx_len)
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._checker: RecordChecker | None = None
        if workers <= 1:
            self._checker = make_checker(*init_args)
        elif sys.platform.startswith("linux"):
            _WORKER_CHECKER = make_checker(*init_args)
            self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
            self._pool.submit(int).result()  # a fork pool starts every worker on its first task
        else:
            self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=init_args)

    def run(self, items: Iterable[SourceItem], chunk_size: int = CHUNK_SIZE) -> Iterator[CheckResult]:
        """Yield a CheckResult per item, in order."""
        chunks = _chunks(items, chunk_size)
        if self._pool is None:
            assert self._checker is not None
            for chunk in chunks:
                yield from _check_chunk_with(self._checker, chunk)
            return
        pending: deque[Future] = deque()  # bounded: Pool.imap would read the whole input ahead
        try:
            for chunk in chunks:
                pending.append(self._pool.submit(_check_chunk, chunk))
                while len(pending) >= self.workers * INFLIGHT_PER_WORKER:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool:
            raise DataError("a worker process died while checking records (an image decoder crash, or out of memory)",
                            hint="run with --workers 1 to see which record") from None

    def close(self) -> None:
        global _WORKER_CHECKER
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            _WORKER_CHECKER = None

    def __enter__(self) -> RecordPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _percentiles(values: array) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    a = np.frombuffer(values, dtype=np.int64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "min": int(a.min()),
        "p50": round(float(p50), 1),
        "p90": round(float(p90), 1),
        "p99": round(float(p99), 1),
        "max": int(a.max()),
        "mean": round(float(a.mean()), 1),
    }


def plot_lengths(path: Path, values: array, unit: str, ctx_len: int | None) -> None:
    """Histogram of record lengths; a dashed line marks ctx_len."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(np.frombuffer(values, dtype=np.int64), bins=50)
    if ctx_len is not None:
        ax.axvline(ctx_len, color="red", linestyle="--", label=f"ctx_len {ctx_len}")
        ax.legend()
    ax.set_xlabel(f"record length ({unit})")
    ax.set_ylabel("records")
    ax.set_title(f"{len(values)} accepted records")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


def prepare_llava(
    json_path: str | os.PathLike,
    image_folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_reject_fraction: float = 0.01,
    tokens_per_image: int | None = None,
    ctx_len: int | None = None,
    workers: int = 1,
    shuffle_seed: int | None = None,
    limits: ImageLimits = ImageLimits(),
    tokenizer_factory: Callable[[], Tokenizer] | None = None,
    progress: Progress | None = None,
    max_rounds: int | None = None,
    readd_instruction: bool = True,
) -> PrepareReport:
    """Check every record and image; write data.jsonl, rejects.jsonl, stats.json, lengths.png.

    Raises DataError (after writing everything) when more than `max_reject_fraction` of
    the records are rejected. Token lengths need `tokens_per_image`; `ctx_len` adds the
    count of records it would truncate. `tokenizer_factory` defaults to the World tokenizer.
    `max_rounds` runs the original's clean + split passes first (see `rounds.py`).
    """
    json_path, image_folder, out = Path(json_path), Path(image_folder), Path(out_dir)
    if not json_path.is_file():
        raise DataError(f"{json_path}: no such file")
    if not image_folder.is_dir():
        what = "is a file, not a folder" if image_folder.exists() else "does not exist"
        raise DataError(f"{image_folder}: the image folder {what}")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: --out is a file, not a folder", hint="choose a folder for data.jsonl and the report")
    if not 0.0 <= max_reject_fraction <= 1.0:
        raise DataError(f"--max-reject-fraction {max_reject_fraction} is out of range: must be in [0, 1]")
    if ctx_len is not None and tokens_per_image is None:
        raise DataError("--ctx-len needs --tokens-per-image to count tokens", hint="pass both, e.g. --tokens-per-image 1024 --ctx-len 2048")
    fmt = detect_format(json_path)
    if tokens_per_image is not None and tokenizer_factory is None:
        tokenizer_factory = _default_tokenizer_factory
    count_tokens = tokens_per_image is not None
    progress = progress or Progress()
    out.mkdir(parents=True, exist_ok=True)

    reasons: Counter[str] = Counter()
    lengths = array("q")
    offsets = array("q")
    n_records = n_images = text_only = multi_image = over_ctx = 0
    data_path = out / "data.jsonl"
    ordered_path = out / ".data.ordered.jsonl" if shuffle_seed is not None else data_path
    t0 = time.perf_counter()
    # the pool forks before the progress bar starts its thread
    pipeline = RecordPipeline(image_folder, workers=workers, limits=limits, tokens_per_image=tokens_per_image,
                              ctx_len=ctx_len, tokenizer_factory=tokenizer_factory if count_tokens else None)
    try:
        progress.start(f"checking {json_path.name}", total=None)
        with atomic_open(ordered_path, "wb") as good, atomic_open(out / "rejects.jsonl", "w") as bad:
            pos = 0
            rounds = RoundStats(max_rounds, readd_instruction) if max_rounds else None
            items = iter_records(json_path) if rounds is None else _split_items(iter_records(json_path), rounds)
            for res in pipeline.run(items):
                n_records += 1
                if res.reason is not None:
                    reasons[res.reason] += 1
                    bad.write(json.dumps({"index": res.index, "line": res.line, "id": res.id, "reason": res.reason, "detail": res.detail}, ensure_ascii=False) + "\n")
                else:
                    line = (res.record_json + "\n").encode("utf-8")  # type: ignore[operator]
                    offsets.append(pos)
                    good.write(line)
                    pos += len(line)
                    n_images += res.n_images
                    text_only += res.n_images == 0
                    multi_image += res.n_images > 1
                    length = res.n_tokens if count_tokens else res.n_chars
                    lengths.append(int(length or 0))
                    over_ctx += ctx_len is not None and (res.n_tokens or 0) > ctx_len
                if n_records % 64 == 0:
                    progress.update(64, accepted=len(lengths), rejected=n_records - len(lengths))
            progress.update(n_records % 64, accepted=len(lengths), rejected=n_records - len(lengths))
        if shuffle_seed is not None:
            _write_shuffled(ordered_path, data_path, offsets, shuffle_seed)
    finally:
        pipeline.close()
        progress.close()
        if shuffle_seed is not None and ordered_path.exists():
            ordered_path.unlink()
    seconds = time.perf_counter() - t0

    accepted = len(lengths)
    rejected = n_records - accepted
    fraction = rejected / n_records if n_records else 0.0
    unit = "tokens" if count_tokens else "characters"
    stats: dict[str, Any] = {
        "source": str(json_path),
        "format": fmt,
        "image_folder": str(image_folder),
        "records": n_records,
        "accepted": accepted,
        "rejected": rejected,
        "reject_fraction": fraction,
        "max_reject_fraction": max_reject_fraction,
        "reject_reasons": dict(reasons.most_common()),
        "images": n_images,
        "text_only_records": text_only,
        "multi_image_records": multi_image,
        "length_unit": unit,
        "lengths": _percentiles(lengths),
        "tokens_per_image": tokens_per_image,
        "ctx_len": ctx_len,
        "over_ctx_len": over_ctx if ctx_len is not None else None,
        "shuffle_seed": shuffle_seed,
        "rounds": rounds.as_dict() if rounds is not None else None,
        "workers": workers,
        "seconds": round(seconds, 3),
        "records_per_s": round(n_records / seconds, 1) if seconds > 0 else None,
    }
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    plot_lengths(out / "lengths.png", lengths, unit, ctx_len)
    report = PrepareReport(out, n_records, accepted, rejected, dict(reasons), stats)
    if n_records == 0:
        raise DataError(f"{json_path}: no records")
    if fraction > max_reject_fraction:
        top = ", ".join(f"{k}: {v}" for k, v in reasons.most_common(3))
        err = DataError(
            f"{json_path}: {rejected} of {n_records} records rejected ({fraction:.2%} > {max_reject_fraction:.2%}; {top})",
            hint=f"see {out / 'rejects.jsonl'}; fix the data or raise --max-reject-fraction",
        )
        err.report = report  # type: ignore[attr-defined]  # the CLI prints the summary before the error
        raise err
    return report


def _split_items(items: Iterable[SourceItem], stats: RoundStats) -> Iterator[SourceItem]:
    """Each source record's chunks (same index and line, for reject reports)."""
    for it in items:
        if it.error is not None or not isinstance(it.record, dict):
            yield it
            continue
        for chunk in split_rounds(it.record, stats.max_rounds, stats.readd_instruction, stats):
            yield SourceItem(it.index, it.line, chunk)


def _write_shuffled(src: Path, dst: Path, offsets: array, seed: int) -> None:
    """Rewrite src's lines into dst in a seeded random order, reading by offset."""
    order = list(range(len(offsets)))
    random.Random(seed).shuffle(order)
    with open(src, "rb") as f, atomic_open(dst, "wb") as g:
        for i in order:
            f.seek(offsets[i])
            g.write(f.readline())
