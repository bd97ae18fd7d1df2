"""The policy file: what is rejected (with file:line), what is accepted and what it becomes."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from meshplane import problems
from meshplane.discovery import model
from meshplane.policy import rules, schema, validate
from tests import pki

ROOT = Path(__file__).resolve().parent.parent
HEAD = "apiVersion: meshplane.io/v1\n"


def load(text: str) -> validate.LoadResult:
    """Line 1 is the first line after the opening triple quote."""
    return validate.load_policy_text(textwrap.dedent(text).lstrip("\n"), path="policy.yaml")


def only_error(text: str) -> problems.Problem:
    result = load(text)
    assert result.policy is None
    assert len(result.errors) == 1, "\n".join(map(str, result.errors))
    return result.errors[0]


def assert_problem(problem: problems.Problem, where: str, reason: str) -> None:
    """`where` is "line: field"; the reason only has to contain `reason`."""
    text = str(problem)
    assert text.startswith(f"policy.yaml:{where}: "), text
    assert reason in text, text


def load_locality(body: str) -> validate.LoadResult:
    """A one-service policy whose locality section is `body`; the body's first line is line 6."""
    head = HEAD + "services:\n  - name: mockb\n    outlierDetection: {consecutive5xxErrors: 1}\n"
    body = textwrap.indent(textwrap.dedent(body).lstrip("\n"), "      ")
    return validate.load_policy_text(head + "    locality:\n" + body, path="policy.yaml")


def locality_error(body: str) -> problems.Problem:
    result = load_locality(body)
    assert result.policy is None
    assert len(result.errors) == 1, "\n".join(map(str, result.errors))
    return result.errors[0]


# --- rejected: locality rules (Istio's localityLbSetting validation) ---------------------------


def test_distribute_with_failover() -> None:
    problem = locality_error("""
        failover: [{from: cn-hangzhou, to: cn-shanghai}]
        distribute:
          - from: cn-hangzhou
            to: {cn-hangzhou: 100}
    """)
    assert_problem(
        problem, "7: services[0].locality.distribute", "can not set both distribute and failover"
    )


def test_distribute_with_failover_priority() -> None:
    problem = locality_error("""
        failoverPriority: [version]
        distribute:
          - from: cn-hangzhou
            to: {cn-hangzhou: 100}
    """)
    assert_problem(
        problem,
        "7: services[0].locality.distribute",
        "can not set both distribute and failoverPriority",
    )


@pytest.mark.parametrize("label", [rules.REGION_LABEL, rules.ZONE_LABEL, rules.SUBZONE_LABEL])
def test_failover_with_topology_label_in_failover_priority(label: str) -> None:
    problem = locality_error(f"""
        failover: [{{from: cn-hangzhou, to: cn-shanghai}}]
        failoverPriority:
          - version
          - {label}
    """)
    assert_problem(
        problem,
        "9: services[0].locality.failoverPriority[1]",
        f"failover and the topology label '{label}'",
    )


def test_failover_with_plain_labels_in_failover_priority_is_valid() -> None:
    result = load_locality("""
        failover: [{from: cn-hangzhou, to: cn-shanghai}]
        failoverPriority: [version, "env=prod"]
    """)
    assert result.errors == () and result.warnings == ()
    assert result.policy is not None
    assert result.policy.services[
        model.service_key("default", "mockb")
    ].locality.failover_priority == (
        "version",
        "env=prod",
    )


def test_failover_to_itself() -> None:
    problem = locality_error("""
        failover:
          - from: cn-shanghai
            to: cn-hangzhou
          - from: cn-hangzhou
            to: cn-hangzhou
    """)
    assert_problem(
        problem, "10: services[0].locality.failover[1].to", "from 'cn-hangzhou' to itself"
    )


