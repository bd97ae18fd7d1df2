"""Every query of the committed dashboard, run by a real Prometheus (Debian's `prometheus`, installed by
the test command) scraping a running meshplane with real Envoys connected, returns data in the
situation its panel shows: a NACK forced, a cluster's API server down, a broken policy edit, a
build failure, an endpoint change pushed and ACKed. The same Prometheus scrapes another process too,
in meshplane's job and in a job of its own (as a shared Prometheus does): no panel charts it. The
shipped alert rules load and evaluate too, and promtool runs their unit tests."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshplane import app
from meshplane.demo import envoy
from meshplane.demo.ports import free_port
from meshplane.xds import translate
from tests.conftest import cluster_doc, required_tool, wait_for, write_yaml
from tests.fakekube import FakeKubeAPI, endpoint, endpoint_slice, node, service
from tests.test_clusters import FAST
from tests.test_dashboard import DASHBOARD, load_generator

pytestmark = [pytest.mark.envoy, pytest.mark.slow, pytest.mark.any_protocol]

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
WINDOW = "20s"  # what $__rate_interval stands for here: scrapes every second


def prometheus_binary() -> str:
    return required_tool("prometheus", why="scripts/test.sh installs Debian's package (apt-get install prometheus)")


class Prometheus:
    """Scrapes `target` in the job meshplane, beside `also` (more targets of that job, e.g. a port nothing
    answers on); and itself, a process with process_* metrics of its own, in meshplane's job and in another."""

    def __init__(self, workdir: Path, target: str, *, also: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.itself = f"127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "meshplane", "static_configs": [{"targets": [target, self.itself, *also]}]},
                {"job_name": "prometheus", "static_configs": [{"targets": [self.itself]}]},
            ],
        }))
        self.data = workdir / "tsdb"
        self.log = workdir / "prometheus.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                prometheus_binary(), f"--config.file={self.config}", f"--storage.tsdb.path={self.data}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        await wait_for(self._ready, timeout=30, what=f"Prometheus ready (log: {self.log})")

        async def scraped() -> bool:  # Prometheus hands new targets to its scrapers every 5 s
            return sum(s["value"][1] == "1" for s in await self.query("up")) >= 3

        await wait_for(scraped, timeout=30, what=f"Prometheus scraping meshplane (log: {self.log})")

    async def _ready(self) -> bool:
        try:
            await asyncio.to_thread(self._get, "/-/ready")
            return True
        except OSError:
            return False

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            return json.loads(response.read()) if path.startswith("/api") else None

    async def query(self, expr: str) -> list[dict[str, Any]]:
        answer = await asyncio.to_thread(self._get, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    async def get(self, path: str) -> Any:
        return await asyncio.to_thread(self._get, path)

    async def label_values(self, label: str, selector: str) -> list[str]:
        """What Grafana's `label_values(selector, label)` variable query lists."""
        answer = await self.get(f"/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": selector}))
        return list(answer["data"])

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), timeout=10)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubeAPI]:
    fake = FakeKubeAPI("kc")
    fake.start()
    fake.put("nodes", node("node-a", "r1", "z1"))
    fake.put("services", service("web", "default", [{"name": "http", "port": 80}]))
    fake.put("endpointslices", endpoint_slice("web-a", "default", "web", [endpoint("127.0.0.9", node_name="node-a")],
                                              [{"name": "http", "port": 8080}]))
    yield fake
    fake.stop()


def _values(series: list[dict[str, Any]]) -> list[float]:
    return [v for v in (float(s["value"][1]) for s in series) if not math.isnan(v)]


