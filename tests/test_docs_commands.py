"""The commands in README.md and docs/ work when pasted: every `meshplane ...` line is one the command
line accepts, every flag a synopsis names exists with the values it lists, and no shell block breaks
a continued command with a comment."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from meshplane import cli

ROOT = Path(__file__).parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
_BLOCK = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.S | re.M)  # indented too (in a list)
_COMMAND = re.compile(r"^(?:\$ )?(?:\S*/)?meshplane (?:--\S+ )*"
                      r"(serve|validate|status|config-dump|explain|demo)(?=\s|$)")


def _blocks() -> list[tuple[str, str, str]]:
    """(file, language, text) of every fenced block."""
    return [(p.name, m.group(1), m.group(2)) for p in DOCS for m in _BLOCK.finditer(p.read_text())]


def _commands() -> list[tuple[str, str]]:
    """(file, command line) of every `meshplane COMMAND ...` in a block, continuation lines joined."""
    out = []
    for name, _, text in _blocks():
        for line in text.replace("\\\n", " ").splitlines():
            line = line.strip()
            if _COMMAND.match(line):
                out.append((name, line.removeprefix("$ ")))
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: a for a in parser._actions for flag in a.option_strings}


def test_the_docs_have_commands_to_check() -> None:
    assert len(_commands()) >= 15, _commands()


def test_no_shell_block_comments_out_the_rest_of_a_continued_command() -> None:
    """`--flag value \\  # comment`: the comment swallows the line break, and the command ends there."""
    broken = [(name, line) for name, language, text in _blocks() if language in ("sh", "bash", "")
              for line in text.splitlines() if re.search(r"\\\s+#", line)]
    assert broken == []


@pytest.mark.parametrize(("name", "line"), _commands())
def test_every_meshplane_command_in_the_docs_is_accepted(name: str, line: str) -> None:
    parser = cli.build_parser()
    if "[" in line or "..." in line:  # a synopsis: every flag it names exists, with the values it lists
        words = shlex.split(line.replace("[", " ").replace("]", " ").replace("...", " "))
        command = next(w for w in words[1:] if not w.startswith("-"))
        options = _options(parser) | _options(_subparsers(parser)[command])
        for i, word in enumerate(words):
            if word.startswith("--"):
                assert word in options, f"{name}: {line}: no {word} for {command}"
                listed = words[i + 1] if i + 1 < len(words) else ""
                if options[word].choices is not None and "|" in listed:
                    assert set(listed.split("|")) == set(options[word].choices), f"{name}: {word} {listed}"
        return
    argv = shlex.split(line, comments=True)
    argv = [w for w in argv if w != "&"][1:]
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{name}: `{line}` is refused (exit {exc.code})")


def test_every_way_the_docs_create_the_tls_secret_gives_its_type() -> None:
    """The Deployment mounts a Secret of type kubernetes.io/tls (tests/test_deploy.py)."""
    found = [line for _, _, text in _blocks() for line in text.replace("\\\n", " ").splitlines()
             if "create secret" in line and "meshplane-tls" in line]
    assert found and all("--type kubernetes.io/tls" in line for line in found), found
