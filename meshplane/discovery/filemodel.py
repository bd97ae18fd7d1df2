"""An endpoint file's fields, the rule of each value, and the file's values as the catalog's model.

The file source's counterpart of kubemodel. What a Kubernetes API server would refuse, or an Envoy
NACK, is refused here, so that it never reaches a proxy: every problem is found, not only the
first, each as a place (the path of keys and indexes, `services[0].endpoints[2].address`) and a
reason. Lines are looked up by the caller (meshplane/discovery/fileparse.py) only when there are
problems: the file is read as plain values, at libyaml's speed.

The field tables here are also the JSON Schema's (meshplane/discovery/fileschema.py).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshplane import problems, yamlpos
from meshplane.discovery import model

Loc = yamlpos.Loc

TOP = ("cluster", "region", "services")
SERVICE = ("name", "namespace", "ports", "endpoints")
PORT = ("name", "port", "protocol", "appProtocol")
ENDPOINT = ("address", "port", "ports", "zone", "labels", "health", "weight")
HEALTH = tuple(h.value for h in model.Health)
PROTOCOLS = tuple(p.value for p in model.Protocol)
WEIGHT = (1, 128)
PORT_RANGE = (1, 65535)
NAME_LENGTH = 63
PLACE_FORBIDDEN = "/*"
"""Not in a region, zone or cluster: '/' separates them in a locality (`region/zone/cluster`, as
policies, `explain --from` and `status --locality` write it), '*' is the policies' wildcard."""

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_PATTERN = rf"{_OCTET}(\.{_OCTET}){{3}}"
"""A dotted quad as ipaddress and Envoy read it (no leading zeros); the schema's too."""

_MISSING: Any = object()
_IPV4 = re.compile(IPV4_PATTERN)
_HEALTHS = {h.value: h for h in model.Health}
_PROTOCOLS = {p.value: p for p in model.Protocol}
_ALLOWED: dict[tuple[str, ...], frozenset[str]] = {keys: frozenset(keys) for keys in (TOP, SERVICE, PORT, ENDPOINT)}
_FORBIDDEN = re.compile(f"[{re.escape(PLACE_FORBIDDEN)}]")
_NAME = re.compile(model.NAME_PATTERN)
# Something written as a host name (letters in dot-separated labels), not a mistyped address.
_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.*[A-Za-z]){_LABEL}(\.{_LABEL})*\.?")


@dataclass(frozen=True)
class Found:
    """One problem, before its line is known; `first`: where what this repeats was written first."""

    loc: Loc
    reason: str
    first: Loc | None = None


class Report:
    """The problems found so far, in the order found."""

    def __init__(self) -> None:
        self.found: list[Found] = []

    def error(self, loc: Loc, reason: str, *, first: Loc | None = None) -> None:
        self.found.append(Found(loc, reason, first))


def cluster_and_region(raw: Any, report: Report) -> tuple[str, str] | None:
    """The file's cluster and region, and its top-level keys checked; `services` is read entry by entry
    (`service`), the caller having checked that it is a list."""
    if raw is None:
        report.error((), "the file is empty: an endpoint file gives cluster, region and services")
        return None
    if not isinstance(raw, dict):
        report.error((), f"an endpoint file is a mapping (cluster, region, services), got {problems.show(raw)}")
        return None
    _known(raw, TOP, (), report)
    cluster = _place(raw, "cluster", (), report, what="the cluster's id, which proxies see as their sub_zone")
    region = _place(raw, "region", (), report, what="the region of every endpoint in the file")
    if cluster is None or region is None:
        return None
    return cluster, region


def services_of(raw: Mapping[str, Any], report: Report) -> list[Any]:
    """The `services` entries of a file whose top level is a mapping (none when left out or null)."""
    value = raw.get("services")
    if value is None:
        return []
    if not isinstance(value, list):
        report.error(("services",), f"must be a list of services, got {problems.show(value)}")
        return []
    return value


