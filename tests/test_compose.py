"""docker-compose.yml brings up meshplane (from the Dockerfile's image), an Envoy, Prometheus and Grafana.

Checked everywhere without a Docker engine: meshplane is built from the Dockerfile and run from its
image (nothing installed at start, no source tree mounted), every file it names exists through its
mounts, and every port is published on 127.0.0.1 only. Each check also runs on a broken copy
(MUTATIONS) to show it can fail. Bringing the stack up needs a Docker engine (skipped without one).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.conftest import docker_engine
from tests.test_deploy import DOCKERFILE, parse_dockerfile, stages

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
LOOPBACK = "127.0.0.1"

Compose = dict[str, Any]


@pytest.fixture
def compose() -> Compose:
    return copy.deepcopy(COMPOSE)


def _image_entrypoint_and_workdir() -> tuple[list[str], str]:
    final = stages(parse_dockerfile(DOCKERFILE.read_text()))[-1]
    entrypoint = json.loads(final.of("ENTRYPOINT")[-1].args)
    return entrypoint, final.of("WORKDIR")[-1].args


def _mounts(service: Compose) -> dict[str, str]:
    """container path -> repository path, for every bind mount of the service."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def _on_host(service: Compose, path: str, workdir: str) -> Path | None:
    """Where in the repository a path the container opens comes from (through its mounts), or None."""
    inside = PurePosixPath(workdir) / path
    for target, source in sorted(_mounts(service).items(), key=lambda m: -len(m[0])):
        if inside == PurePosixPath(target) or PurePosixPath(target) in inside.parents:
            return ROOT / source / inside.relative_to(target)
    return None


# ---- the checks (each asserts; each runs on the shipped file and on a broken copy) -------------------------------

def check_meshplane_is_the_dockerfiles_image(compose: Compose) -> None:
    meshplane = compose["services"]["meshplane"]
    build = meshplane.get("build")
    context = build if isinstance(build, str) else (build or {}).get("context")
    assert context == ".", f"meshplane is not built from the repository's Dockerfile (build: {build!r})"
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / dockerfile).resolve() == DOCKERFILE, f"build: dockerfile {dockerfile}"
    assert meshplane.get("image") == "meshplane:dev", "the built image is tagged as docs/deploying.md builds it"
    assert "entrypoint" not in meshplane, "an entrypoint overrides the image's (meshplane)"


def check_nothing_installed_at_start(compose: Compose) -> None:
    meshplane = compose["services"]["meshplane"]
    command = meshplane.get("command", "")
    words = command if isinstance(command, list) else shlex.split(command)
    for word in words:
        assert not re.search(r"\bpip3?\b|\binstall\b|&&|\bsh\b", word), f"installs or shells at start: {word!r}"
    for target, source in _mounts(meshplane).items():
        assert PurePosixPath(source) != PurePosixPath("."), f"the source tree is mounted at {target}"
    assert "working_dir" not in meshplane, "working_dir replaces the image's WORKDIR"


def check_command_files_exist(compose: Compose) -> None:
    entrypoint, workdir = _image_entrypoint_and_workdir()
    assert entrypoint == ["meshplane"], entrypoint
    meshplane = compose["services"]["meshplane"]
    words = shlex.split(meshplane["command"])
    assert words[0] == "serve", f"the image runs `meshplane {words[0]}`, not serve"
    files = [w for w, flag in zip(words[1:], words, strict=False) if flag in ("--endpoints", "--policy")]
    assert files, "serve reads no endpoint or policy file"
    for path in files:
        on_host = _on_host(meshplane, path, workdir)
        assert on_host is not None and on_host.is_file(), f"{path}: not a file mounted into the container"


