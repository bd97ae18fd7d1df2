"""List and watch one kind of Kubernetes object in a worker thread, into the event loop.

This is the only module of meshplane that imports `kubernetes`.

Why threads: the official client is synchronous (urllib3), and a watch is a
read that blocks for minutes. On the event loop it would freeze everything;
in the default executor it would hold a shared thread that cannot be told to
stop. So each `Reflector` owns one thread that does the blocking I/O and the
JSON decoding, and hands small batches of compact records to the loop with
`call_soon_threadsafe`. The store (key -> record) is touched only on the loop
thread: no locks, and the owner reads it while it handles the callbacks.

The protocol is client-go's reflector: LIST in pages (limit/continue, one
consistent snapshot), then WATCH from the list's resourceVersion with
bookmarks and timeoutSeconds; a watch that ends normally is re-opened from the
last resourceVersion seen; 410 Gone (expired version, as a status or as an
ERROR event) means LIST again, and the new list is diffed against the store
key by key, so only real changes reach the owner (deletions at the end, when
the list is complete: a re-list never empties anything half way).

Cuts: a watch that ends, cleanly or not (a load balancer or API proxy closing
streams it finds idle, a server restarting, the watch's own timeoutSeconds), is
re-opened at once from the last resourceVersion, as client-go's reflector does:
the kinds that change least (nodes, services) are the ones whose watches such
proxies cut, and a wait there is a change seen late. Only a watch that ended
within a second with nothing in it counts as a drop (client-go's "very short
watch"); drops in a row back off (the first re-opens at once), so a server or
proxy that ends every watch as it opens is not spun on.

Failures: a request that fails, or a stream that stays silent past its read
timeout (a stalled server), makes the reflector report "unreachable", wait
(capped exponential backoff, with jitter so that many clusters do not retry in
step) and LIST again; the first list that succeeds reports "reachable". The cap
(4 s, against client-go's 30 s) is what bounds how long after the server's
return the cluster converges (docs/kubernetes.md, decision 0015). urllib3's own
retries are turned off on a private copy of the client's configuration: they
retry at once, with no backoff, and would hide an outage for several timeouts.

Silence: a healthy watch may say nothing until its timeoutSeconds, so by
default a stream counts as stalled only after the watch timeout plus the
request timeout (330 s). The API server promises no bookmark interval (its
API reference: clients may not assume any BOOKMARK event at all), but the
watch cache of current servers sends one about every minute to watchers that
asked for them. Once this server has sent a bookmark well before a watch's
end (so a periodic one, not the one that precedes the end), later silences
longer than `bookmark_silence` (120 s: two missed bookmarks) plus the request
timeout count as a stall; a server that stops sending them is caught once
and then judged by the long limit again.

Stop: set a flag and shut down the socket of the response being read
(urllib3's `HTTPResponse.shutdown` wakes a blocked read at once), then join.
A thread that is still connecting or waiting for headers ends within the
connect/request timeouts, which are per request and never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import kubernetes
import structlog
import urllib3

from meshplane.discovery import kubemodel

log = structlog.get_logger(__name__)

ApiClient = kubernetes.client.ApiClient

R = TypeVar("R")
Decode = Callable[[kubemodel.Obj, kubemodel.Problems], R | None]

# resource -> (kind, API class, list across namespaces, list in one namespace or None if cluster-scoped)
_LISTS = {
    "services": ("Service", "CoreV1Api", "list_service_for_all_namespaces", "list_namespaced_service"),
    "endpointslices": ("EndpointSlice", "DiscoveryV1Api", "list_endpoint_slice_for_all_namespaces",
                       "list_namespaced_endpoint_slice"),
    "nodes": ("Node", "CoreV1Api", "list_node", None),
    "pods": ("Pod", "CoreV1Api", "list_pod_for_all_namespaces", "list_namespaced_pod"),
    "secrets": ("Secret", "CoreV1Api", "list_secret_for_all_namespaces", "list_namespaced_secret"),
}


_config: Any = kubernetes.config  # untyped package: keep mypy's strictness for our own calls


def client_from_kubeconfig(config: Mapping[str, Any], *, context: str | None = None) -> Any:
    """An API client for a kubeconfig (a dict, as loaded from a file or a remote secret)."""
    try:
        return _config.new_client_from_config_dict(dict(config), context=context)
    except (kubernetes.config.ConfigException, AttributeError, KeyError, TypeError, ValueError) as exc:
        # The client's own words, less its boilerplate ("Invalid kube-config file."), on one line.
        reason = " ".join(str(exc).removeprefix("Invalid kube-config file.").split()) or type(exc).__name__
        raise ValueError(f"cannot be used (context {context!r}): {reason}") from exc


def local_client(*, in_cluster: bool) -> Any:
    """The local cluster: the pod's service account, or the current context of ~/.kube/config."""
    try:
        if in_cluster:
            configuration = kubernetes.client.Configuration()
            _config.load_incluster_config(client_configuration=configuration)
            return kubernetes.client.ApiClient(configuration)
        return _config.new_client_from_config()
    except kubernetes.config.ConfigException as exc:
        where = "in-cluster service account" if in_cluster else "current kubeconfig context"
        raise ValueError(f"cannot reach the local cluster through the {where}: {exc}") from exc


