"""Route configurations: virtual hosts and their routes, for sidecars and gateways. Pure functions.

A policy route (Gateway API HTTPRoute) becomes one Envoy route per (rule,
match), and the routes of a virtual host are ordered by Gateway API's
precedence, whatever order the file has: an Exact path first, then a
RegularExpression path (Gateway API leaves its place to implementations;
Envoy Gateway's choice), then the longest PathPrefix; then a method match;
then more header matches; then more query parameter matches; then the
route's `namespace/name`, the rule's and the match's order. A request that
no route matches gets Envoy's 404; a backend whose cluster has no endpoint
(or does not exist) gets 503.

Every route retries by the policy's `defaults.retries` unless its rule says
otherwise (Istio's default: 2 retries on connection failure, refused
stream, gRPC unavailable or cancelled, and 503), each retry on another host
(`previous_hosts`) and in another priority when the first was tried
(`previous_priorities`): so the request that meets a broken replica, or a
broken zone or region, is retried on the next one instead of failing. A
rule with an active-standby backend first retries in the same cluster
(another host), and only then in the next cluster (decision 0018).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import wrappers_pb2

from meshplane.discovery import model
from meshplane.policy import routing, rules
from meshplane.xds import routeactions, translate

_PATH_RANK = {routing.PathKind.EXACT: 0, routing.PathKind.REGEX: 1, routing.PathKind.PREFIX: 2}
_PLAIN_HTTP = routeactions.Listening("http", 80)


def route_config_name(namespace: str) -> str:
    """A sidecar's outbound route configuration (Istio's name)."""
    return f"outbound|http|{namespace}"


def gateway_route_config_name(gateway: str, port: int) -> str:
    return f"gateway|{gateway}|{port}"


def sidecar_route_config(
    namespace: str, services: Iterable[model.Service], policy: rules.Policy
) -> route_pb2.RouteConfiguration:
    """One virtual host per HTTP service port, reachable by the names Kubernetes DNS resolves;
    its routes are the mesh routes attached to the service (port), else everything to the service."""
    config = route_pb2.RouteConfiguration(
        name=route_config_name(namespace), validate_clusters=wrappers_pb2.BoolValue(value=False)
    )
    for service in sorted(services, key=lambda s: (s.namespace, s.name)):
        http_ports = [p for p in sorted(service.ports, key=lambda p: p.port) if p.protocol != model.Protocol.TCP]
        attached = policy.mesh_routes(service.key)
        for index, port in enumerate(http_ports):
            names = [f"{service.name}.{service.namespace}", f"{service.name}.{service.namespace}.svc", service.hostname]
            if service.namespace == namespace:
                names.insert(0, service.name)
            domains = [f"{n}:{port.port}" for n in names]
            if index == 0:  # a name without a port means the service's first port
                domains = names + domains
            mine = [r for r in attached
                    if any(p.kind == "Service" and p.port in (None, port.port) for p in _parents_of(r, service))]
            if mine:
                entries = route_entries(mine, policy.retries, where=routeactions.Listening("http", port.port))
            else:
                whole = routing.Backend(service.key, port.port)
                entries = _routes(routing.Match(), routing.Rule(backends=(whole,)), policy.retries,
                                  routeactions.Listening("http", port.port))
            config.virtual_hosts.append(route_components_pb2.VirtualHost(
                name=f"{service.hostname}:{port.port}", domains=domains, routes=entries,
            ))
    return config


def _parents_of(route: routing.Route, service: model.Service) -> list[routing.ParentRef]:
    return [p for p in route.parents if p.kind == "Service" and p.name == service.name
            and p.namespace == service.namespace]


def gateway_route_config(
    gateway: routing.Gateway, port: int, policy: rules.Policy
) -> route_pb2.RouteConfiguration:
    """The routes of one gateway port: a virtual host per hostname its listeners and routes serve.

    A port in the Host header is ignored when picking the virtual host, as Gateway API says (`curl
    http://example.com:8080/` sends `Host: example.com:8080`), and kept in what the backend receives
    (Envoy Gateway's choice too; `strip_any_host_port` would rewrite the header). Sidecars keep ports:
    there the port picks the service port's virtual host."""
    config = route_pb2.RouteConfiguration(
        name=gateway_route_config_name(gateway.name, port), validate_clusters=wrappers_pb2.BoolValue(value=False),
        ignore_port_in_host_matching=True,
    )
    by_host: dict[str, list[routing.Route]] = {}
    on_port = [ln for ln in gateway.listeners if ln.port == port]
    scheme = "https" if any(ln.protocol == "HTTPS" for ln in on_port) else "http"  # one port, one protocol
    for listener in on_port:
        for route in policy.gateway_routes(gateway.name):
            if not any(p.kind == "Gateway" and p.name == gateway.name and p.section in (None, listener.name)
                       for p in route.parents):
                continue
            for host in routing.hostnames_for(listener, route):
                if route not in by_host.setdefault(host, []):
                    by_host[host].append(route)
    for host in sorted(by_host, key=lambda h: (h == "*", h.startswith("*."), h)):
        where = routeactions.Listening(scheme, port, None if "*" in host else host)
        config.virtual_hosts.append(route_components_pb2.VirtualHost(
            name=f"{gateway.name}|{port}|{host}", domains=[host],
            routes=route_entries(by_host[host], policy.retries, where=where),
        ))
    return config


def route_entries(
    routes: Sequence[routing.Route], default_retries: routing.Retries, *,
    where: routeactions.Listening = _PLAIN_HTTP,
) -> list[route_components_pb2.Route]:
    """One Envoy route per (rule, match) of `routes` (two for some redirects), in Gateway API precedence.
    `where`: the listener and host they serve, for redirects that keep the request's."""
    return [entry for route, i, _, match in ordered(routes)
            for entry in _routes(match, route.rules[i], default_retries, where, name=_name(route, i))]


def _name(route: routing.Route, index: int) -> str:
    """An Envoy route's name: its policy route and rule (by the rule's name, if it has one)."""
    rule = route.rules[index]
    return f"{route.key}/{rule.name if rule.name is not None else index}"


def ordered(routes: Sequence[routing.Route]) -> list[tuple[routing.Route, int, int, routing.Match]]:
    """Every (route, rule index, match index, match) of `routes`, in the order Envoy tries them."""
    found = [(route, i, j, match) for route in routes for i, rule in enumerate(route.rules)
             for j, match in enumerate(rule.matches)]
    return sorted(found, key=lambda item: _precedence(item[0], item[1], item[2], item[3]))


def _precedence(route: routing.Route, rule: int, index: int, match: routing.Match) -> tuple[object, ...]:
    path = match.path
    return (
        _PATH_RANK[path.kind],
        -len(path.value) if path.kind == routing.PathKind.PREFIX else 0,
        match.method is None,
        -len(match.headers),
        -len(match.query_params),
        route.key,
        rule,
        index,
    )


def _routes(match: routing.Match, rule: routing.Rule, default_retries: routing.Retries,
            where: routeactions.Listening, *, name: str = "") -> list[route_components_pb2.Route]:
    """The Envoy route of one (rule, match); a redirect that keeps the request's host and writes no port
    takes two, requests whose Host has a port first (`routeactions.by_host_port`)."""
    route = route_components_pb2.Route(name=name, match=_match(match))
    if rule.redirect is not None:
        route.redirect.CopyFrom(routeactions.redirect(rule, where))
    else:
        route.route.CopyFrom(_action(rule, default_retries))
    if rule.headers is not None:
        route.request_headers_to_add.extend(routeactions.header_options(rule.headers))
        route.request_headers_to_remove.extend(rule.headers.remove)
    if rule.response_headers is not None:
        route.response_headers_to_add.extend(routeactions.header_options(rule.response_headers))
        route.response_headers_to_remove.extend(rule.response_headers.remove)
    if rule.redirect is None or not routeactions.by_host_port(rule, where):
        return [route]
    without_port = route_components_pb2.Route()
    without_port.CopyFrom(route)
    without_port.redirect.CopyFrom(routeactions.redirect(rule, where, port_in_host=False))
    route.match.headers.append(routeactions.HOST_WITH_PORT)
    return [route, without_port]


def _match(match: routing.Match) -> route_components_pb2.RouteMatch:
    out = route_components_pb2.RouteMatch()
    path = match.path
    if path.kind == routing.PathKind.EXACT:
        out.path = path.value
    elif path.kind == routing.PathKind.REGEX:
        out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=path.value))
    elif path.value.rstrip("/") == "":
        out.prefix = "/"
    else:  # Gateway API prefixes match whole path segments: /foo matches /foo and /foo/bar, not /foobar
        out.path_separated_prefix = path.value.rstrip("/")
    for header in match.headers:
        out.headers.append(route_components_pb2.HeaderMatcher(name=header.name, string_match=_string(header)))
    if match.method is not None:
        out.headers.append(route_components_pb2.HeaderMatcher(
            name=":method", string_match=string_pb2.StringMatcher(exact=match.method)))
    for param in match.query_params:
        out.query_parameters.append(route_components_pb2.QueryParameterMatcher(
            name=param.name, string_match=_string(param)))
    return out


