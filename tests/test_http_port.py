"""The HTTP port (/metrics, /ready, /healthz, /debug/*) through a real HTTP client and raw sockets:
GET only, limits on what a request may send, and no connection kept open by a half-sent request."""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import structlog

from meshplane import app
from meshplane.demo import backend
from meshplane.demo.ports import free_port
from tests.conftest import cluster_doc, wait_for, write_yaml


@pytest.fixture
async def plane(start_plane: Any, tmp_path: Path) -> app.ControlPlane:
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"mockb": [{"zone": "z1", "port": 9001}]}))
    return await start_plane(endpoint_files=(endpoints,))  # type: ignore[no-any-return]


async def _exchange(port: int, raw: bytes, *, wait: float = 10.0) -> tuple[bytes, float]:
    """Send `raw`, read until the server closes (or `wait` passes): (what came back, seconds until closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(raw)
    await writer.drain()
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), wait - (time.monotonic() - started)):
            received += chunk
    except TimeoutError:
        received += b"<still open>"
    finally:
        writer.close()
    return received, time.monotonic() - started


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_only_get_is_served(plane: app.ControlPlane, method: str) -> None:
    for path in ("/ready", "/metrics", "/healthz", "/debug/views"):
        response, _ = await _exchange(plane.http_port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                                                       "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        assert _status(response) == 405, (path, response[:200])
        assert b"\r\nAllow: GET" in response, response[:300]


async def test_a_real_http_client_gets_405_for_post_and_200_for_get(plane: app.ControlPlane) -> None:
    def call(method: str) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{plane.http_port}/ready", method=method,
                                         data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.headers.get("Allow", "")
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Allow", "")

    assert await asyncio.to_thread(call, "POST") == (405, "GET,HEAD")
    assert (await asyncio.to_thread(call, "GET"))[0] == 200


async def test_get_still_answers_and_unknown_paths_are_404(plane: app.ControlPlane) -> None:
    ok, _ = await _exchange(plane.http_port, b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _status(ok) == 200 and b'"ready": true' in ok
    missing, _ = await _exchange(plane.http_port, b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _status(missing) == 404


async def test_an_oversized_request_line_or_headers_get_400_logged_in_one_line(plane: app.ControlPlane) -> None:
    with structlog.testing.capture_logs() as logs:
        long_line, _ = await _exchange(plane.http_port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n")
        long_header, _ = await _exchange(plane.http_port,
                                         b"GET /ready HTTP/1.1\r\n" + b"X-Filler: " + b"b" * 20_000 + b"\r\n\r\n")
        many_headers, _ = await _exchange(plane.http_port,
                                          b"GET /ready HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n")
    assert [_status(r) for r in (long_line, long_header, many_headers)] == [400, 400, 400]
    bad = [e for e in logs if e["event"] == "bad HTTP request"]
    assert len(bad) == 3 and not [e for e in bad if "exc_info" in e], logs
    ok, _ = await _exchange(plane.http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _status(ok) == 200  # and the port still serves


async def test_a_body_is_refused(plane: app.ControlPlane) -> None:
    body = b"x" * 100_000
    response, _ = await _exchange(plane.http_port, b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                  + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    assert _status(response) == 413


async def test_a_half_sent_request_is_closed(start_plane: Any, tmp_path: Path) -> None:
    plane = await start_plane(http_timeout=0.5)
    # Headers never finished, and a body announced but never sent: neither holds a connection.
    for raw in (b"GET /ready HTTP/1.1\r\nHost: x\r\n",
                b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"):
        response, took = await _exchange(plane.http_port, raw, wait=10)
        assert not response.endswith(b"<still open>"), response[:200]
        assert took < 5, took


async def test_serve_logs_a_bad_request_as_one_line_without_a_traceback(tmp_path: Path) -> None:
    """What an operator reads on `meshplane serve`'s stderr after a hostile request."""
    path = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009}]}))
    http_port = free_port()
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshplane", "serve", "--endpoints", str(path),
            "--ads", "127.0.0.1:0", "--http", f"127.0.0.1:{http_port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )
    try:
        async def ready() -> bool:
            try:
                return (await backend.http_get(http_port, "localhost", "/ready"))[0] == 200
            except OSError:
                return False

        await wait_for(ready, timeout=20, what="/ready answering 200")
        response, _ = await _exchange(http_port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n")
        assert _status(response) == 400
        await wait_for(lambda: "bad HTTP request" in stderr.read_text(), what="the bad request logged")
    finally:
        proc.send_signal(2)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    logged = stderr.read_text()
    assert "Traceback" not in logged and "LimitOverrun" not in logged, logged
    [line] = [line for line in logged.splitlines() if "bad HTTP request" in line]
    assert "status=400" in line and len(line) < 600, line
