"""Rules across the fields of `gateways` and `routes` (the second validation pass, v2).

Errors are what would make Envoy reject the configuration, or make it do
something other than what the file says: a regular expression RE2 rejects
(checked with RE2 itself, the engine Envoy's `safe_regex` uses), a route
attached to a gateway that does not exist, two listeners claiming one port
and host, weights that are all zero. What the file refers to outside
itself (services, their ports, clusters) may appear later, so a reference
to something no source knows is a warning, given when the catalog is known.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import re2

from meshplane import tls
from meshplane.discovery import model
from meshplane.policy import gatewayapi
from meshplane.policy.durations import duration_ms

Loc = tuple[str | int, ...]
Report = Callable[[Loc, str], None]

ENVOY_MAX_PROGRAM_SIZE = 100
"""Envoy's default `re2.max_program_size.error_level`: a larger RE2 program is rejected (NACK)."""

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the reason goes to the operator, not to stderr


@dataclass(frozen=True)
class Known:
    """What discovery knows now: services with their ports, and cluster ids."""

    services: Mapping[model.ServiceKey, frozenset[int]]
    clusters: frozenset[str]


def check_regex(pattern: str) -> str | None:
    """Why Envoy would reject `pattern` as a safe_regex, or None."""
    try:
        compiled = re2.compile(pattern, _RE2_OPTIONS)
    except UnicodeEncodeError:
        return f"{pattern!r} is not valid UTF-8 text (it holds a lone surrogate)"
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return f"{pattern!r} is not a valid RE2 regular expression: {reason}"
    if compiled.programsize > ENVOY_MAX_PROGRAM_SIZE:
        return (f"{pattern!r} compiles to an RE2 program of size {compiled.programsize}; Envoy rejects "
                f"more than {ENVOY_MAX_PROGRAM_SIZE} (simplify it, or match a prefix instead)")
    return None


def read_certificates(
    gateways: Sequence[gatewayapi.GatewayDoc], base: Path, error: Report
) -> dict[tuple[str, str], tuple[bytes, bytes]]:
    """Read each HTTPS listener's certificate and key (paths relative to the policy file's folder), checked
    as the ADS port's are (meshplane/tls.py): a chain cut short (a file still being written), a key that is
    not the certificate's own (`cp cert` done, `cp key` not yet) is an error, never pushed for Envoy to NACK."""
    out: dict[tuple[str, str], tuple[bytes, bytes]] = {}
    for i, gateway in enumerate(gateways):
        for j, listener in enumerate(gateway.listeners):
            https = listener.tls
            if https is None or (https.certificate_file, https.key_file) in out:
                continue
            loc: Loc = ("gateways", i, "listeners", j, "tls")
            pair = _read_pair(base, https.certificate_file, https.key_file, loc, error)
            if pair is not None:
                out[(https.certificate_file, https.key_file)] = pair
    return out


def _read_pair(base: Path, cert_name: str, key_name: str, loc: Loc, error: Report) -> tuple[bytes, bytes] | None:
    cert_path, key_path = base / cert_name, base / key_name
    cert = _read(cert_path, cert_name, (*loc, "certificateFile"), error)
    key = _read(key_path, key_name, (*loc, "keyFile"), error)
    served = private = None
    try:
        served = tls.chain(cert, cert_path, "certificate")[0] if cert is not None else None
    except tls.TlsError as exc:
        error((*loc, "certificateFile"), str(exc))
    try:
        private = tls.private_key(key, key_path) if key is not None else None
    except tls.TlsError as exc:
        error((*loc, "keyFile"), str(exc))
    if cert is None or key is None or served is None or private is None:
        return None
    try:
        tls.own_key(served, private, cert_path=cert_path, key_path=key_path)
    except tls.TlsError as exc:
        error(loc, str(exc))
        return None
    return cert, key


def _read(path: Path, name: str, loc: Loc, error: Report) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        error(loc, f"cannot read {path}: {exc.strerror or exc}")
    except ValueError as exc:  # a NUL in the name
        error(loc, f"cannot read {name!r}: {exc}")
    return None


