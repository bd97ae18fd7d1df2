"""Load and validate a policy file; every problem names file, line, field and reason.

Validation runs in two passes. The first is the document's shape (pydantic:
unknown fields, types, ranges). Only a well-shaped document gets the second
pass, the rules that relate fields to each other, which mirror Istio's
validation of DestinationRule `localityLbSetting` and `outlierDetection` so
that a rule operators know from Istio is accepted or rejected the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from meshplane import problems, yamlpos
from meshplane.discovery import model
from meshplane.policy import document, routecheck, rules

Known = routecheck.Known
# Istio rejects these in failoverPriority next to `failover` (both would order regions).
_FAILOVER_TOPOLOGY_LABELS = (rules.REGION_LABEL, rules.ZONE_LABEL, rules.SUBZONE_LABEL)
NO_OUTLIER_DETECTION = (
    "failover needs outlier detection: without it Envoy only fails over on endpoints "
    "the control plane reports unhealthy"
)


@dataclass(frozen=True)
class LoadResult:
    """`policy` is None exactly when there are errors; warnings never block a policy."""

    policy: rules.Policy | None
    errors: tuple[problems.Problem, ...]
    warnings: tuple[problems.Problem, ...]


class PolicyError(Exception):
    """A policy that cannot be used; str() lists the problems one per line."""

    def __init__(self, problems: Iterable[problems.Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def load_policy_file(path: Path, *, known: Known | None = None) -> LoadResult:
    """`known`: what discovery knows, to warn about references to services and clusters it does not."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return unreadable(path, exc)
    return load_policy_bytes(data, path=str(path), known=known)


def unreadable(path: Path, exc: OSError) -> LoadResult:
    """`--policy FILE: cannot read it: ...` (serve's flag: `meshplane validate` reads its file itself)."""
    return LoadResult(None, (problems.Problem(str(path), 0, "--policy", problems.cannot_read(exc), "error"),), ())


def refused(path: str, reason: str) -> LoadResult:
    """The file refused as a whole, for `reason` (its validation could not finish)."""
    return LoadResult(None, (problems.Problem(path, 0, "--policy", reason, "error"),), ())


def load_policy_bytes(data: bytes, *, path: str, known: Known | None = None) -> LoadResult:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problem = problems.Problem(path, line, "(file)", f"not UTF-8 text: {exc.reason}", "error")
        return LoadResult(None, (problem,), ())
    return load_policy_text(text, path=path, known=known)


def load_policy_text(text: str, *, path: str, known: Known | None = None) -> LoadResult:
    """Relative certificate paths are read from the folder of `path`."""
    try:
        located = yamlpos.load(text, anchors=False)  # a policy has no use for aliases: docs/policy.md
    except yamlpos.YamlError as exc:
        problem = problems.Problem(path, exc.line, yamlpos.render_loc(exc.loc), exc.reason, "error")
        return LoadResult(None, (problem,), ())
    if located.value is None:
        return LoadResult(rules.Policy(), (), ())
    report = _Report(path, located)
    raw = located.value
    if not isinstance(raw, dict):
        shown = problems.show(raw)
        report.error((), f"a policy is a mapping (apiVersion, defaults, services), got {shown}")
        return report.result(None)
    if raw.get("apiVersion") == "meshplane.io/v1":
        raw = _without_v2(raw, report)
    try:
        doc = document.PolicyDoc.model_validate(raw)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        for err in errors:
            # A list whose only item is broken is also reported "too short"; the item's error says more.
            if err["type"] == "too_short" and any(
                    e is not err and e["loc"][:len(err["loc"])] == err["loc"] for e in errors):
                continue
            report.error(err["loc"], document.error_reason(err))
        return report.result(None)
    _check(doc, report)
    certificates = {}
    if doc.api_version != "meshplane.io/v1":
        routecheck.check(doc.gateways or (), doc.routes or (), error=report.error, warning=report.warning,
                         known=known)
        certificates = routecheck.read_certificates(doc.gateways or (), Path(path).parent, report.error)
    return report.result(None if report.errors else document.to_policy(doc, certificates))