@pytest.mark.parametrize(
    ("side", "value", "line", "reason"),
    [
        ("from", "cn-hangzhou/cn-hangzhou-h", 7, "must be a region only"),
        ("to", "cn-shanghai/*", 8, "must be a region only"),
        ("to", "cn-*", 8, "no '*' wildcard"),
        ("from", "*", 7, "no '*' wildcard"),
    ],
)
def test_failover_names_regions_only(side: str, value: str, line: int, reason: str) -> None:
    ends = {"from": "cn-hangzhou", "to": "cn-shanghai", side: value}
    problem = locality_error(f"""
        failover:
          - from: "{ends["from"]}"
            to: "{ends["to"]}"
    """)
    assert_problem(problem, f"{line}: services[0].locality.failover[0].{side}", reason)
    assert problem.reason.startswith(f"'{value}' must be a region"), problem


@pytest.mark.parametrize("weight", [0, 101, -5])
def test_distribute_weight_out_of_range(weight: int) -> None:
    problem = locality_error(f"""
        distribute:
          - from: cn-hangzhou
            to:
              cn-hangzhou: 100
              cn-shanghai: {weight}
    """)
    assert_problem(
        problem,
        '10: services[0].locality.distribute[0].to["cn-shanghai"]',
        f"weight {weight} for 'cn-shanghai'",
    )


def test_distribute_weights_must_sum_to_100() -> None:
    problem = locality_error("""
        distribute:
          - from: cn-hangzhou
            to:
              "cn-hangzhou/*": 90
              "cn-shanghai/*": 20
    """)
    assert_problem(problem, "8: services[0].locality.distribute[0].to", "weights sum to 110")


def test_distribute_to_must_not_be_empty() -> None:
    problem = locality_error("""
        distribute:
          - from: cn-hangzhou
            to: {}
    """)
    assert_problem(problem, "8: services[0].locality.distribute[0].to", "at least one locality")


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("a/b/c/d", "has 4 segments"),
        ("a//c", "empty segment"),
        ("a/", "empty segment"),
        ("cn-*", "'*' may only be the whole last segment"),
        ("*/zone", "'*' may only be the whole last segment"),
        ("", "must not be empty"),
    ],
)
def test_distribute_locality_patterns(pattern: str, reason: str) -> None:
    from_problem = locality_error(f"""
        distribute:
          - from: "{pattern}"
            to: {{"cn-hangzhou": 100}}
    """)
    assert_problem(from_problem, "7: services[0].locality.distribute[0].from", reason)
    to_problem = locality_error(f"""
        distribute:
          - from: cn-hangzhou
            to:
              "{pattern}": 100
    """)
    assert_problem(to_problem, f'9: services[0].locality.distribute[0].to["{pattern}"]', reason)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("cn-hangzhou/*", "cn-hangzhou/z1"),
        ("cn-hangzhou", "cn-hangzhou/*"),
        ("*", "x"),
        ("a/b", "a/b"),
    ],
)
def test_distribute_overlapping_from(first: str, second: str) -> None:
    problem = locality_error(f"""
        distribute:
          - from: "{first}"
            to: {{"cn-hangzhou": 100}}
          - from: "{second}"
            to: {{"cn-shanghai": 100}}
    """)
    assert_problem(problem, "9: services[0].locality.distribute[1].from", f"overlaps '{first}'")


def test_distribute_overlapping_to() -> None:
    problem = locality_error("""
        distribute:
          - from: "cn-hangzhou"
            to:
              "cn-hangzhou/*": 50
              "cn-hangzhou/z1": 50
    """)
    assert_problem(
        problem, '10: services[0].locality.distribute[0].to["cn-hangzhou/z1"]', "overlaps"
    )


def test_distinct_distribute_patterns_are_valid() -> None:
    result = load_locality("""
        distribute:
          - from: "cn-hangzhou/z1/*"
            to: {"cn-hangzhou/z1": 70, "cn-hangzhou/z2/c1": 30}
          - from: "cn-hangzhou/z2"
            to: {"*": 100}
    """)
    assert result.errors == ()


# --- rejected: outlier detection, types, structure ---------------------------------------------