def check(
    gateways: Sequence[gatewayapi.GatewayDoc],
    routes: Sequence[gatewayapi.RouteDoc],
    *,
    error: Report,
    warning: Report,
    known: Known | None,
) -> None:
    listeners = _check_gateways(gateways, error)
    names: dict[str, int] = {}
    for i, route in enumerate(routes):
        loc: Loc = ("routes", i)
        key = f"{route.namespace}/{route.name}"
        if key in names:
            error((*loc, "name"), f"duplicate route {key} (first defined as routes[{names[key]}])")
        names.setdefault(key, i)
        for j, parent in enumerate(route.parent_refs):
            _check_parent(parent, (*loc, "parentRefs", j), route, listeners, error, warning, known)
        rule_names: dict[str, int] = {}
        for j, rule in enumerate(route.rules):
            _check_rule(rule, (*loc, "rules", j), route.namespace, error, warning, known)
            if rule.name is not None and rule.name in rule_names:
                error((*loc, "rules", j, "name"),
                      f"duplicate rule name {rule.name!r} (first given to rules[{rule_names[rule.name]}])")
            if rule.name is not None:
                rule_names.setdefault(rule.name, j)


def _check_gateways(
    gateways: Sequence[gatewayapi.GatewayDoc], error: Report
) -> dict[str, dict[str, gatewayapi.ListenerDoc]]:
    """Gateway and listener rules; returns gateway name -> listener name -> listener."""
    out: dict[str, dict[str, gatewayapi.ListenerDoc]] = {}
    claimed: dict[tuple[int, str], str] = {}  # (port, hostname) -> which listener claims it
    protocols: dict[int, tuple[str, str]] = {}  # port -> (protocol, which listener)
    for i, gateway in enumerate(gateways):
        loc: Loc = ("gateways", i)
        if gateway.name in out:
            error((*loc, "name"), f"duplicate gateway {gateway.name!r}")
            continue
        mine = out[gateway.name] = {}
        for j, listener in enumerate(gateway.listeners):
            where: Loc = (*loc, "listeners", j)
            label = f"gateways[{i}].listeners[{j}] ({gateway.name}/{listener.name})"
            if listener.name in mine:
                error((*where, "name"), f"duplicate listener {listener.name!r} in gateway {gateway.name!r}")
            mine.setdefault(listener.name, listener)
            if listener.protocol == "HTTPS" and listener.tls is None:
                error(where, "an HTTPS listener needs tls: certificateFile and keyFile")
            if listener.protocol == "HTTP" and listener.tls is not None:
                error((*where, "tls"), "tls is for HTTPS listeners; set protocol: HTTPS")
            host = listener.hostname or "*"
            other = claimed.get((listener.port, host))
            if other is not None:
                error(where, f"port {listener.port} and host {host!r} are already claimed by {other}")
            claimed.setdefault((listener.port, host), label)
            first = protocols.get(listener.port)
            if first is not None and first[0] != listener.protocol:
                error((*where, "protocol"),
                      f"port {listener.port} is {first[0]} in {first[1]}: one port has one protocol")
            protocols.setdefault(listener.port, (listener.protocol, label))
    return out


def _check_parent(
    parent: gatewayapi.ParentRefDoc, loc: Loc, route: gatewayapi.RouteDoc,
    listeners: Mapping[str, Mapping[str, gatewayapi.ListenerDoc]], error: Report, warning: Report,
    known: Known | None,
) -> None:
    expected_group = "gateway.networking.k8s.io" if parent.kind == "Gateway" else ""
    if parent.group is not None and parent.group != expected_group:
        error((*loc, "group"), f"a {parent.kind} parent's group is {expected_group!r}, not {parent.group!r}")
    if parent.kind == "Gateway":
        if parent.port is not None:
            error((*loc, "port"), "a Gateway parent takes sectionName, not port")
        gateway = listeners.get(parent.name)
        if gateway is None:
            known_names = ", ".join(sorted(listeners)) or "none"
            error((*loc, "name"), f"no gateway {parent.name!r} in this policy (gateways: {known_names})")
        elif parent.section_name is not None and parent.section_name not in gateway:
            error((*loc, "sectionName"),
                  f"gateway {parent.name!r} has no listener {parent.section_name!r} "
                  f"(listeners: {', '.join(gateway)})")
        return
    if parent.section_name is not None:
        error((*loc, "sectionName"), "a Service parent takes port, not sectionName")
    if route.hostnames:
        warning(("routes", loc[1], "hostnames"),
                "ignored for sidecars: a route with a Service parent applies to that service's traffic")
    if known is not None:
        _check_service(parent.name, parent.namespace or route.namespace, parent.port, loc, warning, known)


