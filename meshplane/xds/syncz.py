"""What each connected client holds, read from the protocol servers' per-stream state: the sync table
of `/debug/syncz` and `meshplane status`, and the config dump of `/debug/config_dump`.

Both only read `streams.Registry` (docs/architecture.md, layer 4): a status
page never asks a protocol server anything, and never changes a stream.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2, json_format

from meshplane import forms
from meshplane.xds import proxy, refusals, resources, streams, typeurls


def _iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(
        timespec="milliseconds")


def clients(registry: streams.Registry, *, now: float, now_monotonic: float) -> list[dict[str, Any]]:
    """Every identified client and, per type it asked for, where it stands (`now`: wall clock)."""
    out = []
    for stream in registry:
        if stream.proxy is None:
            continue  # its first request has not been read: nothing to say yet
        types = {}
        for type_url, sub in sorted(stream.types.items(), key=lambda item: typeurls.PUSH_ORDER.index(item[0])):
            state = stream.sync(type_url)
            entry: dict[str, Any] = {"state": state.value, "sent": sub.sent_version or None,
                                     "acked": sub.acked_version or None, "sent_at": _iso(sub.sent_at)}
            if state == streams.Sync.STALE and type_url in stream.dirty and stream.dirty_since is not None:
                entry |= {"pending": True, "stale_for_s": round(now_monotonic - stream.dirty_since, 3)}
            elif state == streams.Sync.STALE and sub.sent_at is not None:
                entry["stale_for_s"] = round(now - sub.sent_at, 3)
            if sub.last_nack is not None:
                nack = sub.last_nack
                entry["last_nack"] = {"rejected": nack.rejected, "kept": nack.kept, "message": nack.message,
                                      "at": _iso(nack.at)}
            types[typeurls.SHORT_NAMES[type_url]] = entry
        proxy = stream.proxy
        out.append({
            "node": proxy.id, "kind": proxy.kind.value, "protocol": stream.protocol, "locality": str(proxy.locality),
            "gateway": proxy.gateway or None, "view": str(stream.watch.key) if stream.watch else None,
            "peer": stream.peer, "identity": stream.identity, "connected_since": _iso(stream.connected_at),
            "state": stream.worst().value, "types": types,
        })
    return sorted(out, key=lambda c: (c["kind"], c["locality"], c["node"]))


FILTERS = ("kind", "locality", "state")
"""The query parameters of `/debug/syncz`, each a filter (`meshplane status --kind, --locality, --state`)."""


def refused(recent: refusals.Refusals) -> dict[str, Any]:
    """`/debug/syncz`'s `refused`: the peers refused lately, by address and reason, the latest first: who
    (address, node, identity), why (status, reason, message), when (first and last) and how many times; and
    `refused_window_s`, how long one is kept after its last refusal (what "lately" is: `meshplane status`
    says it, and imports nothing of the server to know it)."""
    return {
        "refused": [
            {"peer": r.address, "node": r.node or None, "identity": r.identity, "code": r.code, "reason": r.reason,
             "message": r.message, "count": r.count, "first_at": _iso(r.first), "last_at": _iso(r.last)}
            for r in recent.recent()
        ],
        "refused_window_s": recent.window,
    }


def select(table: list[dict[str, Any]], query: Mapping[str, str]) -> list[dict[str, Any]]:
    """Filter by kind, by locality (a region/zone/cluster prefix) and by state (kind and state in any case).

    A parameter or value no client could match raises ValueError naming it: scripts read this page
    directly, and a typo must not read as "no client NACKED"."""
    unknown = sorted(set(query) - set(FILTERS))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} (parameters: {', '.join(FILTERS)})")
    kind, locality, state = query.get("kind", "").lower(), query.get("locality", ""), query.get("state", "").upper()
    kinds = [k.value for k in proxy.Kind]
    if kind and kind not in kinds:
        raise ValueError(f"kind: {query['kind']!r} is not a kind of client ({', '.join(kinds)})")
    states = [s.value for s in streams.Sync]
    if state and state not in states:
        raise ValueError(f"state: {query['state']!r} is not a state ({', '.join(states)})")
    if locality:
        try:
            forms.locality_prefix(locality)
        except forms.FormError as exc:
            raise ValueError(f"locality: {exc}") from None
    return [
        c for c in table
        if (not kind or c["kind"] == kind)
        and (not locality or c["locality"] == locality or c["locality"].startswith(locality.rstrip("/") + "/"))
        and (not state or state in {t["state"] for t in c["types"].values()})
    ]


# Config dump: what was sent, in the shape of Envoy's /config_dump.

_DUMPS = {
    typeurls.CLUSTER: ("ClustersConfigDump", "dynamic_active_clusters", "cluster", cluster_pb2.Cluster),
    typeurls.ENDPOINT: ("EndpointsConfigDump", "dynamic_endpoint_configs", "endpoint_config",
                        endpoint_pb2.ClusterLoadAssignment),
    typeurls.LISTENER: ("ListenersConfigDump", "dynamic_listeners", "listener", listener_pb2.Listener),
    typeurls.ROUTE: ("RoutesConfigDump", "dynamic_route_configs", "route_config", route_pb2.RouteConfiguration),
}


def config_dump(stream: streams.Stream) -> dict[str, Any]:
    """What meshplane sent one client and what it ACKed, per type, as Envoy's config_dump reads."""
    configs = []
    for type_url, (kind, key, item, cls) in _DUMPS.items():
        sub = stream.types.get(type_url)
        if sub is None:
            continue
        entries = []
        for name, resource in sorted(sub.held.current.items()):
            if not resource.field:  # reported by a delta client on reconnect, and not sent again since
                entries.append({"name": name, "resource_version": resource.version, "held_since_reconnect": True})
                continue
            message = cls()
            _any(resource).Unpack(message)
            body = _redacted(json_format.MessageToDict(message, preserving_proto_field_name=True))
            # Envoy's per-resource version_info is that of the response that last changed it; ours is
            # the resource's own content hash (what the type's version_info is made of).
            entry: dict[str, Any] = {"resource_version": resource.version, item: body}
            entries.append({"name": name, "active_state": entry} if type_url == typeurls.LISTENER else entry)
        dump: dict[str, Any] = {
            "@type": f"type.googleapis.com/envoy.admin.v3.{kind}", "version_info": sub.sent_version or None,
            "acked_version": sub.acked_version or None, "state": stream.sync(type_url).value, key: entries,
        }
        if sub.last_nack is not None:
            dump["last_nack"] = {"rejected": sub.last_nack.rejected, "message": sub.last_nack.message,
                                 "at": _iso(sub.last_nack.at)}
        configs.append(dump)
    proxy = stream.proxy
    return {"node": proxy.id if proxy else None, "view": str(stream.watch.key) if stream.watch else None,
            "configs": configs}


def _any(resource: resources.Resource) -> any_pb2.Any:
    """The google.protobuf.Any inside a resource's encoded `resources` field."""
    field = resource.field
    pos = 1  # the field's tag is one byte (field 2, wire type 2)
    while field[pos] & 0x80:  # the length, a varint
        pos += 1
    return any_pb2.Any.FromString(field[pos + 1:])


def _redacted(value: Any) -> Any:
    """Private keys stay out of dumps, as in Envoy's own."""
    if isinstance(value, dict):
        return {k: "[redacted]" if k == "private_key" else _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value
