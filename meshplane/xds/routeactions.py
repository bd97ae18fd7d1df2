"""What a route does beyond matching, as Envoy protos: retry policies, redirects, mirrors, rewrites and
header changes. Pure functions, used by `routeconfig` for sidecars, gateways and gRPC clients.

The Gateway API filters are mapped as Envoy Gateway's translator maps them,
except where Envoy can say what Gateway API says more exactly: a redirect
that leaves its port out gets the listener's (Gateway API), and writes no
port when that is the scheme's own (80, 443), which Envoy can leave out
except of a Location that keeps a request's Host with a port. A rule
without a request timeout whose tries
have one gets a request timeout that fits them all: Envoy's default of
15 s would cut them short without a word.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from meshplane.policy import routing
from meshplane.xds import translate

_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_HOST_SELECTION_ATTEMPTS = 5  # Istio's: look this often for a host not tried yet
STANDBY_TRIES_PER_PRIORITY = 2
"""previous_priorities' update_frequency for active-standby rules (Istio's for retryRemoteLocalities)."""
_SCHEME_PORT = {"http": 80, "https": 443}
ENVOY_ROUTE_TIMEOUT_MS = 15_000
"""Envoy's RouteAction.timeout when none is given."""
ENVOY_BACKOFF_MS = 25
"""Envoy's retry back-off base interval when none is given."""
_BACKOFF_CAP = 10
"""Envoy's max_interval when none is given: 10 times the base interval."""
HOST_WITH_PORT = route_components_pb2.HeaderMatcher(
    name=":authority", string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".*:[0-9]+")))
"""Requests whose Host header has a port (`a.example.org:8080`, `[::1]:8080`)."""
_REDIRECT_CODE = {
    301: route_components_pb2.RedirectAction.MOVED_PERMANENTLY,
    302: route_components_pb2.RedirectAction.FOUND,
    303: route_components_pb2.RedirectAction.SEE_OTHER,
    307: route_components_pb2.RedirectAction.TEMPORARY_REDIRECT,
    308: route_components_pb2.RedirectAction.PERMANENT_REDIRECT,
}


@dataclass(frozen=True, slots=True)
class Listening:
    """Where a route's requests come in, for the redirects that leave it to the request: the
    listener's scheme and port (a sidecar's: http and the service port), and the virtual host's one
    hostname (None: a wildcard, or several names)."""

    scheme: str = "http"
    port: int = 80
    host: str | None = None


def duration(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def header_options(modifier: routing.HeaderModifier) -> list[base_pb2.HeaderValueOption]:
    """Gateway API's set (replace, or add) and add (append a value) as Envoy header options."""
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value), append_action=action)
            for action, pairs in ((_OVERWRITE, modifier.set), (_APPEND, modifier.add)) for name, value in pairs]


def deadline_ms(rule: routing.Rule, retries: routing.Retries) -> int | None:
    """The limit of the whole request that the rule gives (None: none given; 0: no limit): its `request`,
    and without retries its backend request's too (then one try is the whole request). gRPC's deadline."""
    backend = rule.backend_timeout_ms
    if retries.attempts > 0 or backend is None:
        return rule.timeout_ms
    limits = [t for t in (rule.timeout_ms, backend) if t]
    return min(limits) if limits else 0


def backoffs_ms(retries: routing.Retries) -> list[int]:
    """The longest Envoy waits before each retry: fully jittered, below the base interval before the
    first, twice that before the second, doubling up to its max_interval (10 x base): 25, 50, 100,
    200, 250 ms for the default 25 ms. (Measured through Envoy 1.40 with a 200 ms base: at most 187,
    399, 802, 1299 and 1932 ms.)"""
    base = retries.backoff_ms if retries.backoff_ms is not None else ENVOY_BACKOFF_MS
    return [min(base << k, _BACKOFF_CAP * base) for k in range(retries.attempts)]


def route_timeout_ms(rule: routing.Rule, retries: routing.Retries) -> int | None:
    """Envoy's RouteAction.timeout, of the whole request (None: Envoy's 15 s; 0: none). Without the rule's
    limit, at least what its tries may take when each has a timeout (`backendRequest`, else
    `perTryTimeout`): every try's and the longest waits between them, when that is more than 15 s.
    None else, as without a try timeout: Envoy's 15 s. A try timeout of 0 (none): no limit."""
    given = deadline_ms(rule, retries)
    if given is not None or retries.attempts == 0:
        return given
    per_try = rule.backend_timeout_ms if rule.backend_timeout_ms is not None else retries.per_try_timeout_ms
    if per_try is None:
        return None
    if per_try == 0:
        return 0
    tries = (retries.attempts + 1) * per_try + sum(backoffs_ms(retries))
    return tries if tries > ENVOY_ROUTE_TIMEOUT_MS else None


