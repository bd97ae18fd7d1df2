"""Policy validation in a worker process, so that a big policy never holds up the event loop (decision 0021).

Parsing and validating a policy is pure Python: 6 s for 5,000 routes here. On the event loop nothing
else runs meanwhile (no push, no /healthz); in a thread it still holds the GIL, handed back every
5 ms at best, and for hundreds of milliseconds at a time in practice. A process leaves the loop alone.

One worker per meshplane process, started when a policy is first loaded, serves every policy
watcher in it (tests and benchmarks run several control planes in one process). It is spoken to
over its stdin and stdout from a thread, so no event loop owns it, and the result is unpickled in
that thread too. It exits when its stdin closes: when meshplane exits, however it exits. A worker
that dies is started again; if none can run, validation runs in the thread (the loop gets the GIL
in slices, and the edit is still applied).

    python -m meshplane.policy.worker      # what meshplane starts; reads requests on stdin
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import pickle
import struct
import subprocess
import sys
import threading
import traceback
from typing import IO, Any

import structlog

from meshplane import gc_tuning
from meshplane.policy import validate

log = structlog.get_logger(__name__)

_HEADER = struct.Struct("!Q")
_lock = threading.Lock()  # one request at a time: the worker answers in order
_process: subprocess.Popen[bytes] | None = None


async def load(data: bytes, *, path: str, known: validate.Known | None) -> validate.LoadResult:
    """What `validate.load_policy_bytes` says of `data`, worked out in the worker process."""
    return await asyncio.to_thread(_call, data, path, known)


def _call(data: bytes, path: str, known: validate.Known | None) -> validate.LoadResult:
    request = pickle.dumps((data, path, known), protocol=pickle.HIGHEST_PROTOCOL)
    with _lock:
        for _ in range(2):
            try:
                process = _started()
                assert process.stdin is not None and process.stdout is not None
                _send(process.stdin, request)
                ok, value = pickle.loads(_receive(process.stdout))
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                log.warning("policy worker process failed; starting another", error=str(exc) or type(exc).__name__)
                _stop()
                continue
            if not ok:
                raise RuntimeError(f"policy validation failed in the worker process:\n{value}")
            result: validate.LoadResult = value
            return result
    log.error("no policy worker process could run; validating in a thread of the control plane")
    return validate.load_policy_bytes(data, path=path, known=known)


def _started() -> subprocess.Popen[bytes]:
    global _process
    if _process is not None and _process.poll() is not None:
        log.warning("policy worker process failed; starting another", exit_status=_process.returncode)
        _stop()
    if _process is None:
        _process = subprocess.Popen([sys.executable, "-m", "meshplane.policy.worker"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return _process


def _stop() -> None:
    """End the worker: its stdin closed, it exits; one that does not within a second is killed."""
    global _process
    process, _process = _process, None
    if process is None:
        return
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    try:
        process.wait(1.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


atexit.register(_stop)


def _send(pipe: IO[bytes], payload: bytes) -> None:
    pipe.write(_HEADER.pack(len(payload)))
    pipe.write(payload)
    pipe.flush()


def _receive(pipe: IO[bytes]) -> bytes:
    header = _exactly(pipe, _HEADER.size)
    return _exactly(pipe, _HEADER.unpack(header)[0])


def _exactly(pipe: IO[bytes], size: int) -> bytes:
    data = pipe.read(size)
    if len(data) != size:
        raise EOFError("the other end closed the pipe")
    return data


def main() -> None:
    """The worker: answer each request on stdin with (ok, result or traceback) on stdout, until stdin closes."""
    gc_tuning.tune_gc()
    stdin = sys.stdin.buffer
    # The answers get a descriptor of their own, and anything printed (a log line) goes to stderr.
    stdout = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    while True:
        try:
            data, path, known = pickle.loads(_receive(stdin))
        except EOFError:
            return
        answer: tuple[bool, Any]
        try:
            answer = (True, validate.load_policy_bytes(data, path=path, known=known))
        except Exception:  # our bug: said in the control plane's log, and the worker goes on
            answer = (False, traceback.format_exc())
        _send(stdout, pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
        del answer, data, known  # an idle worker holds no policy: 45 MB, not 170 after 5,000 routes


if __name__ == "__main__":
    main()