def _string(match: routing.ValueMatch) -> string_pb2.StringMatcher:
    if match.kind == routing.ValueKind.REGEX:
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=match.value))
    return string_pb2.StringMatcher(exact=match.value)


def _destination(rule: routing.Rule) -> route_components_pb2.RouteAction:
    """Where a rule sends: its one backend's cluster, or weighted clusters."""
    action = route_components_pb2.RouteAction()
    weighted = [b for b in rule.backends if b.weight > 0]
    if len(weighted) == 1:
        action.cluster = translate.backend_cluster_name(weighted[0])
    else:
        for backend in weighted:
            action.weighted_clusters.clusters.append(route_components_pb2.WeightedCluster.ClusterWeight(
                name=translate.backend_cluster_name(backend), weight=wrappers_pb2.UInt32Value(value=backend.weight)))
    return action


def _action(rule: routing.Rule, default_retries: routing.Retries) -> route_components_pb2.RouteAction:
    action = _destination(rule)
    retries = rule.retries if rule.retries is not None else default_retries
    timeout = routeactions.route_timeout_ms(rule, retries)
    if timeout is not None:
        action.timeout.CopyFrom(routeactions.duration(timeout))
    if retries.attempts > 0:
        action.retry_policy.CopyFrom(routeactions.retry_policy(
            retries, standby=rule.standby, per_try_timeout_ms=rule.backend_timeout_ms))
    action.request_mirror_policies.extend(routeactions.mirror_policies(rule.mirrors))
    rewrite = rule.rewrite
    if rewrite is not None:
        if rewrite.hostname is not None:
            action.host_rewrite_literal = rewrite.hostname
        if rewrite.full_path is not None:
            action.regex_rewrite.pattern.regex = "^.*$"
            action.regex_rewrite.substitution = rewrite.full_path
        elif rewrite.prefix is not None:
            routeactions.rewrite_prefix(action, rule, rewrite.prefix)
    return action