def retry_policy(retries: routing.Retries, *, standby: bool = False,
                 per_try_timeout_ms: int | None = None) -> route_components_pb2.RetryPolicy:
    """Retries on another host (`previous_hosts`) and in another priority than the ones tried
    (`previous_priorities`). `standby`: the rule sends to an active-standby backend, whose next
    cluster may serve only once the first has no healthy endpoint: every other try uses the priority
    load as it is (the first retry goes to another host of the same cluster, if it has one), and only
    then leaves the priorities tried (decision 0018). Nearest-first backends leave the priority at
    once, so that a broken zone or region costs no request (decision 0010). `per_try_timeout_ms`: the
    rule's backend request timeout, which replaces the retries' own."""
    policy = route_components_pb2.RetryPolicy(
        retry_on=",".join(retries.retry_on),
        num_retries=wrappers_pb2.UInt32Value(value=retries.attempts),
        retriable_status_codes=list(retries.status_codes),
        host_selection_retry_max_attempts=_HOST_SELECTION_ATTEMPTS,
    )
    per_try = per_try_timeout_ms if per_try_timeout_ms is not None else retries.per_try_timeout_ms
    if per_try:
        policy.per_try_timeout.CopyFrom(duration(per_try))
    if retries.backoff_ms is not None:
        policy.retry_back_off.base_interval.CopyFrom(duration(retries.backoff_ms))
    hosts = any_pb2.Any()
    hosts.Pack(previous_hosts_pb2.PreviousHostsPredicate())
    policy.retry_host_predicate.append(route_components_pb2.RetryPolicy.RetryHostPredicate(
        name="envoy.retry_host_predicates.previous_hosts", typed_config=hosts))
    priorities = any_pb2.Any()
    priorities.Pack(previous_priorities_config_pb2.PreviousPrioritiesConfig(
        update_frequency=STANDBY_TRIES_PER_PRIORITY if standby else 1))
    policy.retry_priority.CopyFrom(route_components_pb2.RetryPolicy.RetryPriority(
        name="envoy.retry_priorities.previous_priorities", typed_config=priorities))
    return policy


def mirror_policies(mirrors: Sequence[routing.Mirror]) -> list[route_components_pb2.RouteAction.RequestMirrorPolicy]:
    """A copy of a share of the requests to each mirror's cluster (the whole service). Envoy adds
    `-shadow` to the copy's Host, as with Istio's mirrors: the backend can tell a copy."""
    out = []
    for mirror in mirrors:
        policy = route_components_pb2.RouteAction.RequestMirrorPolicy(
            cluster=translate.backend_cluster_name(mirror.backend))
        if mirror.per_million < 1_000_000:
            policy.runtime_fraction.default_value.CopyFrom(percent_pb2.FractionalPercent(
                numerator=mirror.per_million, denominator=percent_pb2.FractionalPercent.MILLION))
        out.append(policy)
    return out


def redirect(rule: routing.Rule, where: Listening, *, port_in_host: bool = True) -> route_components_pb2.RedirectAction:
    """Gateway API RequestRedirect. Its port: the filter's; else the scheme's own if it names a
    scheme; else the listener's. No port is written when it is the scheme's own, where Envoy can tell
    (the host is known: the filter's, or the virtual host's one name), or for requests whose Host has no
    port (`port_in_host` False: see `by_host_port`)."""
    r = rule.redirect
    assert r is not None
    out = route_components_pb2.RedirectAction(response_code=_REDIRECT_CODE[r.status_code])
    if r.scheme is not None:
        out.scheme_redirect = r.scheme
    scheme, port, host = _location(r, where)
    if host is not None:
        out.host_redirect = host
    if port != _SCHEME_PORT[scheme] or (host is None and port_in_host):
        out.port_redirect = port  # with the request's host: Envoy drops its port only when given one
    if r.full_path is not None:
        out.path_redirect = r.full_path
    elif r.prefix is not None:
        rewrite_prefix(out, rule, r.prefix)
    return out


def by_host_port(rule: routing.Rule, where: Listening) -> bool:
    """Whether the rule's redirect takes two Envoy routes: one for requests whose Host has a port
    (`HOST_WITH_PORT`), one for the others (`port_in_host=False`). So it is when the Location keeps the
    request's host (a wildcard or several names) and its port is the scheme's own, which Gateway API
    leaves out: Envoy keeps a Host without a port as it is, but replaces a Host's port only by writing
    one (`https://a.example.org:443/`, the same place)."""
    assert rule.redirect is not None
    scheme, port, host = _location(rule.redirect, where)
    return host is None and port == _SCHEME_PORT[scheme]


def _location(r: routing.Redirect, where: Listening) -> tuple[str, int, str | None]:
    """The Location's scheme, port and host (None: the request's)."""
    port = r.port or (_SCHEME_PORT[r.scheme] if r.scheme else where.port)
    return r.scheme or where.scheme, port, r.hostname or where.host


def rewrite_prefix(target: route_components_pb2.RouteAction | route_components_pb2.RedirectAction,
                   rule: routing.Rule, replacement: str) -> None:
    """ReplacePrefixMatch, of a URL rewrite or a redirect. Envoy's prefix_rewrite replaces the matched
    characters; Gateway API replaces the matched path segments, so "/" replacing "/foo" in "/foo/bar"
    must give "/bar", not "//bar"."""
    if replacement != "/":
        target.prefix_rewrite = replacement.rstrip("/") or "/"
        return
    prefixes = {m.path.value.rstrip("/") for m in rule.matches}
    if prefixes == {""}:
        return  # "/" replaced by "/": nothing to do
    # One rule's matches may have several prefixes; the regex covers each (RE2, anchored).
    alternatives = "|".join(sorted(_re_escape(p) for p in prefixes if p))
    target.regex_rewrite.pattern.regex = f"^(?:{alternatives})/*"
    target.regex_rewrite.substitution = "/"


def _re_escape(text: str) -> str:
    return "".join("\\" + c if not (c.isalnum() or c in "/-_~") else c for c in text)
