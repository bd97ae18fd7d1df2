"""FakeKubeAPI: an in-process HTTP server speaking the kube-apiserver's list/watch protocol.

Read-only (GET) API over plain HTTP with bearer tokens, for the real `kubernetes` client:
lists with limit/continue pagination over consistent snapshots, chunked watch streams
from a resourceVersion (with bookmarks, selectors, timeoutSeconds and 410 Gone once the
history is compacted), and failure injection (dropped watches, watches cut when idle as a
proxy cuts them, an unreachable server on the same port, stalled responses). Tests change
state with put()/delete().
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from typing import Any

import yaml

from tests.fakekube.store import Obj, Store
from tests.fakekube.wire import IdleCut, RequestRecord, Server, WatchState


class FakeKubeAPI:
    """One fake Kubernetes cluster's API server. Thread-safe; runs its own threads."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.url = ""
        self.requests: list[RequestRecord] = []
        self.page_limit_seen: list[int] = []
        self.tokens: set[str] = {"fake-token"}  # bearer tokens accepted; kubeconfig() adds its token
        # The real server ends every watch after a while (--min-request-timeout, 30-60 min) even
        # without timeoutSeconds; set this to have watches without timeoutSeconds end after it.
        self.default_watch_timeout: float | None = None
        self.cuts: list[tuple[str, float]] = []  # (resource, time.monotonic()) of each watch cut_idle_watches() cut
        self._cut: IdleCut | None = None
        self._cond = threading.Condition()
        self._store = Store()
        self._watches: set[WatchState] = set()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []  # one per connection
        self._stalled = self._unreachable = self._closed = False
        self._held: frozenset[str] = frozenset()  # resources whose watches hold their events back (hold_watches)
        self._hangups = 0  # counts _hang_up(everything=True): stalled requests give up
        self._server: Server | None = None
        self._loop: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._server = Server(self, 0)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._start_accepting()

    def stop(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._server is None:
            return
        self._stop_accepting()
        self._hang_up(everything=True)
        self._server.server_close()
        with self._cond:
            threads, self._threads = self._threads, []
        for thread in threads:  # every connection's thread ends once its socket is shut down
            thread.join(10)
            if thread.is_alive():
                raise RuntimeError(f"fake API server {self.name}: {thread.name} did not end")

    def __enter__(self) -> FakeKubeAPI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_accepting(self) -> None:
        assert self._server is not None
        self._loop = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"fakekube-{self.name}", daemon=True)
        self._loop.start()

    def _stop_accepting(self) -> None:
        assert self._server is not None
        if self._loop is not None:
            self._server.shutdown()
            self._loop.join()
            self._loop = None
        self._server.socket.close()

    def _track(self, conn: socket.socket, thread: threading.Thread) -> None:
        with self._cond:
            self._conns.add(conn)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)

    def _untrack(self, conn: socket.socket) -> None:
        with self._cond:
            self._conns.discard(conn)

    def _hang_up(self, *, everything: bool) -> None:
        """Close every open watch's connection (or every connection) abruptly: no final chunk.

        A watch is open once its response has begun; one still before its headers is left alone, so a
        test that drops watches drops streams, not requests (a request the server hangs up on is, for
        the client, a failed request).
        """
        with self._cond:
            watches = [w for w in self._watches if everything or w.started]
            for watch in watches:
                watch.dropped = True
            conns = set(self._conns) if everything else {w.conn for w in watches}
            self._hangups += everything
            self._cond.notify_all()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # --- client configuration -----------------------------------------------------------------

    def kubeconfig(self, *, cluster: str, context: str | None = None, token: str = "fake-token") -> dict[str, Any]:
        context = context or cluster
        with self._cond:
            self.tokens.add(token)
        user = f"{cluster}-user"
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": cluster, "cluster": {"server": self.url}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
            "current-context": context,
            "preferences": {},
        }

    def write_kubeconfig(self, path: Path, *, cluster: str, context: str | None = None,
                         token: str = "fake-token") -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.kubeconfig(cluster=cluster, context=context, token=token)))
        return path

    # --- state --------------------------------------------------------------------------------

    def put(self, resource: str, obj: Obj) -> Obj:
        """Create (ADDED) or replace (MODIFIED) an object; returns it as stored."""
        with self._cond:
            stored = self._store.put(resource, obj)
            self._cond.notify_all()
        return stored

    def delete(self, resource: str, namespace: str | None, name: str) -> None:
        """Remove an object (KeyError if absent); watchers get DELETED with a new resourceVersion."""
        with self._cond:
            self._store.delete(resource, namespace, name)
            self._cond.notify_all()

    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        with self._cond:
            return self._store.get(resource, namespace, name)

    @property
    def resource_version(self) -> str:
        """The newest resourceVersion (what a list now would return)."""
        with self._cond:
            return str(self._store.rv)

    # --- failure injection --------------------------------------------------------------------

    def expire(self) -> None:
        """Compact the history: lists, continue tokens and new watches at older versions get 410."""
        with self._cond:
            keep_after = min((w.pos for w in self._watches), default=self._store.rv)
            self._store.expire(keep_after)

    def drop_watches(self) -> None:
        self._hang_up(everything=False)

    def cut_idle_watches(self, after: float | None, *, resources: tuple[str, ...] = (), clean: bool = False) -> None:
        """From now on, cut every watch (of `resources`, or all) that has sent nothing for `after` seconds.

        As a load balancer or API proxy closing idle streams does: it hangs up (no final chunk), or with
        `clean` ends the stream as the server ends a watch. Each cut is recorded in `cuts`. None: no more cuts.
        """
        with self._cond:
            self._cut = None if after is None else IdleCut(after=after, resources=resources, clean=clean)
            self._cond.notify_all()

    def set_unreachable(self, unreachable: bool) -> None:
        """True: refuse connections (the port closes) and hang up every open one; False: listen again."""
        with self._cond:
            if unreachable == self._unreachable or self._closed:
                return
            self._unreachable = unreachable
        assert self._server is not None
        if unreachable:
            self._stop_accepting()
            self._hang_up(everything=True)
        else:
            self._server.reopen()
            self._start_accepting()

    def stall(self, stalled: bool) -> None:
        """True: accept requests but answer none, and hold back watch events, until stall(False)."""
        with self._cond:
            self._stalled = stalled
            self._cond.notify_all()

    def hold_watches(self, resources: tuple[str, ...]) -> None:
        """Hold back the events of these resources' watches (a lagging watch) until hold_watches(()).

        Held events are sent, in order, when released; the other watches carry on.
        """
        with self._cond:
            self._held = frozenset(resources)
            self._cond.notify_all()

    def send_bookmarks(self) -> None:
        with self._cond:
            for watch in self._watches:
                if watch.bookmarks:
                    watch.bookmark_at = self._store.rv
            self._cond.notify_all()

    def open_watches(self, resource: str | None = None) -> int:
        """Watches (of `resource`, or all) whose response has begun (headers sent) and that have not ended."""
        with self._cond:
            return sum(1 for w in self._watches if w.started and resource in (None, w.resource))
