"""The fake API server, driven with the real `kubernetes` client (CoreV1Api, DiscoveryV1Api, Watch).

These tests also pin down what the client does on 410 Gone, dropped connections and bookmarks,
so the watchers built on it can rely on it:
- a watch from a compacted resourceVersion: Watch.stream retries once from the same version,
  then raises ApiException(status=410) (at once if timeout_seconds is given);
- a dropped watch connection: the stream raises urllib3.exceptions.ProtocolError;
- a BOOKMARK event is yielded with the raw dict as its object, and Watch.resource_version moves on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.conftest import wait_for
from tests.fakekube import (
    FakeKubeAPI,
    endpoint,
    endpoint_slice,
    kubeconfig_secret,
    namespace,
    node,
    pod,
    service,
)


def poll(predicate: Callable[[], Any], *, timeout: float = 5.0, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def start_fake() -> Iterator[Callable[[str], FakeKubeAPI]]:
    """Start fakes; on teardown stop them and check that no thread or listening socket is left."""
    before = set(threading.enumerate())
    fakes: list[FakeKubeAPI] = []

    def start(name: str) -> FakeKubeAPI:
        fake = FakeKubeAPI(name)
        fake.start()
        fakes.append(fake)
        return fake

    yield start
    for fake in fakes:
        fake.stop()
    leftovers = [t for t in threading.enumerate() if t not in before and t.name.startswith("fakekube")]
    assert not leftovers, f"threads left behind: {leftovers}"
    for fake in fakes:
        assert fake.open_watches() == 0
        assert _port_refuses(int(fake.url.rsplit(":", 1)[1]))


@pytest.fixture
def fake(start_fake: Callable[[str], FakeKubeAPI]) -> FakeKubeAPI:
    return start_fake("east")


@pytest.fixture
def api(fake: FakeKubeAPI) -> Iterator[client.ApiClient]:
    with config.new_client_from_config_dict(fake.kubeconfig(cluster="east")) as api_client:
        yield api_client


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


class Streamer:
    """Watch().stream(...) in a thread, collecting events and the exception that ended it, if any."""

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.watch = watch.Watch()
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(func, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            for event in self.watch.stream(func, *args, **kwargs):
                self.events.append(event)
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended.set()

    def summary(self) -> list[tuple[str, str]]:
        return [(e["type"], e["raw_object"]["metadata"].get("name", "")) for e in self.events]

    def close(self) -> None:
        self.watch.stop()
        self._thread.join(5)
        assert not self._thread.is_alive()


@pytest.fixture
def streamers() -> Iterator[Callable[..., Streamer]]:
    started: list[Streamer] = []

    def start(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Streamer:
        started.append(Streamer(func, *args, **kwargs))
        return started[-1]

    yield start
    for streamer in started:
        streamer.close()


def _put_services(fake: FakeKubeAPI, ns: str, names: list[str]) -> None:
    for name in names:
        fake.put("services", service(name, ns, ports=[80]))


# --- lists -------------------------------------------------------------------------------------


def test_list_pages_are_one_consistent_snapshot(fake: FakeKubeAPI, core: client.CoreV1Api) -> None:
    _put_services(fake, "shop", ["s0", "s1", "s2", "s3", "s4"])
    first = core.list_namespaced_service("shop", limit=2)
    assert [s.metadata.name for s in first.items] == ["s0", "s1"]
    assert first.metadata.remaining_item_count == 3
    snapshot = first.metadata.resource_version

    # Between pages: change an object still to come, delete one, add one.
    changed = service("s3", "shop", ports=[81])
    fake.put("services", changed)
    fake.delete("services", "shop", "s4")
    fake.put("services", service("s25", "shop"))

    pages = [first]
    while pages[-1].metadata._continue:
        pages.append(core.list_namespaced_service("shop", limit=2, _continue=pages[-1].metadata._continue))
    assert len(pages) == 3
    assert {p.metadata.resource_version for p in pages} == {snapshot}
    names = [s.metadata.name for p in pages for s in p.items]
    assert names == ["s0", "s1", "s2", "s3", "s4"]  # as of the snapshot: no s25, s4 still there
    assert pages[1].items[1].spec.ports[0].port == 80  # s3 before the change
    assert pages[2].metadata._continue is None and pages[2].metadata.remaining_item_count is None
    assert fake.page_limit_seen == [2, 2, 2]

    fresh = core.list_namespaced_service("shop")
    assert [s.metadata.name for s in fresh.items] == ["s0", "s1", "s2", "s25", "s3"]
    assert int(fresh.metadata.resource_version) > int(snapshot)
    assert fresh.items[4].spec.ports[0].port == 81


def test_list_wire_format(fake: FakeKubeAPI, api: client.ApiClient) -> None:
    stored = fake.put("services", service("web", "shop"))
    assert stored["apiVersion"] == "v1" and stored["kind"] == "Service"
    assert stored["metadata"]["uid"] and stored["metadata"]["creationTimestamp"]
    raw = client.CoreV1Api(api).list_namespaced_service("shop", _preload_content=False)
    body = json.loads(raw.data)
    assert body["kind"] == "ServiceList" and body["apiVersion"] == "v1"
    assert body["metadata"] == {"resourceVersion": stored["metadata"]["resourceVersion"]}
    # Like the real server, list items leave out kind and apiVersion.
    assert "kind" not in body["items"][0] and body["items"][0]["metadata"]["name"] == "web"
    again = fake.put("services", service("web", "shop", ports=[81]))
    assert again["metadata"]["uid"] == stored["metadata"]["uid"]
    assert int(again["metadata"]["resourceVersion"]) > int(stored["metadata"]["resourceVersion"])


def test_selectors_namespaces_and_cluster_scope(fake: FakeKubeAPI, core: client.CoreV1Api) -> None:
    fake.put("pods", pod("a", "shop", {"app": "web", "track": "stable"}))
    fake.put("pods", pod("b", "shop", {"app": "web"}))
    fake.put("pods", pod("c", "shop", {"app": "db"}))
    fake.put("pods", pod("d", "other", {"app": "web"}))
    fake.put("nodes", node("n1", "us-east", "us-east-1a"))
    fake.put("nodes", node("n2", "us-west", "us-west-1b"))

    def names(**kwargs: Any) -> list[str]:
        return [p.metadata.name for p in core.list_namespaced_pod("shop", **kwargs).items]

    assert names() == ["a", "b", "c"]
    assert names(label_selector="app=web") == ["a", "b"]
    assert names(label_selector="app==web,track") == ["a"]
    assert names(label_selector="!track") == ["b", "c"]
    assert names(label_selector="app!=web") == ["c"]
    assert names(label_selector="app in (db, cache)") == ["c"]
    assert names(label_selector="app notin (db)") == ["a", "b"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.name!=b") == ["a", "c"]
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(label_selector="app=web").items] == [
        "d", "a", "b"]  # sorted by namespace, then name
    labelled = core.list_namespaced_pod("shop", label_selector="app=web", limit=1)
    assert labelled.metadata._continue and labelled.metadata.remaining_item_count is None
    nodes = core.list_node(label_selector="topology.kubernetes.io/region=us-west").items
    assert [n.metadata.name for n in nodes] == ["n2"]
    assert nodes[0].metadata.namespace is None
    assert nodes[0].metadata.labels["topology.kubernetes.io/zone"] == "us-west-1b"
    with pytest.raises(ApiException) as bad:
        core.list_namespaced_pod("shop", label_selector="app=(")
    assert bad.value.status == 400


def test_get_one_object_and_not_found(fake: FakeKubeAPI, api: client.ApiClient, core: client.CoreV1Api) -> None:
    fake.put("services", service("web", "shop", ports=[{"name": "http", "port": 80, "targetPort": 8080}]))
    fake.put("namespaces", namespace("shop"))
    web = core.read_namespaced_service("web", "shop")
    assert web.spec.ports[0].target_port == 8080 and web.kind == "Service"
    assert core.read_namespace("shop").metadata.name == "shop"
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_service("nope", "shop")
    assert missing.value.status == 404
    assert json.loads(missing.value.body)["reason"] == "NotFound"
    assert fake.get("services", "shop", "web")["spec"]["ports"][0]["port"] == 80
    assert fake.get("services", "shop", "nope") is None

    assert client.VersionApi(api).get_code().git_version.startswith("v1.")
    assert "v1" in client.CoreApi(api).get_api_versions().versions
    groups = client.ApisApi(api).get_api_versions().groups
    assert [g.name for g in groups] == ["discovery.k8s.io"]
    http = urllib3.PoolManager()
    try:
        unknown = http.request("GET", f"{fake.url}/api/v1/widgets", headers={"Authorization": "Bearer fake-token"})
    finally:
        http.clear()
    assert unknown.status == 404
    assert json.loads(unknown.data)["kind"] == "Status"


def test_bearer_token_is_required(fake: FakeKubeAPI, core: client.CoreV1Api) -> None:
    core.list_namespaced_service("shop")
    assert fake.requests[-1].token == "fake-token"
    wrong = fake.kubeconfig(cluster="east")
    wrong["users"][0]["user"]["token"] = "stolen"
    with config.new_client_from_config_dict(wrong) as api_client, pytest.raises(ApiException) as denied:
        client.CoreV1Api(api_client).list_namespaced_service("shop")
    assert denied.value.status == 401


def test_kubeconfig_file(fake: FakeKubeAPI, tmp_path: Path) -> None:
    fake.put("services", service("web", "shop"))
    path = fake.write_kubeconfig(tmp_path / "kubeconfig", cluster="east", context="east-ctx")
    assert yaml.safe_load(path.read_text())["current-context"] == "east-ctx"
    with config.new_client_from_config(config_file=str(path)) as api_client:
        assert [s.metadata.name for s in client.CoreV1Api(api_client).list_service_for_all_namespaces().items] == [
            "web"]


# --- watches -----------------------------------------------------------------------------------


def test_watch_from_resource_version_sees_changes_in_order(
        fake: FakeKubeAPI, core: client.CoreV1Api, streamers: Callable[..., Streamer]) -> None:
    _put_services(fake, "shop", ["old"])
    listed = core.list_namespaced_service("shop")
    fake.put("services", service("before-watch", "shop"))  # after the list: must be delivered
    stream = streamers(core.list_namespaced_service, "shop", resource_version=listed.metadata.resource_version)
    poll(lambda: fake.open_watches() == 1, what="the watch to open")
    fake.put("services", service("web", "shop"))
    fake.put("services", service("web", "shop", ports=[81]))
    fake.delete("services", "shop", "web")
    fake.put("services", service("elsewhere", "other"))  # another namespace: not for this watch
    poll(lambda: len(stream.events) >= 4, what="four events")
    assert stream.summary() == [("ADDED", "before-watch"), ("ADDED", "web"), ("MODIFIED", "web"), ("DELETED", "web")]
    rvs = [int(e["object"].metadata.resource_version) for e in stream.events]
    assert rvs == sorted(rvs) and len(set(rvs)) == 4  # DELETED carries a new resourceVersion
    assert stream.events[2]["object"].spec.ports[0].port == 81
    assert stream.events[3]["raw_object"]["kind"] == "Service"
    watches = [r for r in fake.requests if r.watch]
    assert watches[0].query["resourceVersion"] == listed.metadata.resource_version


def _take(count: int, func: Callable[..., Any], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The first `count` events of a watch (then the watch is stopped)."""
    w = watch.Watch()
    events = []
    for event in w.stream(func, *args, **kwargs):
        events.append(event)
        if len(events) == count:
            w.stop()
    return events