@pytest.mark.parametrize(
    ("line_text", "reason"),
    [
        ("consecutive5xxErrors: -1", "-1 is negative"),
        ("consecutiveGatewayErrors: -2", "-2 is negative"),
        ("consecutiveLocalOriginFailures: -3", "-3 is negative"),
        ("interval: 0s", "'0s' is shorter than the minimum of 1ms"),
        ("baseEjectionTime: 0.5ms", "'0.5ms' is shorter than the minimum of 1ms"),
        ("interval: 30", "duration needs a unit, e.g. 30s"),
        ("baseEjectionTime: '5'", "duration '5' needs a unit, e.g. 30s"),
        ("interval: 5 minutes", "'5 minutes' is not a duration"),
        ("interval: 1.5ms", "not a whole number of milliseconds"),
        ("maxEjectionPercent: 101", "101 is not a percentage from 0 to 100"),
        ("minHealthPercent: -1", "-1 is not a percentage from 0 to 100"),
        ("consecutive5xxErrors: '1'", "must be a whole number, got '1'"),
        ("consecutive5xxErrors: 1.5", "must be a whole number, got 1.5"),
        ("splitExternalLocalOriginErrors: 'yes'", "must be true or false, got 'yes'"),
    ],
)
def test_outlier_detection_values(line_text: str, reason: str) -> None:
    field = line_text.split(":", 1)[0]
    problem = only_error(HEAD + "defaults:\n  outlierDetection:\n    " + line_text + "\n")
    assert_problem(problem, f"4: defaults.outlierDetection.{field}", reason)


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        (
            HEAD + "defaults:\n  outlierDetection:\n    intervall: 1s\n",
            "4: defaults.outlierDetection.intervall",
            "unknown field 'intervall'; did you mean 'interval'?",
        ),
        (
            HEAD + "services:\n  - name: a\n    zzz: 1\n",
            "4: services[0].zzz",
            "unknown field 'zzz'; known fields here: connectTimeout",
        ),
        (HEAD + "listeners: []\n", "2: listeners", "unknown field 'listeners'"),
        (
            HEAD + "defaults:\n  locality:\n    failover:\n      - {from: a, to: b, via: c}\n",
            "5: defaults.locality.failover[0].via",
            "unknown field 'via'",
        ),
        (HEAD + "defaults: [1]\n", "2: defaults", "must be a mapping, got a list"),
        (HEAD + "services: {name: a}\n", "2: services", "must be a list, got a mapping"),
        (HEAD + "services:\n  - mockb\n", "3: services[0]", "must be a mapping, got 'mockb'"),
        (HEAD + "services:\n  - name: 42\n", "3: services[0].name", "must be a string, got 42"),
        (
            HEAD + "services:\n  - name: mockB\n",
            "3: services[0].name",
            "'mockB' is not a Kubernetes name",
        ),
        (
            HEAD + "services:\n  - namespace: x\n",
            "3: services[0].name",
            "required field 'name' is missing",
        ),
        (
            HEAD + "defaults:\n  locality: {enabled: 1}\n",
            "3: defaults.locality.enabled",
            "must be true or false, got 1",
        ),
        (
            HEAD + "defaults:\n  locality:\n    failover:\n      - {from: no, to: b}\n",
            "5: defaults.locality.failover[0].from",
            "must be a string, got False (YAML reads yes/no",
        ),
        (
            HEAD + "defaults:\n  connectTimeout: 2\n",
            "3: defaults.connectTimeout",
            "duration needs a unit",
        ),
        (
            "defaults: {}\n",
            "1: apiVersion",
            "required: start the file with apiVersion: meshplane.io/v1",
        ),
        (
            "apiVersion: meshplane.io/v3\n",
            "1: apiVersion",
            "unsupported apiVersion 'meshplane.io/v3'",
        ),
        ("- a\n- b\n", "1: (document)", "a policy is a mapping"),
        (
            HEAD + "routes:\n  - host: example.com\n",
            "2: routes",
            "routes need apiVersion: meshplane.io/v2",
        ),
        (HEAD + "gateways: [edge]\n", "2: gateways", "not supported by v1"),
    ],
)
def test_structure(text: str, where: str, reason: str) -> None:
    assert_problem(only_error(text), where, reason)