def private_client(api_client: Any) -> Any:
    """A client sharing `api_client`'s server and credentials, with urllib3's retries off (we back off)."""
    configuration = copy.deepcopy(api_client.configuration)
    configuration.retries = False
    client = kubernetes.client.ApiClient(configuration)
    client.user_agent = "meshplane"
    return client


@dataclass(frozen=True, kw_only=True)
class ReflectorOptions:
    page_size: int = 500
    watch_timeout: float = 300.0  # timeoutSeconds of each watch
    connect_timeout: float = 5.0
    request_timeout: float = 30.0  # read timeout of a list; a watch may be silent watch_timeout longer
    backoff_initial: float = 0.5
    backoff_max: float = 4.0  # bounds recovery once the server is back (module docstring)
    bookmark_silence: float = 120.0  # longest silence once the server has shown periodic bookmarks
    label_selector: str | None = None


class Owner(Protocol):
    """What a reflector tells its owner, always on the loop thread. Records are the decoder's."""

    def on_change(self, reflector: Reflector[Any], key: str, old: Any, new: Any, seen_at: float) -> None: ...

    def on_listed(self, reflector: Reflector[Any], seen_at: float) -> None: ...

    def on_reachable(self, reflector: Reflector[Any], reachable: bool, error: str) -> None: ...


class _Gone(Exception):
    """The resourceVersion we asked for is no longer in the server's history."""


class _WatchError(Exception):
    """An ERROR event other than 410."""


class _WatchClosed(Exception):
    """A watch that ended within `_SHORT_WATCH` with nothing in it (a drop, not a cut)."""


class _StreamStalled(Exception):
    """A watch stream silent past its read timeout; the cause is urllib3's ReadTimeoutError."""


class _Stopped(Exception):
    """stop() was called, or the loop is gone."""