def test_watch_without_resource_version_starts_with_current_state(
        fake: FakeKubeAPI, core: client.CoreV1Api) -> None:
    _put_services(fake, "shop", ["b", "a"])
    events = _take(2, core.list_namespaced_service, "shop")
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "a"), ("ADDED", "b")]
    assert "resourceVersion" not in fake.requests[-1].query
    poll(lambda: fake.open_watches() == 0, what="the server to notice that the client closed the watch")


def test_watch_ends_cleanly_after_timeout_seconds(fake: FakeKubeAPI, core: client.CoreV1Api) -> None:
    started = time.monotonic()
    events = list(watch.Watch().stream(core.list_namespaced_service, "shop",
                                       resource_version=fake.resource_version, timeout_seconds=1))
    assert events == [] and time.monotonic() - started >= 0.9
    assert fake.open_watches() == 0


def test_client_rewatches_from_the_last_event_when_the_server_ends_a_watch(
        fake: FakeKubeAPI, core: client.CoreV1Api, streamers: Callable[..., Streamer]) -> None:
    fake.default_watch_timeout = 0.2  # as the real server's --min-request-timeout, only shorter
    stream = streamers(core.list_namespaced_service, "shop", resource_version=fake.resource_version)
    fake.put("services", service("web", "shop"))
    poll(lambda: stream.events, what="the event")
    last = stream.events[0]["object"].metadata.resource_version
    # Without timeout_seconds the client silently watches again, from the last resourceVersion it saw.
    poll(lambda: [r for r in fake.requests if r.watch and r.query["resourceVersion"] == last],
         what="a new watch from the last event's resourceVersion")
    fake.put("services", service("api", "shop"))
    poll(lambda: len(stream.events) == 2, what="the second event, on a later watch")
    assert stream.summary() == [("ADDED", "web"), ("ADDED", "api")] and stream.error is None


