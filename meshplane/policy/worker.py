"""Policy validation in a worker process, so that a big policy never holds up the event loop (decision 0021).

Parsing and validating a policy is pure Python: 6 s for 5,000 routes here. On the event loop nothing
else runs meanwhile (no push, no /healthz); in a thread it still holds the GIL, handed back every
5 ms at best, and for hundreds of milliseconds at a time in practice. A process leaves the loop alone.

One worker per meshplane process, started when a policy is first loaded, serves every policy
watcher in it (tests and benchmarks run several control planes in one process). It is spoken to
over its stdin and stdout from a thread of its own (`aio.off_loop`), so no event loop owns it, and
the result is unpickled in that thread too. It runs in a session of its own, so that a Ctrl-C at the
terminal (SIGINT to the foreground process group) is meshplane's to handle, not the worker's, and it
exits when its stdin closes: when meshplane exits, however it exits. A worker that ends is reaped at
once (no zombie waits for the next reload).

What a policy holds cannot stall later reloads, nor meshplane's exit:

- a validation that takes longer than `DEADLINE_S` is stopped (the worker killed; the next validation
  starts another) and the edit rejected, one line naming the file;
- a worker that dies validating an edit (out of memory, say) rejects that edit: it is never sent again,
  and never validated in meshplane's own process instead; a worker found dead before it is sent
  anything is replaced, and sent the edit;
- a validation nobody awaits any more (its watcher stopped: meshplane shutting down) is stopped.

Only where no worker process can be started at all (starting one fails) does validation run in
meshplane's process, in a thread (the loop gets the GIL in slices, and the edit is still applied).

    python -m meshplane.policy.worker      # what meshplane starts; reads requests on stdin
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import traceback
from typing import IO, Any

import structlog

from meshplane import aio, gc_tuning
from meshplane.policy import validate

log = structlog.get_logger(__name__)

DEADLINE_S = 60.0
"""A validation still running after this long is stopped and its edit rejected. 5,000 gateway routes take
about 5 s here (10-15 s on a loaded machine): a policy that takes twelve times that long is one meshplane
cannot serve at its pace anyway, or one built to stall it (YAML aliases are refused for that reason:
docs/policy.md)."""

_HEADER = struct.Struct("!Q")
_lock = threading.Lock()  # one request at a time: the worker answers in order
_process: subprocess.Popen[bytes] | None = None


class _Abandoned(Exception):
    """Nobody awaits this validation any more."""


async def load(data: bytes, *, path: str, known: validate.Known | None) -> validate.LoadResult:
    """What `validate.load_policy_bytes` says of `data`, worked out in the worker process; or the edit
    refused, naming `path`, when the worker took longer than DEADLINE_S or died on it."""
    call = _Call(data, path=path, known=known)
    try:
        return await aio.off_loop(call.run)
    except BaseException:  # cancelled (its watcher stopped): the worker stops too, nothing waits for it
        call.abandon()
        raise


class _Call:
    """One validation: sent to the worker, answered within DEADLINE_S, stopped when abandoned."""

    def __init__(self, data: bytes, *, path: str, known: validate.Known | None) -> None:
        self.data, self.path, self.known = data, path, known
        self._state = threading.Lock()  # the fields below: set by the calling thread, read by the loop's
        self._process: subprocess.Popen[bytes] | None = None  # the worker validating this, while it does
        self._abandoned = False
        self._expired = False

    def abandon(self) -> None:
        self._stop(expired=False)

    def _expire(self) -> None:
        self._stop(expired=True)

    def _stop(self, *, expired: bool) -> None:
        with self._state:
            if expired:
                self._expired = True
            else:
                self._abandoned = True
            process = self._process
        if process is not None:
            process.kill()

    def run(self) -> validate.LoadResult:
        request = pickle.dumps((self.data, self.path, self.known), protocol=pickle.HIGHEST_PROTOCOL)
        with _lock:
            for _ in range(2):  # a worker found dead when sent this is replaced, once
                try:
                    process = _started()
                except OSError as exc:
                    log.error("no policy worker process can be started; validating in meshplane's own process",
                              error=str(exc))
                    return validate.load_policy_bytes(self.data, path=self.path, known=self.known)
                with self._state:
                    if self._abandoned:
                        raise _Abandoned
                    self._process = process
                try:
                    sent, answer = self._ask(process, request)
                finally:
                    with self._state:
                        self._process = None
                if answer is not None:
                    ok, value = pickle.loads(answer)
                    if not ok:
                        raise RuntimeError(f"policy validation failed in the worker process:\n{value}")
                    result: validate.LoadResult = value
                    return result
                if self._abandoned:
                    _stop()
                    raise _Abandoned
                if sent or self._expired:
                    return self._died(process)
                log.warning("policy worker process failed; starting another", exit_status=process.returncode)
                _stop()
        return validate.refused(self.path, "no policy worker process could be given it (each one started ended "
                                "at once): see meshplane's log")

    def _ask(self, process: subprocess.Popen[bytes], request: bytes) -> tuple[bool, bytes | None]:
        """Whether the worker was given the request, and its answer (None if it ended first: killed by the
        deadline or by `abandon`, or dead)."""
        assert process.stdin is not None and process.stdout is not None
        timer = threading.Timer(DEADLINE_S, self._expire)
        timer.daemon = True
        timer.start()
        sent = False
        try:
            _send(process.stdin, request)
            sent = True
            return sent, _receive(process.stdout)
        except (OSError, EOFError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(1.0)  # its exit status says why, once it is known
            return sent, None
        finally:
            timer.cancel()

    def _died(self, process: subprocess.Popen[bytes]) -> validate.LoadResult:
        _stop()  # the next validation starts another worker
        if self._expired:
            log.error("policy validation took too long and was stopped", path=self.path, seconds=DEADLINE_S)
            return validate.refused(self.path, f"validating it took longer than {DEADLINE_S:g} s, and it was "
                                    "stopped (`meshplane validate` shows how long it takes)")
        status = process.returncode
        how = (f"killed by {signal.Signals(-status).name}" if status is not None and status < 0 else
               f"exit status {status}")
        log.error("the policy worker process died validating the policy; the next edit starts another",
                  path=self.path, exit_status=status)
        return validate.refused(self.path, f"the policy worker process died validating it ({how}; out of "
                                "memory?): the edit is not validated again")


def _started() -> subprocess.Popen[bytes]:
    global _process
    if _process is not None and _process.poll() is not None:
        log.warning("policy worker process failed; starting another", exit_status=_process.returncode)
        _stop()
    if _process is None:
        _process = subprocess.Popen([sys.executable, "-m", "meshplane.policy.worker"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        # Reaped the moment it ends, whenever that is: a worker that dies idle is no zombie until the next reload.
        threading.Thread(target=_process.wait, name="policy-worker-reaper", daemon=True).start()
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
        try:
            _send(stdout, pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
        except BrokenPipeError:
            return  # meshplane is gone (killed while this was validated): nobody to answer
        del answer, data, known  # an idle worker holds no policy: 45 MB, not 170 after 5,000 routes


if __name__ == "__main__":
    main()