def service(raw: Any, *, loc: Loc, cluster: str, region: str, report: Report) -> model.ServiceInCluster | None:
    """One entry of `services`; None if it has a problem (all of them reported)."""
    before = len(report.found)
    if not isinstance(raw, dict):
        report.error(loc, f"a service is a mapping (name, namespace, ports, endpoints), got {problems.show(raw)}")
        return None
    _known(raw, SERVICE, loc, report)
    name = _name(raw, "name", loc, report, required=True)
    namespace = _name(raw, "namespace", loc, report) or "default"
    ports = _ports(raw.get("ports", _MISSING), (*loc, "ports"), report)
    endpoints: list[model.Endpoint] = []
    first: dict[tuple[str, str, int], Loc] = {}
    for k, item in enumerate(_list(raw, "endpoints", loc, report)):
        where = (*loc, "endpoints", k)
        endpoint = _endpoint(item, loc=where, ports=ports, cluster=cluster, region=region, report=report)
        if endpoint is None:
            continue
        for port_name, number in endpoint.ports:
            seen = first.setdefault((port_name, endpoint.address, number), where)
            if seen != where:
                report.error((*where, "address"), f"duplicate endpoint {_hostport(endpoint.address, number)} "
                             f"for port {port_name!r}", first=(*seen, "address"))
                break
        endpoints.append(endpoint)
    if len(report.found) > before or name is None or ports is None:
        return None
    return model.ServiceInCluster(name=name, namespace=namespace, ports=tuple(ports), endpoints=tuple(endpoints))


def key_of(raw: Any) -> model.ServiceKey | None:
    """The key of a service entry, read as far as its name and namespace allow (to find a service given
    twice even when one of the two has another problem)."""
    if not isinstance(raw, dict):
        return None
    name, namespace = raw.get("name"), raw.get("namespace") or "default"
    return model.service_key(namespace, name) if isinstance(name, str) and isinstance(namespace, str) else None


def _ports(raw: Any, loc: Loc, report: Report) -> list[model.ServicePort] | None:
    if raw is _MISSING or raw is None:
        report.error(loc, "required field 'ports' is missing: a service has at least one port")
        return None
    if not isinstance(raw, list):
        report.error(loc, f"must be a list of ports, got {problems.show(raw)}")
        return None
    if not raw:
        report.error(loc, "must not be empty: a service has at least one port")
        return None
    ports: list[model.ServicePort] = []
    names: dict[str, int] = {}
    numbers: dict[int, int] = {}
    for j, item in enumerate(raw):
        where = (*loc, j)
        if not isinstance(item, dict):
            report.error(where, f"a port is a mapping (name, port, protocol), got {problems.show(item)}")
            continue
        _known(item, PORT, where, report)
        name = _text(item, "name", where, report, required=True)
        number = _port(item, "port", where, report, required=True)
        protocol = _protocol(item, where, report)
        if name is not None and names.setdefault(name, j) != j:
            report.error((*where, "name"), f"duplicate port name {name!r}", first=(*loc, names[name], "name"))
            continue
        if number is not None and numbers.setdefault(number, j) != j:
            report.error((*where, "port"), f"duplicate port {number}: each port number is one Envoy cluster",
                         first=(*loc, numbers[number], "port"))
            continue
        if name is not None and number is not None and protocol is not None:
            ports.append(model.ServicePort(name=name, port=number, protocol=protocol))
    return ports if len(ports) == len(raw) else None


def _protocol(raw: Mapping[str, Any], loc: Loc, report: Report) -> model.Protocol | None:
    """`protocol` (what Envoy speaks: HTTP, the default), or Kubernetes' `appProtocol`, or both if they agree."""
    before = len(report.found)
    text = _text(raw, "protocol", loc, report)
    app = _text(raw, "appProtocol", loc, report)
    if len(report.found) > before:
        return None
    stated = None
    if text is not None:
        stated = _PROTOCOLS.get(text.upper())
        if stated is None:
            report.error((*loc, "protocol"), f"{text!r} is not one of {', '.join(PROTOCOLS)}")
            return None
    if app is None:
        return stated or model.Protocol.HTTP
    implied = model.app_protocol(app)
    if stated is not None and stated != implied:
        report.error((*loc, "appProtocol"), (
            f"{app!r} is {implied.value}, but protocol says {stated.value} (protocol here is what Envoy speaks to "
            "the port, not Kubernetes' TCP or UDP: give one of the two, or both alike)"))
        return None
    return implied


