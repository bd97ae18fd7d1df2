"""The policy YAML document (apiVersion meshplane.io/v1) as pydantic models.

These models are the *shape* of the file: field names, types, ranges. Rules
that relate several fields (failover vs distribute, weights summing to 100,
warnings) live in `validate`, which can point at the right line for each.
`to_policy` turns a validated document into the frozen `rules.Policy` the
rest of meshplane reads; nothing outside `meshplane.policy` sees these models.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)
from pydantic_core import ErrorDetails

from meshplane import problems
from meshplane.discovery import model
from meshplane.policy import gatewayapi, routing, rules, shape
from meshplane.policy.durations import Duration, duration_ms

API_VERSION = "meshplane.io/v2"
API_VERSIONS = ("meshplane.io/v1", "meshplane.io/v2")

# A Kubernetes Service name / namespace (DNS-1035 / DNS-1123 label): a typo here
# would silently never match a service, so the shape is checked.


Count = Annotated[StrictInt, Field(ge=0)]
Percent = Annotated[StrictInt, Field(ge=0, le=100)]
Weight = Annotated[StrictInt, Field(ge=1, le=100)]
Name = Annotated[StrictStr, Field(pattern=model.NAME_PATTERN, max_length=63)]


class OutlierDetectionDoc(shape.Doc):
    """Istio DestinationRule `outlierDetection`: each proxy ejects hosts that keep failing."""

    consecutive_5xx_errors: Count | None = Field(
        None,
        alias="consecutive5xxErrors",
        description="5xx (and, unless split, local-origin) errors before ejection; 0 disables.",
    )
    consecutive_gateway_errors: Count | None = Field(
        None,
        alias="consecutiveGatewayErrors",
        description="502/503/504 errors before ejection; 0 disables.",
    )
    consecutive_local_origin_failures: Count | None = Field(
        None,
        alias="consecutiveLocalOriginFailures",
        description="Connect failures, resets, timeouts before ejection (only when split).",
    )
    split_external_local_origin_errors: StrictBool = Field(
        False,
        alias="splitExternalLocalOriginErrors",
        description="Count local-origin failures apart from 5xx.",
    )
    interval: Duration | None = Field(
        None, description="Time between ejection sweeps (Envoy default 10s)."
    )
    base_ejection_time: Duration | None = Field(
        None,
        alias="baseEjectionTime",
        description="Ejection time, times the number of ejections (default 30s).",
    )
    max_ejection_percent: Percent | None = Field(
        None,
        alias="maxEjectionPercent",
        description="Most of a cluster's hosts that may be ejected (default 10).",
    )
    min_health_percent: Percent = Field(
        0,
        alias="minHealthPercent",
        description="Envoy healthy panic threshold; 0 keeps failover from ever panicking.",
    )


class FailoverDoc(shape.Doc):
    """Clients in region `from` fail over to region `to` before any other region."""

    from_: StrictStr = Field(alias="from", description="The clients' region.")
    to: StrictStr = Field(description="The region to try after the clients' own.")


class DistributeDoc(shape.Doc):
    """Clients whose locality matches `from` send the `to` percentages (summing to 100)."""

    from_: StrictStr = Field(
        alias="from", description="Client locality pattern region[/zone[/cluster]], '*' last."
    )
    to: dict[str, Weight] = Field(
        description="Endpoint locality pattern -> percentage (1..100, sum 100)."
    )


class LocalityDoc(shape.Doc):
    enabled: StrictBool = Field(
        True, description="Locality-aware load balancing (nearest healthy first)."
    )
    failover: tuple[FailoverDoc, ...] = Field(
        (), description="Region to region failover; not with distribute."
    )
    failover_priority: tuple[StrictStr, ...] = Field(
        (),
        alias="failoverPriority",
        description="Ordered labels (or label=value) that replace the topology order.",
    )
    distribute: tuple[DistributeDoc, ...] = Field(
        (), description="Locality weights; an alternative to failover."
    )


class SectionsDoc(shape.Doc):
    """The sections a service can set; each one set replaces the same section of `defaults`."""

    connect_timeout: Duration | None = Field(
        None, alias="connectTimeout", description="Default 1s."
    )
    outlier_detection: OutlierDetectionDoc | None = Field(None, alias="outlierDetection")
    locality: LocalityDoc | None = None


class ServiceDoc(SectionsDoc):
    name: Name = Field(description="The Kubernetes Service name.")
    namespace: Name = "default"


class DefaultsDoc(SectionsDoc):
    """The sections every service inherits, and (v2) every route's retry policy."""

    retries: gatewayapi.RetriesDoc | None = Field(
        None, description="v2: the retry policy of every route that sets none (default: Istio's)."
    )