def test_watch_with_selector_sees_objects_enter_and_leave(
        fake: FakeKubeAPI, core: client.CoreV1Api, streamers: Callable[..., Streamer]) -> None:
    start = fake.resource_version
    stream = streamers(core.list_namespaced_pod, "shop", label_selector="app=web", resource_version=start)
    fake.put("pods", pod("p", "shop", {"app": "db"}))
    fake.put("pods", pod("p", "shop", {"app": "web"}))  # enters the selection
    fake.put("pods", pod("p", "shop", {"app": "web", "v": "2"}))
    fake.put("pods", pod("p", "shop", {"app": "db"}))  # leaves it
    fake.delete("pods", "shop", "p")  # not selected any more
    fake.put("pods", pod("q", "shop", {"app": "web"}))
    poll(lambda: len(stream.events) >= 4, what="four events")
    assert stream.summary() == [("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p"), ("ADDED", "q")]
    assert stream.events[2]["object"].metadata.labels == {"app": "db"}


def test_watch_from_expired_resource_version_gets_410(fake: FakeKubeAPI, core: client.CoreV1Api) -> None:
    _put_services(fake, "shop", ["web"])
    old = fake.resource_version
    _put_services(fake, "shop", ["api"])
    fake.expire()

    # On the wire: 200, then an ERROR event holding a 410 Status, then the end of the stream.
    http = urllib3.PoolManager()
    try:
        raw = http.request("GET", f"{fake.url}/api/v1/namespaces/shop/services?watch=true&resourceVersion={old}",
                           headers={"Authorization": "Bearer fake-token"})
    finally:
        http.clear()
    assert raw.status == 200 and raw.headers["Transfer-Encoding"] == "chunked"
    lines = raw.data.decode().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR"
    assert event["object"]["kind"] == "Status" and event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired"

    # The client retries once from the same resourceVersion, then raises ApiException 410.
    watches_before = sum(r.watch for r in fake.requests)
    with pytest.raises(ApiException) as gone:
        for _ in watch.Watch().stream(core.list_namespaced_service, "shop", resource_version=old):
            pass
    assert gone.value.status == 410 and "Expired" in gone.value.reason
    assert sum(r.watch for r in fake.requests) - watches_before == 2
    # With timeout_seconds it does not retry.
    with pytest.raises(ApiException) as gone_at_once:
        for _ in watch.Watch().stream(core.list_namespaced_service, "shop", resource_version=old, timeout_seconds=5):
            pass
    assert gone_at_once.value.status == 410
    assert sum(r.watch for r in fake.requests) - watches_before == 3

    # From the current version (what a fresh list returns) all is well again.
    relisted = core.list_namespaced_service("shop")
    assert relisted.metadata.resource_version == fake.resource_version
    _put_services(fake, "shop", ["new"])
    events = _take(1, core.list_namespaced_service, "shop", resource_version=relisted.metadata.resource_version)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "new")]