# --- proxyless gRPC clients ----------------------------------------------------------------------
# gRPC's xDS client (gRFC A28) is stricter than Envoy and speaks only part of a route: it NACKs a
# `path_separated_prefix`, and takes of a route's action the cluster (or weighted clusters), the
# retry policy's gRPC status codes and the stream duration. A policy route is translated into what
# it supports with the same meaning, or left out where it can never match a gRPC call.

GRPC_RETRY_ON = frozenset({"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"})
"""The `retry_on` conditions gRPC honours (gRFC A44): status codes. The others need a proxy."""


def grpc_dial_names(service: model.Service) -> tuple[str, ...]:
    """The names a gRPC client may dial a service by (with `:PORT`): its short name (from its own
    namespace only), NAME.NAMESPACE, NAME.NAMESPACE.svc and the full hostname."""
    return (service.name, f"{service.name}.{service.namespace}", f"{service.name}.{service.namespace}.svc",
            service.hostname)


def grpc_route_config_name(service: model.Service, port: model.ServicePort) -> str:
    """A gRPC service port's route configuration, named after the name its listeners all mean."""
    return f"{service.hostname}:{port.port}"


def grpc_route_config(
    service: model.Service, port: model.ServicePort, policy: rules.Policy
) -> route_pb2.RouteConfiguration:
    """One virtual host for the port, whose domains are every name a client may dial it by; its routes
    are the mesh routes attached to the service (port), else everything to the service."""
    mine = [r for r in policy.mesh_routes(service.key)
            if any(p.kind == "Service" and p.port in (None, port.port) for p in _parents_of(r, service))]
    where = routeactions.Listening("http", port.port)
    if mine:
        entries = [route for match, rule in _ordered_rules(mine)
                   for route in _grpc_routes(match, rule, policy.retries, where)]
    else:
        whole = routing.Rule(backends=(routing.Backend(service.key, port.port),))
        entries = _grpc_routes(routing.Match(), whole, policy.retries, where)
    return route_pb2.RouteConfiguration(
        name=grpc_route_config_name(service, port),
        virtual_hosts=[route_components_pb2.VirtualHost(
            name=f"{service.hostname}:{port.port}", domains=[f"{n}:{port.port}" for n in grpc_dial_names(service)],
            routes=entries)],
    )