def _check_rule(
    rule: gatewayapi.RuleDoc, loc: Loc, namespace: str, error: Report, warning: Report, known: Known | None
) -> None:
    prefix_only = all(m.path is None or m.path.type == "PathPrefix" for m in rule.matches)
    for j, match in enumerate(rule.matches):
        where: Loc = (*loc, "matches", j)
        if match.path is not None:
            _check_path(match.path, (*where, "path"), error)
        for k, header in enumerate(match.headers):
            if header.type == "RegularExpression" and (reason := check_regex(header.value)):
                error((*where, "headers", k, "value"), reason)
        for k, param in enumerate(match.query_params):
            if param.type == "RegularExpression" and (reason := check_regex(param.value)):
                error((*where, "queryParams", k, "value"), reason)
    _check_filters(rule, loc, prefix_only, error)
    kinds = {f.type for f in rule.filters}
    redirects = "RequestRedirect" in kinds
    if redirects and rule.backend_refs:
        warning((*loc, "backendRefs"), "ignored: the rule's RequestRedirect answers every request itself")
    if not rule.backend_refs and not redirects:
        error((*loc, "backendRefs"), "a rule needs at least one backendRef (or a RequestRedirect filter)")
    elif rule.backend_refs and not redirects and not any(b.weight for b in rule.backend_refs):
        error((*loc, "backendRefs"), "every weight is 0: no request could be sent anywhere")
    _check_timeouts_and_retries(rule, loc, error)
    if known is not None:
        for j, f in enumerate(rule.filters):
            if f.request_mirror is not None:
                ref = f.request_mirror.backend_ref
                _check_service(ref.name, ref.namespace or namespace, ref.port,
                               (*loc, "filters", j, "requestMirror", "backendRef"), warning, known)
    for j, backend in enumerate(rule.backend_refs):
        where = (*loc, "backendRefs", j)
        if len(set(backend.clusters)) != len(backend.clusters):
            error((*where, "clusters"), "a cluster is listed twice")
        if any(not c for c in backend.clusters):
            error((*where, "clusters"), "cluster ids must not be empty")
        if known is not None:
            _check_service(backend.name, backend.namespace or namespace, backend.port, where, warning, known)
            for k, cluster in enumerate(backend.clusters):
                if cluster not in known.clusters:
                    warning((*where, "clusters", k),
                            f"no source knows cluster {cluster!r} yet (known: {', '.join(sorted(known.clusters))})")


def _check_path(path: gatewayapi.PathMatchDoc, loc: Loc, error: Report) -> None:
    if path.type == "RegularExpression":
        if reason := check_regex(path.value):
            error((*loc, "value"), reason)
    elif not path.value.startswith("/"):
        error((*loc, "value"), f"{path.value!r}: a path starts with '/'")
    elif path.type == "PathPrefix" and "//" in path.value:
        error((*loc, "value"), f"{path.value!r}: a prefix has no empty segment ('//')")