def test_expired_continue_token_gets_410(fake: FakeKubeAPI, core: client.CoreV1Api) -> None:
    _put_services(fake, "shop", ["a", "b", "c"])
    first = core.list_namespaced_service("shop", limit=1)
    fake.put("services", service("d", "shop"))
    fake.expire()  # the first page's snapshot is now older than the compacted history
    with pytest.raises(ApiException) as gone:
        core.list_namespaced_service("shop", limit=1, _continue=first.metadata._continue)
    assert gone.value.status == 410
    assert json.loads(gone.value.body)["reason"] == "Expired"


def test_list_at_exact_resource_version(fake: FakeKubeAPI, core: client.CoreV1Api) -> None:
    _put_services(fake, "shop", ["a"])
    then = fake.resource_version
    _put_services(fake, "shop", ["b"])
    exact = core.list_namespaced_service("shop", resource_version=then, resource_version_match="Exact")
    assert [s.metadata.name for s in exact.items] == ["a"] and exact.metadata.resource_version == then
    newer = core.list_namespaced_service("shop", resource_version=then, resource_version_match="NotOlderThan")
    assert [s.metadata.name for s in newer.items] == ["a", "b"]
    fake.expire()
    with pytest.raises(ApiException) as gone:
        core.list_namespaced_service("shop", resource_version=then, resource_version_match="Exact")
    assert gone.value.status == 410


