"""The `gateways`, `routes` and `retries` of a policy document (apiVersion meshplane.io/v2), as pydantic models.

Field names are the Kubernetes Gateway API's (`Gateway.spec.listeners`,
`HTTPRoute.spec.parentRefs / hostnames / rules[].matches / filters /
backendRefs / timeouts`), so that an operator's HTTPRoute carries over;
meshplane's additions to a backendRef (`clusters`, `labels`, `spread`) say
which of a service's endpoints it means. Retries take Istio's shape
(`attempts`, `perTryTimeout`, `retryOn`). Rules across fields live in
`meshplane.policy.routecheck`; `to_*` turn a checked document into
`meshplane.policy.routes` values.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictInt, StrictStr

from meshplane.discovery import model
from meshplane.policy import routing, shape
from meshplane.policy.durations import Duration, duration_ms

HOSTNAME_PATTERN = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
NAME_PATTERN = model.NAME_PATTERN
# An HTTP header name (RFC 9110 token); pseudo-headers (":path") cannot be matched or set here.
HEADER_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"

Name = Annotated[StrictStr, Field(pattern=NAME_PATTERN, max_length=63)]
Hostname = Annotated[StrictStr, Field(pattern=HOSTNAME_PATTERN, max_length=253)]
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


class FilterDoc(shape.Doc):
    type: Literal["RequestHeaderModifier", "URLRewrite"]
    request_header_modifier: HeaderModifierDoc | None = Field(None, alias="requestHeaderModifier")
    url_rewrite: URLRewriteDoc | None = Field(None, alias="urlRewrite")


class BackendRefDoc(shape.Doc):
    """A Service port, or part of its endpoints (meshplane's `clusters`, `labels`, `spread`)."""

    name: Name = Field(description="The Service.")
    namespace: Name | None = Field(None, description="Default: the route's namespace.")
    port: Port = Field(description="The Service port.")
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


class TimeoutsDoc(shape.Doc):
    request: Duration | None = Field(None, description="The whole request, retries included.")


class RuleDoc(shape.Doc):
    matches: tuple[MatchDoc, ...] = Field((), description="Any one must match; none: every request.")
    filters: tuple[FilterDoc, ...] = ()
    backend_refs: tuple[BackendRefDoc, ...] = Field(alias="backendRefs")
    timeouts: TimeoutsDoc | None = None
    retries: RetriesDoc | None = Field(None, description="Default: the policy's defaults.retries.")


class ParentRefDoc(shape.Doc):
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


def _rule(doc: RuleDoc, namespace: str) -> routing.Rule:
    headers: routing.HeaderModifier | None = None
    rewrite: routing.Rewrite | None = None
    for f in doc.filters:
        if f.type == "RequestHeaderModifier" and f.request_header_modifier is not None:
            m = f.request_header_modifier
            headers = routing.HeaderModifier(
                add=tuple((h.name, h.value) for h in m.add), set=tuple((h.name, h.value) for h in m.set),
                remove=m.remove,
            )
        elif f.type == "URLRewrite" and f.url_rewrite is not None:
            u = f.url_rewrite
            rewrite = routing.Rewrite(
                hostname=u.hostname,
                prefix=u.path.replace_prefix_match if u.path and u.path.type == "ReplacePrefixMatch" else None,
                full_path=u.path.replace_full_path if u.path and u.path.type == "ReplaceFullPath" else None,
            )
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
        timeout_ms=duration_ms(doc.timeouts.request) if doc.timeouts and doc.timeouts.request else None,
        retries=to_retries(doc.retries) if doc.retries is not None else None,
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
