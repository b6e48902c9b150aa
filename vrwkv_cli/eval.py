"""`vrwkv eval`: generate benchmark answers (not yet), and `vrwkv eval score`: official metrics.

    vrwkv eval score textvqa --answers answers.jsonl --annotations TextVQA_0.5.1_val.json --json

The benchmark registry and the metrics live in `vrwkv_core.eval`; this module only parses
arguments and prints (a Rich table, or with --json one JSON object as the last stdout line).
"""

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

# No help= here: the callback's docstring (with its example) is the group's help.
app = typer.Typer(no_args_is_help=False, add_completion=False)


class PromptStyle(str, Enum):
    v7 = "v7"
    v6 = "v6"


@app.callback(invoke_without_command=True)
def generate(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(help="Model dir (ours) or released VisualRWKV .pth.")] = None,
    benchmark: Annotated[Optional[str], typer.Option(help="textvqa, vqav2, vqav2-testdev, gqa, scienceqa, pope or shapes.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Folder with the benchmark's questions, images and annotations.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder for answers.jsonl and the scores.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Answer only the first N questions (quick checks).")] = None,
    shard: Annotated[Optional[str], typer.Option(help="I/N: answer the I-th of N interleaved shards (one per GPU).")] = None,
    batch_size: Annotated[int, typer.Option(help="Questions decoded together; lower it if you run out of memory.")] = 1,
    device: Annotated[str, typer.Option(help="cuda, cuda:1, cpu or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="bf16, fp16 or fp32.")] = "bf16",
    prompt_style: Annotated[PromptStyle, typer.Option(help="Chat template of the model: v7 or v6.")] = PromptStyle.v7,
    json_output: Annotated[bool, typer.Option("--json", help="Print the scores as one JSON object on the last line.")] = False,
) -> None:
    """Generate benchmark answers and score them; `vrwkv eval score` scores an answer file.

    Example: vrwkv eval --model out/1b5/finetune --benchmark textvqa --data-root data/eval/textvqa --out runs/textvqa
    """
    if ctx.invoked_subcommand is not None:
        return
    from vrwkv_core.errors import NotImplementedYet

    raise NotImplementedYet(
        "vrwkv eval: answer generation is not implemented yet",
        hint="score an existing LLaVA answer file with `vrwkv eval score`",
    )


@app.command()
def score(
    benchmark: Annotated[str, typer.Argument(help="textvqa, vqav2, vqav2-testdev, gqa, scienceqa, pope or shapes.")],
    answers: Annotated[Path, typer.Option(help="LLaVA answer JSONL: question_id, prompt, text, model_id.")],
    annotations: Annotated[Path, typer.Option(
        help="Ground truth: TextVQA_0.5.1_val.json, v2_mscoco_val2014_annotations.json, the test "
             "question file (vqav2-testdev), testdev_balanced_questions.json, the ScienceQA folder "
             "(problems.json + pid_splits.json), the POPE folder (coco_pope_*.json), or DIR/eval/answers.json.")],
    questions: Annotated[Optional[Path], typer.Option(
        help="pope: llava_pope_test.jsonl (required); vqav2: the val question file (optional, limits the scope).")] = None,
    submission: Annotated[Optional[Path], typer.Option(
        help="vqav2-testdev: where to write the EvalAI JSON (default: <answers>.evalai.json).")] = None,
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
    notes = []
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
    if result.accuracy is not None:
        table.add_row("accuracy", _pct(result.accuracy))
    if "img_accuracy" in result.details:
        table.add_row("img_accuracy", _pct(result.details["img_accuracy"]))
        table.add_row("questions with an image", str(result.details["img_count"]))
    table.add_row("scored", str(result.count))
    table.add_row("missing", str(result.missing))
    table.add_row("duplicates", str(result.duplicates))
    if "submission" in result.details:
        table.add_row("submission", str(result.details["submission"]))
        table.add_row("ids written", str(result.details["written"]))
    console.print(table)
    categories = {k: v for k, v in result.details.items() if isinstance(v, dict)}
    if categories:
        cat_table = Table(title="per category")
        for col in ("category", "count", "accuracy", "precision", "recall", "f1", "yes_ratio"):
            cat_table.add_column(col, justify="left" if col == "category" else "right")
        for cat, m in categories.items():
            cat_table.add_row(cat, str(m["count"]), *(_pct(m[k]) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")))
        console.print(cat_table)
    for note in _notes(result):
        console.print(f"[yellow]{note}[/yellow]")