def test_open_watch_survives_compaction(
        fake: FakeKubeAPI, core: client.CoreV1Api, streamers: Callable[..., Streamer]) -> None:
    stream = streamers(core.list_namespaced_service, "shop", resource_version=fake.resource_version)
    poll(lambda: fake.open_watches() == 1, what="the watch to open")
    fake.stall(True)  # hold events back so that the watch is behind when the history is compacted
    _put_services(fake, "shop", ["a", "b"])
    fake.expire()
    fake.stall(False)
    poll(lambda: len(stream.events) >= 2, what="both events")
    assert stream.summary() == [("ADDED", "a"), ("ADDED", "b")] and stream.error is None


def test_bookmarks_only_when_allowed(
        fake: FakeKubeAPI, core: client.CoreV1Api, streamers: Callable[..., Streamer]) -> None:
    start = fake.resource_version
    with_bookmarks = streamers(core.list_namespaced_service, "shop", resource_version=start,
                               allow_watch_bookmarks=True)
    without = streamers(core.list_namespaced_service, "shop", resource_version=start)
    poll(lambda: fake.open_watches() == 2, what="both watches to open")
    fake.put("services", service("elsewhere", "other"))  # moves the resourceVersion, not for these watches
    fake.send_bookmarks()
    fake.put("services", service("web", "shop"))
    poll(lambda: len(with_bookmarks.events) >= 2 and len(without.events) >= 1, what="events")
    bookmark = with_bookmarks.events[0]
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["raw_object"] == {"kind": "Service", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(int(start) + 1)}}
    assert bookmark["object"] == bookmark["raw_object"]  # the client does not deserialize bookmarks
    assert with_bookmarks.summary()[1] == ("ADDED", "web")
    assert without.summary() == [("ADDED", "web")]
    assert with_bookmarks.watch.resource_version == with_bookmarks.events[1]["object"].metadata.resource_version


def test_initial_events_end_with_a_bookmark(fake: FakeKubeAPI, core: client.CoreV1Api) -> None:
    _put_services(fake, "shop", ["a"])
    events = _take(2, core.list_namespaced_service, "shop", send_initial_events=True,
                   resource_version_match="NotOlderThan", allow_watch_bookmarks=True)
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["raw_object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_drop_watches_makes_the_stream_raise_protocol_error(
        fake: FakeKubeAPI, core: client.CoreV1Api, streamers: Callable[..., Streamer]) -> None:
    stream = streamers(core.list_namespaced_service, "shop", resource_version=fake.resource_version)
    poll(lambda: fake.open_watches() == 1, what="the watch to open")
    fake.put("services", service("web", "shop"))
    poll(lambda: stream.events, what="the first event")
    fake.drop_watches()
    assert stream.ended.wait(5)
    assert isinstance(stream.error, urllib3.exceptions.ProtocolError)  # "Response ended prematurely"
    poll(lambda: fake.open_watches() == 0, what="the watch to close")
    assert [s.metadata.name for s in core.list_namespaced_service("shop").items] == ["web"]


@pytest.mark.parametrize("clean", [False, True], ids=["hung-up", "ended"])
def test_idle_watches_are_cut_as_a_proxy_cuts_them(
        fake: FakeKubeAPI, core: client.CoreV1Api, streamers: Callable[..., Streamer], clean: bool) -> None:
    fake.cut_idle_watches(0.5, resources=("services",), clean=clean)
    began = time.monotonic()
    # timeout_seconds: the client ends with the stream, rather than watching again on a clean end
    services = streamers(core.list_namespaced_service, "shop", resource_version=fake.resource_version,
                         timeout_seconds=30)
    nodes = streamers(core.list_node, resource_version=fake.resource_version)
    poll(lambda: fake.open_watches("services") == 1 and fake.open_watches("nodes") == 1, what="the watches to open")
    time.sleep(0.3)
    fake.put("services", service("web", "shop"))  # something sent: idle from here on
    assert services.ended.wait(5)
    assert time.monotonic() - began >= 0.75, "cut before it had been idle for 0.5 s"
    assert services.summary() == [("ADDED", "web")]
    if clean:
        assert services.error is None  # the end of a watch, as the server ends one
    else:
        assert isinstance(services.error, urllib3.exceptions.ProtocolError)
    assert [resource for resource, _ in fake.cuts] == ["services"]
    assert fake.open_watches("nodes") == 1 and not nodes.ended.is_set(), "only the resources named are cut"
    fake.cut_idle_watches(None)
    again = streamers(core.list_namespaced_service, "shop", resource_version=fake.resource_version)
    poll(lambda: fake.open_watches("services") == 1, what="the watch to open")
    assert not again.ended.wait(0.7) and fake.cuts[1:] == [], "cut after cut_idle_watches(None)"