def check_ports_on_loopback_only(compose: Compose) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):  # the long syntax
                host_ip = port.get("host_ip")
            else:
                parts = str(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else None
            assert host_ip == LOOPBACK, f"{name}: port {port} is published on every interface, not {LOOPBACK}"


CHECKS = [check_meshplane_is_the_dockerfiles_image, check_nothing_installed_at_start, check_command_files_exist,
          check_ports_on_loopback_only]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_compose_file_passes(check: Callable[[Compose], None], compose: Compose) -> None:
    check(compose)


def _meshplane(**changes: Any) -> Callable[[Compose], None]:
    def mutate(compose: Compose) -> None:
        service = compose["services"]["meshplane"]
        for key, value in changes.items():
            if value is None:
                service.pop(key, None)
            else:
                service[key] = value
    return mutate


def _ports(service: str, ports: list[Any]) -> Callable[[Compose], None]:
    def mutate(compose: Compose) -> None:
        compose["services"][service]["ports"] = ports
    return mutate


_PIP_AT_START = 'sh -c "pip install --no-cache-dir /src && exec meshplane serve --policy /src/policy.yaml"'
MUTATIONS: list[tuple[Callable[[Compose], None], str, Callable[[Compose], None]]] = [
    (check_meshplane_is_the_dockerfiles_image, "a stock Python image", _meshplane(
        build=None, image="python:3.11-slim")),
    (check_meshplane_is_the_dockerfiles_image, "another Dockerfile", _meshplane(
        build={"context": ".", "dockerfile": "other.Dockerfile"})),
    (check_meshplane_is_the_dockerfiles_image, "entrypoint replaced", _meshplane(entrypoint=["sh", "-c"])),
    (check_nothing_installed_at_start, "pip install at start", _meshplane(command=_PIP_AT_START)),
    (check_nothing_installed_at_start, "source tree mounted", _meshplane(volumes=[".:/src"])),
    (check_nothing_installed_at_start, "working_dir", _meshplane(working_dir="/src")),
    (check_command_files_exist, "file not mounted", _meshplane(volumes=[])),
    (check_command_files_exist, "misspelt file", _meshplane(
        command="serve --policy examples/policy.yml --ads 0.0.0.0:18000 --http 0.0.0.0:18001")),
    (check_command_files_exist, "meshplane twice", _meshplane(command="meshplane serve --policy examples/policy.yaml")),
    (check_ports_on_loopback_only, "Envoy admin on every interface", _ports("envoy", ["15000:15000"])),
    (check_ports_on_loopback_only, "a port without a host port", _ports("meshplane", ["18001"])),
    (check_ports_on_loopback_only, "long syntax, every interface", _ports("grafana", [
        {"target": 3000, "published": 3000}])),
    (check_ports_on_loopback_only, "all addresses", _ports("prometheus", ["0.0.0.0:9090:9090"])),
]


@pytest.mark.parametrize(("check", "what", "mutate"), MUTATIONS,
                         ids=[f"{m[0].__name__}-{m[1].replace(' ', '-')}" for m in MUTATIONS])
def test_each_check_fails_on_a_broken_compose_file(
        check: Callable[[Compose], None], what: str, mutate: Callable[[Compose], None], compose: Compose) -> None:
    mutate(compose)
    with pytest.raises(AssertionError):
        check(compose)


def test_every_check_has_a_mutation() -> None:
    assert {m[0] for m in MUTATIONS} == set(CHECKS)


def test_compose_files_point_at_what_exists() -> None:
    """Every bind mount of every service is a file or folder of the repository."""
    for service in COMPOSE["services"].values():
        for source in _mounts(service).values():
            assert (ROOT / source).exists(), source


# ---- the stack, up (needs a Docker engine) ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not docker_engine(), reason="no Docker engine on this machine (docker is only a client here)")
def test_compose_stack_serves_envoy() -> None:
    from testcontainers.compose import DockerCompose

    with DockerCompose(ROOT, compose_file_name="docker-compose.yml", build=True, wait=True) as stack:
        stack.wait_for("http://127.0.0.1:18001/ready")
        dump = json.load(urllib.request.urlopen("http://127.0.0.1:15000/config_dump", timeout=10))
        clusters = [c["cluster"]["name"] for s in dump["configs"] if s["@type"].endswith("ClustersConfigDump")
                    for c in s.get("dynamic_active_clusters", [])]
        assert "outbound|8000||mockb.default.svc.cluster.local" in clusters
        for service, port in (("envoy", 15000), ("meshplane", 18001)):
            host, _ = stack.get_service_host_and_port(service, port)
            assert host == LOOPBACK, f"{service}:{port} is published on {host}"
