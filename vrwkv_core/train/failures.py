"""How a training run stops when something goes wrong: one clear line, and what to change.

- SIGTERM (a scheduler's pre-emption, `kill`): Lightning finishes the step, StageMonitor
  saves last.ckpt, and the run ends with `TrainingStopped` (exit code 143, as a process
  killed by SIGTERM reports).
- Ctrl-C (SIGINT): handled like SIGTERM (`InterruptCatcher`), exit code 130.
- Too many non-finite steps in a row: `TrainingStopped` naming the step and the knobs.
- Out of memory: `out_of_memory_error` turns torch's error into one naming the knobs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vrwkv_core.errors import VrwkvError

if TYPE_CHECKING:
    from vrwkv_core.config import Recipe

SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process it ended


class TrainingStopped(VrwkvError):
    """A run that stopped before max_steps, after saving what can be resumed."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


def sigterm_stop(stage: str, step: int) -> TrainingStopped:
    return TrainingStopped(f"stopped by SIGTERM at step {step}; resume with --resume",
                           hint=f"vrwkv {stage} RECIPE --resume continues from last.ckpt", exit_code=SIGTERM_EXIT)  # fmt: skip


INTERRUPT_EXIT = 130  # 128 + SIGINT


def interrupted_stop(stage: str, step: int, saved: bool = True) -> TrainingStopped:
    if not saved:
        return TrainingStopped(f"interrupted twice at step {step}: stopped without saving; resume with --resume "
                               "(from the last saved checkpoint)", exit_code=INTERRUPT_EXIT)  # fmt: skip
    return TrainingStopped(f"interrupted at step {step}; resume with --resume",
                           hint=f"vrwkv {stage} RECIPE --resume continues from last.ckpt", exit_code=INTERRUPT_EXIT)  # fmt: skip


class InterruptCatcher:
    """Turns the first Ctrl-C during fit into Lightning's SIGTERM path: the step finishes,
    every rank stops together, StageMonitor saves last.ckpt (Lightning's own Ctrl-C handling
    would exit 1 without saving). A second Ctrl-C interrupts at once. Main thread only."""

    def __init__(self, trainer: object) -> None:
        self.trainer = trainer
        self.interrupted = False
        self._previous: object = None

    def _handle(self, signum: int, frame: object) -> None:
        import signal

        if self.interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.interrupted = True
        # Trainer.received_sigterm is a read-only view of its signal connector's flag.
        self.trainer._signal_connector.received_sigterm = True  # type: ignore[attr-defined]

    def __enter__(self) -> "InterruptCatcher":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._previous = None


def non_finite_stop(stage: str, step: int, in_row: int) -> TrainingStopped:
    return TrainingStopped(
        f"stopped at step {step}: {in_row} steps in a row had a non-finite loss or gradients "
        f"(skipped, not applied); last.ckpt holds the last good weights",
        hint=f"lower {stage}.lr_init or {stage}.grad_clip, check the data, or try hardware.precision=fp32; "
        f"then --resume (or raise {stage}.max_bad_steps)",
    )


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def out_of_memory_error(recipe: "Recipe", stage: str, step: int) -> VrwkvError:
    """The error shown for an out-of-memory failure, naming the knobs to turn."""
    st = getattr(recipe, stage)
    hw = recipe.hardware
    knobs = [f"lower {stage}.micro_batch (now {st.micro_batch}; raise {stage}.grad_accum to keep the batch size)"]
    if not hw.grad_checkpoint:
        knobs.append("set hardware.grad_checkpoint=true")
    if hw.precision != "bf16":
        knobs.append("set hardware.precision=bf16")
    if not hw.strategy.startswith("deepspeed"):
        knobs.append("use hardware.strategy=deepspeed_stage_2 (with hardware.cpu_offload=true for more room)")
    elif not hw.cpu_offload:
        knobs.append("set hardware.cpu_offload=true")
    return VrwkvError(f"out of memory at step {step} of {stage} (micro_batch {st.micro_batch}, ctx_len {recipe.data.ctx_len})",
                      hint="; ".join(knobs))  # fmt: skip