def test_unreachable_refuses_connections_then_recovers_on_the_same_port(
        fake: FakeKubeAPI, core: client.CoreV1Api, streamers: Callable[..., Streamer]) -> None:
    _put_services(fake, "shop", ["web"])
    stream = streamers(core.list_namespaced_service, "shop", resource_version=fake.resource_version)
    poll(lambda: fake.open_watches() == 1, what="the watch to open")
    url = fake.url
    fake.set_unreachable(True)
    assert stream.ended.wait(5) and isinstance(stream.error, urllib3.exceptions.ProtocolError)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as refused:
        core.list_namespaced_service("shop")
    assert isinstance(refused.value.reason, urllib3.exceptions.NewConnectionError)
    assert isinstance(refused.value.reason.__cause__, ConnectionRefusedError)

    fake.put("services", service("api", "shop"))  # state changes while unreachable
    fake.set_unreachable(False)
    assert fake.url == url
    assert [s.metadata.name for s in core.list_namespaced_service("shop").items] == ["api", "web"]


def test_stall_hangs_requests_and_holds_back_watch_events(
        fake: FakeKubeAPI, core: client.CoreV1Api, streamers: Callable[..., Streamer]) -> None:
    stream = streamers(core.list_namespaced_service, "shop", resource_version=fake.resource_version)
    poll(lambda: fake.open_watches() == 1, what="the watch to open")
    fake.stall(True)
    fake.put("services", service("web", "shop"))
    with pytest.raises(urllib3.exceptions.MaxRetryError) as timed_out:  # urllib3 retries the read 3 times
        core.list_namespaced_service("shop", _request_timeout=0.2)
    assert isinstance(timed_out.value.reason, urllib3.exceptions.ReadTimeoutError)
    assert stream.events == []  # nothing was sent during the ~0.8s the list hung
    fake.stall(False)
    poll(lambda: stream.events, what="the held-back event")
    assert stream.summary() == [("ADDED", "web")]
    assert [s.metadata.name for s in core.list_namespaced_service("shop").items] == ["web"]


def test_held_watches_deliver_late_and_in_order_while_others_carry_on(
        fake: FakeKubeAPI, core: client.CoreV1Api, streamers: Callable[..., Streamer]) -> None:
    start = fake.resource_version
    services = streamers(core.list_namespaced_service, "shop", resource_version=start)
    pods = streamers(core.list_namespaced_pod, "shop", resource_version=start)
    poll(lambda: fake.open_watches() == 2, what="both watches to open")
    fake.hold_watches(("services",))
    fake.put("services", service("web", "shop"))
    fake.put("services", service("api", "shop"))
    fake.put("pods", pod("p", "shop", {"app": "web"}))  # written after the services, delivered before them
    poll(lambda: pods.events, what="the pod event, not held")
    assert services.events == []
    fake.hold_watches(())
    poll(lambda: len(services.events) == 2, what="the held-back services events")
    assert services.summary() == [("ADDED", "web"), ("ADDED", "api")]


def test_two_instances_are_independent(start_fake: Callable[[str], FakeKubeAPI]) -> None:
    east, west = start_fake("east"), start_fake("west")
    assert east.url != west.url
    east.put("services", service("web", "shop"))
    west.put("nodes", node("w1", "us-west", "us-west-1a"))
    west.expire()
    with config.new_client_from_config_dict(east.kubeconfig(cluster="east")) as e_api, \
            config.new_client_from_config_dict(west.kubeconfig(cluster="west", token="west-token")) as w_api:
        e_core, w_core = client.CoreV1Api(e_api), client.CoreV1Api(w_api)
        assert [s.metadata.name for s in e_core.list_service_for_all_namespaces().items] == ["web"]
        assert w_core.list_service_for_all_namespaces().items == []
        assert [n.metadata.name for n in w_core.list_node().items] == ["w1"]
        # west's compaction leaves east's history alone
        assert e_core.list_namespaced_service("shop", resource_version="1", resource_version_match="Exact").items == []
    assert [r.token for r in west.requests] == ["west-token"] * 2