def _without_v2(raw: dict[str, Any], report: _Report) -> dict[str, Any]:
    """A v1 file keeps v1's meaning: what came with v2 is an error there (saying how to get it),
    and is not checked further."""
    raw = dict(raw)
    for key in ("gateways", "routes"):
        if raw.get(key):
            report.error((key,), f"{key} need apiVersion: meshplane.io/v2; not supported by v1")
        raw.pop(key, None)
    defaults = raw.get("defaults")
    if isinstance(defaults, dict) and "retries" in defaults:
        report.error(("defaults", "retries"), "retries need apiVersion: meshplane.io/v2; not supported by v1")
        raw["defaults"] = {k: v for k, v in defaults.items() if k != "retries"}
    return raw


class _Report:
    def __init__(self, path: str, located: yamlpos.Located) -> None:
        self.path = path
        self.located = located
        self.errors: list[problems.Problem] = []
        self.warnings: list[problems.Problem] = []

    def line(self, loc: Sequence[str | int]) -> int:
        return self.located.line_for(loc)

    def error(self, loc: Sequence[str | int], reason: str) -> None:
        self.errors.append(self._problem(loc, reason, "error"))

    def warning(self, loc: Sequence[str | int], reason: str) -> None:
        self.warnings.append(self._problem(loc, reason, "warning"))

    def _problem(self, loc: Sequence[str | int], reason: str, severity: problems.Severity) -> problems.Problem:
        return problems.Problem(self.path, self.line(loc), yamlpos.render_loc(loc), reason, severity)

    def result(self, policy: rules.Policy | None) -> LoadResult:
        def order(p: problems.Problem) -> tuple[int, str]:
            return (p.line, p.field)

        return LoadResult(
            policy, tuple(sorted(self.errors, key=order)), tuple(sorted(self.warnings, key=order))
        )


# Pass 2: rules across fields, on a document whose shape is known to be right.


def _check(doc: document.PolicyDoc, report: _Report) -> None:
    if doc.defaults is not None:
        _check_sections(doc.defaults, ("defaults",), report)
    first: dict[model.ServiceKey, int] = {}
    for i, svc in enumerate(doc.services or ()):
        key = model.service_key(svc.namespace, svc.name)
        if key in first:
            line = report.line(("services", first[key], "name"))
            report.error(
                ("services", i, "name"), f"duplicate service {key} (first defined at line {line})"
            )
        else:
            first[key] = i
        _check_sections(svc, ("services", i), report)
    _check_failover_has_outlier_detection(doc, report)
    _check_standby_has_outlier_detection(doc, report)
    _check_standby_retries_reach_the_next_cluster(doc, report)


def _check_sections(
    sections: document.SectionsDoc, loc: tuple[str | int, ...], report: _Report
) -> None:
    od = sections.outlier_detection
    if (
        od is not None
        and od.consecutive_local_origin_failures is not None
        and not od.split_external_local_origin_errors
    ):
        report.warning(
            (*loc, "outlierDetection", "consecutiveLocalOriginFailures"),
            "ignored unless splitExternalLocalOriginErrors is true "
            "(until then local-origin failures count as 5xx errors)",
        )
    if sections.locality is not None:
        _check_locality(sections.locality, (*loc, "locality"), report)


def _check_locality(lb: document.LocalityDoc, loc: tuple[str | int, ...], report: _Report) -> None:
    if lb.distribute and lb.failover:
        report.error((*loc, "distribute"), "can not set both distribute and failover: choose one")
    if lb.distribute and lb.failover_priority:
        report.error(
            (*loc, "distribute"), "can not set both distribute and failoverPriority: choose one"
        )
    if not lb.enabled and (lb.failover or lb.failover_priority or lb.distribute):
        report.warning(
            (*loc, "enabled"), "locality load balancing is off: failover and distribute are ignored"
        )
    for j, entry in enumerate(lb.failover_priority):
        where = (*loc, "failoverPriority", j)
        name = entry.split("=", 1)[0]
        if not name.strip():
            report.error(where, f"{entry!r} must be a label name, or label=value")
        elif lb.failover and name in _FAILOVER_TOPOLOGY_LABELS:
            report.error(
                where,
                f"can not set both failover and the topology label {entry!r} in failoverPriority "
                "(both would order regions)",
            )
    first_rule: dict[str, int] = {}
    for j, rule in enumerate(lb.failover):
        _check_failover(rule, (*loc, "failover", j), report)
        if rule.from_ in first_rule:
            report.warning(
                (*loc, "failover", j, "from"),
                f"ignored: failover[{first_rule[rule.from_]}] already sends {rule.from_!r} "
                "elsewhere, and the first rule for a region wins",
            )
        first_rule.setdefault(rule.from_, j)
    froms: list[tuple[str, int]] = []
    for j, dist in enumerate(lb.distribute):
        where = (*loc, "distribute", j)
        if _check_pattern(dist.from_, (*where, "from"), report):
            for earlier, k in froms:
                if _overlap(earlier, dist.from_):
                    report.error(
                        (*where, "from"),
                        f"{dist.from_!r} overlaps {earlier!r} of distribute[{k}]: "
                        "a client locality must match one rule",
                    )
                    break
            froms.append((dist.from_, j))
        _check_distribute_to(dist, where, report)