class PolicyDoc(shape.Doc):
    """A meshplane policy file: mesh-wide defaults, per-service overrides, and (v2) gateways and routes."""

    api_version: Literal["meshplane.io/v1", "meshplane.io/v2"] = Field(alias="apiVersion")
    defaults: DefaultsDoc | None = Field(
        None, description="Sections every service inherits unless it sets them."
    )
    services: tuple[ServiceDoc, ...] | None = None
    gateways: tuple[gatewayapi.GatewayDoc, ...] | None = Field(
        None, description="v2: gateways (Gateway API Gateway); v1 must leave this out."
    )
    routes: tuple[gatewayapi.RouteDoc, ...] | None = Field(
        None, description="v2: routes (Gateway API HTTPRoute) for gateways and sidecars; v1 must leave this out."
    )


def _outlier(doc: OutlierDetectionDoc) -> rules.OutlierDetection:
    return rules.OutlierDetection(
        consecutive_5xx_errors=doc.consecutive_5xx_errors,
        consecutive_gateway_errors=doc.consecutive_gateway_errors,
        consecutive_local_origin_failures=doc.consecutive_local_origin_failures,
        split_external_local_origin_errors=doc.split_external_local_origin_errors,
        interval_ms=None if doc.interval is None else duration_ms(doc.interval),
        base_ejection_time_ms=None
        if doc.base_ejection_time is None
        else duration_ms(doc.base_ejection_time),
        max_ejection_percent=doc.max_ejection_percent,
        min_health_percent=doc.min_health_percent,
    )


def _locality(doc: LocalityDoc) -> rules.LocalitySettings:
    return rules.LocalitySettings(
        enabled=doc.enabled,
        failover=tuple(
            rules.FailoverRule(from_region=f.from_, to_region=f.to) for f in doc.failover
        ),
        failover_priority=doc.failover_priority,
        distribute=tuple(
            rules.DistributeRule(from_locality=d.from_, to=tuple(d.to.items()))
            for d in doc.distribute
        ),
    )


def _resolve(sections: SectionsDoc, base: rules.ServicePolicy) -> rules.ServicePolicy:
    return rules.ServicePolicy(
        outlier_detection=(
            base.outlier_detection
            if sections.outlier_detection is None
            else _outlier(sections.outlier_detection)
        ),
        locality=base.locality if sections.locality is None else _locality(sections.locality),
        connect_timeout_ms=(
            base.connect_timeout_ms
            if sections.connect_timeout is None
            else duration_ms(sections.connect_timeout)
        ),
    )


def resolve_defaults(doc: PolicyDoc) -> rules.ServicePolicy:
    if doc.defaults is None:
        return rules.ServicePolicy()
    return _resolve(doc.defaults, rules.ServicePolicy())


def resolve_service(doc: ServiceDoc, defaults: rules.ServicePolicy) -> rules.ServicePolicy:
    return _resolve(doc, defaults)


def to_policy(
    doc: PolicyDoc, certificates: dict[tuple[str, str], tuple[bytes, bytes]] | None = None
) -> rules.Policy:
    """The resolved policy; assumes `validate` found no errors (duplicates: the last one wins).

    `certificates`: (certificate file, key file) of each HTTPS listener -> their contents.
    """
    defaults = resolve_defaults(doc)
    services = {
        model.service_key(svc.namespace, svc.name): resolve_service(svc, defaults)
        for svc in doc.services or ()
    }
    retries = doc.defaults.retries if doc.defaults is not None else None
    return rules.Policy(
        defaults=defaults,
        services=services,
        retries=gatewayapi.to_retries(retries) if retries is not None else routing.Retries(),
        gateways=tuple(gatewayapi.to_gateway(g, certificates or {}) for g in doc.gateways or ()),
        routes=tuple(gatewayapi.to_route(r) for r in doc.routes or ()),
    )


# Error wording: what an operator reads in `meshplane validate` and in the logs.


