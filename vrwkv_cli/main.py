"""The `vrwkv` root command: loads subcommands from entry points and holds the error boundary.

Subcommands are `typer.Typer` apps registered in the entry-point group `vrwkv.commands`
(the built-ins by this distribution, plugins by others). A plugin that fails to import is
one warning line; a plugin cannot replace a built-in. Known errors (`VrwkvError`) become
one line plus a hint and a non-zero exit, and so does any `OSError` (a path that cannot
be opened or created: it names the file); `--debug` or VRWKV_DEBUG=1 shows the traceback.
Exit codes: 0 success, 1 error, 2 usage, 130 Ctrl-C, 143 SIGTERM during training.
Nothing here imports torch, so `vrwkv --help` is instant.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from importlib import metadata
from typing import Any

import typer
from typer.core import TyperGroup

from vrwkv_core.errors import VrwkvError

GROUP = "vrwkv.commands"
DISTRIBUTION = "vrwkv"
# The built-ins, as pyproject.toml declares them; used when running from a source tree
# whose distribution metadata is absent (a test checks the two agree).
BUILTINS: dict[str, str] = {
    "download": "vrwkv_cli.download:app",
    "prepare-data": "vrwkv_cli.prepare_data:app",
    "pretrain": "vrwkv_cli.train:pretrain_app",
    "finetune": "vrwkv_cli.train:finetune_app",
    "eval": "vrwkv_cli.eval:app",
    "chat": "vrwkv_cli.chat:app",
    "serve": "vrwkv_cli.serve:app",
    "bench": "vrwkv_cli.bench:app",
    "env": "vrwkv_cli.env:app",
    "export": "vrwkv_cli.export:app",
}


def _version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+source"


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def _load(value: str) -> Any:
    module_name, _, attr = value.partition(":")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)


def _to_command(name: str, sub: typer.Typer) -> Any:
    command = typer.main.get_command(sub)
    command.name = name
    return command


def build_cli() -> TyperGroup:
    """The root command group with every subcommand attached (built-ins first, then plugins)."""
    root = typer.Typer(
        name="vrwkv",
        help="Train, evaluate and chat with VisualRWKV (RWKV-7 + vision towers).\n\n"
        "Example: vrwkv pretrain recipes/tiny.yaml",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )

    def _print_version(value: bool) -> None:
        if value:
            typer.echo(f"vrwkv {_version()}")
            raise typer.Exit(0)

    @root.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
        ),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also VRWKV_DEBUG=1)."),
    ) -> None:
        pass

    group = typer.main.get_command(root)
    assert isinstance(group, TyperGroup)
    try:
        eps = list(metadata.entry_points(group=GROUP))
    except Exception:  # broken metadata must not take the CLI down
        eps = []
    builtin_eps = {ep.name: ep.value for ep in eps if ep.dist is not None and ep.dist.name == DISTRIBUTION}
    # Keep the documented order (entry-point metadata comes back sorted by name).
    builtins = dict(sorted((builtin_eps or BUILTINS).items(), key=lambda kv: list(BUILTINS).index(kv[0]) if kv[0] in BUILTINS else len(BUILTINS)))
    for name, value in builtins.items():
        try:
            group.add_command(_to_command(name, _load(value)), name)
        except Exception as err:  # a broken built-in should not hide the others
            _warn(f"built-in command '{name}' failed to load: {err}")
    for ep in eps:
        if ep.dist is not None and ep.dist.name == DISTRIBUTION:
            continue
        origin = ep.dist.name if ep.dist is not None else "unknown distribution"
        if ep.name in builtins:
            _warn(f"plugin command '{ep.name}' from {origin} ignored: it would shadow a built-in")
            continue
        try:
            sub = ep.load()
            if not isinstance(sub, typer.Typer):
                raise TypeError(f"{ep.value} is not a typer.Typer")
            group.add_command(_to_command(ep.name, sub), ep.name)
        except Exception as err:
            _warn(f"plugin command '{ep.name}' from {origin} failed to load: {type(err).__name__}: {err}")
    return group


def run(argv: list[str] | None = None) -> int:
    """Runs the CLI on argv and returns the exit code (the error boundary)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("VRWKV_DEBUG", "") not in ("", "0") or "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        cli = build_cli()
        # standalone mode: Typer prints usage errors itself and exits with their code.
        cli.main(args=args, prog_name="vrwkv", standalone_mode=True)
        return 0
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except VrwkvError as err:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {err}", err=True)
        if err.hint:
            typer.echo(f"hint: {err.hint}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except OSError as err:  # a user path the command could not open or create
        if debug:
            traceback.print_exc()
        message, hint = describe_os_error(err)
        typer.echo(f"error: {message}", err=True)
        typer.echo(f"hint: {hint}", err=True)
        return 1


# errno -> what to do about it (the OSError's filename says where)
_OS_HINTS = {
    errno.ENOENT: "check the path (a folder on the way may be missing)",
    errno.EEXIST: "a file is in the way: remove it or choose another path",
    errno.ENOTDIR: "a part of the path is a file where a folder is needed: choose another path",
    errno.EISDIR: "the path is a folder where a file is needed: choose a file name",
    errno.EACCES: "check the permissions, or choose a folder you can write to",
    errno.EPERM: "check the permissions, or choose a folder you can write to",
    errno.EROFS: "the filesystem is read-only: choose another folder",
    errno.ENOSPC: "the disk is full: free some space or choose another disk",
    errno.ENAMETOOLONG: "shorten the path",
}


def describe_os_error(err: OSError) -> tuple[str, str]:
    """One line (path and reason) and a hint for an OSError that reached the boundary."""
    reason = err.strerror or type(err).__name__
    where = err.filename if err.filename is not None else ""
    if err.filename2 is not None:
        where = f"{err.filename} -> {err.filename2}"
    message = f"{where}: {reason}" if where != "" else f"{reason}"
    return message, _OS_HINTS.get(err.errno or -1, "check the path and try again (--debug shows the traceback)")


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
