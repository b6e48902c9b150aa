"""`vrwkv export`: convert one of our model dirs to the released .pth layouts.

    vrwkv export out/tiny/finetune --out tiny.pth                    # released VisualRWKV layout, fp16
    vrwkv export out/1b5/finetune --out lm.pth --lm-only --dtype bf16  # the LM as an RWKV-LM .pth
    vrwkv export out/tiny/finetune-lora --merge --out out/tiny/merged  # a peft run -> an ordinary model dir
    vrwkv export out/tiny/finetune --quant int8 --out out/tiny-int8  # a quantized model dir
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from vrwkv_cli.common import QuantOpt

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def export(
    model_dir: Annotated[str, typer.Argument(help="One of our output dirs (config.yaml + model.safetensors); "
                                                   "with --quant also a released .pth or hub:NAME.")],
    out: Annotated[str, typer.Option("--out", "-o", help="The .pth file to write (replaced atomically); with "
                                                         "--quant a model dir.")],
    lm_only: Annotated[
        bool,
        typer.Option("--lm-only", help="Write only the RWKV LM, in RWKV-LM's .pth layout (names without `rwkv.`), "
                     "which the `rwkv` pip package and RWKV-LM load."),
    ] = False,
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="fp16 (as released, half the size of fp32), bf16, or fp32 (exact copy of a "
                     "float32 model)."),
    ] = "fp16",
    merge: Annotated[
        bool,
        typer.Option("--merge", help="MODEL_DIR is a peft run: fold its LoRA/PiSSA/MiSS adapters into the base "
                     "weights and write an ordinary model dir to --out (a state-tuning run: the model dir plus "
                     "state.safetensors)."),
    ] = False,
    base: Annotated[
        Optional[str],
        typer.Option("--base", help="With --merge: the run's base model, if it moved (checked by sha256)."),
    ] = None,
    quant: QuantOpt = None,
) -> None:
    """Write a model dir as a released VisualRWKV .pth (or, with --lm-only, an RWKV .pth).

    Example: vrwkv export out/tiny/finetune --out tiny.pth
    """
    from vrwkv_cli.common import console

    if quant is not None:
        if out.endswith(".pth") or lm_only:
            raise typer.BadParameter("--quant writes a model dir: give --out a folder (and no --lm-only)",
                                     param_hint="--out")  # fmt: skip
        from vrwkv_core.checkpoint import export_quantized

        info = export_quantized(model_dir, quant, out)
        console.print(f"wrote {info['path']} ({info['quant']} language model, {info['bytes'] / 2**20:.1f} MiB); "
                      f"load it with --model {info['path']}")  # fmt: skip
        return
    if dtype not in ("fp32", "fp16", "bf16"):
        raise typer.BadParameter(f"{dtype!r} is not one of fp32, fp16, bf16", param_hint="--dtype")
    if merge:
        from vrwkv_core.checkpoint.adapters import export_merged

        info = export_merged(model_dir, out, base=base)
        extra = f" and {info['state']}" if info["state"] else ""
        console.print(f"wrote {info['path']} (the {info['method']} run merged into its base){extra}")
        return
    from vrwkv_core.checkpoint import export_pth

    info = export_pth(model_dir, out, dtype=dtype, lm_only=lm_only)
    layout = "RWKV-LM" if lm_only else "released VisualRWKV"
    console.print(
        f"wrote {info['path']} ({layout} layout, {info['tensors']} tensors, {info['dtype']}, "
        f"{info['bytes'] / 2**20:.1f} MiB)"
    )
