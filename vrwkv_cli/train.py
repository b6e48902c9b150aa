"""`vrwkv pretrain` and `vrwkv finetune`: load the recipe, run one training stage.

With several devices (hardware.devices, hardware.nodes) Lightning starts one process per
extra device by re-running this same command; only the first process draws progress
and prints the summary.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

_SETTINGS = {"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]}
pretrain_app = typer.Typer(context_settings=_SETTINGS, add_completion=False)
finetune_app = typer.Typer(context_settings=_SETTINGS, add_completion=False)

RecipeArg = Annotated[str, typer.Argument(help="Recipe YAML, e.g. recipes/tiny.yaml.", show_default=False)]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="key=value overrides, e.g. pretrain.micro_batch=4 (lower it if you run out of memory)."),
]
ResumeOpt = Annotated[
    bool,
    typer.Option("--resume", help="Continue exactly from out_dir/last.ckpt (prev.ckpt if last.ckpt is damaged)."),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Start fresh even if out_dir holds a run (its checkpoints are replaced)."),
]
PrintOpt = Annotated[bool, typer.Option("--print-config", help="Print the resolved recipe as YAML and exit.")]


def _stage(stage: str, recipe_path: str, overrides: list[str] | None, resume: bool, print_config: bool,
           overwrite: bool = False) -> None:
    from vrwkv_core.config import load_recipe, recipe_to_yaml

    if resume and overwrite:
        raise typer.BadParameter("--resume continues the run in out_dir, --overwrite replaces it: pass one",
                                 param_hint="--resume/--overwrite")
    recipe = load_recipe(recipe_path, overrides or [])
    if print_config:
        typer.echo(recipe_to_yaml(recipe), nl=False)
        return
    from vrwkv_core.progress import Progress
    from vrwkv_core.train import run_stage
    from vrwkv_core.train.strategy import is_launch_rank_zero
    from vrwkv_cli.common import RichProgress, err_console

    first = is_launch_rank_zero()
    progress = RichProgress() if first else Progress()
    try:
        out_dir = run_stage(recipe, stage, resume=resume, progress=progress, overwrite=overwrite)
    finally:
        progress.close()
    if first:
        err_console.print(f"[green]{stage} done[/green]: {out_dir}")


@pretrain_app.command()
def pretrain(recipe: RecipeArg, overrides: OverridesArg = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
             print_config: PrintOpt = False) -> None:
    """Stage 1: train the projector on image-caption pairs (towers and LM frozen).

    Example: vrwkv pretrain recipes/tiny.yaml pretrain.max_steps=50
    """
    _stage("pretrain", recipe, overrides, resume, print_config, overwrite)


@finetune_app.command()
def finetune(recipe: RecipeArg, overrides: OverridesArg = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
             print_config: PrintOpt = False) -> None:
    """Stage 2: train projector and LM on instructions, from finetune.init_from.

    Example: vrwkv finetune recipes/tiny.yaml finetune.max_steps=100
    """
    _stage("finetune", recipe, overrides, resume, print_config, overwrite)