def _check_filters(rule: gatewayapi.RuleDoc, loc: Loc, prefix_only: bool, error: Report) -> None:
    """Gateway API's rules for a rule's filters: each type's field and no other, one of a type (except
    RequestMirror), not RequestRedirect with URLRewrite; a mirror's share; paths of rewrites and redirects."""
    kinds = [f.type for f in rule.filters]
    for j, f in enumerate(rule.filters):
        where: Loc = (*loc, "filters", j)
        wanted = gatewayapi.FILTER_FIELDS[f.type]
        if kinds.count(f.type) > 1 and kinds.index(f.type) != j and f.type != "RequestMirror":
            error((*where, "type"), f"a rule takes one {f.type} filter")
        given = [alias for attribute, field in gatewayapi.FilterDoc.model_fields.items()
                 if (alias := field.alias or attribute) in gatewayapi.FILTER_FIELDS.values()
                 and getattr(f, attribute) is not None]
        if wanted not in given:
            error(where, f"type {f.type} needs {wanted}")
        for other in (k for k in given if k != wanted):
            error((*where, other), f"{other} is not for a filter of type {f.type} (it needs {wanted})")
        if f.url_rewrite is not None and f.url_rewrite.path is not None:
            _check_path_modifier(f.url_rewrite.path, (*where, "urlRewrite", "path"), prefix_only, error)
        if f.request_redirect is not None and f.request_redirect.path is not None:
            _check_path_modifier(f.request_redirect.path, (*where, "requestRedirect", "path"), prefix_only, error)
        mirror = f.request_mirror
        if mirror is not None and mirror.percent is not None and mirror.fraction is not None:
            error((*where, "requestMirror"), "give percent or fraction, not both")
        share = mirror.fraction if mirror is not None else None
        if share is not None and share.numerator > share.denominator:
            error((*where, "requestMirror", "fraction"),
                  f"numerator {share.numerator} is more than denominator {share.denominator}")
    if "RequestRedirect" in kinds and "URLRewrite" in kinds:
        error((*loc, "filters", kinds.index("URLRewrite"), "type"),
              "a rule takes a RequestRedirect or a URLRewrite filter, not both")
    if "RequestRedirect" in kinds and "RequestMirror" in kinds:
        error((*loc, "filters", kinds.index("RequestMirror"), "type"),
              "RequestMirror has nothing to copy: the rule's RequestRedirect sends no request to a backend")


def _check_timeouts_and_retries(rule: gatewayapi.RuleDoc, loc: Loc, error: Report) -> None:
    if rule.retry is not None and rule.retries is not None:
        error((*loc, "retry"), "give retry (Gateway API) or retries (Istio's shape), not both")
    timeouts = rule.timeouts
    if timeouts is None or timeouts.backend_request is None:
        return
    where: Loc = (*loc, "timeouts", "backendRequest")
    backend = duration_ms(timeouts.backend_request, zero=True)
    if timeouts.request is not None:
        request = duration_ms(timeouts.request, zero=True)
        if request and backend > request:
            error(where, f"backendRequest {timeouts.backend_request} is longer than request {timeouts.request}: "
                         "the request timeout covers every try")
    if rule.retries is not None and rule.retries.per_try_timeout is not None:
        error(where, "give timeouts.backendRequest or retries.perTryTimeout, not both: both are each try's timeout")


def _check_path_modifier(path: gatewayapi.PathModifierDoc, where: Loc, prefix_only: bool, error: Report) -> None:
    if path.type == "ReplacePrefixMatch":
        if path.replace_prefix_match is None:
            error(where, "type ReplacePrefixMatch needs replacePrefixMatch")
        elif path.replace_prefix_match and not path.replace_prefix_match.startswith("/"):
            error((*where, "replacePrefixMatch"), "a path starts with '/' (or is empty: the same as '/')")
        if not prefix_only:
            error(where, "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
    elif path.replace_full_path is None:
        error(where, "type ReplaceFullPath needs replaceFullPath")
    elif not path.replace_full_path.startswith("/"):
        error((*where, "replaceFullPath"), "a path starts with '/'")


def _check_service(
    name: str, namespace: str, port: int | None, loc: Loc, warning: Report, known: Known
) -> None:
    key = model.service_key(namespace, name)
    ports = known.services.get(key)
    if ports is None:
        warning((*loc, "name"), f"no source knows service {key} yet")
    elif port is not None and port not in ports:
        warning((*loc, "port"), f"service {key} has no port {port} (ports: {', '.join(map(str, sorted(ports)))})")
