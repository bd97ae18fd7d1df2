"""docker-compose.yml brings up meshplane, an Envoy and Prometheus (where a Docker engine exists)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _docker_engine(), reason="no Docker engine on this machine (docker is only a client here)")
def test_compose_stack_serves_envoy() -> None:
    from testcontainers.compose import DockerCompose

    with DockerCompose(ROOT, compose_file_name="docker-compose.yml", wait=True) as compose:
        compose.wait_for("http://127.0.0.1:18001/ready")
        dump = json.load(urllib.request.urlopen("http://127.0.0.1:15000/config_dump", timeout=10))
        clusters = [c["cluster"]["name"] for s in dump["configs"] if s["@type"].endswith("ClustersConfigDump")
                    for c in s.get("dynamic_active_clusters", [])]
        assert "outbound|8000||mockb.default.svc.cluster.local" in clusters


def test_compose_files_point_at_what_exists() -> None:
    """The compose file's mounted files and meshplane arguments exist in the repository (checked everywhere)."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (ROOT / source).exists(), source
    command = compose["services"]["meshplane"]["command"]
    for word in command.split():
        if word.startswith("deploy/"):
            assert (ROOT / word).exists(), word