class Reflector(Generic[R]):
    """One resource kind (in one namespace, or all): a store kept equal to the server's."""

    def __init__(
        self,
        *,
        api_client: Any,
        resource: str,
        namespace: str = "",
        decode: Decode[R],
        owner: Owner,
        problems: kubemodel.Problems,
        options: ReflectorOptions = ReflectorOptions(),
        cluster: str = "",
    ) -> None:
        self.kind, api_class, all_namespaces, namespaced = _LISTS[resource]
        api = getattr(kubernetes.client, api_class)(api_client)
        if namespace and namespaced:
            method = getattr(api, namespaced)
            self._list_fn: Callable[..., Any] = lambda **kw: method(namespace, **kw)
        else:
            self._list_fn = getattr(api, all_namespaces)
        self.resource = resource
        self.namespace = namespace
        self.name = f"{resource}/{namespace}" if namespace and namespaced else resource
        self.cluster = cluster
        self._ctx = {"cluster": cluster, "resource": self.name}  # not log.bind(): capture_logs must see every call
        self.options = options
        self.store: dict[str, R] = {}  # loop thread only
        self.synced = False  # listed at least once (loop thread)
        self.listing = False  # a list is under way and its deletions are not known yet (loop thread)
        # The resourceVersion the store is known to be current at: the last list's, event's or bookmark's
        # (loop thread; "" before the first list). Lets the owner tell a watch that lags from one that has
        # seen a point in the server's history.
        self.version = ""
        self._decode = decode
        self._owner = owner
        self._problems = problems
        self._seen: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._resp: Any = None  # the response the worker is reading, for stop() to shut down
        self._rv = ""  # worker thread only from here on
        self._failures = 0  # requests failed in a row (unreachable): backoff, then list again
        self._drops = 0  # watches in a row that ended within _SHORT_WATCH with nothing read: backoff, watch again
        self._unreachable = False  # as last reported to the owner
        self.periodic_bookmarks = False  # this server sends bookmarks during a watch (worker thread writes)

    # --- loop side -----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name=f"kube:{self.cluster}:{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the worker to end; wakes it if it is blocked reading a response."""
        self._stopping.set()
        resp = self._resp
        if resp is not None:
            # ValueError/RuntimeError: already released or closed, so the worker is not blocked on it.
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                if hasattr(resp, "shutdown"):  # urllib3 >= 2.3
                    resp.shutdown()
                elif (sock := getattr(resp.connection, "sock", None)) is not None:
                    sock.shutdown(socket.SHUT_RDWR)

    async def join(self) -> None:
        """Wait for the worker thread to end (bounded by the request timeouts)."""
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + self.options.connect_timeout + self.options.request_timeout + 5
        while thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        thread.join(timeout=0)
        if thread.is_alive():
            log.error("reflector thread did not stop", **self._ctx)
        self._thread = None

    def _page(self, records: list[tuple[str, R | None]], first: bool, seen_at: float) -> None:
        if self._stopping.is_set():
            return
        if first:
            self._seen = set()
            self.listing = True
        for key, record in records:
            self._seen.add(key)
            self._put(key, record, seen_at)

    def _listed(self, seen_at: float, version: str) -> None:
        if self._stopping.is_set():
            return
        for key in [k for k in self.store if k not in self._seen]:
            self._delete(key, seen_at)
        self._seen = set()
        self.listing = False
        self.version = version
        self.synced = True
        self._owner.on_listed(self, seen_at)

    def _put(self, key: str, record: R | None, seen_at: float, version: str = "") -> None:
        if self._stopping.is_set():
            return
        if version:  # before any early return: an event that changes nothing we keep still moves us on
            self.version = version
        old = self.store.get(key)
        if record is None:
            if old is None:
                return
            del self.store[key]
        elif old == record:
            return  # nothing we keep changed (a status, a heartbeat)
        else:
            self.store[key] = record
        self._owner.on_change(self, key, old, record, seen_at)

    def _delete(self, key: str, seen_at: float, version: str = "") -> None:
        self._problems.forget(f"{self.kind} {key}")  # problems are reported as "<Kind> <key>"
        self._put(key, None, seen_at, version)

    def _advance(self, version: str) -> None:
        if not self._stopping.is_set() and version:
            self.version = version

    def _reachable(self, reachable: bool, error: str) -> None:
        if not self._stopping.is_set():
            self._owner.on_reachable(self, reachable, error)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to hand anything to
            self._stopping.set()
            raise _Stopped() from None

    # --- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        need_list = True
        while not self._stopping.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                self._watch()
            except _Stopped:
                return
            except _Gone as exc:
                log.info("resource version expired, listing again", **self._ctx, reason=str(exc))
                need_list = True
            except _WatchClosed as exc:
                # The server answered, then ended the watch at once (a restart, a proxy refusing long requests):
                # it is reachable and the watch goes on from where it was, but in a row these slow down.
                self._drops += 1
                log.info("watch ended at once with nothing in it, watching again", **self._ctx, error=str(exc),
                         drops=self._drops)
                if self._drops > 1:
                    self._stopping.wait(self._delay(self._drops - 1))
            except Exception as exc:
                if self._stopping.is_set():
                    return
                cause = exc.__cause__ if isinstance(exc, _StreamStalled) and exc.__cause__ else exc
                error = _describe(cause)
                if isinstance(exc, _StreamStalled):
                    self.periodic_bookmarks = False  # learn again, rather than misjudge a quiet watch twice
                self._failures += 1
                log.warning("kubernetes API request failed", **self._ctx, error=error,
                            failures=self._failures, exc_info=not isinstance(cause, _EXPECTED))
                need_list = True
                if not self._unreachable:
                    self._unreachable = True
                    try:
                        self._post(self._reachable, False, error)
                    except _Stopped:
                        return
                self._stopping.wait(self._delay(self._failures))

    def _delay(self, attempt: int) -> float:
        base = min(self.options.backoff_max, self.options.backoff_initial * 2.0 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)  # "equal jitter": never less than half the step

    def _call(self, read_timeout: float, **kwargs: Any) -> Any:
        if self.options.label_selector:
            kwargs["label_selector"] = self.options.label_selector
        try:
            return self._list_fn(
                _preload_content=False, _request_timeout=(self.options.connect_timeout, read_timeout), **kwargs
            )
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 410:
                raise _Gone(exc.reason) from exc
            raise

    def _list(self) -> None:
        """Every page to the loop, then the end of the list (which lets the loop find deletions)."""
        cont: str | None = None
        first = True
        while True:
            resp = self._call(self.options.request_timeout, limit=self.options.page_size, _continue=cont)
            self._resp = resp
            try:
                if self._stopping.is_set():
                    raise _Stopped()
                data = resp.data
            finally:
                self._resp = None
                resp.release_conn()
            seen_at = time.monotonic()
            if self._unreachable:  # before the pages: the owner applies them knowing the server is back
                self._unreachable = False
                self._post(self._reachable, True, "")
            body = json.loads(data)
            del data
            records = [(kubemodel.object_key(o), self._record(o)) for o in body.get("items") or ()]
            meta = body.get("metadata") or {}
            del body
            self._post(self._page, records, first, seen_at)
            first = False
            cont = meta.get("continue") or None
            if cont is None:
                self._rv = str(meta.get("resourceVersion") or "")
                self._post(self._listed, seen_at, self._rv)
                return

    def _watch(self) -> None:
        """One watch from the last resourceVersion, until it ends or is cut; then the caller watches again."""
        opened = time.monotonic()
        timeout = max(1, round(self.options.watch_timeout))
        resp = self._call(
            self.options.request_timeout, watch=True, resource_version=self._rv or None,
            allow_watch_bookmarks=True, timeout_seconds=timeout,
        )
        self._resp = resp
        delivered = clean = False
        cut: Exception | None = None
        try:
            if self._stopping.is_set():  # stop() came while we waited for the headers: it could not wake us
                raise _Stopped()
            # Headers came within the request timeout; from here on a watch may be silent for its whole
            # timeout, or between bookmarks once the server has shown that it sends them (module docstring).
            sock = getattr(resp.connection, "sock", None)
            if sock is not None:
                sock.settimeout(self._silence(timeout))
            for line in _lines(resp, self._stopping):
                seen_at = time.monotonic()
                kind = self._event(json.loads(line), seen_at)
                delivered = True
                self._failures = self._drops = 0
                if kind == "BOOKMARK" and not self.periodic_bookmarks \
                        and opened + timeout - seen_at > max(2.0, timeout / 10):
                    self.periodic_bookmarks = True
                    if sock is not None:
                        sock.settimeout(self._silence(timeout))
            clean = True
        except (_Gone, _WatchError, _Stopped):
            raise
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise _StreamStalled() from exc
        except Exception as exc:  # the stream was cut (a proxy, a restart) or sent something unreadable
            cut = exc
        finally:
            self._resp = None
            if not clean:
                resp.close()
            resp.release_conn()
        if self._stopping.is_set():
            raise _Stopped()
        lasted = time.monotonic() - opened
        if not delivered and lasted < _SHORT_WATCH:
            raise _WatchClosed(_describe(cut) if cut is not None else "watch ended at once by the server")
        self._failures = self._drops = 0
        if cut is not None:
            log.info("watch cut, watching again", **self._ctx, error=_describe(cut), after=round(lasted, 1))

    def _silence(self, timeout: float) -> float:
        """How long a watch stream may say nothing before it counts as stalled (a socket read timeout)."""
        quiet = min(timeout, self.options.bookmark_silence) if self.periodic_bookmarks else timeout
        return quiet + self.options.request_timeout

    def _record(self, obj: kubemodel.Obj) -> R | None:
        """The decoder's record; an object it cannot read is skipped (and reported once), never fatal."""
        try:
            return self._decode(obj, self._problems)
        except Exception as exc:
            self._problems.report("object could not be read, skipped", f"{self.kind} {kubemodel.object_key(obj)}",
                                  error=f"{type(exc).__name__}: {exc}")
            return None

    def _event(self, event: dict[str, Any], seen_at: float) -> str:
        """Hand one watch event to the loop; returns its type."""
        kind, obj = str(event.get("type")), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone(str(obj.get("message") or "Gone"))
            raise _WatchError(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        rv = kubemodel.resource_version(obj)
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            key = kubemodel.object_key(obj)
            if kind == "DELETED":
                self._post(self._delete, key, seen_at, rv)
            else:
                self._post(self._put, key, self._record(obj), seen_at, rv)
        elif kind == "BOOKMARK":
            self._post(self._advance, rv)  # about once a minute: nothing changed, but the watch has moved on
        else:
            log.warning("unknown watch event type ignored", **self._ctx, type=kind)
            return kind
        self._rv = rv or self._rv
        return kind


_EXPECTED = (urllib3.exceptions.HTTPError, OSError, kubernetes.client.exceptions.ApiException, _WatchError)
_SHORT_WATCH = 1.0  # seconds: a watch that ended sooner with nothing in it is a drop (client-go's "very short watch")


def _lines(resp: Any, stopping: threading.Event) -> Iterator[bytes]:
    """Newline-delimited JSON out of a chunked stream (an event may span chunks, a chunk hold several)."""
    pending = b""
    for chunk in resp.stream(None, decode_content=True):
        if stopping.is_set():
            return
        if b"\n" not in chunk:
            pending += chunk
            continue
        *complete, rest = (pending + chunk).split(b"\n")
        pending = rest
        for line in complete:
            if line.strip():
                yield line
    if pending.strip() and not stopping.is_set():
        yield pending


def _describe(exc: BaseException) -> str:
    if isinstance(exc, kubernetes.client.exceptions.ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return "timed out reading from the API server"
    reason = getattr(exc, "reason", None)
    return f"{type(exc).__name__}: {reason or exc}"
