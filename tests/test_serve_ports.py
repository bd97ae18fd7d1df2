"""`meshplane serve`'s addresses as an operator meets them, with real processes: a port another control
plane holds is refused naming the flag and the port, out-of-range and malformed addresses are usage
errors, an unknown host is one line; never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from meshplane.demo import backend
from meshplane.demo.ports import free_port
from meshplane.xds import client as ads_client
from meshplane.xds import typeurls
from tests import pki
from tests.conftest import cluster_doc, required_tool, wait_for, write_yaml


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    """A `serve` expected to refuse to start: it must exit (a started one is killed, and the test fails)."""
    return subprocess.run([sys.executable, "-m", "meshplane", "serve", *args], capture_output=True, text=True,
                          timeout=30)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


async def _ready(http_port: int) -> bool:
    try:
        status, _ = await backend.http_get(http_port, "localhost", "/ready")
    except OSError:
        return False
    return status == 200


@pytest.fixture
def endpoints(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009}]}))


@pytest.fixture
async def first(endpoints: Path) -> AsyncIterator[tuple[int, int]]:
    """A running `meshplane serve`: its (ADS port, HTTP port)."""
    ads, http = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshplane", "serve", "--endpoints", str(endpoints),
        "--ads", f"127.0.0.1:{ads}", "--http", f"127.0.0.1:{http}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_for(lambda: _ready(http), timeout=20, what="the first meshplane ready")
        yield ads, http
    finally:
        proc.terminate()
        await proc.wait()


async def test_a_second_control_plane_on_the_ads_port_refuses_to_start(endpoints: Path,
                                                                         first: tuple[int, int]) -> None:
    ads, http = first
    result = _serve("--endpoints", str(endpoints), "--ads", f"127.0.0.1:{ads}", "--http", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert _one_line(result) == (f"meshplane: --ads 127.0.0.1:{ads}: port {ads} is in use (another meshplane, or "
                                 "another program, listens there): stop it, or choose another port")
    # The port is still the first's alone: a proxy dialing it is served by the first.
    async with ads_client.AdsClient(f"127.0.0.1:{ads}", ads_client.node("probe", region="r1")) as probe:
        await probe.request(typeurls.CLUSTER)
        assert ads_client.resource_names(await probe.recv())
        _, body = await backend.http_get(http, "localhost", "/debug/syncz")
        assert [c["node"] for c in json.loads(body)["clients"]] == ["probe"]


async def test_the_ads_port_is_bound_without_so_reuseport(first: tuple[int, int]) -> None:
    """Whoever binds the port with SO_REUSEPORT after meshplane (an older meshplane, any gRPC server
    with its defaults) is refused by the kernel, not let in to share the proxies."""
    ads, _ = first
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError) as error:
            other.bind(("127.0.0.1", ads))
    assert error.value.errno == 98  # EADDRINUSE


async def test_a_busy_http_port_names_the_flag_and_the_port(endpoints: Path, first: tuple[int, int]) -> None:
    _, http = first
    result = _serve("--endpoints", str(endpoints), "--ads", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{http}")
    assert result.returncode == 1
    assert _one_line(result) == (f"meshplane: --http 127.0.0.1:{http}: port {http} is in use (another meshplane, "
                                 "or another program, listens there): stop it, or choose another port")


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--ads", "127.0.0.1:99999", "argument --ads: '127.0.0.1:99999': port 99999 is out of range (0-65535; "
                                 "0 picks a free port)"),
    ("--http", "127.0.0.1:70000", "argument --http: '127.0.0.1:70000': port 70000 is out of range (0-65535; "
                                  "0 picks a free port)"),
    ("--ads", "localhost:abc", "argument --ads: 'localhost:abc': the port 'abc' is not a number (HOST:PORT)"),
    ("--http", "18001", "argument --http: '18001' is not HOST:PORT"),
    ("--ads", "::1:18000", "argument --ads: '::1:18000': an IPv6 address goes in brackets ([::1]:18000)"),
])
def test_a_malformed_address_is_a_usage_error(endpoints: Path, flag: str, value: str, message: str) -> None:
    result = _serve("--endpoints", str(endpoints), flag, value)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"meshplane serve: error: {message}"


def test_an_out_of_range_plaintext_port_is_a_usage_error(tmp_path: Path, endpoints: Path) -> None:
    result = _serve("--endpoints", str(endpoints), "--tls-cert", "c.pem", "--tls-key", "k.pem",
                    "--ads-plaintext", "127.0.0.1:65536")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "meshplane serve: error: argument --ads-plaintext: '127.0.0.1:65536': port 65536 is out of range "
        "(0-65535; 0 picks a free port)")


def test_an_unknown_host_is_one_line(endpoints: Path) -> None:
    result = _serve("--endpoints", str(endpoints), "--ads", f"127.0.0.1:{free_port()}", "--http", "nohost.invalid:1")
    assert result.returncode == 1
    line = _one_line(result)
    assert line.startswith("meshplane: --http nohost.invalid:1: cannot resolve 'nohost.invalid' (")
    assert line.endswith("): give an IP address (0.0.0.0 for every interface) or a name this machine resolves")


def test_optional_client_certificates_without_tls_are_refused(endpoints: Path) -> None:
    result = _serve("--endpoints", str(endpoints), "--ads", f"127.0.0.1:{free_port()}", "--client-cert", "optional")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: meshplane serve ")
    assert result.stderr.splitlines()[-1] == ("meshplane serve: error: --client-cert optional needs --client-ca (and "
                                              "--tls-cert, --tls-key): without a CA no client certificate is asked for")


@contextlib.contextmanager
def namespace(*, ipv6: bool) -> Iterator[list[str]]:
    """A network namespace of our own whose /etc/hosts lists localhost as both 127.0.0.1 and ::1 (as most
    images' do), with IPv6 on or off (off: as in many containers); the command prefix that runs a program
    in it (`ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts)."""
    ip = required_tool("ip", why="the test runs meshplane in a network namespace of its own (iproute2)")
    name = f"mp-listen-{os.getpid()}-{secrets.token_hex(3)}"
    etc = Path("/etc/netns") / name
    subprocess.run([ip, "netns", "add", name], check=True)
    try:
        etc.mkdir(parents=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
        run = [ip, "netns", "exec", name]
        subprocess.run([*run, ip, "link", "set", "lo", "up"], check=True)
        if not ipv6:
            for scope in ("all", "default", "lo"):
                subprocess.run([*run, "sysctl", "-q", "-w", f"net.ipv6.conf.{scope}.disable_ipv6=1"], check=True)
        yield run
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        subprocess.run([ip, "netns", "del", name], check=False)


_PROBE = """
import asyncio, sys
import grpc
from meshplane.xds import client, typeurls

async def main(target, ca, cert, key):
    probe = client.AdsClient(target, client.node("probe", region="r1"))
    if ca:
        probe.credentials = grpc.ssl_channel_credentials(*(open(p, "rb").read() for p in (ca, key, cert)))
        probe.options = [("grpc.ssl_target_name_override", "localhost")]
    async with probe:
        await probe.request(typeurls.CLUSTER)
        print(",".join(sorted(client.resource_names(await probe.recv(timeout=10)))))

asyncio.run(main(*sys.argv[1:]))
"""


async def _in(run: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [*run, *argv], capture_output=True, text=True, timeout=30)


async def _serving(run: list[str], *argv: str) -> tuple[asyncio.subprocess.Process, str]:
    """`meshplane serve ARGV` in the namespace, once it serves: the process, and the ADS address it logged."""
    proc = await asyncio.create_subprocess_exec(
        *run, sys.executable, "-m", "meshplane", "--log-format", "json", "serve", *argv,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    lines: list[str] = []

    async def serving() -> str | None:
        line = (await proc.stderr.readline()).decode()  # type: ignore[union-attr]
        lines.append(line)
        assert line, f"serve exited: {''.join(lines)}"
        event = json.loads(line) if line.startswith("{") else {}
        return str(event["ads"]) if event.get("event") == "control plane serving" else None

    try:
        return proc, await wait_for(serving, timeout=30, what="meshplane serving in the namespace")
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


@pytest.mark.parametrize("client_cert", ["none", "optional"])
async def test_localhost_listing_ipv6_where_ipv6_is_off_serves_on_ipv4(
    endpoints: Path, tmp_path: Path, client_cert: str
) -> None:
    """gRPC binds the addresses of `localhost` it can (127.0.0.1 here) and serves; so must every port of
    meshplane, whoever does the binding (the TLS relay of `optional`, the HTTP port)."""
    ca = pki.CA()
    cert, key, _ = ca.write_server(tmp_path / "server")
    client, client_key = ca.write_client(tmp_path / "client", "spiffe://cluster.local/ns/default/sa/probe")
    authority = ca.write_ca(tmp_path / "ca.pem")
    tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--client-ca", str(authority), "--client-cert", "optional"]
    with namespace(ipv6=False) as run:
        proc, ads = await _serving(run, "--endpoints", str(endpoints), "--ads", "localhost:18000",
                                   "--http", "localhost:18001", *(tls if client_cert == "optional" else []))
        try:
            assert ads == "localhost:18000"
            ready = await _in(run, sys.executable, "-c", "import urllib.request as u; "
                              "print(u.urlopen('http://127.0.0.1:18001/ready', timeout=5).status)")
            assert ready.stdout.strip() == "200", ready.stderr
            credentials = [str(authority), str(client), str(client_key)] if client_cert == "optional" else ["", "", ""]
            probe = await _in(run, sys.executable, "-c", _PROBE, "127.0.0.1:18000", *credentials)
            assert probe.stdout.strip() == "outbound|8000||svc.default.svc.cluster.local", probe.stderr
        finally:
            proc.terminate()
            await proc.wait()


async def test_port_0_on_a_name_with_two_addresses_is_one_port_for_both(endpoints: Path, tmp_path: Path) -> None:
    """As gRPC does: the port the first address got is the port of every other (the one logged and served)."""
    ca = pki.CA()
    cert, key, _ = ca.write_server(tmp_path / "server")
    client, client_key = ca.write_client(tmp_path / "client", "spiffe://cluster.local/ns/default/sa/probe")
    authority = ca.write_ca(tmp_path / "ca.pem")
    with namespace(ipv6=True) as run:
        proc, ads = await _serving(run, "--endpoints", str(endpoints), "--ads", "localhost:0", "--http", "127.0.0.1:0",
                                   "--tls-cert", str(cert), "--tls-key", str(key), "--client-ca", str(authority),
                                   "--client-cert", "optional")
        try:
            port = int(ads.rpartition(":")[2])
            for target in (f"127.0.0.1:{port}", f"[::1]:{port}"):
                probe = await _in(run, sys.executable, "-c", _PROBE, target, str(authority), str(client),
                                  str(client_key))
                assert probe.stdout.strip() == "outbound|8000||svc.default.svc.cluster.local", (target, probe.stderr)
        finally:
            proc.terminate()
            await proc.wait()