def _check_failover(
    rule: document.FailoverDoc, loc: tuple[str | int, ...], report: _Report
) -> None:
    for key, value in (("from", rule.from_), ("to", rule.to)):
        if not value:
            report.error((*loc, key), "must name a region")
        elif "/" in value:
            report.error(
                (*loc, key), f"{value!r} must be a region only: failover has no zones ('/')"
            )
        elif "*" in value:
            report.error((*loc, key), f"{value!r} must be a region: failover takes no '*' wildcard")
    if rule.from_ and rule.from_ == rule.to:
        report.error(
            (*loc, "to"), f"failover from {rule.from_!r} to itself: from and to must differ"
        )


def _check_distribute_to(
    dist: document.DistributeDoc, loc: tuple[str | int, ...], report: _Report
) -> None:
    if not dist.to:
        report.error((*loc, "to"), "to must give at least one locality and its weight")
        return
    total = sum(dist.to.values())
    if total != 100:
        report.error(
            (*loc, "to"), f"weights sum to {total}; the weights of one 'to' must sum to 100"
        )
    seen: list[str] = []
    for pattern in dist.to:
        if not _check_pattern(pattern, (*loc, "to", pattern), report):
            continue
        clash = next((s for s in seen if _overlap(s, pattern)), None)
        if clash is not None:
            report.error(
                (*loc, "to", pattern),
                f"{pattern!r} overlaps {clash!r}: a locality must get one weight",
            )
        seen.append(pattern)


def _check_pattern(pattern: str, loc: tuple[str | int, ...], report: _Report) -> bool:
    """Istio's locality pattern: region[/zone[/cluster]], '*' only as the whole last segment."""
    segments = pattern.split("/")
    if not pattern:
        reason = "a locality pattern must not be empty (use '*' for any locality)"
    elif len(segments) > 3:
        reason = f"{pattern!r} has {len(segments)} segments; a locality is region/zone/cluster"
    elif "" in segments:
        reason = f"{pattern!r} has an empty segment; write region/zone/cluster"
    elif any("*" in s for s in segments[:-1]) or ("*" in segments[-1] and segments[-1] != "*"):
        reason = f"{pattern!r}: '*' may only be the whole last segment, e.g. cn-hangzhou/*"
    else:
        return True
    report.error(loc, reason)
    return False


def _overlap(a: str, b: str) -> bool:
    """Whether some locality matches both patterns: one is a prefix (by segment) of the other."""
    sa = [s for s in a.split("/") if s != "*"]
    sb = [s for s in b.split("/") if s != "*"]
    n = min(len(sa), len(sb))
    return sa[:n] == sb[:n]


def _detects(od: rules.OutlierDetection | None) -> bool:
    """Whether some detector of the outlier detection is enforced (Envoy defaults apply to unset counts)."""
    if od is None:
        return False
    return (
        od.consecutive_5xx_errors != 0  # unset: Envoy's default 5, enforced
        or bool(od.consecutive_gateway_errors)  # unset: Envoy counts but does not enforce
        or (od.split_external_local_origin_errors and od.consecutive_local_origin_failures != 0)
    )


def _ejects(od: rules.OutlierDetection | None) -> bool:
    """Whether outlier detection can eject anything."""
    return od is not None and od.max_ejection_percent != 0 and _detects(od)


def _fails_over_blind(sp: rules.ServicePolicy) -> bool:
    lb = sp.locality
    return (
        lb.enabled
        and bool(lb.failover or lb.failover_priority)
        and not _ejects(sp.outlier_detection)
    )