async def test_every_panel_has_data_in_its_situation(
    start_plane: Any, kube: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = load_generator()
    committed = json.loads(DASHBOARD.read_text())
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009},
                                                                                 {"zone": "z2", "port": 9010}]}))
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: 1s\n")
    plane: app.ControlPlane = await start_plane(
        endpoint_files=(endpoints,), policy_file=policy, kube=FAST,
        kubeconfigs=(f"kc={kube.write_kubeconfig(tmp_path / 'kc.yaml', cluster='kc')}",))
    meshplane = f"127.0.0.1:{plane.http_port}"
    nothing_there = f"127.0.0.1:{free_port()}"  # a meshplane that is down
    prom = Prometheus(tmp_path, meshplane, also=(nothing_there,))
    proxies = [envoy.EnvoyProcess(
        node=envoy.EnvoyNode(id=f"sidecar-{z}", cluster="t", region="r1", zone=z, sub_zone="c1",
                             metadata={"listener_port": free_port(), "listener_address": "127.0.0.1"}),
        ads_port=plane.ads_port, workdir=tmp_path) for z in ("z1", "z2")]
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    stuck = envoy.EnvoyProcess(
        node=envoy.EnvoyNode(id="sidecar-stuck", cluster="t", region="r1", zone="z1", sub_zone="c1",
                             metadata={"listener_port": taken.getsockname()[1], "listener_address": "127.0.0.1"}),
        ads_port=plane.ads_port, workdir=tmp_path)
    try:
        await prom.start()
        for proxy in (*proxies, stuck):  # serving; and one Envoy NACKs its listener
            await proxy.start()
        await wait_for(lambda: plane.metrics.registry.get_sample_value("meshplane_xds_nacks_total", {"type": "lds"}),
                       timeout=20, what="the NACK")
        kube.set_unreachable(True)  # stale
        policy.write_text("apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: soon\n")  # rejected
        build_cluster = translate.build_cluster

        def broken(service: Any, port: Any, settings: Any, **kw: Any) -> Any:
            if service.name == "broken":
                raise RuntimeError("injected: cannot build broken")
            return build_cluster(service, port, settings, **kw)

        monkeypatch.setattr(translate, "build_cluster", broken)  # build failure, and a change pushed
        write_yaml(endpoints, cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009}],
                                                      "broken": [{"zone": "z1", "port": 9011}]}))

        # The variables at the top, as Grafana fills them (All: its regex of the values its query found, for
        # instance `.*`): only meshplane's job and instance, though another process is in that job too.
        variables = {v["name"]: v for v in committed["templating"]["list"]}
        assert variables["job"]["query"] == "label_values(meshplane_xds_connected_proxies, job)"
        jobs = await prom.label_values("job", "meshplane_xds_connected_proxies")
        assert jobs == ["meshplane"]
        job_all = "(" + "|".join(jobs) + ")"
        instance_query = variables["instance"]["query"].replace("$job", job_all)
        selector, label = instance_query.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        assert await prom.label_values(label, selector) == [meshplane]

        for spec in generator.PANELS:
            panel = next(p for p in committed["panels"] if p.get("title") == spec.title)
            for target, query in zip(panel["targets"], spec.queries, strict=True):
                expr = (target["expr"].replace("$job", job_all).replace("$instance", variables["instance"]["allValue"])
                        .replace("$__rate_interval", WINDOW))

                async def answered(expr: str = expr) -> list[float]:
                    return _values(await prom.query(expr))

                found = await wait_for(answered, timeout=30,
                                       what=f"data for {spec.title!r} ({spec.shows}): {expr}")
                if query.nonzero:
                    await wait_for(lambda expr=expr: _positive(prom, expr), timeout=30,
                                   what=f"a non-zero value for {spec.title!r} ({spec.shows}): {expr}")
                assert found
                charted = {(s["metric"].get("job"), s["metric"].get("instance")) for s in await prom.query(expr)}
                if "{{instance}}" in query.legend:  # one series per instance: meshplane's, not Prometheus'
                    assert charted == {("meshplane", meshplane)}, f"{spec.title!r} charts {charted}: {expr}"

        # The shipped alert rules load and evaluate without error against the same metrics.
        rules = (await prom.get("/api/v1/rules"))["data"]["groups"]
        names = {r["name"] for g in rules for r in g["rules"]}
        assert names >= {"MeshplaneProxyRejectedConfig", "MeshplaneClusterStale", "MeshplaneBuildFailures"}
        assert all(r["health"] in ("ok", "unknown") for g in rules for r in g["rules"]), rules

        async def nack_alert_firing() -> bool:
            alerts = (await prom.get("/api/v1/alerts"))["data"]["alerts"]
            return any(a["labels"]["alertname"] == "MeshplaneProxyRejectedConfig" for a in alerts)

        await wait_for(nack_alert_firing, timeout=20, what="the NACK alert")

        async def down_alert() -> set[tuple[str, str]]:  # pending: it fires after its `for: 1m`
            alerts = (await prom.get("/api/v1/alerts"))["data"]["alerts"]
            return {(a["labels"].get("instance", ""), a["state"]) for a in alerts
                    if a["labels"]["alertname"] in ("MeshplaneDown", "MeshplaneAbsent")}

        assert await wait_for(down_alert, timeout=20, what="MeshplaneDown for the target that is down") == {
            (nothing_there, "pending")}
    finally:
        for proxy in (*proxies, stuck):
            await proxy.stop()
        taken.close()
        await prom.stop()


async def _positive(prom: Prometheus, expr: str) -> bool:
    return any(v > 0 for v in _values(await prom.query(expr)))


def test_promtool_checks_the_shipped_prometheus_files() -> None:
    promtool = required_tool("promtool", why="scripts/test.sh installs Debian's prometheus package")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)],
                 ["check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
