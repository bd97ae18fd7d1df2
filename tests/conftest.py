"""Shared fixtures: a control plane on free ports, endpoint files, waiting for conditions."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from math import comb
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshplane import app
from meshplane.demo import envoy as envoy_mod

XDS_PROTOCOLS = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
"""The xDS protocols a real Envoy can speak to meshplane, by the bootstrap's ads_config.api_type."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every real-Envoy scenario runs under each protocol (`[sotw]`, `[delta]`), unless it is marked
    `any_protocol` (it checks something the protocol does not touch, or runs the shipped default)."""
    definition = metafunc.definition
    if definition.get_closest_marker("envoy") and not definition.get_closest_marker("any_protocol"):
        metafunc.fixturenames.append("xds_protocol")
        metafunc.parametrize("xds_protocol", list(XDS_PROTOCOLS), indirect=True)


@pytest.fixture
def xds_protocol(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The protocol the test's Envoys speak (the bootstrap's api_type)."""
    protocol = str(request.param)
    monkeypatch.setattr(envoy_mod, "API_TYPE", XDS_PROTOCOLS[protocol])
    return protocol


async def wait_for(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]], *, timeout: float = 10.0, what: str
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def required_tool(name: str, *, why: str) -> str:
    """The path of a program a test needs; without it the test fails (never skips), saying `why`."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {why}")
    return found


def docker_engine() -> bool:
    """Whether a Docker engine answers (on these machines `docker` is only a client)."""
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


def held_back(plane: app.ControlPlane, type_url: str, name: str, *, after: str) -> bool:
    """The route `name` is held back on the plane's one stream, and the client's reply to the last
    response of `after` has been read (so what that reply let go has gone)."""
    (stream,) = list(plane.streams)
    return name in stream.waiting.get(type_url, ()) and not stream.types[after].unsettled


def binomial_bounds(n: int, p: float, tail: float) -> tuple[int, int]:
    """The narrowest [lo, hi] such that Binomial(n, p) falls below lo, or above hi, each with
    probability at most `tail`."""
    pmf = [comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    lo, below = 0, 0.0
    while below + pmf[lo] <= tail:
        below += pmf[lo]
        lo += 1
    hi, above = n, 0.0
    while above + pmf[hi] <= tail:
        above += pmf[hi]
        hi -= 1
    return lo, hi


def cluster_doc(cluster: str, region: str, services: dict[str, list[dict[str, Any]]],
                port: int = 8000) -> dict[str, Any]:
    """An endpoint file: services name -> endpoints (dicts with zone, port, health...)."""
    return {
        "cluster": cluster,
        "region": region,
        "services": [
            {"name": name, "ports": [{"name": "http", "port": port, "protocol": "HTTP"}],
             "endpoints": [{"address": "127.0.0.1", **ep} for ep in eps]}
            for name, eps in services.items()
        ],
    }


def write_yaml(path: Path, doc: Any) -> Path:
    """Write atomically, as editors and config management do (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
    return path


@pytest.fixture
async def start_plane() -> AsyncIterator[Callable[..., Awaitable[app.ControlPlane]]]:
    planes: list[app.ControlPlane] = []

    async def start(**kwargs: Any) -> app.ControlPlane:
        kwargs.setdefault("ads_port", 0)
        kwargs.setdefault("http_port", 0)
        kwargs.setdefault("poll_interval", 0.02)
        plane = app.ControlPlane(app.Config(**kwargs))
        planes.append(plane)  # stopped at teardown even if start() fails half way
        await plane.start()
        return plane

    yield start
    for plane in planes:
        await plane.stop()


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running (an unstopped source, stream or server)."""
    yield
    current = asyncio.current_task()

    def leftovers() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t is not current and not t.done()]

    deadline = time.monotonic() + 2.0
    while leftovers() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    leaked = leftovers()
    assert not leaked, f"test leaked asyncio tasks: {[t.get_name() for t in leaked]}"
