"""The `elastickit` command (Typer). One module per command; each is a thin adapter over an
engine function and registers itself here."""

from __future__ import annotations

import importlib

import typer

import elastickit
from elastickit.cli._errors import set_debug

app = typer.Typer(
    name="elastickit",
    help="Keep hybrid-parallel PyTorch training alive through failures.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (command name, module under elastickit.cli, function name). Modules import heavy things
# (torch) inside their functions so that `elastickit --help` stays fast.
COMMANDS: list[tuple[str, str, str]] = [
    ("inspect", "inspect_cmd", "inspect"),
    ("verify", "verify_cmd", "verify"),
    ("ls", "ls_cmd", "ls"),
    ("demo", "demo_cmd", "demo"),
    ("train", "train_cmd", "train"),
    ("reshard", "reshard_cmd", "reshard"),
    ("convert", "convert_cmd", "convert"),
    ("dashboard", "dashboard_cmd", "dashboard"),
]


def _version(value: bool) -> None:
    if value:
        print(f"elastickit {elastickit.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    set_debug(debug)


for _name, _module, _func in COMMANDS:
    try:
        _mod = importlib.import_module(f"elastickit.cli.{_module}")
    except ModuleNotFoundError as _e:  # a command whose module is not there yet
        if _e.name != f"elastickit.cli.{_module}":
            raise
        continue
    app.command(_name)(getattr(_mod, _func))


def main() -> None:
    """Entry point of the `elastickit` console script."""
    app()


if __name__ == "__main__":
    main()