def _endpoint(raw: Any, *, loc: Loc, ports: Sequence[model.ServicePort] | None, cluster: str, region: str,
              report: Report) -> model.Endpoint | None:
    before = len(report.found)
    if not isinstance(raw, dict):
        report.error(loc, f"an endpoint is a mapping (address, port, zone, ...), got {problems.show(raw)}")
        return None
    _known(raw, ENDPOINT, loc, report)
    address = _address(raw, loc, report)
    port_map = _endpoint_ports(raw, loc, ports, report)
    zone = _place(raw, "zone", loc, report, what="the endpoint's zone: failover goes to the nearest zone first")
    labels = _labels(raw, loc, report)
    health = _health(raw, loc, report)
    weight = _weight(raw, loc, report)
    if len(report.found) > before:
        return None
    if address is None or port_map is None or zone is None or labels is None or health is None or weight is None:
        return None  # said by the service's own problem (its ports)
    return model.Endpoint(
        address=address,
        ports=tuple(sorted(port_map.items())),
        locality=model.Locality(region=region, zone=zone, cluster=cluster),
        labels=labels,
        health=health,
        weight=weight,
    )


def _address(raw: Mapping[str, Any], loc: Loc, report: Report) -> str | None:
    """An IPv4 or IPv6 address, as Envoy writes it (fe80::1 for FE80:0::1). An EDS endpoint's socket address
    must be an IP: meshplane sends no resolver, and Envoy NACKs a name ("malformed IP address")."""
    text = _text(raw, "address", loc, report, required=True)
    if text is None:
        return None
    where = (*loc, "address")
    if _IPV4.fullmatch(text) and text != "0.0.0.0" and not 224 <= int(text[:text.index(".")]) <= 239:
        return text  # the common case, without ipaddress's cost (a file of 25,000 endpoints)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        if _HOSTNAME.fullmatch(text):
            report.error(where, f"{text!r} is not an IP address: Envoy is sent endpoints by IP address and "
                         "resolves no names here; give the address the name resolves to")
        else:
            report.error(where, f"{text!r} is not an IPv4 or IPv6 address")
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        report.error(where, f"{text!r}: a scope (%{ip.scope_id}) names a network interface of one machine, and "
                     "proxies elsewhere have no such interface (Envoy NACKs it); give the address without it")
    elif ip.is_unspecified or ip.is_multicast:
        kind = "the unspecified address" if ip.is_unspecified else "a multicast address"
        report.error(where, f"{text!r} is {kind}: no endpoint can be reached there")
    else:
        return str(ip)
    return None


def _endpoint_ports(raw: Mapping[str, Any], loc: Loc, ports: Sequence[model.ServicePort] | None,
                    report: Report) -> dict[str, int] | None:
    """Service port name -> the port this endpoint listens on: `port` (a one-port service), `ports` (by name),
    or, given neither, the service's own port numbers."""
    names = [p.name for p in ports] if ports is not None else None
    if "port" in raw and "ports" in raw:
        report.error((*loc, "ports"), "give port (a one-port service) or ports (by port name), not both")
        return None
    if "port" in raw:
        number = _port(raw, "port", loc, report, required=True)
        if names is not None and len(names) != 1:
            report.error((*loc, "port"), f"the service has several ports ({', '.join(names)}): "
                         "give ports: {name: number} instead")
            return None
        return None if number is None or names is None else {names[0]: number}
    if "ports" not in raw:
        return None if ports is None else {p.name: p.port for p in ports}
    value = raw["ports"]
    where = (*loc, "ports")
    if not isinstance(value, dict) or not value:
        report.error(where, "must map at least one of the service's port names to the port this endpoint "
                     f"listens on, got {problems.show(value)}")
        return None
    out: dict[str, int] = {}
    for key in value:
        number = _port(value, key, where, report, required=True)
        if names is not None and key not in names:
            close = problems.did_you_mean(key, names)
            hint = f"; did you mean {close!r}?" if close is not None else f" (its ports: {', '.join(names)})"
            report.error((*where, key), f"{key!r} is not a port of the service{hint}")
        elif number is not None:
            out[key] = number
    return out if names is not None and len(out) == len(value) else None


def _labels(raw: Mapping[str, Any], loc: Loc, report: Report) -> tuple[tuple[str, str], ...] | None:
    value = raw.get("labels")
    if value is None:
        return ()
    where = (*loc, "labels")
    if not isinstance(value, dict):
        report.error(where, f"must be a mapping of label names to values, got {problems.show(value)}")
        return None
    ok = True
    for key in value:
        if not isinstance(key, str) or not key:
            report.error(where, f"label names must be non-empty strings, got {problems.show(key)}")
            ok = False
        elif _text(value, key, where, report, required=True, empty=True) is None:
            ok = False
    return tuple(sorted(value.items())) if ok else None