def _check_failover_has_outlier_detection(doc: document.PolicyDoc, report: _Report) -> None:
    """Warn once per place an operator can fix: the defaults, or the service that set a section."""
    defaults = document.resolve_defaults(doc)
    if doc.defaults is not None and _fails_over_blind(defaults):
        _warn_blind(doc.defaults, defaults, ("defaults",), report)
    for i, svc in enumerate(doc.services or ()):
        resolved = document.resolve_service(svc, defaults)
        sets_one = svc.outlier_detection is not None or svc.locality is not None
        if sets_one and _fails_over_blind(resolved):
            _warn_blind(svc, resolved, ("services", i), report)


def _warn_blind(
    sections: document.SectionsDoc,
    sp: rules.ServicePolicy,
    loc: tuple[str | int, ...],
    report: _Report,
) -> None:
    if sections.outlier_detection is not None:
        where: tuple[str | int, ...] = (*loc, "outlierDetection")
    elif sections.locality is not None:
        where = (*loc, "locality", "failover" if sections.locality.failover else "failoverPriority")
    else:
        where = loc
    if sp.outlier_detection is None:
        report.warning(where, NO_OUTLIER_DETECTION)
    else:
        report.warning(
            where,
            "failover needs outlier detection: the outlierDetection in effect ejects nothing "
            "(its detectors or maxEjectionPercent are 0), so Envoy only fails over on endpoints "
            "the control plane reports unhealthy",
        )


def _check_standby_has_outlier_detection(doc: document.PolicyDoc, report: _Report) -> None:
    """An active-standby backend moves to the next cluster only once the first has no healthy endpoint;
    an endpoint that refuses connections stays healthy unless outlier detection ejects it. (An
    active-standby cluster may always eject every endpoint, whatever maxEjectionPercent says.)"""
    defaults = document.resolve_defaults(doc)
    services = {model.service_key(s.namespace, s.name): document.resolve_service(s, defaults)
                for s in doc.services or ()}
    for i, route in enumerate(doc.routes or ()):
        for j, rule in enumerate(route.rules):
            for k, backend in enumerate(rule.backend_refs):
                if len(backend.clusters) < 2:
                    continue
                key = model.service_key(backend.namespace or route.namespace, backend.name)
                od = services.get(key, defaults).outlier_detection
                if _detects(od):
                    continue
                why = (f"service {key} has none" if od is None
                       else f"the outlierDetection in effect for {key} ejects nothing: its detectors are 0")
                first, second = backend.clusters[:2]
                report.warning(
                    ("routes", i, "rules", j, "backendRefs", k, "clusters"),
                    f"active-standby needs outlier detection ({why}): an endpoint of {first} that refuses "
                    f"connections is never ejected, so every request that meets it fails there first and is "
                    f"retried in {second}, and {first} never empties; set outlierDetection in defaults or on "
                    "the service",
                )


def _check_standby_retries_reach_the_next_cluster(doc: document.PolicyDoc, report: _Report) -> None:
    """An active-standby rule retries in the next cluster only from its second retry (decision 0018,
    previous_priorities' update_frequency 2): with one retry, a request never leaves the first cluster."""
    defaults = doc.defaults.retries if doc.defaults is not None else None
    for i, route in enumerate(doc.routes or ()):
        for j, rule in enumerate(route.rules):
            standby = next((b for b in rule.backend_refs if len(b.clusters) > 1), None)
            if standby is None or any(f.type == "RequestRedirect" for f in rule.filters):
                continue
            loc: tuple[str | int, ...] = ("routes", i, "rules", j)
            said = ""
            if rule.retry is not None:
                attempts, where = rule.retry.attempts, (*loc, "retry", "attempts")
            elif rule.retries is not None:
                attempts, where = rule.retries.attempts, (*loc, "retries", "attempts")
            elif defaults is not None:
                attempts, where = defaults.attempts, (*loc, "backendRefs", rule.backend_refs.index(standby), "clusters")
                said = f" (defaults.retries, line {report.line(('defaults', 'retries', 'attempts'))})"
            else:
                continue
            if attempts != 1:
                continue
            first, second = standby.clusters[:2]
            report.warning(
                where,
                f"1 retry{said} stays in {first}: an active-standby rule retries in the next cluster only from "
                f"its second retry, so when {first} breaks at once its requests fail, until outlier detection "
                f"ejects its endpoints, instead of being retried in {second}; give attempts: 2 or more",
            )
