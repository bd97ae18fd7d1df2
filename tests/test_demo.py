"""`meshplane demo` as a user runs it: watch failover, then Ctrl-C leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for

pytestmark = [pytest.mark.envoy, pytest.mark.any_protocol]


def _processes_under(workdir: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", str(workdir)], capture_output=True, text=True, check=False)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


async def _demo(workdir: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshplane", "--log-level", "warning", "demo",
        "--workdir", str(workdir), "--interval", "0.3", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )


async def test_demo_script_shows_same_region_then_cross_region_failover(tmp_path: Path) -> None:
    script = ("sleep 1; status; break mockb ap-northeast-1a; sleep 2.5; where mockb ap-northeast-1a; "
              "where mockb ap-northeast-1a zone=ap-northeast-1b; break-region mockb ap-northeast-1; sleep 2.5; quit")
    proc = await _demo(tmp_path, "--script", script)
    stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    out = stdout.decode()
    assert proc.returncode == 0, out
    healthy, _, rest = out.partition("break: mockb in ap-northeast-1a")
    same_region, _, cross_region = rest.partition("break-region: mockb in")
    line = "  from ap-northeast-1a "
    assert "mocka@ap-northeast-1a > mockb@ap-northeast-1a > mockc@ap-northeast-1a" in healthy, out
    rounds = [ln for ln in same_region.splitlines() if line in ln]
    assert "mocka@ap-northeast-1a > mockb@ap-northeast-1b" in rounds[-1], out
    # `status`: every Envoy (four sidecars and the gateway) has ACKed every type.
    table = [ln for ln in healthy.splitlines() if ln.startswith(("sidecar~", "gateway~"))]
    assert len(table) == 5 and all(ln.count("SYNCED") == 4 for ln in table), out
    # `where` explains the table and says where traffic goes with the broken replica down (what the
    # rounds show), and where it would go if the next zone failed too.
    where, _, what_if = same_region.partition("zone=ap-northeast-1b down")
    assert "priority 0  ap-northeast-1/ap-northeast-1a/cluster-2" in where, out
    assert "same region, zone and cluster" in where and "same region, another zone" in where, out
    assert "traffic: 100% to priority 1" in where, out
    assert "traffic: 100% to priority 2" in what_if, out
    last = [ln for ln in cross_region.splitlines() if line in ln][-1]
    assert "mocka@ap-northeast-1a > mockb@cn-hangzhou-" in last, out
    assert not _processes_under(tmp_path), "the demo left processes behind"


async def test_demo_gateway_canary_and_active_standby_moving_when_a_cluster_breaks(tmp_path: Path) -> None:
    proc = await _demo(tmp_path, "--script", "sleep 1.2; break-cluster cluster-1; sleep 1.5; quit")
    stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    out = stdout.decode()
    assert proc.returncode == 0, out
    healthy, _, cluster_down = out.partition("break-cluster: every replica in cluster-1")

    def lines(text: str, label: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.startswith(f"  gw {label}")]

    # Active-active reaches both clusters; the canary only cluster-2's mocka.
    everywhere = " ".join(lines(healthy, "example.com/mocka"))
    assert "mocka@cn-hangzhou-" in everywhere and "mocka@ap-northeast-1" in everywhere, out
    assert all(" 200  mocka@ap-northeast-1" in ln for ln in lines(out, "  canary: cluster-2")), out
    # Active-standby: cluster-1 (cn-hangzhou) while it has a healthy mocka; then cluster-2, no request lost.
    before, after = lines(healthy, "example.com/standby"), lines(cluster_down, "example.com/standby")
    assert before and all(" 200  mocka@cn-hangzhou-" in ln for ln in before), out
    assert after and all(" 200  mocka@ap-northeast-1" in ln for ln in after), out
    assert not _processes_under(tmp_path), "the demo left processes behind"


async def test_demo_ctrl_c_stops_everything(tmp_path: Path) -> None:
    proc = await _demo(tmp_path)
    assert proc.stdout is not None
    seen = []

    async def first_round() -> bool:
        line = (await proc.stdout.readline()).decode()  # type: ignore[union-attr]
        seen.append(line)
        return line.startswith("round 1")

    await wait_for(first_round, timeout=90, what="the demo's first round of requests")
    assert _processes_under(tmp_path), "expected Envoys running under the workdir"
    os.kill(proc.pid, signal.SIGINT)
    await asyncio.wait_for(proc.wait(), timeout=30)
    assert proc.returncode == 0, "".join(seen)
    await wait_for(lambda: not _processes_under(tmp_path), timeout=10, what="no process left")