def test_stop_closes_idle_and_watch_connections(start_fake: Callable[[str], FakeKubeAPI]) -> None:
    fake = start_fake("short-lived")
    with config.new_client_from_config_dict(fake.kubeconfig(cluster="x")) as api_client:
        core = client.CoreV1Api(api_client)
        core.list_namespaced_service("shop")  # leaves an idle keep-alive connection in the pool
        stream = Streamer(core.list_namespaced_service, "shop", resource_version=fake.resource_version)
        poll(lambda: fake.open_watches() == 1, what="the watch to open")
        fake.stop()  # the fixture then checks that every thread is gone and the port is closed
        assert stream.ended.wait(5) and isinstance(stream.error, urllib3.exceptions.ProtocolError)
        stream.close()


async def test_usable_from_asyncio(fake: FakeKubeAPI, core: client.CoreV1Api) -> None:
    stream = Streamer(core.list_namespaced_service, "shop", resource_version=fake.resource_version)
    try:
        await wait_for(lambda: fake.open_watches() == 1, what="the watch to open")
        await asyncio.to_thread(fake.put, "services", service("web", "shop"))
        await wait_for(lambda: stream.events, what="the event")
    finally:
        await asyncio.to_thread(stream.close)
    assert stream.summary() == [("ADDED", "web")]


# --- builders ----------------------------------------------------------------------------------


def test_builders_deserialize_with_the_typed_client(
        start_fake: Callable[[str], FakeKubeAPI], fake: FakeKubeAPI, api: client.ApiClient) -> None:
    remote = start_fake("west")
    fake.put("endpointslices", endpoint_slice(
        "web-abc12", "shop", "web",
        endpoints=[
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "nodeName": "n1", "zone": "us-east-1a",
             "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1"}},
            endpoint("10.0.0.2", ready=False, terminating=True, node_name="n2", zone="us-east-1b", pod="web-2",
                     ns="shop"),
        ],
        ports=[{"name": "http", "port": 8080, "protocol": "TCP"}]))
    fake.put("endpointslices", endpoint_slice("db-xyz", "shop", "db", endpoints=[endpoint("10.0.1.1")]))
    fake.put("secrets", kubeconfig_secret("west-kubeconfig", "meshplane", "west",
                                          remote.kubeconfig(cluster="west"), labels={"multicluster": "true"}))
    remote.put("services", service("web", "shop"))

    slices = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
        "shop", label_selector="kubernetes.io/service-name=web").items
    assert len(slices) == 1
    web = slices[0]
    assert web.address_type == "IPv4" and web.kind is None  # list items carry no kind
    assert web.metadata.labels["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
    first, second = web.endpoints
    assert (first.addresses, first.node_name, first.zone, first.target_ref.name) == (
        ["10.0.0.1"], "n1", "us-east-1a", "web-1")
    assert (first.conditions.ready, first.conditions.serving, first.conditions.terminating) == (True, True, False)
    assert (second.conditions.ready, second.conditions.serving, second.conditions.terminating) == (
        False, False, True)
    assert (web.ports[0].name, web.ports[0].port, web.ports[0].protocol) == ("http", 8080, "TCP")

    secret = client.CoreV1Api(api).list_namespaced_secret("meshplane", label_selector="multicluster=true").items[0]
    kubeconfig = yaml.safe_load(base64.b64decode(secret.data["west"]))
    with config.new_client_from_config_dict(kubeconfig) as west_api:
        assert [s.metadata.name for s in client.CoreV1Api(west_api).list_service_for_all_namespaces().items] == [
            "web"]

    fake.put("pods", pod("web-1", "shop", {"app": "web"}, ip="10.0.0.1", node_name="n1"))
    fake.put("nodes", node("n1", "us-east", "us-east-1a", subzone="rack1"))
    core = client.CoreV1Api(api)
    web_pod = core.read_namespaced_pod("web-1", "shop")
    assert (web_pod.status.pod_ip, web_pod.spec.node_name, web_pod.status.phase) == ("10.0.0.1", "n1", "Running")
    n1 = core.read_node("n1")
    assert n1.metadata.labels["topology.istio.io/subzone"] == "rack1"
    assert n1.status.addresses[0].type == "InternalIP"