def _health(raw: Mapping[str, Any], loc: Loc, report: Report) -> model.Health | None:
    text = _text(raw, "health", loc, report)
    if text is None:
        return model.Health.HEALTHY if raw.get("health") is None else None
    health = _HEALTHS.get(text.lower())
    if health is None:
        report.error((*loc, "health"), f"{text!r} is not one of {', '.join(HEALTH)}")
    return health


def _weight(raw: Mapping[str, Any], loc: Loc, report: Report) -> int | None:
    value = raw.get("weight")
    if value is None:
        return 1
    low, high = WEIGHT
    if not _whole(value) or not low <= value <= high:
        report.error((*loc, "weight"), f"{problems.show(value)} must be a whole number from {low} to {high}")
        return None
    return int(value)


def _port(raw: Mapping[Any, Any], key: Any, loc: Loc, report: Report, *, required: bool = False) -> int | None:
    where = (*loc, key)
    value = _value(raw, key, where, report, required=required)
    if value is _MISSING:
        return None
    low, high = PORT_RANGE
    if not _whole(value):
        report.error(where, f"must be a whole number (a port, {low}-{high}), got {problems.show(value)}")
        return None
    if not low <= value <= high:
        report.error(where, f"{problems.show(value)} is not a port number ({low}-{high})")
        return None
    return int(value)


def _name(raw: Mapping[str, Any], key: str, loc: Loc, report: Report, *, required: bool = False) -> str | None:
    """A service's name or namespace: a Kubernetes name, as the policy names services."""
    text = _text(raw, key, loc, report, required=required)
    if text is not None and (len(text) > NAME_LENGTH or not _NAME.match(text)):
        report.error((*loc, key), f"{text!r} is not a Kubernetes name: {model.NAME_RULE}")
        return None
    return text


def _place(raw: Mapping[str, Any], key: str, loc: Loc, report: Report, *, what: str) -> str | None:
    """A region, zone or cluster id: required, and free of the characters a locality is written with."""
    text = _text(raw, key, loc, report, required=True, why=what)
    if text is not None and _FORBIDDEN.search(text):
        report.error((*loc, key), f"{text!r} must not contain '/' or '*': a locality is written region/zone/cluster "
                     "and '*' is a wildcard in policies")
        return None
    return text


def _value(raw: Mapping[Any, Any], key: Any, where: Loc, report: Report, *, required: bool, why: str = "") -> Any:
    """The value at `key`, or _MISSING if left out (reported when `required`, with `why` it is)."""
    value = raw.get(key, _MISSING)
    if value is _MISSING and required:
        report.error(where, f"required field {key!r} is missing" + (f" ({why})" if why else ""))
    return value


def _text(raw: Mapping[Any, Any], key: Any, loc: Loc, report: Report, *, required: bool = False,
          empty: bool = False, why: str = "") -> str | None:
    """A string value; None if left out (an error when `required`) or wrong (reported)."""
    where = (*loc, key)
    value = _value(raw, key, where, report, required=required, why=why)
    if value is _MISSING:
        return None
    if value is None and not required:
        return None
    if not isinstance(value, str):
        report.error(where, f"must be a string, got {problems.show(value)}{_quote_hint(value)}")
        return None
    if not value and not empty:
        report.error(where, "must not be empty")
        return None
    return value


def _quote_hint(value: Any) -> str:
    if isinstance(value, bool):
        return " (YAML reads yes/no/on/off/true/false as booleans: quote it)"
    if isinstance(value, int | float):
        return " (YAML reads it as a number: quote it)"
    return ""


def _list(raw: Mapping[str, Any], key: str, loc: Loc, report: Report) -> list[Any]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        report.error((*loc, key), f"must be a list, got {problems.show(value)}")
        return []
    return value


def _known(raw: Mapping[Any, Any], allowed: Sequence[str], loc: Loc, report: Report) -> None:
    if raw.keys() - _ALLOWED[tuple(allowed)]:  # at C speed: almost always nothing
        for key in raw:
            if key not in allowed:
                report.error((*loc, key), problems.unknown_field(key, allowed))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
