"""The HTTP side of the fake API server: routing, list, get and watch, as kube-apiserver does them.

See https://kubernetes.io/docs/reference/using-api/api-concepts/ (efficient detection of
changes, watch bookmarks, retrieving large results sets in chunks, resource versions).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import select
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from tests.fakekube.store import KINDS, Event, Expired, Kind, Obj, Store, field_selector, label_selector

if TYPE_CHECKING:
    from tests.fakekube.server import FakeKubeAPI

CORE, DISCOVERY = "v1", "discovery.k8s.io/v1"
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
CLIENT_CHECK = 0.1  # seconds between checks, on an idle watch, that its client is still there


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    watch: bool
    token: str | None = None  # the bearer token the client sent
    at: float = dataclasses.field(default_factory=time.monotonic, compare=False)  # when it came


def status(code: int, reason: str, message: str, **extra: Any) -> Obj:
    """A metav1.Status failure body, as the API server returns it."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, **extra, "code": code}


class Fail(Exception):
    """Answer the request with this Status."""

    def __init__(self, code: int, reason: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.body = status(code, reason, message, **extra)


def not_found(message: str = "the server could not find the requested resource", **extra: Any) -> Fail:
    return Fail(404, "NotFound", message, details=extra)


# Like the real server's token: base64url (unpadded) JSON {"v", "rv", "start": last key + "\0"}.
def encode_continue(rv: int, key: tuple[str, str]) -> str:
    token = {"v": "meta.k8s.io/v1", "rv": rv, "start": "/".join(filter(None, key)) + "\x00"}
    return base64.urlsafe_b64encode(json.dumps(token).encode()).decode().rstrip("=")


def decode_continue(text: str) -> tuple[int, tuple[str, str]]:
    try:
        token = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        ns, _, name = token["start"].rstrip("\x00").rpartition("/")
        return int(token["rv"]), (ns, name)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise Fail(400, "BadRequest", f"continue key is not valid: {exc}") from None


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1")


@dataclass(frozen=True)
class IdleCut:
    """FakeKubeAPI.cut_idle_watches: which watches are cut after how long without sending, and how."""

    after: float
    resources: tuple[str, ...]  # empty: every watch
    clean: bool

    def applies_to(self, resource: str) -> bool:
        return not self.resources or resource in self.resources


class WatchState:
    """One open watch, shared between its connection's thread and the failure-injection methods."""

    def __init__(self, conn: socket.socket, resource: str, bookmarks: bool, pos: int) -> None:
        self.conn = conn
        self.resource = resource
        self.active = time.monotonic()  # when it opened or last sent something: idle since
        self.bookmarks = bookmarks
        self.pos = pos  # every event up to this resourceVersion has been sent or filtered out
        self.bookmark_at: int | None = None  # send_bookmarks() asked for a BOOKMARK at this resourceVersion
        self.dropped = False
        self.started = False  # its headers are sent: open, for open_watches() and drop_watches()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, fake: FakeKubeAPI, port: int) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", port), Handler)

    def server_bind(self) -> None:  # skips HTTPServer's getfqdn(), which may do a slow DNS lookup
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def reopen(self) -> None:
        """A new listening socket on the same port (after set_unreachable(True) closed the old one)."""
        self.socket = socket.socket(self.address_family, self.socket_type)
        self.server_bind()
        self.server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        # ThreadingMixIn does not keep daemon threads for server_close() to join: we do.
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name=f"fakekube-{self.fake.name}-conn", daemon=True)
        self.fake._track(request, thread)
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        self.fake._untrack(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client or a test hanging up is no error
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked watch streams, as the real server
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        fake.requests.append(RequestRecord(self.command, url.path, query, _truthy(query.get("watch")), token))
        if not self._wait_while_stalled():
            self.close_connection = True
            return
        try:
            if token not in fake.tokens:
                raise Fail(401, "Unauthorized", "Unauthorized")
            self._route([p for p in url.path.split("/") if p], query)
        except Fail as fail:
            self.send_json(fail.body["code"], fail.body)

    def _refuse(self) -> None:
        url = urlsplit(self.path)
        self.server.fake.requests.append(RequestRecord(self.command, url.path, {}, False))
        self.close_connection = True  # a body, if any, is left unread
        self.send_json(405, status(405, "MethodNotAllowed",
                                   "the server does not allow this method on the requested resource"))

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

    def _wait_while_stalled(self) -> bool:
        """Hang while the server is stalled; False if it stopped or hung up on us meanwhile."""
        fake = self.server.fake
        with fake._cond:
            hangups = fake._hangups
            fake._cond.wait_for(lambda: not fake._stalled or fake._closed or fake._hangups != hangups)
            return not fake._closed and fake._hangups == hangups

    def send_json(self, code: int, body: Any) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # --- routing -------------------------------------------------------------------------------

    def _route(self, parts: list[str], query: dict[str, str]) -> None:
        if parts == ["version"]:
            return self.send_json(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fakekube",
                                        "gitCommit": "0" * 40, "gitTreeState": "clean",
                                        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0",
                                        "compiler": "gc", "platform": "linux/amd64"})
        if parts == ["api"]:
            host = f"127.0.0.1:{self.server.server_port}"
            return self.send_json(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": host}]})
        if parts == ["apis"]:
            version = {"groupVersion": DISCOVERY, "version": "v1"}
            return self.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": "discovery.k8s.io", "versions": [version], "preferredVersion": version}]})
        if parts[:2] == ["api", "v1"]:
            group_version, rest = CORE, parts[2:]
        elif parts[:3] == ["apis", "discovery.k8s.io", "v1"]:
            group_version, rest = DISCOVERY, parts[3:]
        else:
            raise not_found()
        if not rest:
            return self.send_json(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                                        "resources": [{"name": k.resource, "singularName": k.kind.lower(),
                                                       "namespaced": k.namespaced, "kind": k.kind,
                                                       "verbs": ["get", "list", "watch"]}
                                                      for k in KINDS.values() if k.group_version == group_version]})
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        kind = KINDS.get(rest[0])
        if (kind is None or kind.group_version != group_version or len(rest) > 2
                or (namespace is not None and not kind.namespaced)
                or (len(rest) == 2 and kind.namespaced and namespace is None)):
            raise not_found()
        if len(rest) == 2:
            return self._get(kind, namespace or "", rest[1])
        if _truthy(query.get("watch")):
            return self._watch(kind, namespace, query)
        return self._list(kind, namespace, query)

    def _selection(self, namespace: str | None, query: dict[str, str]) -> tuple[Callable[[Obj], bool], bool]:
        """What the request asks for: a predicate on objects, and whether a label/field selector was given."""
        preds: list[Callable[[Obj], bool]] = []
        if namespace is not None:
            preds.append(lambda obj: obj["metadata"].get("namespace") == namespace)
        try:
            if query.get("labelSelector"):
                preds.append(label_selector(query["labelSelector"]))
            if query.get("fieldSelector"):
                preds.append(field_selector(query["fieldSelector"]))
        except ValueError as exc:
            raise Fail(400, "BadRequest", str(exc)) from None
        return (lambda obj: all(p(obj) for p in preds)), bool(query.get("labelSelector") or query.get("fieldSelector"))

    # --- get and list ----------------------------------------------------------------------------

    def _get(self, kind: Kind, namespace: str, name: str) -> None:
        with self.server.fake._cond:
            obj = self.server.fake._store.current[kind.resource].get((namespace, name))
        if obj is None:
            group = kind.group_version.rpartition("/")[0]
            raise not_found(f'{kind.resource} "{name}" not found', name=name, kind=kind.resource,
                            **({"group": group} if group else {}))
        self.send_json(200, obj)

    def _list(self, kind: Kind, namespace: str | None, query: dict[str, str]) -> None:
        fake = self.server.fake
        visible, selective = self._selection(namespace, query)
        try:
            limit = int(query.get("limit") or 0)
        except ValueError:
            raise Fail(400, "BadRequest", f"limit: invalid value {query['limit']!r}") from None
        if "limit" in query:
            fake.page_limit_seen.append(limit)
        with fake._cond:
            store = fake._store
            after: tuple[str, str] | None = None
            if query.get("continue"):
                rv, after = decode_continue(query["continue"])
                if rv < store.compacted:
                    raise Fail(410, "Expired", "The provided continue parameter is too old to display a consistent "
                               "list result. You can start a new list without the continue parameter.")
            else:
                rv = _list_resource_version(store, query)
            try:
                state = store.state_at(kind.resource, rv)
            except Expired as exc:
                raise Fail(410, "Expired", str(exc)) from None
            items = sorted(((k, o) for k, o in state.items() if (after is None or k > after) and visible(o)),
                           key=lambda item: item[0])
        page = items[:limit] if limit > 0 else items
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if len(page) < len(items):
            meta["continue"] = encode_continue(rv, page[-1][0])
            if not selective:  # the real server only counts when no selector filters the list
                meta["remainingItemCount"] = len(items) - len(page)
        # As the real server does for built-in types, list items carry no kind/apiVersion.
        self.send_json(200, {"kind": f"{kind.kind}List", "apiVersion": kind.group_version, "metadata": meta,
                             "items": [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                                       for _, o in page]})

    # --- watch -------------------------------------------------------------------------------------

    def _watch(self, kind: Kind, namespace: str | None, query: dict[str, str]) -> None:
        fake = self.server.fake
        visible, _ = self._selection(namespace, query)
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else fake.default_watch_timeout
            start = query.get("resourceVersion", "")
            start_rv = int(start) if start not in ("", "0") else 0
        except ValueError as exc:
            raise Fail(400, "BadRequest", f"invalid watch parameter: {exc}") from None
        deadline = time.monotonic() + timeout if timeout is not None else None
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        lines: list[bytes] = []
        expired = False
        with fake._cond:
            store = fake._store
            watch = WatchState(self.connection, kind.resource, bookmarks, store.rv)
            if start in ("", "0") or _truthy(query.get("sendInitialEvents")):
                # "Get state and start at most recent": synthetic ADDED events for what exists now.
                for _, obj in sorted(store.current[kind.resource].items(), key=lambda item: item[0]):
                    if visible(obj):
                        lines.append(_line("ADDED", obj))
                if _truthy(query.get("sendInitialEvents")) and bookmarks:
                    lines.append(_line("BOOKMARK", _bookmark(kind, store.rv, {INITIAL_EVENTS_END: "true"})))
            elif start_rv < store.compacted:
                lines.append(_line("ERROR", status(410, "Expired",
                                                   f"too old resource version: {start_rv} ({store.compacted})")))
                expired = True
            else:
                watch.pos = start_rv
            if not expired:
                fake._watches.add(watch)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-cache, private")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with fake._cond:
                watch.started = True
            while True:
                for line in lines:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                if lines:
                    watch.active = time.monotonic()
                if expired:  # the stream ends after the ERROR event
                    break
                with fake._cond:
                    pending = self._next_lines(watch, kind, visible, deadline)
                if pending is None:  # dropped, or the server stops: hang up without the final chunk
                    self.close_connection = True
                    return
                if not pending:  # timeoutSeconds passed
                    break
                lines = pending
            with fake._cond:  # not open any more once the client has seen the end
                fake._watches.discard(watch)
            self.wfile.write(b"0\r\n\r\n")  # a clean end (timeoutSeconds, or after an ERROR event)
        except OSError:
            self.close_connection = True
        finally:
            with fake._cond:
                fake._watches.discard(watch)

    def _next_lines(self, watch: WatchState, kind: Kind, visible: Callable[[Obj], bool],
                    deadline: float | None) -> list[bytes] | None:
        """Wait (holding the server's condition) for something to send: lines, [] at the deadline, None if dropped.

        An idle cut (FakeKubeAPI.cut_idle_watches) is a deadline too: [] if it ends the watch cleanly, None if it
        hangs up.
        """
        fake = self.server.fake
        while True:
            if fake._closed or watch.dropped or _hung_up(watch.conn):
                return None
            now = time.monotonic()
            cut = fake._cut if fake._cut is not None and fake._cut.applies_to(watch.resource) else None
            if cut is not None and now >= watch.active + cut.after:
                fake.cuts.append((watch.resource, now))
                return [] if cut.clean else None
            if deadline is not None and now >= deadline:
                return []
            ends = [t for t in (deadline, watch.active + cut.after if cut is not None else None) if t is not None]
            remaining = min(ends) - now if ends else None
            if not fake._stalled and watch.resource not in fake._held:
                store = fake._store
                lines = []
                for event in store.events_after(kind.resource, watch.pos):
                    if watch.bookmark_at is not None and event.rv > watch.bookmark_at:
                        lines.append(_line("BOOKMARK", _bookmark(kind, watch.bookmark_at)))
                        watch.bookmark_at = None
                    if (line := _event_line(event, visible)) is not None:
                        lines.append(line)
                if watch.bookmark_at is not None:
                    lines.append(_line("BOOKMARK", _bookmark(kind, watch.bookmark_at)))
                    watch.bookmark_at = None
                watch.pos = store.rv
                if lines:
                    return lines
            fake._cond.wait(CLIENT_CHECK if remaining is None else min(remaining, CLIENT_CHECK))


