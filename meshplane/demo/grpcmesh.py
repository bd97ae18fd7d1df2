"""Proxyless gRPC clients and echo backends laid out over S1's zones, for the tests and bench.grpc_failover.

`XdsClient` is grpcio's own xDS client in a process of its own (a process has one bootstrap, so one
node and one locality), calling at a steady rate through `python -m meshplane.demo.grpcecho call`,
with its xDS trace kept to look for NACKs. `Mesh` runs echo replicas (grpcecho.Replica) and writes
the endpoint files that describe them, one per cluster of S1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshplane.demo import grpcecho, topology
from meshplane.demo.ports import free_port

PORT = 50051
"""The echo services' gRPC port."""
ZONES = tuple(zone for spec in topology.S1_CLUSTERS for zone in spec.zones)
_SPEC_OF = {zone: spec for spec in topology.S1_CLUSTERS for zone in spec.zones}


class Mesh:
    """Echo replicas, `services` name -> the zones it runs in (of S1), and their endpoint files."""

    def __init__(self, directory: Path, services: dict[str, tuple[str, ...]]) -> None:
        self.replicas = {(name, zone): grpcecho.Replica(name, zone, free_port())
                         for name, zones in services.items() for zone in zones}
        self.files = tuple(directory / f"{spec.name}.yaml" for spec in topology.S1_CLUSTERS)
        self._services = list(services)

    def write(self) -> tuple[Path, ...]:
        for path, spec in zip(self.files, topology.S1_CLUSTERS, strict=True):
            services = []
            for name in self._services:
                endpoints = [{"address": "127.0.0.1", "port": r.port, "zone": zone}
                             for (n, zone), r in self.replicas.items() if n == name and zone in spec.zones]
                services.append({"name": name, "ports": [{"name": "grpc", "port": PORT, "protocol": "GRPC"}],
                                 "endpoints": endpoints})
            tmp = path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump({"cluster": spec.name, "region": spec.region, "services": services},
                                          sort_keys=False))
            tmp.replace(path)
        return self.files

    async def __aenter__(self) -> Mesh:
        for replica in self.replicas.values():
            await replica.start()
        self.write()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for replica in self.replicas.values():
            await replica.stop()


@dataclass(frozen=True)
class Call:
    at: float  # time.monotonic() in the test process when the result arrived
    ok: bool
    code: str
    body: str

    @property
    def zone(self) -> str | None:
        """Where it landed (`echo@zone`), if it succeeded."""
        return self.body.split("@", 1)[1] if self.ok else None

    @property
    def service(self) -> str | None:
        return self.body.split("@", 1)[0] if self.ok else None


def bootstrap(ads_port: int, *, node_id: str, region: str, zone: str, cluster: str,
              namespace: str = "default") -> dict[str, Any]:
    """What docs/grpc.md tells an application to give its gRPC library (deploy/grpc/bootstrap.json,
    without TLS)."""
    return {
        "xds_servers": [{"server_uri": f"127.0.0.1:{ads_port}", "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": node_id, "locality": {"region": region, "zone": zone, "sub_zone": cluster},
                 "metadata": {"namespace": namespace}},
    }


# A request the client sends that carries an error is its NACK (xds_client.cc's trace).
_REQUEST = re.compile(r"sending ADS request: type=(\S+) version=(\S*) nonce=(\S*) error=(.*)$")


def s1_bootstrap(ads_port: int, zone: str) -> dict[str, Any]:
    """A client in `zone` of S1."""
    spec = _SPEC_OF[zone]
    return bootstrap(ads_port, node_id=f"grpc-{zone}", region=spec.region, zone=zone, cluster=spec.name)


class XdsClient:
    """One gRPC client process calling `target` `rate` times a second until stopped."""

    def __init__(self, boot: dict[str, Any], target: str, *, rate: float = 20.0, timeout: float = 1.0,
                 headers: tuple[str, ...] = ()) -> None:
        self.boot, self.target, self.rate, self.timeout, self.headers = boot, target, rate, timeout, headers
        self.calls: list[Call] = []
        self.trace: list[str] = []
        self._process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self.started = 0.0

    @property
    def zone(self) -> str:
        return str(self.boot["node"]["locality"]["zone"])

    async def __aenter__(self) -> XdsClient:
        args = ["call", self.target, "--rate", str(self.rate), "--timeout", str(self.timeout)]
        for header in self.headers:
            args += ["--header", header]
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(self.boot), "GRPC_TRACE": "xds_client",
               "GRPC_VERBOSITY": "debug", "GRPC_EXPERIMENTAL_XDS_DATA_ERROR_HANDLING": "true"}
        env.pop("GRPC_XDS_BOOTSTRAP", None)
        self.started = time.monotonic()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", grpcecho.__name__, *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._readers = [asyncio.create_task(self._read_calls()), asyncio.create_task(self._read_trace())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(self._process.wait(), 10)
        for task in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _read_calls(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        async for line in self._process.stdout:
            item = json.loads(line)
            self.calls.append(Call(time.monotonic(), item["ok"], item["code"], item["body"]))

    async def _read_trace(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        async for line in self._process.stderr:
            self.trace.append(line.decode(errors="replace").rstrip())

    def since(self, when: float) -> list[Call]:
        return [c for c in self.calls if c.at >= when]

    def ok_in(self, zones: set[str], since: float, n: int) -> bool:
        """The last `n` calls since `since` all succeeded in one of `zones`."""
        recent = self.since(since)[-n:]
        return len(recent) == n and all(c.ok and c.zone in zones for c in recent)

    def nacks(self) -> list[str]:
        """The requests this client sent with an error: its NACKs, with gRPC's reason."""
        return [line for line in self.trace if (m := _REQUEST.search(line)) and m.group(4) != "OK"]

    def acks(self) -> int:
        """Requests that answered a response (they carry its nonce) without an error."""
        return sum(1 for line in self.trace if (m := _REQUEST.search(line)) and m.group(3) and m.group(4) == "OK")

    def received(self) -> list[str]:
        return [line for line in self.trace if "received ADS response" in line]


async def moved(client: XdsClient, since: float, zones: set[str], *, timeout: float = 15) -> tuple[int, float]:
    """Wait until `client`'s calls land in `zones` (10 in a row); the calls that failed on the way, and
    the time from `since` to the first call that succeeded there. Raises TimeoutError naming the zones,
    and AssertionError if a call after that first one failed or landed elsewhere."""
    deadline = time.monotonic() + timeout
    while not client.ok_in(zones, since, 10):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{client.zone}'s calls did not move to {sorted(zones)} in {timeout} s: "
                               f"{client.since(since)[-5:]}")
        await asyncio.sleep(0.02)
    after = client.since(since)
    first = next(x for x in after if x.ok and x.zone in zones)
    stray = [x for x in after if x.at > first.at and not (x.ok and x.zone in zones)]
    assert not stray, stray
    return sum(1 for x in after if not x.ok), first.at - since
