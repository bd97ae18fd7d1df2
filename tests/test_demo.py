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


def _rows(text: str, label: str) -> list[list[str]]:
    """The rounds' rows for one request: [status, the zone of each hop...] (a hop that left its
    caller's zone is marked *, a failed one !)."""
    out = []
    for line in text.splitlines():
        if line.startswith(f"  {label} "):
            rest = line[len(label) + 3:].split()
            if rest and (rest[0].isdigit() or rest[0] == "-"):
                out.append(rest)
    return out


def _wide(out: str, workdir: Path) -> list[str]:
    """Lines wider than a terminal's 80 columns (a path of the work directory cannot be broken)."""
    return [ln for ln in out.splitlines() if len(ln) > 80 and str(workdir) not in ln]


async def test_demo_script_shows_same_region_then_cross_region_failover(tmp_path: Path) -> None:
    script = ("sleep 1; status; break mockb ap-northeast-1a; sleep 2.5; where mockb ap-northeast-1a; "
              "where mockb ap-northeast-1a zone=ap-northeast-1b; break-region mockb ap-northeast-1; sleep 2.5; quit")
    proc = await _demo(tmp_path, "--script", script)
    stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    out = stdout.decode()
    assert proc.returncode == 0, out
    healthy, _, rest = out.partition("break: mockb in ap-northeast-1a")
    same_region, _, cross_region = rest.partition("break-region: mockb in")
    label = "from ap-northeast-1a"
    assert ["200", "ap-northeast-1a", "ap-northeast-1a", "ap-northeast-1a"] in _rows(healthy, label), out
    # mockb moved to the other zone of the region, and is marked as having left its caller's zone.
    assert _rows(same_region, label)[-1] == ["200", "ap-northeast-1a", "ap-northeast-1b*", "ap-northeast-1b"], out
    # `status`: every Envoy (four sidecars and the gateway) has ACKed every type.
    table = [ln for ln in healthy.splitlines() if ln.startswith(("sidecar~", "gateway~"))]
    assert len(table) == 5 and all(ln.count("SYNCED") == 4 for ln in table), out
    # `where` explains the table and says where traffic goes with the broken replica down (what the
    # rounds show), and where it would go if the next zone failed too.
    where, _, what_if = same_region.partition("zone=ap-northeast-1b")
    assert "priority 0  ap-northeast-1/ap-northeast-1a/cluster-2" in where, out
    assert "same region, zone and cluster" in where and "same region, another zone" in where, out
    assert "traffic: 100% to priority 1" in where, out
    assert "traffic: 100% to priority 2" in what_if, out
    last = _rows(cross_region, label)[-1]
    assert last[:2] == ["200", "ap-northeast-1a"] and last[2].startswith("cn-hangzhou-") and last[2].endswith("*"), out
    assert not _wide(out, tmp_path), _wide(out, tmp_path)
    assert not _processes_under(tmp_path), "the demo left processes behind"


async def test_demo_gateway_canary_and_active_standby_moving_when_a_cluster_breaks(tmp_path: Path) -> None:
    script = "sleep 1.2; help; break-cluster cluster-1; sleep 1.5; quit"
    proc = await _demo(tmp_path, "--script", script)
    stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    out = stdout.decode()
    healthy, _, cluster_down = out.partition("break-cluster: every replica in cluster-1")

    # Active-active reaches both clusters; the canary only cluster-2's mocka.
    everywhere = [row[1] for row in _rows(healthy, "gw /mocka")]
    assert any(z.startswith("cn-hangzhou-") for z in everywhere), out
    assert any(z.startswith("ap-northeast-1") for z in everywhere), out
    canary = _rows(out, "gw /mocka +canary")
    assert canary and all(row[0] == "200" and row[1].startswith("ap-northeast-1") for row in canary), out
    # Active-standby: cluster-1 (cn-hangzhou) while it has a healthy mocka; then cluster-2, no request lost.
    before, after = _rows(healthy, "gw /standby"), _rows(cluster_down, "gw /standby")
    assert before and all(row[0] == "200" and row[1].startswith("cn-hangzhou-") for row in before), out
    assert after and all(row[0] == "200" and row[1].startswith("ap-northeast-1") for row in after), out
    # `help` lists the commands again.
    assert healthy.count("Commands (type help to see them again):") == 2, out
    assert proc.returncode == 0, out
    assert not _wide(out, tmp_path), _wide(out, tmp_path)
    assert not _processes_under(tmp_path), "the demo left processes behind"


@pytest.mark.parametrize(("script", "says"), [
    ("sleep 1; brake mockb ap-northeast-1a", "unknown command 'brake' (commands: break, fix,"),
    ("break mockx ap-northeast-1a", "'break mockx ap-northeast-1a': no service 'mockx' "
                                    "(services: mocka, mockb, mockc)"),
    ("fix mockb ap-northeast-1c", "no zone 'ap-northeast-1c' (zones: cn-hangzhou-h, cn-hangzhou-k, "
                                  "ap-northeast-1a, ap-northeast-1b)"),
    ("break-region mockb eu-west-1", "no region 'eu-west-1' (regions: cn-hangzhou, ap-northeast-1)"),
    ("break-cluster cluster-3", "no cluster 'cluster-3' (clusters: cluster-1, cluster-2)"),
    ("where mockb", "'where mockb': write where SERVICE ZONE [zone=Z|cluster=C|region=R ...]"),
    ("where mockb ap-northeast-1a zone=nosuch", "'where mockb ap-northeast-1a zone=nosuch': no zone 'nosuch' "
                                                "(zones: cn-hangzhou-h, cn-hangzhou-k, ap-northeast-1a, "
                                                "ap-northeast-1b)"),
    ("where mockb ap-northeast-1a cluster=cluster-1 region=eu-west-1", "no region 'eu-west-1' (regions: cn-hangzhou, "
                                                                       "ap-northeast-1)"),
    ("where mockb ap-northeast-1a datacenter=dc1", "'datacenter=dc1': write zone=Z, cluster=C or region=R"),
    ("sleep soon", "'sleep soon': 'soon' is not a number of seconds"),
])
async def test_a_script_with_a_bad_command_exits_2_before_starting_anything(
    tmp_path: Path, script: str, says: str
) -> None:
    proc = await _demo(tmp_path, "--script", f"{script}; quit")
    stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    out = stdout.decode()
    assert proc.returncode == 2, out
    said = " ".join(out.split())  # (wrapped to 80 columns)
    assert said.startswith("meshplane demo: --script: ") and says in said, out
    assert "starting" not in out, out
    assert not _processes_under(tmp_path)


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
