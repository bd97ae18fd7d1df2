"""The fake API server's state: objects, their change history, compaction and selectors.

Everything here is single-threaded; the server holds its lock around every call.
Stored objects are never mutated after they are stored (put and delete store new
dicts), so events and snapshots can share them.
"""

from __future__ import annotations

import bisect
import copy
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, or "" for a cluster-scoped object; name)


@dataclass(frozen=True)
class Kind:
    resource: str  # the URL segment, e.g. "endpointslices"
    kind: str
    group_version: str  # "v1" (the core group) or "discovery.k8s.io/v1"
    namespaced: bool


KINDS: dict[str, Kind] = {
    k.resource: k
    for k in (
        Kind("services", "Service", "v1", True),
        Kind("pods", "Pod", "v1", True),
        Kind("secrets", "Secret", "v1", True),
        Kind("nodes", "Node", "v1", False),
        Kind("namespaces", "Namespace", "v1", False),
        Kind("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True),
    )
}


def kind_of(resource: str) -> Kind:
    try:
        return KINDS[resource]
    except KeyError:
        raise ValueError(f"unknown resource {resource!r}; known: {sorted(KINDS)}") from None


class Expired(Exception):
    """A resourceVersion (or continue token) from before the last compaction: 410 Gone."""


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj  # the new object; for DELETED the last state, with the deletion's resourceVersion
    prev: Obj | None  # the object before this change (None for ADDED)


def key_of(obj: Obj) -> Key:
    meta = obj["metadata"]
    return (meta.get("namespace", ""), meta["name"])


class Store:
    def __init__(self) -> None:
        self.rv = 1  # the newest resourceVersion handed out (global, as etcd's revision)
        self.compacted = 0  # history at or before this resourceVersion is gone
        self.current: dict[str, dict[Key, Obj]] = {r: {} for r in KINDS}
        # State at `compacted`, plus every change since: any snapshot after `compacted` can be rebuilt.
        self._base: dict[str, dict[Key, Obj]] = {r: {} for r in KINDS}
        # Events per resource, sorted by rv. May start before `compacted` (kept for open watches).
        self.history: dict[str, list[Event]] = {r: [] for r in KINDS}

    def put(self, resource: str, obj: Obj) -> Obj:
        kind = kind_of(resource)
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError("metadata.name is required")
        if kind.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = key_of(obj)
        prev = self.current[resource].get(key)
        self.rv += 1
        obj["apiVersion"], obj["kind"] = kind.group_version, kind.kind
        meta["resourceVersion"] = str(self.rv)
        meta["uid"] = prev["metadata"]["uid"] if prev else str(uuid.uuid4())
        meta["creationTimestamp"] = (
            prev["metadata"]["creationTimestamp"] if prev else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        self.current[resource][key] = obj
        self.history[resource].append(Event(self.rv, "MODIFIED" if prev else "ADDED", obj, prev))
        return copy.deepcopy(obj)

    def delete(self, resource: str, namespace: str | None, name: str) -> None:
        kind = kind_of(resource)
        key = ((namespace or "default") if kind.namespaced else "", name)
        prev = self.current[resource].pop(key, None)
        if prev is None:
            raise KeyError(f"{resource} {key} not found")
        self.rv += 1
        last = copy.deepcopy(prev)
        last["metadata"]["resourceVersion"] = str(self.rv)
        self.history[resource].append(Event(self.rv, "DELETED", last, prev))

    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        kind = kind_of(resource)
        key = ((namespace or "default") if kind.namespaced else "", name)
        obj = self.current[resource].get(key)
        return copy.deepcopy(obj) if obj is not None else None

    def expire(self, keep_after: int) -> None:
        """Compact: nothing at or before the current resourceVersion can be asked for any more.

        Events after `keep_after` (the oldest position of an open watch) stay in memory so
        that open watches carry on, as the API server's watch cache does for its watchers.
        """
        self.compacted = self.rv
        self._base = {r: dict(objs) for r, objs in self.current.items()}
        for resource, events in self.history.items():
            self.history[resource] = events[bisect.bisect_right(events, keep_after, key=lambda e: e.rv):]

    def state_at(self, resource: str, rv: int) -> dict[Key, Obj]:
        """The objects as they were at resourceVersion `rv` (raises Expired if compacted away)."""
        if rv >= self.rv:
            return self.current[resource]
        if rv < self.compacted:
            raise Expired(f"too old resource version: {rv} ({self.compacted})")
        state = dict(self._base[resource])
        for event in self.history[resource]:
            if event.rv <= self.compacted:
                continue
            if event.rv > rv:
                break
            if event.type == "DELETED":
                state.pop(key_of(event.obj), None)
            else:
                state[key_of(event.obj)] = event.obj
        return state

    def events_after(self, resource: str, rv: int) -> list[Event]:
        events = self.history[resource]
        return events[bisect.bisect_right(events, rv, key=lambda e: e.rv):]


# --- selectors -------------------------------------------------------------------------------

Predicate = Callable[[Obj], bool]

_SET_REQ = re.compile(r"^\s*([A-Za-z0-9._/-]+)\s+(in|notin)\s*\(([^)]*)\)\s*$")
_KEY = re.compile(r"^[A-Za-z0-9._/-]+$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _checked(req: str, key: str, values: set[str] | None = None) -> None:
    if not _KEY.match(key) or any(not _VALUE.match(v) for v in values or ()):
        raise ValueError(f"invalid label selector requirement {req!r}")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses: "a in (x,y),b" -> ["a in (x,y)", "b"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _label_requirement(req: str) -> Callable[[Mapping[str, str]], bool]:
    if m := _SET_REQ.match(req):
        key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
        _checked(req, key, values)
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if req.startswith("!"):
        key = req[1:].strip()
        _checked(req, key)
        return lambda labels: key not in labels
    for op in ("!=", "==", "="):
        if op in req:
            key, value = (s.strip() for s in req.split(op, 1))
            _checked(req, key, {value})
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    _checked(req, req)
    return lambda labels: req in labels


def label_selector(text: str) -> Predicate:
    """equality (a=b, a==b, a!=b), set (a in (x,y), a notin (x)) and existence (a, !a) requirements."""
    reqs = [_label_requirement(r) for r in _split_top_level(text)]
    return lambda obj: all(req(obj["metadata"].get("labels") or {}) for req in reqs)


def _field(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def field_selector(text: str) -> Predicate:
    """metadata.name=x, metadata.namespace!=y, spec.nodeName==z: dotted paths, = == !=."""
    reqs: list[tuple[str, bool, str]] = []
    for term in _split_top_level(text):
        for op in ("!=", "==", "="):
            if op in term:
                path, value = (s.strip() for s in term.split(op, 1))
                reqs.append((path, op != "!=", value))
                break
        else:
            raise ValueError(f"invalid field selector {term!r}: want field=value or field!=value")
    return lambda obj: all((_field(obj, path) == value) == equal for path, equal, value in reqs)
