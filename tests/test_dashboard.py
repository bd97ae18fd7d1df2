"""The Grafana dashboard is code: the committed JSON is what deploy/grafana/dashboard.py generates, and
docker-compose.yml provisions it (and Prometheus) from files that exist. Its queries are run against
a real Prometheus in tests/test_dashboard_prometheus.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "deploy" / "grafana" / "dashboard.py"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "meshplane.json"
SITUATIONS = {"serving", "change", "nack", "stale", "rejected", "build-failure"}


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("meshplane_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_committed_dashboard_is_what_the_generator_makes() -> None:
    generator = load_generator()
    assert DASHBOARD.read_text() == generator.render(), (
        "deploy/grafana/dashboards/meshplane.json is out of date: run .venv/bin/python deploy/grafana/dashboard.py")


def test_without_the_sdk_the_generator_says_how_to_get_it_in_one_line() -> None:
    """The README's venv (`.[envoy]`) has no grafana-foundation-sdk: a None in sys.modules is how
    Python sees a package that is not installed."""
    run = ("import runpy, sys; sys.modules['grafana_foundation_sdk'] = None; "
           f"runpy.run_path({str(GENERATOR)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-I", "-c", run], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("deploy/grafana/dashboard.py needs grafana-foundation-sdk, one of the test "
                             "dependencies: .venv/bin/pip install -e '.[test]'\n")


def test_every_panel_says_what_it_shows_and_has_queries() -> None:
    generator = load_generator()
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert [p["title"] for p in panels] == [s.title for s in generator.PANELS]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for spec, panel in zip(generator.PANELS, panels, strict=True):
        assert spec.shows in SITUATIONS, spec
        assert panel["description"] and panel["targets"], panel["title"]
        assert all(t["expr"] and t["refId"] for t in panel["targets"])
    titles = " ".join(s.title for s in generator.PANELS).lower()
    for needed in ("push latency", "nacks", "clients by kind and sync state", "discovery", "debounce, queue and build",
                   "configuration size", "policy reloads", "build failures", "cpu", "memory"):
        assert needed in titles, needed


def test_compose_provisions_prometheus_and_grafana_from_the_repository() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    mounts = {service: dict(v.split(":")[:2] for v in spec.get("volumes", [])) for service, spec in compose.items()}
    # Prometheus reads deploy/prometheus: its config names alerts.yml beside it, and scrapes meshplane's --http.
    prom_dir = ROOT / mounts["prometheus"]["./deploy/prometheus"].replace("/etc/prometheus", "deploy/prometheus")
    config = yaml.safe_load((prom_dir / "prometheus.yml").read_text())
    assert all((prom_dir / rule).exists() for rule in config["rule_files"])
    (target,) = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == "meshplane:" + compose["meshplane"]["command"].split("--http 0.0.0.0:")[1].split()[0].strip("\"")
    # Grafana: the provisioning folder, whose dashboard provider reads where the dashboards are mounted,
    # and whose data source is the compose file's Prometheus.
    grafana = mounts["grafana"]
    assert grafana["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/meshplane.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == grafana["./deploy/grafana/dashboards"]
    assert (ROOT / "deploy/grafana/dashboards/meshplane.json").exists()
    source = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    (datasource,) = source["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:" + compose["prometheus"]["ports"][0].split(":")[-1]