def _hung_up(conn: socket.socket) -> bool:
    """Whether the client closed its end (as the real server notices, ending the watch)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _list_resource_version(store: Store, query: dict[str, str]) -> int:
    """The snapshot a list is served from (resourceVersion / resourceVersionMatch semantics)."""
    text = query.get("resourceVersion", "")
    if text in ("", "0"):  # most recent (consistent read) / any: we always have the newest
        return store.rv
    try:
        rv = int(text)
    except ValueError:
        raise Fail(400, "BadRequest", f"resourceVersion: invalid value {text!r}") from None
    if rv > store.rv:
        raise Fail(504, "Timeout", f"Too large resource version: {rv}, current: {store.rv}",
                   details={"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                            "retryAfterSeconds": 1})
    if query.get("resourceVersionMatch") == "Exact":
        return rv
    return store.rv  # NotOlderThan (and the legacy unset match): anything at least as new


def _event_line(event: Event, visible: Callable[[Obj], bool]) -> bytes | None:
    """The event as this watcher sees it: an object entering its selection is ADDED, leaving it DELETED."""
    was = event.prev is not None and visible(event.prev)
    if event.type == "DELETED":
        return _line("DELETED", event.obj) if was else None
    if visible(event.obj):
        return _line("MODIFIED" if was else "ADDED", event.obj)
    return _line("DELETED", event.obj) if was else None


def _bookmark(kind: Kind, rv: int, annotations: dict[str, str] | None = None) -> Obj:
    meta: dict[str, Any] = {"resourceVersion": str(rv)}
    if annotations:
        meta["annotations"] = annotations
    return {"kind": kind.kind, "apiVersion": kind.group_version, "metadata": meta}


def _line(event_type: str, obj: Obj) -> bytes:
    return json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"