def _ordered_rules(routes: Sequence[routing.Route]) -> list[tuple[routing.Match, routing.Rule]]:
    return [(match, route.rules[i]) for route, i, _, match in ordered(routes)]


def _grpc_routes(match: routing.Match, rule: routing.Rule, default_retries: routing.Retries,
                 where: routeactions.Listening) -> list[route_components_pb2.Route]:
    """The gRPC routes of one (rule, match): none if no gRPC call can match it (a query parameter, a
    method other than POST); two for a path prefix other than "/" (the path itself, and under it).
    A redirect stays a redirect: gRPC fails the calls it matches (UNAVAILABLE), as a call that a proxy
    answers with a redirect fails; header changes and mirrors are not applied (gRPC has neither)."""
    if match.query_params or (match.method is not None and match.method != "POST"):
        return []
    path = match.path
    matches: list[route_components_pb2.RouteMatch] = []
    if path.kind == routing.PathKind.EXACT:
        matches.append(route_components_pb2.RouteMatch(path=path.value))
    elif path.kind == routing.PathKind.REGEX:
        matches.append(route_components_pb2.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex=path.value)))
    elif path.value.rstrip("/") == "":
        matches.append(route_components_pb2.RouteMatch(prefix="/"))
    else:  # Gateway API prefixes match whole segments: /pkg.Svc matches /pkg.Svc and /pkg.Svc/Method
        segment = path.value.rstrip("/")
        matches += [route_components_pb2.RouteMatch(path=segment),
                    route_components_pb2.RouteMatch(prefix=segment + "/")]
    for out in matches:
        for header in match.headers:
            out.headers.append(route_components_pb2.HeaderMatcher(name=header.name, string_match=_string(header)))
    if rule.redirect is not None:
        redirect = routeactions.redirect(rule, where)
        return [route_components_pb2.Route(match=m, redirect=redirect) for m in matches]
    action = _grpc_action(rule, default_retries)
    return [route_components_pb2.Route(match=m, route=action) for m in matches]


def _grpc_action(rule: routing.Rule, default_retries: routing.Retries) -> route_components_pb2.RouteAction:
    action = _destination(rule)
    retries = rule.retries if rule.retries is not None else default_retries
    timeout = routeactions.deadline_ms(rule, retries)
    if timeout:  # gRPC's deadline for the call (gRFC A31); gRPC has no timeout per try, nor a default
        action.max_stream_duration.max_stream_duration.CopyFrom(routeactions.duration(timeout))
    codes = [c for c in retries.retry_on if c in GRPC_RETRY_ON]
    if retries.attempts > 0 and codes:
        action.retry_policy.CopyFrom(route_components_pb2.RetryPolicy(
            retry_on=",".join(codes), num_retries=wrappers_pb2.UInt32Value(value=retries.attempts)))
        if retries.backoff_ms is not None:  # gRFC A44 takes the back-off
            action.retry_policy.retry_back_off.base_interval.CopyFrom(routeactions.duration(retries.backoff_ms))
    return action