def test_empty_reserved_keys_are_allowed() -> None:
    assert load(HEAD + "routes: []\ngateways:\n").errors == ()


def test_duplicate_service_is_reported_on_the_second() -> None:
    problem = only_error("""
        apiVersion: meshplane.io/v1
        services:
          - name: mockb
          - name: mockc
          - name: mockb
            namespace: default
          - name: mockb
            namespace: other
    """)
    assert_problem(
        problem, "5: services[2].name", "duplicate service default/mockb (first defined at line 3)"
    )


def test_yaml_syntax_error_has_the_line() -> None:
    problem = only_error("""
        apiVersion: meshplane.io/v1
        services:
          - name: mockb
            outlierDetection: {interval: 1s
          - name: mockc
    """)
    assert problem.line == 5 and "invalid YAML" in problem.reason, str(problem)


def test_duplicate_yaml_key_has_the_second_line() -> None:
    problem = only_error("""
        apiVersion: meshplane.io/v1
        defaults:
          connectTimeout: 1s
          connectTimeout: 2s
    """)
    assert_problem(
        problem, "4: defaults.connectTimeout", "duplicate key 'connectTimeout' (first at line 3)"
    )


@pytest.mark.parametrize(("text", "where", "anchor"), [
    # A few hundred bytes of nested aliases expand ninefold per level (5 s and 443 MB at six levels).
    ("apiVersion: meshplane.io/v2\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "routes: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "2: a", "a"),
    ("apiVersion: meshplane.io/v1\ndefaults:\n  outlierDetection: &od {consecutive5xxErrors: 1}\nservices:\n"
     "  - name: mockb\n    outlierDetection: *od\n", "3: defaults.outlierDetection", "od"),
    ("apiVersion: meshplane.io/v1\nservices:\n  - &base\n    name: mockb\n  - <<: *base\n    name: mockc\n",
     "3: services[0]", "base"),
])
def test_yaml_anchors_and_aliases_are_refused_where_the_anchor_is(text: str, where: str, anchor: str) -> None:
    result = validate.load_policy_text(text, path="policy.yaml")
    assert [str(p) for p in result.errors] == [
        f"policy.yaml:{where}: YAML anchors and aliases are not accepted in this file (&{anchor}): "
        "write the value out where it is used"]


def test_a_merge_key_without_an_alias_is_still_a_mapping_merged() -> None:
    result = load("""
        apiVersion: meshplane.io/v1
        defaults:
          <<: {connectTimeout: 1s}
    """)
    assert result.errors == () and result.policy is not None
    assert result.policy.defaults.connect_timeout_ms == 1000


def test_every_problem_is_reported_sorted_by_line() -> None:
    result = load("""
        apiVersion: meshplane.io/v1
        services:
          - name: a
            locality:
              failover: [{from: x, to: x}]
          - name: b
            locality:
              failover: [{from: y/z, to: q}]
    """)
    assert [(p.line, p.field) for p in result.errors] == [
        (5, "services[0].locality.failover[0].to"),
        (8, "services[1].locality.failover[0].from"),
    ]


