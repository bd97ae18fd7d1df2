"""The `gateways`, `routes` and `retries` of a policy document (apiVersion meshplane.io/v2), as pydantic models.

Field names are the Kubernetes Gateway API's (`Gateway.spec.listeners`,
`HTTPRoute.spec.parentRefs / hostnames / rules[].matches / filters /
backendRefs / timeouts`), so that an operator's HTTPRoute carries over;
meshplane's additions to a backendRef (`clusters`, `labels`, `spread`) say
which of a service's endpoints it means. Retries take Istio's shape
(`retries`: `attempts`, `perTryTimeout`, `retryOn`) or Gateway API's (`retry`, GEP-1731: `codes`,
`attempts`, `backoff`). Gateway API fields meshplane does not support are refused by name
(`unsupported` of a model, `UNSUPPORTED_FILTERS`). Rules across fields live in
`meshplane.policy.routecheck`; `to_*` turn a checked document into
`meshplane.policy.routes` values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal

from pydantic import Field, StrictInt, StrictStr

from meshplane.discovery import model
from meshplane.policy import routing, shape
from meshplane.policy.durations import Duration, Timeout, duration_ms

HOSTNAME_PATTERN = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
PRECISE_HOSTNAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# An HTTP header name (RFC 9110 token); pseudo-headers (":path") cannot be matched or set here.
HEADER_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"

Name = Annotated[StrictStr, Field(pattern=model.NAME_PATTERN, max_length=63)]
Hostname = Annotated[StrictStr, Field(pattern=HOSTNAME_PATTERN, max_length=253)]
PreciseHostname = Annotated[StrictStr, Field(pattern=PRECISE_HOSTNAME_PATTERN, max_length=253)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
HeaderName = Annotated[StrictStr, Field(pattern=HEADER_PATTERN, max_length=256)]
RetryAttempts = Annotated[StrictInt, Field(ge=0, le=10)]
Method = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]


class PathMatchDoc(shape.Doc):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = Field(
        "PathPrefix", description="Exact, PathPrefix (whole path segments) or RegularExpression (RE2).")
    value: StrictStr = Field("/", description="The path, prefix or RE2 expression; starts with '/' unless a regex.")


class HeaderMatchDoc(shape.Doc):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: HeaderName
    value: StrictStr


class QueryParamMatchDoc(shape.Doc):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    value: StrictStr


class MatchDoc(shape.Doc):
    """Conditions that must all hold; a rule matches when any of its matches does."""

    path: PathMatchDoc | None = Field(None, description="Default: PathPrefix /.")
    headers: tuple[HeaderMatchDoc, ...] = ()
    query_params: tuple[QueryParamMatchDoc, ...] = Field((), alias="queryParams")
    method: Method | None = None


class HeaderDoc(shape.Doc):
    name: HeaderName
    value: StrictStr


class HeaderModifierDoc(shape.Doc):
    set: tuple[HeaderDoc, ...] = Field((), description="Replace the header (or add it).")
    add: tuple[HeaderDoc, ...] = Field((), description="Append a value to the header.")
    remove: tuple[HeaderName, ...] = Field((), description="Remove these headers.")


class PathModifierDoc(shape.Doc):
    type: Literal["ReplacePrefixMatch", "ReplaceFullPath"]
    replace_prefix_match: StrictStr | None = Field(None, alias="replacePrefixMatch")
    replace_full_path: StrictStr | None = Field(None, alias="replaceFullPath")


class URLRewriteDoc(shape.Doc):
    hostname: Hostname | None = None
    path: PathModifierDoc | None = None


class ServiceRefDoc(shape.Doc):
    """A Service port (Gateway API BackendObjectReference; meshplane's backends are Services)."""

    group: Literal[""] = Field("", description="The core API group (\"\"): a Kubernetes Service.")
    kind: Literal["Service"] = "Service"
    name: Name = Field(description="The Service.")
    namespace: Name | None = Field(None, description="Default: the route's namespace.")
    port: Port = Field(description="The Service port.")


class FractionDoc(shape.Doc):
    numerator: Annotated[StrictInt, Field(ge=0)]
    denominator: Annotated[StrictInt, Field(ge=1)] = 100


class RequestMirrorDoc(shape.Doc):
    """A copy of the requests to another Service; its answers are dropped."""

    backend_ref: ServiceRefDoc = Field(alias="backendRef")
    percent: Annotated[StrictInt, Field(ge=0, le=100)] | None = Field(
        None, description="Share of the requests copied (default all); or give fraction.")
    fraction: FractionDoc | None = None


class RequestRedirectDoc(shape.Doc):
    """Answer with a redirect; what is left out is the request's (the port: the listener's)."""

    scheme: Literal["http", "https"] | None = None
    hostname: PreciseHostname | None = None
    path: PathModifierDoc | None = None
    port: Port | None = None
    status_code: Literal[301, 302, 303, 307, 308] = Field(302, alias="statusCode")


FILTER_FIELDS = {"RequestHeaderModifier": "requestHeaderModifier", "ResponseHeaderModifier": "responseHeaderModifier",
                 "RequestMirror": "requestMirror", "RequestRedirect": "requestRedirect", "URLRewrite": "urlRewrite"}
"""Each filter type meshplane takes (FilterDoc.type), and the field that configures it."""
FILTER_TYPES = tuple(FILTER_FIELDS)
UNSUPPORTED_FILTERS = {"CORS": "cors", "ExternalAuth": "externalAuth", "ExtensionRef": "extensionRef"}
"""Gateway API's other HTTPRoute filter types and their fields, refused by name (docs/policy.md)."""


class FilterDoc(shape.Doc):
    unsupported: ClassVar[Mapping[str, str]] = {
        field: f"Gateway API's {kind} filter is not supported" for kind, field in UNSUPPORTED_FILTERS.items()}

    type: Literal["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "RequestRedirect",
                  "URLRewrite"]
    request_header_modifier: HeaderModifierDoc | None = Field(None, alias="requestHeaderModifier")
    response_header_modifier: HeaderModifierDoc | None = Field(None, alias="responseHeaderModifier")
    request_mirror: RequestMirrorDoc | None = Field(None, alias="requestMirror")
    request_redirect: RequestRedirectDoc | None = Field(None, alias="requestRedirect")
    url_rewrite: URLRewriteDoc | None = Field(None, alias="urlRewrite")


class BackendRefDoc(ServiceRefDoc):
    """A Service port, or part of its endpoints (meshplane's `clusters`, `labels`, `spread`)."""

    unsupported: ClassVar[Mapping[str, str]] = {
        "filters": "per-backend filters (Gateway API HTTPBackendRef.filters) are not supported: put the "
                   "filters on the rule"}

    weight: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = Field(
        1, description="Share of the rule's requests, relative to the other backends' weights.")
    clusters: tuple[StrictStr, ...] = Field(
        (), description="One cluster pins the backend to it; several are an active-standby order.")
    labels: dict[StrictStr, StrictStr] = Field(
        {}, description="Endpoint label subset; topology.istio.io/cluster reads the endpoint's cluster.")
    spread: Literal["spread", "nearest"] | None = Field(
        None, description="At a gateway: spread over every endpoint (default) or nearest first.")


class RetriesDoc(shape.Doc):
    attempts: RetryAttempts = Field(2, description="Retries after the first try; 0 disables retries.")
    per_try_timeout: Duration | None = Field(None, alias="perTryTimeout", description="Each try's timeout.")
    retry_on: tuple[StrictStr, ...] | None = Field(
        None, alias="retryOn",
        description="Envoy retry_on conditions and HTTP status codes; default Istio's "
                    "(connect-failure, refused-stream, unavailable, cancelled, retriable-status-codes, 503).")


class RetryDoc(shape.Doc):
    """Gateway API's HTTPRoute retry (GEP-1731): `codes` and connection errors are retried."""

    codes: tuple[Annotated[StrictInt, Field(ge=400, le=599)], ...] = Field(
        (), description="HTTP status codes to retry (400-599), besides connection errors.")
    attempts: Annotated[StrictInt, Field(ge=1, le=10)] = Field(2, description="Retries after the first try.")
    backoff: Duration | None = Field(None, description="Envoy's base interval between retries (default 25ms).")


class TimeoutsDoc(shape.Doc):
    request: Timeout | None = Field(None, description="The whole request, retries included; 0s: none.")
    backend_request: Timeout | None = Field(
        None, alias="backendRequest", description="Each try's request to a backend; 0s: none.")


class RuleDoc(shape.Doc):
    unsupported: ClassVar[Mapping[str, str]] = {
        "sessionPersistence": "Gateway API's sessionPersistence (experimental) is not supported"}

    name: Name | None = Field(None, description="Unique within the route; names the Envoy route.")
    matches: tuple[MatchDoc, ...] = Field((), description="Any one must match; none: every request.")
    filters: tuple[FilterDoc, ...] = ()
    backend_refs: tuple[BackendRefDoc, ...] = Field(
        (), alias="backendRefs", description="At least one, unless a RequestRedirect answers the rule.")
    timeouts: TimeoutsDoc | None = None
    retry: RetryDoc | None = Field(None, description="Gateway API's retry (GEP-1731); or retries.")
    retries: RetriesDoc | None = Field(None, description="Default: the policy's defaults.retries.")


class ParentRefDoc(shape.Doc):
    group: Literal["gateway.networking.k8s.io", ""] | None = Field(
        None, description="gateway.networking.k8s.io for a Gateway, \"\" (core) for a Service.")
    kind: Literal["Gateway", "Service"] = Field(
        "Gateway", description="Gateway: a gateway of this policy; Service: sidecars' traffic to it (mesh).")
    name: Name
    namespace: Name | None = Field(None, description="Service parents: default the route's namespace.")
    section_name: Name | None = Field(None, alias="sectionName", description="One listener of the gateway.")
    port: Port | None = Field(None, description="Service parents: one port of the service.")


class RouteDoc(shape.Doc):
    """A Gateway API HTTPRoute."""

    name: Name
    namespace: Name = "default"
    parent_refs: Annotated[tuple[ParentRefDoc, ...], Field(min_length=1)] = Field(alias="parentRefs")
    hostnames: tuple[Hostname, ...] = ()
    rules: Annotated[tuple[RuleDoc, ...], Field(min_length=1)]


class TlsDoc(shape.Doc):
    certificate_file: StrictStr = Field(alias="certificateFile", description="PEM; relative to the policy file.")
    key_file: StrictStr = Field(alias="keyFile", description="PEM; relative to the policy file.")


class ListenerDoc(shape.Doc):
    name: Name
    port: Port
    protocol: Literal["HTTP", "HTTPS"] = "HTTP"
    hostname: Hostname | None = Field(None, description="Only requests for this host (and SNI, for HTTPS).")
    tls: TlsDoc | None = Field(None, description="HTTPS: the certificate served for `hostname`.")


class GatewayDoc(shape.Doc):
    """A gateway: its proxies say `role: gateway` and `gateway: NAME` in their node metadata."""

    name: Name
    listeners: Annotated[tuple[ListenerDoc, ...], Field(min_length=1)]


# To the resolved values (the document is known to be well formed; durations already checked).


def to_retry(doc: RetryDoc) -> routing.Retries:
    """GEP-1731 as Istio maps it, with reset (disconnects and timed-out tries) as the GEP asks."""
    codes = tuple(dict.fromkeys(doc.codes))
    retry_on = (*routing.GATEWAY_API_RETRY_ON, "retriable-status-codes") if codes else routing.GATEWAY_API_RETRY_ON
    return routing.Retries(attempts=doc.attempts, retry_on=retry_on, status_codes=codes,
                           backoff_ms=None if doc.backoff is None else duration_ms(doc.backoff))


def to_retries(doc: RetriesDoc) -> routing.Retries:
    retry_on: tuple[str, ...] = routing.ISTIO_RETRY_ON
    codes: tuple[int, ...] = (503,)
    if doc.retry_on is not None:
        retry_on = tuple(c for c in doc.retry_on if not c.isdigit())
        codes = tuple(int(c) for c in doc.retry_on if c.isdigit())
        if codes and "retriable-status-codes" not in retry_on:
            retry_on = (*retry_on, "retriable-status-codes")
    return routing.Retries(
        attempts=doc.attempts,
        per_try_timeout_ms=None if doc.per_try_timeout is None else duration_ms(doc.per_try_timeout),
        retry_on=retry_on,
        status_codes=codes,
    )


def to_route(doc: RouteDoc) -> routing.Route:
    return routing.Route(
        name=doc.name,
        namespace=doc.namespace,
        parents=tuple(
            routing.ParentRef(kind=p.kind, name=p.name, namespace=p.namespace or doc.namespace,
                             section=p.section_name, port=p.port)
            for p in doc.parent_refs
        ),
        hostnames=doc.hostnames,
        rules=tuple(_rule(r, doc.namespace) for r in doc.rules),
    )


def _header_modifier(doc: HeaderModifierDoc) -> routing.HeaderModifier:
    return routing.HeaderModifier(add=tuple((h.name, h.value) for h in doc.add),
                                  set=tuple((h.name, h.value) for h in doc.set), remove=doc.remove)


def _replaced(path: PathModifierDoc | None) -> tuple[str | None, str | None]:
    """(ReplaceFullPath, ReplacePrefixMatch) of a rewrite's or a redirect's path."""
    if path is None:
        return None, None
    if path.type == "ReplaceFullPath":
        return path.replace_full_path, None
    return None, path.replace_prefix_match or "/"  # Gateway API: an empty prefix is "/"


def _mirror(doc: RequestMirrorDoc, namespace: str) -> routing.Mirror:
    ref = doc.backend_ref
    share = 1_000_000
    if doc.percent is not None:
        share = doc.percent * 10_000
    elif doc.fraction is not None:
        share = doc.fraction.numerator * 1_000_000 // doc.fraction.denominator
    return routing.Mirror(routing.Backend(model.service_key(ref.namespace or namespace, ref.name), ref.port), share)


def _rule(doc: RuleDoc, namespace: str) -> routing.Rule:
    headers = response_headers = None
    rewrite: routing.Rewrite | None = None
    redirect: routing.Redirect | None = None
    mirrors: list[routing.Mirror] = []
    for f in doc.filters:
        if f.type == "RequestHeaderModifier" and f.request_header_modifier is not None:
            headers = _header_modifier(f.request_header_modifier)
        elif f.type == "ResponseHeaderModifier" and f.response_header_modifier is not None:
            response_headers = _header_modifier(f.response_header_modifier)
        elif f.type == "URLRewrite" and f.url_rewrite is not None:
            full, prefix = _replaced(f.url_rewrite.path)
            rewrite = routing.Rewrite(hostname=f.url_rewrite.hostname, prefix=prefix, full_path=full)
        elif f.type == "RequestRedirect" and f.request_redirect is not None:
            r = f.request_redirect
            full, prefix = _replaced(r.path)
            redirect = routing.Redirect(scheme=r.scheme, hostname=r.hostname, port=r.port, full_path=full,
                                        prefix=prefix, status_code=r.status_code)
        elif f.type == "RequestMirror" and f.request_mirror is not None:
            mirrors.append(_mirror(f.request_mirror, namespace))
    timeouts = doc.timeouts or TimeoutsDoc.model_validate({})
    retries = to_retry(doc.retry) if doc.retry is not None else to_retries(doc.retries) if doc.retries else None
    return routing.Rule(
        matches=tuple(_match(m) for m in doc.matches) or (routing.Match(),),
        backends=tuple(
            routing.Backend(
                service=model.service_key(b.namespace or namespace, b.name),
                port=b.port,
                weight=b.weight,
                clusters=b.clusters,
                labels=tuple(sorted(b.labels.items())),
                spread=routing.Spread(b.spread) if b.spread is not None else None,
            )
            for b in doc.backend_refs
        ),
        headers=headers,
        rewrite=rewrite,
        timeout_ms=None if timeouts.request is None else duration_ms(timeouts.request, zero=True),
        retries=retries,
        name=doc.name,
        response_headers=response_headers,
        redirect=redirect,
        mirrors=tuple(m for m in mirrors if m.per_million > 0),
        backend_timeout_ms=None if timeouts.backend_request is None
        else duration_ms(timeouts.backend_request, zero=True),
    )


def _match(doc: MatchDoc) -> routing.Match:
    path = routing.PathMatch(routing.PathKind(doc.path.type), doc.path.value) if doc.path else routing.Match().path
    return routing.Match(
        path=path,
        headers=tuple(routing.ValueMatch(h.name.lower(), routing.ValueKind(h.type), h.value) for h in doc.headers),
        query_params=tuple(routing.ValueMatch(q.name, routing.ValueKind(q.type), q.value) for q in doc.query_params),
        method=doc.method,
    )


def to_gateway(doc: GatewayDoc, certificates: dict[tuple[str, str], tuple[bytes, bytes]]) -> routing.Gateway:
    """`certificates`: (certificate file, key file) -> their contents, read by the loader."""
    return routing.Gateway(
        name=doc.name,
        listeners=tuple(
            routing.Listener(
                name=ln.name, port=ln.port, protocol=ln.protocol, hostname=ln.hostname,
                tls=routing.Tls(ln.tls.certificate_file, ln.tls.key_file,
                               *certificates[(ln.tls.certificate_file, ln.tls.key_file)])
                if ln.tls is not None else None,
            )
            for ln in doc.listeners
        ),
    )
