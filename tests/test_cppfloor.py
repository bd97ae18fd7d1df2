"""The C++ benchmark floor (bench/cppfloor) serves what the grpcio floor (bench.floor) serves, byte for byte.

Builds the C++ floor with bench/cppfloor/build.sh first; skipped where that cannot be done
(no g++ or gRPC C++: the skip says what to install).
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from bench import common, floor, loadgen

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cpp_floor() -> None:
    if why := floor.unavailable("cpp"):
        pytest.skip(why)


async def _one_proxy(target: str, push: Callable[[], float], pushes: int) -> list[bytes]:
    """CDS, EDS for every cluster received, an ACK for each, `pushes` pushes ACKed, then a half-close.

    Returns every message the stream received, in order. A response to an ACK would arrive
    before the stream's end, so there is none if the list holds just CDS, EDS and the pushes.
    """
    received = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(loadgen.ADS_METHOD)()
        await call.write(loadgen.request(loadgen.CDS, node=loadgen.node_field("p-0", ("r", "z", "s"), 15001)))
        for i in range(2 + pushes):
            if i >= 2:
                push()
            received.append(await call.read())
            version, type_url, nonce, names = loadgen.decode_response(received[-1])
            await call.write(loadgen.request(type_url, version=version, nonce=nonce))
            if type_url == loadgen.CDS:
                await call.write(loadgen.request(loadgen.EDS, names=b"".join(loadgen._ld(3, n) for n in names)))
        await call.done_writing()
        received.append(await call.read())
        assert await call.code() == grpc.StatusCode.OK
    return received


async def test_cpp_floor_serves_the_grpcio_floor_bytes(cpp_floor: None) -> None:
    mesh = common.Mesh(services=3, endpoints=4, clusters=2, zones=2)
    received = {}
    for server in ("grpcio", "cpp"):
        with floor.Floor(mesh, server) as served:
            received[server] = await _one_proxy(served.target, served.push, pushes=3)
    assert received["cpp"] == received["grpcio"]
    *messages, end = received["cpp"]
    assert end is grpc.aio.EOF
    cds, eds, *pushes = [loadgen.decode_response(m) for m in messages]
    assert cds[1] == loadgen.CDS and len(cds[3]) == 3
    assert eds[1] == loadgen.EDS and eds[3] == cds[3]
    tags = [f"push-{k}".encode() for k in (1, 2, 3)]
    assert pushes == [(tag, loadgen.EDS, tag, [mesh.cluster_name(0).encode()]) for tag in tags]
    bodies = [m[len(loadgen._ld(1, tag)):-len(loadgen._ld(5, tag))] for m, tag in zip(messages[2:], tags, strict=True)]
    assert bodies[0] == bodies[2] != bodies[1]  # endpoint 0's health alternates
