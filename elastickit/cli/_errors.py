"""Maps exceptions to exit codes in one place (DESIGN.md section 7).

0 success, 1 the data is bad, 2 the request is bad. One sentence on stderr; the traceback only
with `--debug`.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from elastickit.checkpoint.errors import ElastickitError

P = ParamSpec("P")
R = TypeVar("R")

DEBUG = {"on": False}


def set_debug(on: bool) -> None:
    """Called by the top-level `--debug` option."""
    DEBUG["on"] = on


def fail(message: str, code: int) -> typer.Exit:
    """Print one sentence to stderr and return the Exit to raise."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def handled(func: Callable[P, R]) -> Callable[P, R]:
    """Wrap a command so that elastickit's errors become one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except ElastickitError as e:
            if DEBUG["on"]:
                traceback.print_exc()
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as e:  # a bug of ours: still one line unless --debug
            if DEBUG["on"]:
                traceback.print_exc()
            raise fail(
                f"{type(e).__name__}: {e} (internal error; rerun with --debug for the traceback)",
                1,
            ) from None

    return wrapper