def error_reason(err: ErrorDetails) -> str:
    """Pydantic's message, reworded to name the YAML field's meaning and the offending value."""
    kind, loc, value = err["type"], err["loc"], err.get("input")
    last = loc[-1] if loc else ""
    if kind == "extra_forbidden":
        unsupported = _unsupported(loc)
        if unsupported is not None:
            return f"{unsupported}; see docs/policy.md for the Gateway API fields meshplane takes"
        return problems.unknown_field(last, _fields_at(loc[:-1]))
    if kind == "missing":
        if loc == ("apiVersion",):
            return "required: start the file with apiVersion: meshplane.io/v1 (meshplane.io/v2 for gateways and routes)"
        return f"required field {problems.safe_repr(last)} is missing"
    if kind == "literal_error" and loc == ("apiVersion",):
        return f"unsupported apiVersion {problems.safe_repr(value)}; this meshplane reads {' and '.join(API_VERSIONS)}"
    if kind == "literal_error" and len(loc) >= 3 and loc[-3] == "filters" and last == "type":
        return _filter_type_reason(value)
    if kind == "literal_error" and last in ("group", "kind") and any(p in ("backendRefs", "backendRef") for p in loc):
        return (f"{problems.safe_repr(value)}: meshplane sends requests to Kubernetes Services only "
                '(group "", kind Service)')
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping, got {problems.show(value)}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list, got {problems.show(value)}"
    if kind in ("int_type", "int_from_float"):
        return f"must be a whole number, got {problems.show(value)}"
    if kind == "bool_type":
        return f"must be true or false, got {problems.show(value)}"
    if kind == "string_type":
        hint = (
            " (YAML reads yes/no/on/off/true/false as booleans: quote it)"
            if isinstance(value, bool)
            else ""
        )
        return f"must be a string, got {problems.show(value)}{hint}"
    if kind in ("greater_than_equal", "less_than_equal"):
        return _range_reason(loc, value)
    if kind in ("string_pattern_mismatch", "string_too_long"):
        return _pattern_reason(loc, value)
    if kind == "too_short":
        return f"must not be empty: give at least one {str(last).rstrip('s')!r}"
    if kind == "duration":
        return err["msg"]
    return f"{err['msg']}, got {problems.show(value)}"


def _pattern_reason(loc: tuple[str | int, ...], value: Any) -> str:
    field = next((p for p in reversed(loc) if isinstance(p, str)), "")
    if field == "hostname" and "requestRedirect" in loc:
        return (f"{value!r} is not a hostname: lowercase DNS labels separated by '.' "
                "(no wildcard, no port, no trailing dot)")
    if field in ("hostnames", "hostname"):
        return (f"{value!r} is not a hostname: lowercase DNS labels separated by '.', "
                "optionally starting with '*.' (no port, no trailing dot)")
    if (field in ("name", "remove") and "headers" in loc) or field == "remove" or (
            field == "name" and any(p in ("set", "add") for p in loc)):
        return f"{value!r} is not an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)"
    return (
        f"{value!r} is not a Kubernetes name: {model.NAME_RULE}"
    )


def _range_reason(loc: tuple[str | int, ...], value: Any) -> str:
    if len(loc) >= 3 and loc[-2] == "to":
        return f"weight {problems.safe_repr(value)} for {loc[-1]!r} must be from 1 to 100"
    if loc[-1] in ("maxEjectionPercent", "minHealthPercent"):
        return f"{problems.safe_repr(value)} is not a percentage from 0 to 100"
    if loc[-1] == "port":
        return f"{problems.safe_repr(value)} is not a port number (1-65535)"
    if loc[-1] == "weight":
        return f"weight {problems.safe_repr(value)} must be from 0 to 1000000"
    if loc[-1] == "attempts" and len(loc) >= 2 and loc[-2] == "retry":
        return (f"{problems.safe_repr(value)} retries: must be from 1 to 10 (Gateway API's retry takes at least 1; "
                "retries: {attempts: 0} turns retries off)")
    if loc[-1] == "attempts":
        return f"{problems.safe_repr(value)} retries: must be from 0 to 10"
    if len(loc) >= 2 and loc[-2] == "codes":
        return f"{problems.safe_repr(value)} is not an HTTP status code to retry (400-599)"
    return f"{problems.safe_repr(value)} is negative; a count must be 0 or more (0 disables the detector)"


def _filter_type_reason(value: Any) -> str:
    supported = ", ".join(gatewayapi.FILTER_TYPES)
    if value in gatewayapi.UNSUPPORTED_FILTERS:
        return (f"{value} is a Gateway API HTTPRoute filter meshplane does not support "
                f"(supported: {supported})")
    close = problems.did_you_mean(value, gatewayapi.FILTER_TYPES)
    hint = f"; did you mean {close!r}?" if close else ""
    return f"unknown filter type {problems.show(value)}{hint} (supported: {supported})"


def _unsupported(loc: tuple[str | int, ...]) -> str | None:
    """Why a Gateway API field that meshplane's model leaves out is not taken, if it is one."""
    cls = _model_at(loc[:-1])
    known: Mapping[str, str] = getattr(cls, "unsupported", {}) if cls is not None else {}
    return known.get(str(loc[-1]))


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    """The YAML keys allowed by the model at `loc`."""
    cls = _model_at(loc)
    if cls is None:
        return []
    return [f.alias or n for n, f in cls.model_fields.items()]


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model of the mapping at `loc`, found by walking the models' annotations."""
    cls: type[BaseModel] | None = PolicyDoc
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = next((f for n, f in cls.model_fields.items() if (f.alias or n) == part), None)
        cls = _model_in(field.annotation) if field is not None else None
    return cls


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
