"""`vrwkv eval`: generate benchmark answers and score them; `eval merge`: join shards; `eval score`: metrics.

    vrwkv eval --model out/tiny/finetune --benchmark shapes --data-root data/shapes --out runs/shapes --json
    vrwkv eval score textvqa --answers answers.jsonl --annotations TextVQA_0.5.1_val.json --json

Generation, resume and shards: `vrwkv_core.eval.generate`; the expected data tree and
the prompts: `vrwkv_core.eval.questions`; the benchmark registry and the metrics:
`vrwkv_core.eval`. This module only parses arguments and prints (Rich tables, or with
--json one JSON object as the last stdout line).
"""

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vrwkv_cli.common import AdapterOpt, MergeAdapterOpt, PrefillPadOpt, QuantOpt, StateOpt, WkvBackendOpt

# No help= here: the callback's docstring (with its example) is the group's help.
app = typer.Typer(no_args_is_help=False, add_completion=False)


class PromptStyle(str, Enum):
    v7 = "v7"
    v6 = "v6"
    llava = "llava"


@app.callback(invoke_without_command=True)
def generate(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(help="Our output dir, a released .pth, or a registry name.")] = None,
    benchmark: Annotated[Optional[str], typer.Option(help="textvqa, vqav2, vqav2-testdev, gqa, scienceqa, pope, mme, mmbench, mmbench-cn, vizwiz, mmvet, chartqa, docvqa, infovqa or shapes.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(
        help="The benchmark's folder in LLaVA's eval layout (e.g. playground/data/eval/textvqa, or its parent), "
             "or a `prepare-data synthetic-shapes` folder.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder: answers.jsonl, scores.json; rerun to resume.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Answer only the first N questions (quick checks).")] = None,
    shard: Annotated[Optional[str], typer.Option(
        help="I/N (0 <= I < N): answer every N-th question from I, one shard per GPU; the last to finish merges.")] = None,
    batch_size: Annotated[int, typer.Option(help="Questions decoded together (answers do not depend on it); lower it if you run out of memory.")] = 8,
    device: Annotated[str, typer.Option(help="cuda, cuda:1, cpu or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="bf16, fp16, fp32 or auto (bf16 on CUDA, fp32 on CPU).")] = "auto",
    prompt_style: Annotated[Optional[PromptStyle], typer.Option(
        help="Prompt template: v7 (image first, as the v7.00 eval), v6 (v6.0's image in the middle) or llava "
             "(image first with LLaVA-1.5's instructions, e.g. ScienceQA's letter instruction, and text-only "
             "questions answered); default: the model's (v6 for an RWKV-6 / x060 model, else v7).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.", min=1)] = 128,
    download: Annotated[bool, typer.Option("--download", help="Fetch a registry model if it is not on disk.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the scores as one JSON object on the last line.")] = False,
    wkv_backend: WkvBackendOpt = None,
    prefill_pad: PrefillPadOpt = True,
    adapter: AdapterOpt = None,
    state: StateOpt = None,
    merge_adapter: MergeAdapterOpt = False,
    quant: QuantOpt = None,
    fast_batch: Annotated[bool, typer.Option(help="CPU fp32: decode through packed matrices (~1.8x faster at "
                                             "--batch-size 8, the same answers at any batch size; one more fp32 copy of them).")] = True,
) -> None:
    """Generate benchmark answers and score them; `vrwkv eval score` scores an answer file.

    Example: vrwkv eval --model out/1b5/finetune --benchmark textvqa --data-root playground/data/eval/textvqa --out runs/textvqa --batch-size 16
    """
    if ctx.invoked_subcommand is not None:
        return
    from vrwkv_core.errors import VrwkvError

    missing = [flag for flag, value in (("--model", model), ("--benchmark", benchmark), ("--data-root", data_root),
                                        ("--out", out)) if value is None]  # fmt: skip
    if missing:
        raise VrwkvError(f"vrwkv eval needs {', '.join(missing)}",
                         hint="e.g. vrwkv eval --model out/tiny/finetune --benchmark shapes --data-root data/shapes --out runs/shapes")  # fmt: skip
    from vrwkv_cli.common import RichProgress
    from vrwkv_core.eval.generate import parse_shard, run_eval

    style = prompt_style.value if prompt_style is not None else None  # None: the model's own
    report = run_eval(model, benchmark, data_root, out, limit=limit, shard=parse_shard(shard), batch_size=batch_size,
                      device=device, dtype=dtype, prompt_style=style, max_new_tokens=max_new_tokens,
                      download=download, wkv_backend=wkv_backend, prefill_pad=prefill_pad, quant=quant,
                      fast_batch=fast_batch, progress=RichProgress(), adapter=adapter, state=state,
                      merge_adapter=merge_adapter)  # fmt: skip
    _print_report(report, json_output)


@app.command()
def merge(
    out: Annotated[Path, typer.Option(help="The --out folder of the sharded `vrwkv eval` runs.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the scores as one JSON object on the last line.")] = False,
) -> None:
    """Merge the shard answer files of OUT into answers.jsonl (question order) and score it.

    Example: vrwkv eval merge --out runs/textvqa
    """
    from vrwkv_core.eval.generate import merge_and_score

    _print_report(merge_and_score(out), json_output, generated=False)


def _print_report(report: Any, json_output: bool, generated: bool = True) -> None:
    """The generation summary (stderr with --json), then the scores."""
    from rich.table import Table

    from vrwkv_cli.common import console, err_console

    summary = Table(title=f"{report.benchmark}: {report.out}")
    summary.add_column("generation")
    summary.add_column("value", justify="right")
    if report.shard is not None:
        summary.add_row("shard", f"{report.shard[0]}/{report.shard[1]}")
    summary.add_row("questions", str(report.n_questions))
    if generated:
        summary.add_row("answered now", str(report.n_answered))
        summary.add_row("already answered", str(report.n_skipped))
        summary.add_row("missing images", str(report.n_missing_images))
        if report.n_text_only:
            summary.add_row("text-only, not answered", str(report.n_text_only))
        qps = report.questions_per_s
        summary.add_row("questions/s", f"{qps:.2f}" if qps else "n/a")
    if report.merged is not None:
        summary.add_row("answers in answers.jsonl", str(report.n_merged))
    (err_console if json_output else console).print(summary)
    if report.n_missing_images:  # the first few were logged as they were met
        err_console.print(f"[yellow]{report.n_missing_images} question(s) skipped for a missing or unreadable image[/yellow]")
    pending = ", ".join(map(str, report.pending_shards))
    if pending and report.merged is None:
        err_console.print(f"waiting for shard(s) {pending}: the last one to finish merges "
                          f"(or run `vrwkv eval merge --out {report.out}`)", highlight=False)  # fmt: skip
    elif pending:
        err_console.print(f"[yellow]merged although shard(s) {pending} have not finished[/yellow]", highlight=False)
    if report.score is None:
        if json_output:
            typer.echo(json.dumps(report.shard_json() if report.shard is not None else {"benchmark": report.benchmark}))
        return
    if json_output:
        for note in _notes(report.score):
            typer.echo(note, err=True)
        typer.echo(json.dumps(report.score.to_json()))
    else:
        _print_table(report.score, report.merged)
        console.print(f"answers: {report.merged}  scores: {report.scores_file}")


@app.command()
def score(
    benchmark: Annotated[str, typer.Argument(help="textvqa, vqav2, vqav2-testdev, gqa, scienceqa, pope, mme, mmbench, mmbench-cn, vizwiz, mmvet, chartqa, docvqa, infovqa or shapes.")],
    answers: Annotated[Path, typer.Option(help="LLaVA answer JSONL: question_id, prompt, text, model_id.")],
    annotations: Annotated[Path, typer.Option(
        help="Ground truth: TextVQA_0.5.1_val.json, v2_mscoco_val2014_annotations.json, the test "
             "question file (vqav2-testdev), testdev_balanced_questions.json, the ScienceQA folder "
             "(problems.json + pid_splits.json), the POPE folder (coco_pope_*.json), MME_Benchmark_release_version, "
             "the MMBench TSV, VizWiz Annotations/val.json (test.json: the upload), mm-vet.json, the ChartQA test "
             "folder, val_v1.0.json (DocVQA), infographicsVQA_val_v1.0_withQT.json, or DIR/eval/answers.json.")],
    questions: Annotated[Optional[Path], typer.Option(
        help="pope: llava_pope_test.jsonl (required); vqav2: the val question file (optional, limits the scope); "
             "vizwiz: the LLaVA question file (question_id -> image; without it question_id is the image name).")] = None,
    submission: Annotated[Optional[Path], typer.Option(
        help="vqav2-testdev, vizwiz test: where to write the EvalAI JSON (default: <answers>.evalai.json); "
             "mmvet: the grader's input (default: <answers>.mmvet.json).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on the last stdout line.")] = False,
) -> None:
    """Score an answer file with the benchmark's official metric.

    Example: vrwkv eval score pope --answers runs/pope/answers.jsonl --annotations pope/coco --questions pope/llava_pope_test.jsonl
    """
    from vrwkv_core.eval import get_benchmark

    result = get_benchmark(benchmark).score(answers, annotations, questions, submission)
    if json_output:
        for note in _notes(result):
            typer.echo(note, err=True)
        typer.echo(json.dumps(result.to_json()))
    else:
        _print_table(result, answers)


def _notes(result: Any) -> list[str]:
    notes = [f"note: {result.details['note']}"] if result.details.get("note") else []
    if result.duplicates:
        notes.append(f"note: {result.duplicates} repeated answer line(s) ignored (the first answer per question counts)")
    if result.missing:
        what = "scored as failed" if result.benchmark == "scienceqa" else "not scored"
        notes.append(f"note: {result.missing} question(s) have no answer ({what})")
    return notes


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _print_table(result: Any, answers: Path) -> None:
    from rich.table import Table

    from vrwkv_cli.common import console
    table = Table(title=f"{result.benchmark}: {answers}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if "img_accuracy" in result.details:  # ScienceQA: IMG accuracy is the headline (the papers' column)
        table.add_row("IMG accuracy", _pct(result.details["img_accuracy"]))
        table.add_row("questions with an image", str(result.details["img_count"]))
    if result.accuracy is not None:
        table.add_row("accuracy", _pct(result.accuracy))
    table.add_row("scored", str(result.count))
    table.add_row("missing", str(result.missing))
    table.add_row("duplicates", str(result.duplicates))
    if "submission" in result.details:
        table.add_row("submission", str(result.details["submission"]))
        table.add_row("ids written", str(result.details["written"]))
    console.print(table)
    categories = _per_category(result.details)
    if categories:
        cat_table = Table(title="per category")
        # POPE has all these columns; shapes only count and accuracy
        cols = [k for k in ("accuracy", "precision", "recall", "f1", "yes_ratio") if any(k in m for m in categories.values())]
        for col in ("category", "count", *cols):
            cat_table.add_column(col, justify="left" if col == "category" else "right")
        for cat, m in categories.items():
            cat_table.add_row(cat, str(m["count"]), *(_pct(m.get(k)) for k in cols))
        console.print(cat_table)
    _print_more(result)
    for note in _notes(result):
        console.print(f"[yellow]{note}[/yellow]", soft_wrap=True)  # paths in notes stay whole for copying


_SHOWN = {"img_accuracy", "img_count", "submission", "written", "note"}
_POINTS = {"perception", "cognition", "total", "score"}  # MME's scores are points, not fractions


def _cell(key: str, x: Any) -> str:
    if isinstance(x, float) and key in _POINTS:
        return f"{x:.2f}"
    return _pct(x) if isinstance(x, float) or x is None else str(x)


def _is_category(v: Any) -> bool:
    return isinstance(v, dict) and {"count", "accuracy"} <= set(v)


def _per_category(details: dict) -> dict:
    """Per-category figures (each with count and accuracy): POPE's at the top level, shapes'
    under "categories"; `_print_table` shows them, `_print_more` leaves them out."""
    found = {**details, **(details.get("categories") or {})}
    return {k: v for k, v in found.items() if _is_category(v)}


def _print_more(result: Any) -> None:
    """The other benchmark-specific figures: scalars in one table, each group (MME subtasks,
    MMBench categories, VizWiz answer types) in its own."""
    from rich.table import Table

    from vrwkv_cli.common import console

    scalars = {k: v for k, v in result.details.items() if k not in _SHOWN and not isinstance(v, dict)}
    if scalars:
        table = Table(title="details")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in scalars.items():
            table.add_row(k, _cell(k, v))
        console.print(table)
    for name, group in result.details.items():
        if not isinstance(group, dict) or not group or _is_category(group) or all(map(_is_category, group.values())):
            continue  # shown in the per-category table
        first = next(iter(group.values()))
        columns = list(first) if isinstance(first, dict) else ["accuracy"]
        table = Table(title=name)
        table.add_column("name")
        for c in columns:
            table.add_column(c, justify="right")
        for k, v in group.items():
            table.add_row(k, *((_cell(c, v.get(c)) for c in columns) if isinstance(v, dict) else (_cell("", v),)))
        console.print(table)
