"""The commands in README.md and docs/ work when pasted: every `meshplane ...` line is one the command
line accepts, every flag a synopsis names exists with the values it lists, and no shell block breaks
a continued command with a comment."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
import subprocess
import sys
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


def _block_after(doc: str, heading: str, index: int = 0) -> str:
    """The `index`-th fenced block under `heading` in docs/`doc`."""
    text = (ROOT / "docs" / doc).read_text()
    section = text[text.index(heading):]
    return [m.group(2) for m in _BLOCK.finditer(section)][index]


def test_the_grpc_walkthrough_works_when_pasted() -> None:
    """docs/grpc.md's first two blocks, pasted into a shell as they are: the calls land in the client's
    zone (none before meshplane serves), and `status` then lists the client SYNCED."""
    ports = (18000, 18001, 27001, 27002)  # the documented ones
    for port in ports:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port}, which docs/grpc.md uses, is taken on this machine")
    blocks = [_block_after("grpc.md", "## Try it on one machine", i) for i in (0, 1)]
    bindir = f"{Path(sys.executable).parent}/"  # the venv the tests run in (.venv/bin/ in CI)
    script = "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\nset -e\n" + "".join(
        block.replace(".venv/bin/", bindir) + "echo ==block==\n" for block in blocks)
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    parts = result.stdout.split("==block==\n")
    assert len(parts) == 3, f"a block failed (exit {result.returncode}): {result.stdout}{result.stderr[-2000:]}"
    calls, status, _ = parts
    answers = [json.loads(line) for line in calls.splitlines() if line.startswith("{")]  # (servers say hello)
    assert [(a["ok"], a["body"]) for a in answers] == [(True, "echo@cn-hangzhou-h")] * 5, result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split()[:8] for line in status.splitlines()[2:]]
    assert rows == [["echo-client-1", "grpc", "sotw", "cn-hangzhou/cn-hangzhou-h/cluster-1", *["SYNCED"] * 4]], status