def test_unreadable_file_is_an_error_of_the_file_naming_the_flag(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = validate.load_policy_file(missing)
    assert result.policy is None
    assert [str(p) for p in result.errors] == [f"--policy {missing}: cannot read it: No such file or directory"]
    assert [(p.file, p.line) for p in result.errors] == [(str(missing), 0)]  # no line: the file as a whole


def test_policy_error_lists_problems_one_per_line() -> None:
    problems = load("apiVersion: 1\nfoo: 2\n").errors
    assert str(validate.PolicyError(problems)).splitlines() == [str(p) for p in problems]
    assert len(problems) == 2


# --- warnings ---------------------------------------------------------------------------------


def test_failover_without_outlier_detection_warns_but_applies() -> None:
    result = load("""
        apiVersion: meshplane.io/v1
        services:
          - name: reviews
            locality:
              failover: [{from: cn-shanghai, to: cn-hangzhou}]
    """)
    assert result.errors == () and result.policy is not None
    assert [str(w) for w in result.warnings] == [
        f"policy.yaml:5: services[0].locality.failover: {validate.NO_OUTLIER_DETECTION}"
    ]
    assert result.warnings[0].severity == "warning"


def test_inherited_failover_without_outlier_detection_warns_once_on_defaults() -> None:
    result = load("""
        apiVersion: meshplane.io/v1
        defaults:
          locality:
            failoverPriority: [topology.kubernetes.io/region]
        services:
          - name: a
            connectTimeout: 2s
          - name: b
            outlierDetection: {consecutive5xxErrors: 0, consecutiveGatewayErrors: 0}
          - name: c
            outlierDetection: {consecutive5xxErrors: 2}
    """)
    assert [(w.line, w.field) for w in result.warnings] == [
        (4, "defaults.locality.failoverPriority"),
        (9, "services[1].outlierDetection"),
    ]
    assert "ejects nothing" in result.warnings[1].reason
    assert result.policy is not None


def test_local_origin_failures_without_split_warns() -> None:
    result = load("""
        apiVersion: meshplane.io/v1
        defaults:
          outlierDetection:
            consecutiveLocalOriginFailures: 1
    """)
    assert result.errors == ()
    assert_problem(
        result.warnings[0],
        "4: defaults.outlierDetection.consecutiveLocalOriginFailures",
        "ignored unless splitExternalLocalOriginErrors is true",
    )


# --- accepted: what the file becomes ----------------------------------------------------------

S1_OUTLIER = rules.OutlierDetection(
    consecutive_5xx_errors=1,
    consecutive_local_origin_failures=1,
    split_external_local_origin_errors=True,
    interval_ms=30_000,
    base_ejection_time_ms=300_000,
    max_ejection_percent=100,
)


def test_empty_file_is_the_default_policy() -> None:
    for text in ("", "# nothing yet\n", "---\n"):
        assert load(text) == validate.LoadResult(rules.Policy(), (), ())


def test_s1_policy() -> None:
    result = load("""
        apiVersion: meshplane.io/v1
        services:
          - name: mockb
            outlierDetection:
              consecutive5xxErrors: 1
              consecutiveLocalOriginFailures: 1
              splitExternalLocalOriginErrors: true
              interval: 30s
              baseEjectionTime: 5m
              maxEjectionPercent: 100
    """)
    assert result == validate.LoadResult(
        rules.Policy(
            services={model.service_key("default", "mockb"): rules.ServicePolicy(S1_OUTLIER)}
        ),
        (),
        (),
    )


def test_s2_failover_policy() -> None:
    result = load("""
        apiVersion: meshplane.io/v1
        services:
          - name: reviews
            namespace: bookinfo
            outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 1m}
            locality:
              failover:
                - {from: cn-shanghai, to: cn-hangzhou}
                - {from: cn-hangzhou, to: cn-shanghai}
    """)
    outlier = rules.OutlierDetection(
        consecutive_5xx_errors=1, interval_ms=1000, base_ejection_time_ms=60_000
    )
    failover_rules = (
        rules.FailoverRule("cn-shanghai", "cn-hangzhou"),
        rules.FailoverRule("cn-hangzhou", "cn-shanghai"),
    )
    expected = rules.ServicePolicy(
        outlier_detection=outlier, locality=rules.LocalitySettings(failover=failover_rules)
    )
    assert result == validate.LoadResult(
        rules.Policy(services={model.service_key("bookinfo", "reviews"): expected}), (), ()
    )


def test_s2_distribute_policy() -> None:
    result = load("""
        apiVersion: meshplane.io/v1
        services:
          - name: reviews
            outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 1m}
            locality:
              enabled: true
              distribute:
                - from: "cn-hangzhou/*"
                  to:
                    "cn-shanghai/*": 10
                    "cn-hangzhou/*": 90
    """)
    assert result.errors == () and result.policy is not None
    sp = result.policy.for_service(model.service_key("default", "reviews"))
    assert sp.locality == rules.LocalitySettings(
        distribute=(
            rules.DistributeRule("cn-hangzhou/*", (("cn-shanghai/*", 10), ("cn-hangzhou/*", 90))),
        )
    )


def test_defaults_inheritance_and_section_replacement() -> None:
    result = load("""
        apiVersion: meshplane.io/v1
        defaults:
          connectTimeout: 250ms
          outlierDetection: {consecutive5xxErrors: 3, interval: 10s}
          locality:
            failover: [{from: a, to: b}]
        services:
          - name: inherits
          - name: own-outlier
            outlierDetection: {consecutiveGatewayErrors: 2}
          - name: own-locality
            namespace: ns
            locality: {enabled: false}
            connectTimeout: 1m30s
    """)
    assert result.errors == () and result.policy is not None
    policy = result.policy
    defaults = rules.ServicePolicy(
        outlier_detection=rules.OutlierDetection(consecutive_5xx_errors=3, interval_ms=10_000),
        locality=rules.LocalitySettings(failover=(rules.FailoverRule("a", "b"),)),
        connect_timeout_ms=250,
    )
    assert policy.defaults == defaults
    assert policy.services == {
        model.service_key("default", "inherits"): defaults,
        model.service_key("default", "own-outlier"): rules.ServicePolicy(
            # the whole section replaced: no interval, no 5xx count from the defaults
            outlier_detection=rules.OutlierDetection(consecutive_gateway_errors=2),
            locality=defaults.locality,
            connect_timeout_ms=250,
        ),
        model.service_key("ns", "own-locality"): rules.ServicePolicy(
            outlier_detection=defaults.outlier_detection,
            locality=rules.LocalitySettings(enabled=False),
            connect_timeout_ms=90_000,
        ),
    }
    assert policy.for_service(model.service_key("default", "unnamed")) == defaults


def test_no_defaults_means_built_in_defaults() -> None:
    result = load(HEAD + "services:\n  - name: a\n    connectTimeout: 1.5s\n")
    assert result.policy == rules.Policy(
        services={model.service_key("default", "a"): rules.ServicePolicy(connect_timeout_ms=1500)}
    )


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("100ms", 100),
        ("1s", 1000),
        ("1.5s", 1500),
        ("5m", 300_000),
        ("1h", 3_600_000),
        ("1m30s", 90_000),
        ("1h0m1ms", 3_600_001),
    ],
)
def test_durations(text: str, ms: int) -> None:
    result = load(HEAD + f"defaults: {{connectTimeout: {text}}}\n")
    assert result.policy is not None and result.policy.defaults.connect_timeout_ms == ms


