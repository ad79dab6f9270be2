"""The `elastickit` command (Typer). One module per command; each is a thin adapter over an
engine function and registers itself here."""

from __future__ import annotations

import importlib
import sys

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
    ("launch", "launch_cmd", "launch"),
    ("reshard", "reshard_cmd", "reshard"),
    ("convert", "convert_cmd", "convert"),
    ("dashboard", "dashboard_cmd", "dashboard"),
    ("top", "top_cmd", "top"),
]


def _bare_flags() -> None:
    """Show flags bare in help: Typer 0.29 labels them `<bool>`, as if they took a value."""
    from typer.core import TyperOption

    show = getattr(TyperOption, "display_type_rich", None)
    if show is None or getattr(show, "elastickit", False):
        return

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag else show(self, ctx)

    display_type_rich.elastickit = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_bare_flags()


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
    app.command(_name)(getattr(importlib.import_module(f"elastickit.cli.{_module}"), _func))


def global_flags(argv: list[str]) -> list[str]:
    """`--debug` is global: accept it after the subcommand too (up to a `--`) by moving it to
    the front, where the top-level option reads it."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    return ["--debug", *(a for i, a in enumerate(argv) if not (i < end and a == "--debug"))]


def main() -> None:
    """Entry point of the `elastickit` console script."""
    app(args=global_flags(sys.argv[1:]))


if __name__ == "__main__":
    main()
