"""What `meshplane demo` prints, without running the mesh: rounds in 80 columns with moved and
failed hops marked, the command list, and a command line checked against the mesh's names."""

from __future__ import annotations

import pytest

from meshplane.demo import run, screen, topology

CHAIN = topology.CHAIN
ZONES = tuple(z for spec in topology.S1_CLUSTERS for z in spec.zones)


@pytest.mark.parametrize(("row", "cells"), [
    (screen.Row("from ap-northeast-1a", "ap-northeast-1a", 200,
                "mocka@ap-northeast-1a -> mockb@ap-northeast-1a -> mockc@ap-northeast-1a"),
     ["ap-northeast-1a", "ap-northeast-1a", "ap-northeast-1a"]),
    # mockb failed over to 1b (marked); mockc follows its caller, in 1b (not marked: it is its caller's zone).
    (screen.Row("from ap-northeast-1a", "ap-northeast-1a", 200,
                "mocka@ap-northeast-1a -> mockb@ap-northeast-1b -> mockc@ap-northeast-1b"),
     ["ap-northeast-1a", "ap-northeast-1b*", "ap-northeast-1b"]),
    # The gateway chose mocka's zone (balancing is not a move); mockb left it.
    (screen.Row("gw /mocka", None, 200, "mocka@cn-hangzhou-k -> mockb@cn-hangzhou-h -> mockc@cn-hangzhou-h"),
     ["cn-hangzhou-k", "cn-hangzhou-h*", "cn-hangzhou-h"]),
    (screen.Row("from cn-hangzhou-h", "cn-hangzhou-h", 502, "mocka@cn-hangzhou-h -> !mockb 503"),
     ["cn-hangzhou-h", "!503"]),
    (screen.Row("from cn-hangzhou-h", "cn-hangzhou-h", 502,
                "mocka@cn-hangzhou-h -> mockb@cn-hangzhou-h -> !mockc ConnectionRefusedError"),
     ["cn-hangzhou-h", "cn-hangzhou-h", "!refused"]),
    (screen.Row("from cn-hangzhou-h", "cn-hangzhou-h", 0, "!TimeoutError"), ["!timeout"]),
    (screen.Row("gw /standby", None, 503, "no healthy upstream"), ["!no healthy upstream"]),
])
def test_cells_say_where_each_hop_landed(row: screen.Row, cells: list[str]) -> None:
    assert screen.cells(row) == cells


def test_a_round_fits_80_columns_with_the_longest_names() -> None:
    longest = max(ZONES, key=len)
    rows = [screen.Row(f"from {z}", z, 200, " -> ".join(f"{s}@{longest}" for s in CHAIN)) for z in ZONES]
    rows += [screen.Row(label, None, 503, "upstream connect error or disconnect/reset before headers. "
                                          "reset reason: connection failure, transport failure reason: refused")
             for label, _, _ in run.GATEWAY_REQUESTS]
    table = screen.round_table(1234, "12:00:07", rows, chain=CHAIN, zones=ZONES)
    lines = table.splitlines()
    assert max(map(len, lines)) <= 80, table
    assert lines[0].split() == ["round", "1234", "(12:00:07)", *CHAIN]
    # Each hop starts under its service's name (a long failure is cut at the screen's edge).
    starts = [lines[0].index(s) for s in CHAIN]
    for line, row in zip(lines[1:], rows, strict=True):
        for start, cell in zip(starts, screen.cells(row), strict=False):
            assert line[start - 1] == " " and line[start:].startswith(cell[:80 - start]), (line, cell)


def test_fit_wraps_long_lines_under_their_indent() -> None:
    text = "  " + " ".join(["word"] * 40)
    wrapped = screen.fit(text).splitlines()
    assert all(len(ln) <= 80 for ln in wrapped) and len(wrapped) > 1
    assert wrapped[1].startswith("      word")


def test_the_command_list_fits_and_names_what_exists() -> None:
    text = run.commands_text(topology.Topology.build())
    assert max(map(len, text.splitlines())) <= 80, text
    for command in run.COMMANDS:
        assert f"  {command.verb}" in text
    assert "Services: mocka, mockb, mockc." in text and "Clusters: cluster-1, cluster-2." in text


def test_a_command_line_is_checked_against_the_mesh() -> None:
    topo = topology.Topology.build()
    assert run.parse("break mockb ap-northeast-1a", topo) == ("break", ["mockb", "ap-northeast-1a"])
    assert run.parse("   ", topo) is None
    assert run.parse("where mockb ap-northeast-1a zone=ap-northeast-1b", topo) == (
        "where", ["mockb", "ap-northeast-1a", "zone=ap-northeast-1b"])
    with pytest.raises(run.BadCommand, match="no zone 'cn-hangzhou-q'"):
        run.parse("where mockb cn-hangzhou-q", topo)
    with pytest.raises(run.BadCommand, match="write status"):
        run.parse("status now", topo)