# --- schema and docs cannot go stale ----------------------------------------------------------


def test_committed_schema_is_current() -> None:
    expected = schema.json_schema()
    for path in (ROOT / "meshplane/policy/schema.json", ROOT / "docs/policy.schema.json"):
        assert json.loads(path.read_text()) == expected, (
            f"{path} is stale: regenerate it (see schema.py)"
        )
    assert expected["$schema"].startswith("https://json-schema.org/")
    assert expected["required"] == ["apiVersion"]
    assert expected["additionalProperties"] is False


def _docs_examples() -> list[str]:
    text = (ROOT / "docs/policy.md").read_text()
    fences = re.findall(r"^```(yaml[^\n]*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [body for info, body in fences if info in ("yaml", "yaml https")]


def _editor_schema() -> jsonschema.Draft202012Validator:
    """The published schema, as an editor's YAML language server applies it."""
    return jsonschema.Draft202012Validator(json.loads((ROOT / "docs/policy.schema.json").read_text()))


V2_ROUTE = ("apiVersion: meshplane.io/v2\ngateways: [{{name: edge, listeners: [{{name: http, port: 80}}]}}]\n"
            "routes: [{{name: r, parentRefs: [{{name: edge}}], rules: [{rule}]}}]\n")
SHAPES = [
    pytest.param("", True, id="empty-file"),
    pytest.param("# nothing yet\n", True, id="comments-only"),
    pytest.param("---\n", True, id="empty-document"),
    pytest.param(HEAD, True, id="api-version-only"),
    pytest.param(HEAD + "defaults:\nservices:\n", True, id="null-sections"),
    pytest.param("{}\n", False, id="empty-mapping-lacks-api-version"),
    pytest.param("apiVersion: meshplane.io/v3\n", False, id="other-api-version"),
    pytest.param(HEAD + "bogus: 1\n", False, id="unknown-key"),
    pytest.param(HEAD + "routes: [{}]\n", False, id="reserved-key"),
    pytest.param(HEAD + "defaults: {outlierDetection: {maxEjectionPercent: 101}}\n", False, id="out-of-range"),
    pytest.param("- apiVersion: meshplane.io/v1\n", False, id="a-list"),
    pytest.param("42\n", False, id="a-number"),
    # Gateway API's HTTPRoute fields: what both take, and what both refuse.
    pytest.param(V2_ROUTE.format(rule="{retry: {codes: [500], attempts: 1, backoff: 10ms}, timeouts: "
                                      "{request: 0s, backendRequest: 1s}, backendRefs: [{name: s, port: 80}]}"),
                 True, id="gep-1731-retry-and-timeouts"),
    pytest.param(V2_ROUTE.format(rule="{filters: [{type: RequestRedirect, requestRedirect: {scheme: https, "
                                      "statusCode: 301}}]}"), True, id="redirect-without-backends"),
    pytest.param(V2_ROUTE.format(rule="{filters: [{type: CORS}], backendRefs: [{name: s, port: 80}]}"), False,
                 id="cors-refused"),
    pytest.param(V2_ROUTE.format(rule="{retry: {codes: [600]}, backendRefs: [{name: s, port: 80}]}"), False,
                 id="retry-code-out-of-range"),
    pytest.param(V2_ROUTE.format(rule="{sessionPersistence: {}, backendRefs: [{name: s, port: 80}]}"), False,
                 id="session-persistence-refused"),
]


@pytest.mark.parametrize(("text", "valid"), SHAPES)
def test_schema_and_validator_agree_on_shape(text: str, valid: bool) -> None:
    """What an editor flags with the published schema is what `meshplane validate` rejects."""
    schema_errors = [e.message for e in _editor_schema().iter_errors(yaml.safe_load(text))]
    assert (schema_errors == []) is valid, schema_errors
    result = validate.load_policy_text(text, path="policy.yaml")
    assert (result.errors == ()) is valid, result.errors


def test_schema_accepts_every_docs_example() -> None:
    checker = _editor_schema()
    examples = _docs_examples()
    assert len(examples) >= 7
    for body in examples:
        assert [e.message for e in checker.iter_errors(yaml.safe_load(body))] == [], body


def test_docs_examples_validate(tmp_path: Path) -> None:
    text = (ROOT / "docs/policy.md").read_text()
    fences = re.findall(r"^```(yaml[^\n]*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    # "yaml https" examples name certificate files: PEM files are put where they say.
    assert {info for info, _ in fences} == {"yaml", "yaml https"}
    assert len(fences) >= 7
    for host in ("example.com", "example.org"):
        pki.write_self_signed(tmp_path / "certs", host)
    for info, body in fences:
        path = str(tmp_path / "policy.yaml") if info == "yaml https" else "docs/policy.md"
        result = validate.load_policy_text(body, path=path)
        assert result.errors == (), "\n".join(map(str, result.errors)) + "\n" + body
        assert result.warnings == (), "\n".join(map(str, result.warnings)) + "\n" + body
