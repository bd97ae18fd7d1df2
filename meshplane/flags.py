"""What the command line's flags accept, and how `--help` shows them: every refusal names the flag
(argparse adds it) and is a usage error (exit 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

import meshplane
from meshplane import ask, forms


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is none to show (no value, an empty
    list, a flag that is off) or the help says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default in (None, "", [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Version(argparse.Action):
    """`--version`: the installed package's, looked up only when asked (it costs a metadata read)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"meshplane {meshplane.version()}")
        parser.exit()


def _number(text: str, kind: Callable[[str], float], what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def seconds(text: str) -> float:
    value = _number(text, float, "a number of seconds")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text}")
    return value


def positive_seconds(text: str) -> float:
    value = _number(text, float, "a number of seconds")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def count(text: str) -> int:
    value = int(_number(text, int, "a whole number"))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, not {value}")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int, "a whole number"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def pair(form: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        key, sep, _ = text.partition("=")
        if not (key and sep):
            raise argparse.ArgumentTypeError(f"{text!r}: write {form}")
        return text

    return check


def form(check: Callable[[str], object]) -> Callable[[str], str]:
    """A flag's type from a check of meshplane/forms.py (the one the /debug pages make): the text as
    given, or a usage error saying what is wrong with it."""
    def parse(text: str) -> str:
        try:
            check(text)
        except forms.FormError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return parse


def server(text: str) -> str:
    try:
        return ask.server_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
