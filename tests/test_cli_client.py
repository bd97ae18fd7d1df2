"""`meshplane status | config-dump | explain` as a user runs them against a running control plane, and
the /debug pages they read as scripts read them: one clear line for every mistake, the version, and a
start without the server's imports."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshplane import app, ask
from meshplane.demo import grpcmesh, topology
from meshplane.demo.ports import free_port
from meshplane.xds import proxy, streams

VERSION = importlib.metadata.version("meshplane")


async def meshplane(*args: str, stdout: int | None = asyncio.subprocess.PIPE) -> tuple[int, str, str]:
    """Run the `meshplane` command as a user would; (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshplane", *args,
        stdout=stdout, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, (out or b"").decode(), err.decode()


def _get(port: int, path: str) -> tuple[int, str, Any]:
    """(status, content type, body: JSON decoded where it is JSON)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            status, kind, body = response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            status, kind, body = error.code, error.headers["Content-Type"], error.read()
    return status, kind, json.loads(body) if kind == "application/json" else body.decode()


async def http(plane: app.ControlPlane, path: str) -> tuple[int, str, Any]:
    return await asyncio.to_thread(_get, plane.http_port, path)


@pytest.fixture
async def s1_plane(start_plane: Any, tmp_path: Path) -> app.ControlPlane:
    """S1's catalog (both clusters' endpoint files) and the demo's policy; no proxy connected."""
    topo = topology.Topology.build()
    files = []
    for spec in topo.clusters:
        path = tmp_path / f"{spec.name}.yaml"
        path.write_text(yaml.safe_dump(topo.endpoint_doc(spec), sort_keys=False))
        files.append(path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(topology.demo_policy(gateway_port=free_port()))
    return await start_plane(endpoint_files=tuple(files), policy_file=policy)  # type: ignore[no-any-return]


# The version: --version (tests/test_cli.py), status, /ready and the build_info metric agree.


async def test_the_version_is_in_status_ready_and_a_metric(s1_plane: app.ControlPlane) -> None:
    server = f"127.0.0.1:{s1_plane.http_port}"
    code, out, err = await meshplane("status", "--server", server)  # HOST:PORT, as serve --http takes it
    assert code == 0, err
    assert out.splitlines() == [f"meshplane {VERSION} at http://{server}", "no clients connected"]
    code, out, err = await meshplane("status", "--server", f":{s1_plane.http_port}")  # :PORT, as --http too
    assert (code, out.splitlines()[0]) == (0, f"meshplane {VERSION} at http://{server}"), err
    _, _, ready = await http(s1_plane, "/ready")
    assert ready["version"] == VERSION
    _, _, metrics = await http(s1_plane, "/metrics")
    assert f'meshplane_build_info{{version="{VERSION}"}} 1.0' in metrics.splitlines()


# One clear line: the server, the output pipe.


async def test_a_server_that_is_down_is_one_line_naming_the_flag_and_the_url() -> None:
    port = free_port()
    code, _, err = await meshplane("status", "--server", f"127.0.0.1:{port}")
    assert code == 1
    assert err == (f"meshplane status: no control plane answers at http://127.0.0.1:{port} (--server): connection "
                   "refused; is `meshplane serve` running with that --http address?\n")
    code, _, err = await meshplane("explain", "mockb", "--from", "z", "--server", "http://nohost.invalid:1")
    assert code == 1 and len(err.splitlines()) == 1
    assert "http://nohost.invalid:1 (--server): cannot resolve its host name" in err, err


async def test_a_port_that_is_not_meshplanes_is_named(s1_plane: app.ControlPlane) -> None:
    # Something else answers there (here: a path meshplane does not serve, as another server's 404).
    code, _, err = await meshplane("status", "--server", f"http://127.0.0.1:{s1_plane.http_port}/elsewhere")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "/elsewhere/debug/syncz answered 404 Not Found: is http://127.0.0.1:" in err, err
    assert "the HTTP port of `meshplane serve` (its --http)?" in err


async def test_a_reader_that_goes_away_is_no_traceback(s1_plane: app.ControlPlane) -> None:
    """`meshplane explain --json | head -1`: the pipe closes before the answer is written."""
    read, write = os.pipe()
    os.close(read)  # nobody reads: every write to the pipe fails with EPIPE
    try:
        code, _, err = await meshplane("explain", "mockb", "--from", "ap-northeast-1a", "--json",
                                       "--server", f"127.0.0.1:{s1_plane.http_port}", stdout=write)
    finally:
        os.close(write)
    assert (code, err) == (1, "")


# status


async def test_wait_synced_with_no_client_fails_unless_allowed(s1_plane: app.ControlPlane) -> None:
    server = f"127.0.0.1:{s1_plane.http_port}"
    code, _, err = await meshplane("status", "--server", server, "--wait-synced", "0.5")
    assert code == 1
    assert err == "meshplane status: no client connected after 0.5s (--allow-none accepts none)\n"
    code, _, err = await meshplane("status", "--server", server, "--kind", "gateway", "--wait-synced", "0.5")
    assert code == 1 and "no client connected matching --kind gateway" in err, err
    code, out, err = await meshplane("status", "--server", server, "--wait-synced", "0.5", "--allow-none")
    assert code == 0, err
    assert out.splitlines()[-1] == "no clients connected"


async def test_status_kind_grpc_lists_a_proxyless_client_and_state_takes_any_case(
    start_plane: Any, tmp_path: Path
) -> None:
    async with grpcmesh.Mesh(tmp_path, {"echo": ("cn-hangzhou-h",)}) as echo:
        plane = await start_plane(endpoint_files=echo.files)
        server = f"127.0.0.1:{plane.http_port}"
        boot = grpcmesh.s1_bootstrap(plane.ads_port, "cn-hangzhou-h")
        async with grpcmesh.XdsClient(boot, f"xds:///echo:{grpcmesh.PORT}"):
            code, out, err = await meshplane("status", "--server", server, "--kind", "grpc", "--wait-synced", "20")
            assert code == 0, (out, err)
            rows = out.splitlines()[2:]
            assert [row.split()[:3] for row in rows] == [["grpc-cn-hangzhou-h", "grpc", "sotw"]], out
            code, out, err = await meshplane("status", "--server", server, "--kind", "GRPC")  # any case, as --state
            assert code == 0 and out.splitlines()[2].startswith("grpc-cn-hangzhou-h"), (out, err)
            for state in ("synced", "Synced", "SYNCED"):
                code, out, err = await meshplane("status", "--server", server, "--state", state)
                assert code == 0 and out.splitlines()[2].startswith("grpc-cn-hangzhou-h"), (state, out, err)
            # Filters that match nobody say so, not that nobody is connected.
            for filters in (["--kind", "sidecar"], ["--state", "nacked"], ["--locality", "ap-northeast-1"]):
                code, out, _ = await meshplane("status", "--server", server, *filters)
                shown = f"{filters[0]} {filters[1].upper() if filters[0] == '--state' else filters[1]}"
                assert (code, out.splitlines()[1:]) == (0, [f"no client matches {shown} (1 connected)"]), out
            for query in ("state=synced", "kind=grpc&state=Synced", "kind=GRPC", "locality=cn-hangzhou/cn-hangzhou-h/"):
                status, _, body = await http(plane, f"/debug/syncz?{query}")
                assert status == 200 and [c["node"] for c in body["clients"]] == ["grpc-cn-hangzhou-h"], query


def test_the_clients_choices_are_the_servers() -> None:
    """ask.py imports nothing of the server: its lists must not drift from the server's enums."""
    assert tuple(k.value for k in proxy.Kind) == ask.KINDS
    assert tuple(s.value for s in streams.Sync) == ask.STATES


@pytest.mark.parametrize(("query", "says"), [
    ("state=BOGUS", "state: 'BOGUS' is not a state (SYNCED, STALE, NACKED, NOT SENT)"),
    ("kind=nope", "kind: 'nope' is not a kind of client (sidecar, gateway, grpc)"),
    ("locality=r1/z1/c1/x", "locality: 'r1/z1/c1/x' is not REGION[/ZONE[/CLUSTER]]"),
    ("locality=r1//c1", "locality: 'r1//c1' is not REGION[/ZONE[/CLUSTER]]"),
    ("staet=NACKED", "unknown parameter 'staet' (parameters: kind, locality, state)"),
])
async def test_syncz_refuses_a_filter_no_client_could_match(s1_plane: app.ControlPlane, query: str, says: str) -> None:
    """A script reading /debug/syncz?state=NACKD must not read "nothing NACKED"."""
    status, _, body = await http(s1_plane, f"/debug/syncz?{query}")
    assert (status, body) == (400, {"error": says})


# explain


@pytest.mark.parametrize(("query", "says"), [
    ("from=a/b/c/d", "from 'a/b/c/d' is not REGION/ZONE/CLUSTER (or a zone alone)"),
    ("from=nowhere", "from 'nowhere': zone 'nowhere' alone does not say the region (regions seen with it: none)"),
    ("down=endpoint=10.1.0.2:99999", "down 'endpoint=10.1.0.2:99999': 99999 is not a port number (1-65535)"),
    ("down=endpoint=10.1.0.2:http", "down 'endpoint=10.1.0.2:http': 'http' is not a port number (1-65535)"),
    ("down=endpoint=not-an-address", "down 'endpoint=not-an-address': 'not-an-address' is not an IP address"),
    ("down=endpoint=10.1.0.2", "down endpoint=10.1.0.2: no endpoint in the catalog is at 10.1.0.2"),
    ("down=zone=cn-hangzhou-q", "down zone=cn-hangzhou-q: no endpoint of the catalog is in that zone (zones: "
                                "ap-northeast-1a, ap-northeast-1b, cn-hangzhou-h, cn-hangzhou-k)"),
    ("down=cluster=cluster-3", "down cluster=cluster-3: no endpoint of the catalog is in that cluster (clusters: "
                               "cluster-1, cluster-2)"),
    ("down=region=eu-west-1", "down region=eu-west-1: no endpoint of the catalog is in that region (regions: "
                              "ap-northeast-1, cn-hangzhou)"),
    ("label=version", "label 'version': write KEY=VALUE"),
    ("label==v1", "label '=v1': write KEY=VALUE"),
    ("lable=version%3Dv1", "unknown parameter 'lable'"),
    ("host=example.com", "host is for a request at a gateway: give gateway=NAME"),
])
async def test_explain_page_refuses_what_the_command_refuses(s1_plane: app.ControlPlane, query: str, says: str) -> None:
    """Naming the page's parameter (`from`, `down`), not the command's flag: scripts read the page."""
    base = "service=mockb" + ("" if query.startswith("from=") else "&from=ap-northeast-1a")
    status, _, body = await http(s1_plane, f"/debug/explain?{base}&{query}")
    assert status == 400 and body["error"].startswith(says), body
    name = query.partition("=")[0]
    assert body.get("parameter") == (name if name in ("from", "down", "label") else None), body


@pytest.mark.parametrize(("query", "says"), [
    ("gateway=edge&header=x-canary", "header 'x-canary': write NAME=VALUE"),
    ("gateway=edge&label=version%3Dv1", "label is a sidecar client's"),
    ("gateway=edge&down=zone=nope", "down zone=nope: no endpoint of the catalog is in that zone"),
    ("gateway=edge&service=mockb", "give a service, or a gateway"),
    ("", "give service=NAMESPACE/NAME, or gateway=NAME"),
])
async def test_explain_page_at_a_gateway_refuses_the_same(s1_plane: app.ControlPlane, query: str, says: str) -> None:
    status, _, body = await http(s1_plane, f"/debug/explain?{query}")
    assert status == 400 and says in body["error"], body


async def test_explain_down_what_the_catalog_has_is_answered(s1_plane: app.ControlPlane) -> None:
    server = f"127.0.0.1:{s1_plane.http_port}"
    code, out, err = await meshplane("explain", "mockb", "--from", "ap-northeast-1a", "--down", "zone=ap-northeast-1a",
                                     "--server", server)
    assert code == 0, err
    assert out.splitlines()[-1] == "  traffic: 100% to priority 1"
    code, _, err = await meshplane("explain", "mockb", "--from", "ap-northeast-1a", "--down", "zone=cn-hangzhou-q",
                                   "--server", server)
    assert code == 1
    assert err == ("meshplane explain: --down zone=cn-hangzhou-q: no endpoint of the catalog is in that zone (zones: "
                   "ap-northeast-1a, ap-northeast-1b, cn-hangzhou-h, cn-hangzhou-k)\n")
    # What only the server can check (the catalog's zones) is said naming the command's flag, as the rest.
    code, _, err = await meshplane("explain", "mockb", "--from", "nowhere", "--server", server)
    assert (code, err) == (1, "meshplane explain: --from 'nowhere': zone 'nowhere' alone does not say the region "
                              "(regions seen with it: none); give REGION/ZONE/CLUSTER\n")


# config-dump


async def test_config_dump_needs_a_proxy_and_an_unknown_one_lists_the_connected(s1_plane: app.ControlPlane) -> None:
    status, _, body = await http(s1_plane, "/debug/config_dump")
    assert (status, body) == (400, {"error": "give the proxy: ?proxy=NODE_ID"})
    code, _, err = await meshplane("config-dump", "nobody", "--server", f"127.0.0.1:{s1_plane.http_port}")
    assert code == 1
    assert err == "meshplane config-dump: no client with node id 'nobody' is connected; connected: none\n"


# The index of the HTTP port.


@pytest.mark.parametrize("index", ["/", "/debug", "/debug/"])
async def test_the_http_port_lists_its_pages(s1_plane: app.ControlPlane, index: str) -> None:
    status, kind, text = await http(s1_plane, index)
    assert status == 200 and kind.startswith("text/plain"), (status, kind)
    assert text.splitlines()[0] == f"meshplane {VERSION}: this HTTP port serves (docs/serving.md)"
    listed = [line.split()[0] for line in text.splitlines()[2:]]
    assert listed == ["/metrics", "/healthz", "/ready", "/debug/syncz", "/debug/config_dump", "/debug/explain",
                      "/debug/placements", "/debug/views"]
    for path in listed:  # each listed page exists (some want parameters: 400, never 404)
        assert (await http(s1_plane, path))[0] in (200, 400), path


# Start-up: the client commands never import the server.


@pytest.mark.parametrize("argv", [
    ["status", "--server", "127.0.0.1:1"], ["config-dump", "x", "--server", "127.0.0.1:1"],
    ["explain", "mockb", "--from", "z", "--server", "127.0.0.1:1"], ["--version"], ["status", "--help"],
])
async def test_client_commands_do_not_import_the_server(argv: list[str]) -> None:
    """They start in a tenth of a second: a question over HTTP needs neither gRPC nor protobuf nor the
    Kubernetes client (1.2-1.6 s of imports, before)."""
    _, _, err = await meshplane_importtime(*argv)
    modules = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", err, re.M))
    assert "meshplane.cli" in modules, err[-2000:]
    heavy = sorted(m for m in modules if m.split(".")[0] in ("grpc", "kubernetes", "envoy", "google", "aiohttp",
                                                            "structlog", "yaml", "pydantic", "prometheus_client")
                   or m in ("meshplane.app", "meshplane.explain") or m.startswith("meshplane.xds.adsbase"))
    assert heavy == [], heavy


async def meshplane_importtime(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "importtime", "-m", "meshplane", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
