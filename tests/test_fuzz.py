"""Property-based tests (fuzzing, hypothesis) of what meshplane reads from outside: policy files,
xDS nodes, and xDS requests on the wire.

The properties:

1. The policy loader never raises, whatever the text (valid policies mutated line by line, documents
   generated from the policy's own keys, raw YAML tokens); every problem it reports names the file,
   a line (0 only for a whole-file YAML error) and a field, and gives a reason.
2. Node classification returns a `Proxy`, or raises `InvalidNode` naming a `node.` field.
3. The ADS servers (state of the world and delta) answer any bytes on a stream with responses or a
   status among OK, CANCELLED, INVALID_ARGUMENT, PERMISSION_DENIED and RESOURCE_EXHAUSTED, never
   UNKNOWN or INTERNAL; and after the fuzzing they still serve well-behaved clients, old and new.

The default profile is quick (a few seconds a test); the nightly one digs much longer:

    HYPOTHESIS_PROFILE=nightly .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import math
import os
import re
import tempfile
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pydantic
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, struct_pb2
from google.rpc import status_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from meshplane import app, problems
from meshplane.demo import topology
from meshplane.policy import document, rules, validate
from meshplane.xds import adsbase, proxy, typeurls
from meshplane.xds import client as ads_client
from tests import pki
from tests.conftest import cluster_doc, wait_for, write_yaml

ROOT = Path(__file__).resolve().parent.parent

# --- profiles -------------------------------------------------------------------------------------

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # Hypothesis caches (charmap, constants) go to the temp folder, not .hypothesis/ in the repository.
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "meshplane-hypothesis")

_COMMON: dict[str, Any] = {
    "deadline": None,
    "database": None,  # nothing written into the repository
    "print_blob": True,  # a failure prints the @reproduce_failure blob to replay it
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
        # conftest's autouse `no_leaked_tasks` is function scoped; sharing it between examples is harmless
        HealthCheck.function_scoped_fixture,
    ],
}
settings.register_profile("meshplane-default", max_examples=50, **_COMMON)
settings.register_profile("nightly", max_examples=5000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "meshplane-default"))

# --- 1. the policy loader -------------------------------------------------------------------------

MOCKB = "outbound|8000||mockb.default.svc.cluster.local"
MOCKC = "outbound|8000||mockc.default.svc.cluster.local"
GATEWAY_PORT = 18080


def _doc_examples() -> list[str]:
    text = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    return re.findall(r"```yaml[^\n]*\n(.*?)```", text, re.S)


_SEED_CANDIDATES = [
    (ROOT / "deploy" / "examples" / "policy.yaml").read_text(encoding="utf-8"),
    topology.s1_policy(),
    topology.demo_policy(gateway_port=GATEWAY_PORT),
    *_doc_examples(),
]


def _with_certificates(folder: Path) -> Path:
    """A policy's folder: relative certificate paths are read from it (docs' HTTPS example: certs/...)."""
    (folder / "certs").mkdir()
    pki.write_self_signed(folder / "certs", "example.com")
    return folder


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _with_certificates(tmp_path_factory.mktemp("policy"))


def _policy_path(folder: Path) -> str:
    return str(folder / "pölicy.yaml")


def _lines_in(text: str) -> int:
    # str.splitlines breaks on every character YAML breaks lines on (\r, \n, \x85, \u2028, \u2029) and more.
    return len(text.splitlines())


def check_result(result: validate.LoadResult, text: str, path: str) -> None:
    """What `load_policy_text` promises of every answer."""
    assert isinstance(result, validate.LoadResult)
    assert (result.policy is None) == bool(result.errors), "a policy exactly when there are no errors"
    if result.policy is not None:
        assert isinstance(result.policy, rules.Policy)
    for found, severity in ((result.errors, "error"), (result.warnings, "warning")):
        for p in found:
            assert isinstance(p, problems.Problem)
            assert p.file == path, p
            assert p.severity == severity, p
            assert isinstance(p.line, int) and p.line >= 0, p
            # Line 0: only a whole-file error (YAML the parser could not place), reported on the document.
            if p.line == 0:
                assert severity == "error" and p.field == "(document)", p
            assert p.line <= _lines_in(text) + 1, (p, _lines_in(text))
            assert isinstance(p.field, str) and p.field.strip(), p
            assert isinstance(p.reason, str) and p.reason.strip(), p
            assert str(p).startswith(f"{path}:{p.line}: "), p  # what `meshplane validate` prints


def _valid_seeds() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = _policy_path(_with_certificates(Path(tmp)))
        return [s for s in _SEED_CANDIDATES if not validate.load_policy_text(s, path=path).errors]


SEEDS = _valid_seeds()


def test_seed_policies_are_valid_v1_and_v2() -> None:
    """The mutations start from valid policies, of both versions (a seed that stops loading is left out)."""
    assert len(SEEDS) >= 6, len(SEEDS)
    assert any(s.lstrip().startswith("apiVersion: meshplane.io/v1") for s in SEEDS)
    assert any("apiVersion: meshplane.io/v2" in s and "gateways:" in s for s in SEEDS)


# Every key the policy's models know (their YAML names), walked from PolicyDoc.
def _model_keys() -> list[str]:
    keys: set[str] = set()
    seen: set[type] = set()

    def walk(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            if annotation in seen:
                return
            seen.add(annotation)
            for name, field in annotation.model_fields.items():
                keys.add(field.alias or name)
                walk(field.annotation)
            return
        for arg in typing.get_args(annotation):
            walk(arg)

    walk(document.PolicyDoc)
    return sorted(keys)


POLICY_KEYS = _model_keys()

# YAML scalars as source text: what the resolver turns into ints, floats, timestamps, tags, aliases...
YAML_TOKENS = [
    "~", "null", "Null", "true", "no", "on", "yes", "y", "0", "-1", "1.5", "1e3", ".inf", "-.inf", ".nan",
    "0o777", "0777", "0x1F", "0b101", "1_000", "+12", "190:20:30", "-1:30", "2001-12-14",
    "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10 -5", "2001-02-30", "2001-13-01", "2001-01-99",
    "0x", "0b", "0o", "!!int abc", "!!int 0x", "!!float abc", "!!float", "!!timestamp x", "!!timestamp 2001-02-30",
    "!!binary ZZZ", "!!binary AAAA", "!!str 5", "!!bool maybe", "!!null x", "!!set {a, b}", "!!omap [a: 1]",
    "!!omap [a]", "!!pairs [a: 1]", "!!seq x", "!!map x", "!!python/name:os.system", "!local x", "!<tag:x> y",
    "&a x", "*a", "*nope", "&a [*a]", "&a {k: *a}", '"\\0"', '"\\ud800"', '"\\x85"', '"\\U0010ffff"', '"\\q"',
    "'it''s'", "'", '"', "|\n  block", ">-\n  folded", "|9\n x", "[]", "{}", "[a, [b, {c: d}]]", "{a: 1, a: 2}",
    "{<<: {a: 1}, b: 2}", "{<<: [*nope]}", "{<<: 1}", "{? [a]: b}", "{1: a}", "{null: a}", "? complex\n: key",
    "%YAML 1.1", "---", "...", "--- !!set", "@reserved", "`tick", "- a\n- b", "a: b: c", "\t", "#", "\ufeff",
    "30s", "1m30s", "0ms", "0.5ms", "1.0005s", "1e3s", "30", "99999999999999999999h", "1.5m", "-1s",
    "cn-hangzhou/*", "*/x", "a//b", "a/b/c/d", "*", "(((", "[a-", "\\p{Greek}", "(?P<n>x)", "a{1000}{1000}",
    "/", "//x", "x", "HTTPS", "HTTP", "RegularExpression", "Exact", "PathPrefix", "ReplacePrefixMatch",
    "URLRewrite", "RequestHeaderModifier", "Gateway", "Service", "GET", "spread", "nearest", "503",
    "-5", "101", "65536", "1000001", "meshplane.io/v1", "meshplane.io/v2", "meshplane.io/v3", "edge", "mockb",
]

_NUMBERISH = st.builds(
    lambda prefix, digit, n: prefix + digit * n,
    st.sampled_from(["", "-", "0x", "0b", "0o", "0", "1_", "+"]),
    st.sampled_from(list("0179afAF_:.")),
    st.integers(0, 6000),
)
_DATEISH = st.builds(
    lambda y, m, d, rest: f"{y:04d}-{m:02d}-{d:02d}{rest}",
    st.integers(0, 9999), st.integers(0, 99), st.integers(0, 99),
    st.sampled_from(["", "t25:61:61", " 23:59:60.5 +99", "T00:00:00Z", "t1:2:3.1234567890-1:30"]),
)
_SEXAGESIMAL = st.builds(lambda parts: ":".join(parts), st.lists(st.sampled_from(["59", "0", "1", "99"]),
                                                                 min_size=2, max_size=2000))

yaml_tokens = st.one_of(
    st.sampled_from(YAML_TOKENS),
    _NUMBERISH,
    _DATEISH,
    _SEXAGESIMAL,
    st.text(max_size=30),
    st.text(max_size=30).map(json.dumps),  # double-quoted, escapes (lone surrogates too: "\ud800")
    st.builds(lambda tag, v: f"!!{tag} {v}", st.sampled_from(["int", "float", "bool", "timestamp", "binary", "str",
                                                                "null", "set", "omap", "pairs", "seq", "map"]),
              st.text(max_size=10)),
)


@dataclasses.dataclass(frozen=True)
class Raw:
    """A leaf written into the YAML text as it is (not quoted by the dumper)."""

    token: str


def _tree(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20),
        st.text(st.characters(categories=["Cs", "Cc"]), max_size=3),  # dumped as escapes: "\uD800", "\0"
        st.sampled_from(YAML_TOKENS), yaml_tokens.map(Raw),
    )
    return st.recursive(
        leaves,
        lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(keys, kids, max_size=5)),
        max_leaves=25,
    )


policy_keys = st.one_of(st.sampled_from(POLICY_KEYS), st.sampled_from(POLICY_KEYS), st.text(max_size=12))
api_versions = st.one_of(st.sampled_from(["meshplane.io/v1", "meshplane.io/v2"]), _tree(policy_keys))

# Near-valid shapes, so that the second pass (rules across fields) runs too: values from small pools
# collide (duplicates, overlapping patterns, weights not summing to 100).
_names = st.sampled_from(["mockb", "mockc", "edge", "a", "reviews", "x" * 63, "x" * 64, "Bad", "-a", ""])
_regions = st.sampled_from(["cn-hangzhou", "cn-shanghai", "ap-northeast-1", "", "*", "a/b", "cn-hangzhou/*"])
_patterns = st.sampled_from(["cn-hangzhou/*", "cn-hangzhou", "cn-shanghai/*", "*", "a/b/c", "a/b/c/d", "a//b",
                             "*/a", "a/*/b", "", "cn-hangzhou/cn-hangzhou-h"])
_durations = st.sampled_from(["1s", "30s", "5m", "1m30s", "100ms", "0s", "0.5ms", "1.0005s", "30", "x", 30, None])
_counts = st.one_of(st.integers(-2, 5), st.sampled_from([True, "1", 1.5, None]))
_ports = st.one_of(st.integers(-1, 65536), st.sampled_from([80, 443, 8000, GATEWAY_PORT]))
_paths = st.sampled_from(["/", "/mocka", "mocka", "//x", "/a//b", "^/api/.*$", "(((", "a{1000}{1000}", ""])


def _opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(None), strategy)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


_outlier = st.builds(
    lambda *v: _drop_none(dict(zip(("consecutive5xxErrors", "consecutiveGatewayErrors",
                                     "consecutiveLocalOriginFailures", "splitExternalLocalOriginErrors",
                                     "interval", "baseEjectionTime", "maxEjectionPercent", "minHealthPercent"),
                                    v, strict=True))),
    _opt(_counts), _opt(_counts), _opt(_counts), _opt(st.booleans()), _opt(_durations), _opt(_durations),
    _opt(st.integers(-1, 101)), _opt(st.integers(-1, 101)),
)
_locality = st.builds(
    lambda enabled, failover, priority, distribute: _drop_none(
        {"enabled": enabled, "failover": failover, "failoverPriority": priority, "distribute": distribute}),
    _opt(st.booleans()),
    _opt(st.lists(st.builds(lambda f, t: {"from": f, "to": t}, _regions, _regions), max_size=3)),
    _opt(st.lists(st.sampled_from(["version", "topology.istio.io/cluster", "topology.kubernetes.io/region",
                                   "=x", " ", "a=b"]), max_size=3)),
    _opt(st.lists(st.builds(lambda f, t: {"from": f, "to": t}, _patterns,
                            st.dictionaries(_patterns, st.integers(-1, 101), max_size=3)), max_size=3)),
)


def _sections(**extra: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {}, optional={"connectTimeout": _durations, "outlierDetection": _outlier, "locality": _locality, **extra})


_retries = st.fixed_dictionaries({}, optional={
    "attempts": st.integers(-1, 11), "perTryTimeout": _durations,
    "retryOn": st.lists(st.sampled_from(["5xx", "503", "connect-failure", "reset", "", "x"]), max_size=3)})
_header = st.fixed_dictionaries({"name": st.sampled_from(["x-canary", "canary", ":path", "bad header", ""]),
                                 "value": st.sampled_from(["a", "^a.*", "(((", ""])},
                                optional={"type": st.sampled_from(["Exact", "RegularExpression", "Prefix"])})
_match = st.fixed_dictionaries({}, optional={
    "path": st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["Exact", "PathPrefix", "RegularExpression", "Nope"]), "value": _paths}),
    "headers": st.lists(_header, max_size=2),
    "queryParams": st.lists(_header, max_size=2),
    "method": st.sampled_from(["GET", "POST", "get", "FETCH"]),
})
_filter = st.fixed_dictionaries({"type": st.sampled_from(["RequestHeaderModifier", "URLRewrite", "Mirror"])}, optional={
    "requestHeaderModifier": st.fixed_dictionaries({}, optional={
        "set": st.lists(_header, max_size=2), "add": st.lists(_header, max_size=2),
        "remove": st.lists(st.sampled_from(["x-a", "bad header"]), max_size=2)}),
    "urlRewrite": st.fixed_dictionaries({}, optional={
        "hostname": st.sampled_from(["example.com", "*.example.com", "Bad_Host", "a."]),
        "path": st.fixed_dictionaries({"type": st.sampled_from(["ReplacePrefixMatch", "ReplaceFullPath"])},
                                      optional={"replacePrefixMatch": _paths, "replaceFullPath": _paths})}),
})
_backend = st.fixed_dictionaries({"name": _names, "port": _ports}, optional={
    "namespace": _names, "weight": st.integers(-1, 1_000_001),
    "clusters": st.lists(st.sampled_from(["c1", "cluster-1", "cluster-2", ""]), max_size=3),
    "labels": st.dictionaries(st.sampled_from(["version", "topology.istio.io/cluster"]),
                              st.sampled_from(["v1", "c1", ""]), max_size=2),
    "spread": st.sampled_from(["spread", "nearest", "far"]),
})
_route = st.fixed_dictionaries({
    "name": _names,
    "parentRefs": st.lists(st.fixed_dictionaries({"name": _names}, optional={
        "kind": st.sampled_from(["Gateway", "Service", "Mesh"]), "namespace": _names,
        "sectionName": st.sampled_from(["http", "https", "nope"]), "port": _ports}), max_size=2),
    "rules": st.lists(st.fixed_dictionaries({"backendRefs": st.lists(_backend, max_size=3)}, optional={
        "matches": st.lists(_match, max_size=2), "filters": st.lists(_filter, max_size=2),
        "timeouts": st.fixed_dictionaries({}, optional={"request": _durations}), "retries": _retries,
    }), max_size=2),
}, optional={"namespace": _names, "hostnames": st.lists(st.sampled_from(["example.com", "*.a.b", "A.com", "a..b"]),
                                                         max_size=2)})
_listener = st.fixed_dictionaries({"name": st.sampled_from(["http", "https", "Bad"]), "port": _ports}, optional={
    "protocol": st.sampled_from(["HTTP", "HTTPS", "TCP"]),
    "hostname": st.sampled_from(["example.com", "*.example.com", "example.com."]),
    "tls": st.fixed_dictionaries({"certificateFile": st.sampled_from(["certs/example.com.crt", "nope.crt", ".",
                                                                     "certs/example.com.key"]),
                                  "keyFile": st.sampled_from(["certs/example.com.key", "nope.key",
                                                              "certs/example.com.crt"])}),
})
_gateway = st.fixed_dictionaries({"name": _names, "listeners": st.lists(_listener, max_size=3)})

structured_policies = st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(["meshplane.io/v1", "meshplane.io/v2", "meshplane.io/v2"])},
    optional={
        "defaults": _sections(retries=_retries),
        "services": st.lists(st.one_of(
            _sections(name=_names, namespace=_names),
            st.builds(lambda s, n: {**s, "name": n}, _sections(namespace=_names), _names)), max_size=4),
        "gateways": st.lists(_gateway, max_size=2),
        "routes": st.lists(_route, max_size=3),
    },
)
free_policies = st.fixed_dictionaries({}, optional={
    "apiVersion": api_versions, "defaults": _tree(policy_keys), "services": _tree(policy_keys),
    "gateways": _tree(policy_keys), "routes": _tree(policy_keys), "locality": _tree(policy_keys),
    "failover": _tree(policy_keys), "outlierDetection": _tree(policy_keys),
}).flatmap(lambda d: st.dictionaries(policy_keys, _tree(policy_keys), max_size=2).map(lambda extra: {**extra, **d}))


def _graft(doc: Any, draw: Callable[[st.SearchStrategy[Any]], Any]) -> Any:
    """Replace a few subtrees of `doc` with generated ones (a wrong type, a raw YAML token)."""
    if isinstance(doc, dict) and doc:
        key = draw(st.sampled_from(sorted(doc, key=str)))
        if draw(st.booleans()):
            return {**doc, key: draw(_tree(policy_keys))}
        return {**doc, key: _graft(doc[key], draw)}
    if isinstance(doc, list) and doc:
        i = draw(st.integers(0, len(doc) - 1))
        return [*doc[:i], _graft(doc[i], draw), *doc[i + 1:]]
    return draw(_tree(policy_keys))


@st.composite
def generated_policy_texts(draw: st.DrawFn) -> str:
    doc = draw(st.one_of(structured_policies, free_policies, _tree(policy_keys)))
    if isinstance(doc, dict | list) and draw(st.integers(0, 3)) == 0:
        doc = _graft(doc, draw)
    raws: list[str] = []

    def placeholders(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.token)
            return f"RAWTOKEN{len(raws) - 1}Z"
        if isinstance(value, dict):
            return {k: placeholders(v) for k, v in value.items()}
        if isinstance(value, list):
            return [placeholders(v) for v in value]
        return value

    text = yaml.safe_dump(
        placeholders(doc),
        default_flow_style=draw(st.sampled_from([False, True, None])),
        allow_unicode=draw(st.booleans()),
        sort_keys=draw(st.booleans()),
        indent=draw(st.integers(2, 6)),
        width=draw(st.sampled_from([80, 20, 10_000])),
        explicit_start=draw(st.booleans()),
    )
    for i in reversed(range(len(raws))):  # RAWTOKEN1Z before RAWTOKEN10Z would be wrong the other way round
        text = text.replace(f"RAWTOKEN{i}Z", raws[i])
    return text


# Line mutations of a valid policy.
_KEY_VALUE = re.compile(r"^(\s*(?:- )?[^:#\n]+:)[ \t]*([^\n]*)(\n?)$")


def _yaml_value(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(yaml_tokens)
    if kind == 1:  # a flow list or map of tokens
        items = draw(st.lists(yaml_tokens, max_size=4))
        if draw(st.booleans()):
            return "[" + ", ".join(items) + "]"
        keys = draw(st.lists(policy_keys, min_size=len(items), max_size=len(items)))
        return "{" + ", ".join(f"{k}: {v}" for k, v in zip(keys, items, strict=True)) + "}"
    if kind == 2:  # a block mapping or list under the key
        indent = " " * draw(st.integers(0, 8))
        entries = draw(st.lists(st.tuples(policy_keys, yaml_tokens), min_size=1, max_size=3))
        dash = "- " if draw(st.booleans()) else ""
        return "\n" + "".join(f"{indent}{dash}{k}: {v}\n" for k, v in entries).rstrip("\n")
    return json.dumps(draw(_tree(policy_keys)), default=str)  # JSON is YAML flow (mostly)


@st.composite
def mutated_policy_texts(draw: st.DrawFn) -> str:
    lines = draw(st.sampled_from(SEEDS)).splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["delete", "duplicate", "replace", "swap_value", "swap_value", "indent",
                                   "unicode", "truncate", "move", "insert"]))
        if not lines:
            lines = [""]
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, line)
        elif op == "replace":
            lines[i] = " " * draw(st.integers(0, 10)) + draw(policy_keys) + ": " + draw(yaml_tokens) + "\n"
        elif op == "insert":
            lines.insert(i, " " * draw(st.integers(0, 10)) + draw(policy_keys) + ":" +
                         draw(st.sampled_from(["", " "])) + draw(st.sampled_from(["", _yaml_value(draw)])) + "\n")
        elif op == "swap_value":
            match = _KEY_VALUE.match(line)
            if match:
                lines[i] = f"{match.group(1)} {_yaml_value(draw)}{match.group(3) or ''}"
        elif op == "indent":
            stripped = line.lstrip(" ")
            lines[i] = draw(st.sampled_from(["", " ", "  ", "\t", "   ", " " * 12])) + stripped
        elif op == "unicode":
            at = draw(st.integers(0, len(line)))
            lines[i] = line[:at] + draw(st.text(min_size=1, max_size=5)) + line[at:]
        elif op == "truncate":
            text = "".join(lines)
            cut = draw(st.integers(0, len(text)))
            lines = text[:cut].splitlines(keepends=True)
        elif op == "move":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "".join(lines)


# Bugs found by these properties (and by probing the code paths they aim at), each fixed in issue 11:
# each raised out of the loader instead of becoming a Problem.
_READER = "yamlpos.load: yaml.SafeLoader(text) runs outside the try; its ReaderError is no MarkedYAMLError"
_CONSTRUCTOR = ("yamlpos._Builder.build: PyYAML's scalar constructors raise ValueError, KeyError, IndexError or "
                "AttributeError, not MarkedYAMLError, on values the resolver matched (dates, tagged scalars)")
_INT_REPR = "problems.show / _range_reason: repr() of an int over 4300 decimal digits raises ValueError"
_REGEX = "routecheck.check_regex: re2 raises UnicodeEncodeError on a lone surrogate (not re2.error)"
_PEM = "routecheck._read: Path.read_bytes raises ValueError on a NUL in the path (not OSError)"

# The minimal input of each (id, text, bug), to check each fix on its own.
CRASHERS = {
    "non-printable character": ("\x00", _READER),
    "non-printable character in a value": ("apiVersion: meshplane.io/v1\ndefaults:\n  connectTimeout: 1s\x7f\n",
                                           _READER),
    "timestamp out of range": ("a: 2001-02-30\n", _CONSTRUCTOR),
    "year 0": ("a: 0000-01-01\n", _CONSTRUCTOR),
    "timezone offset over 24h": ("a: 2001-01-01 00:00:00 +99\n", _CONSTRUCTOR),
    "!!bool without a value": ("a: !!bool\n", _CONSTRUCTOR),
    "!!float without a value": ("a: !!float\n", _CONSTRUCTOR),
    "!!int without digits": ("a: !!int 0x\n", _CONSTRUCTOR),
    "!!float not a number": ("a: !!float abc\n", _CONSTRUCTOR),
    "!!timestamp not a date": ("a: !!timestamp x\n", _CONSTRUCTOR),
    "decimal int over 4300 digits": ("a: " + "1" * 4301 + "\n", _CONSTRUCTOR),
    "huge hex int in a wrong field": ("apiVersion: 0x" + "f" * 3600 + "\n", _INT_REPR),
    "lone surrogate in a regex": (
        "apiVersion: meshplane.io/v2\ngateways:\n- name: edge\n  listeners:\n  - {name: http, port: 80}\n"
        "routes:\n- name: r\n  parentRefs: [{name: edge}]\n  rules:\n  - matches: [{path: {type: RegularExpression,"
        ' value: "\\ud800"}}]\n    backendRefs: [{name: a, port: 80}]\n', _REGEX),
    "NUL in a certificate path": (
        "apiVersion: meshplane.io/v2\ngateways:\n- name: edge\n  listeners:\n  - name: https\n    port: 443\n"
        '    protocol: HTTPS\n    tls: {certificateFile: "a\\0", keyFile: k.pem}\n', _PEM),
}

@pytest.mark.parametrize("text", [
    pytest.param(text, id=name) for name, (text, _bug) in CRASHERS.items()
])
def test_policy_loader_known_crashers(text: str, policy_dir: Path) -> None:
    """The minimal failing inputs the properties below found, one per bug, to check each fix on its own."""
    path = _policy_path(policy_dir)
    check_result(validate.load_policy_text(text, path=path), text, path)


@given(text=mutated_policy_texts())
@example(text=CRASHERS["non-printable character in a value"][0])  # what it found, checked every run
@example(text=CRASHERS["timestamp out of range"][0])
def test_policy_loader_on_mutated_policies(text: str, policy_dir: Path) -> None:
    path = _policy_path(policy_dir)
    check_result(validate.load_policy_text(text, path=path), text, path)


@given(text=generated_policy_texts())
@example(text=CRASHERS["huge hex int in a wrong field"][0])
@example(text=CRASHERS["!!float not a number"][0])
def test_policy_loader_on_generated_documents(text: str, policy_dir: Path) -> None:
    path = _policy_path(policy_dir)
    check_result(validate.load_policy_text(text, path=path), text, path)


@given(data=st.one_of(mutated_policy_texts().map(lambda t: t.encode("utf-8", "surrogatepass")),
                      st.binary(max_size=200),
                      st.tuples(mutated_policy_texts(), st.binary(min_size=1, max_size=8), st.integers(0, 10_000))
                      .map(lambda t: t[0].encode()[:t[2]] + t[1] + t[0].encode()[t[2]:])))
@example(data=b"\xef\xbb\xbfapiVersion: meshplane.io/v1\n\x01")
def test_policy_loader_on_bytes(data: bytes, policy_dir: Path) -> None:
    """What `load_policy_file` reads: bytes, maybe not UTF-8 (the error then names the line of the bad byte)."""
    path = _policy_path(policy_dir)
    result = validate.load_policy_bytes(data, path=path)
    text = data.decode("utf-8-sig", errors="replace")
    check_result(result, text, path)


@given(doc=structured_policies)
def test_policy_loader_on_near_valid_documents(doc: dict[str, Any], policy_dir: Path) -> None:
    """Documents of the right shape (mostly), dumped as YAML: the second pass's rules run on them."""
    text = yaml.safe_dump(doc, sort_keys=False)
    path = _policy_path(policy_dir)
    check_result(validate.load_policy_text(text, path=path), text, path)


# --- 2. node classification -----------------------------------------------------------------------

NODE_KEYS = ["role", "gateway", "namespace", "listener_address", "listener_port", "labels"]

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-(2**53), 2**53), st.text(max_size=20),
              st.text(min_size=300, max_size=2000).filter(bool)),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=10), kids, max_size=4)),
    max_leaves=20,
)
_texts = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "default", "sidecar", "gateway", "edge"]))
_node_values: dict[str, st.SearchStrategy[Any]] = {
    "role": st.one_of(st.sampled_from(["sidecar", "gateway", "Sidecar", "router", ""]), json_values),
    "gateway": st.one_of(st.sampled_from(["edge", "Edge", "", "-a", "a" * 64]), json_values),
    "namespace": st.one_of(st.sampled_from(["default", "prod", "Prod", "", "a" * 63, "a" * 64, "a-"]), json_values),
    "listener_address": st.one_of(st.ip_addresses().map(str), st.sampled_from(["0.0.0.0", "::", "localhost",
                                                                               "1.2.3.4:5", "fe80::1%eth0", ""]),
                                  json_values),
    "listener_port": st.one_of(
        st.integers(-70000, 70000), st.floats(), st.integers(0, 10**20).map(str), json_values,
        st.sampled_from(["15001", "0", "65536", "\u0661\u0662", "\uff11", " 1", "1.0", "-1", "1e3", ""]),
    ),
    "labels": st.one_of(st.dictionaries(st.text(max_size=10), st.one_of(st.text(max_size=10), json_values),
                                        max_size=4), json_values),
}
node_metadata = st.one_of(
    st.none(),
    st.fixed_dictionaries({}, optional=_node_values).flatmap(
        lambda known: st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(
            lambda other: {**other, **known})),
    st.dictionaries(st.text(max_size=10), json_values, max_size=4),
)


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


@st.composite
def nodes(draw: st.DrawFn) -> base_pb2.Node:
    node = base_pb2.Node(
        id=draw(st.one_of(st.just(""), st.sampled_from(["sidecar-1", "gw-1"]), st.text(max_size=40))),
        cluster=draw(st.text(max_size=10)),
        locality=base_pb2.Locality(region=draw(_texts), zone=draw(_texts), sub_zone=draw(_texts)),
    )
    metadata = draw(node_metadata)
    if metadata is not None:
        node.metadata.CopyFrom(_struct(metadata))
    return node


def _check_classified(node: base_pb2.Node) -> None:
    try:
        classified = proxy.classify(node)
    except proxy.InvalidNode as exc:
        assert exc.field.startswith("node."), exc.field
        assert str(exc).startswith(f"{exc.field}: "), str(exc)
        part = exc.field.removeprefix("node.")
        if part != "id":
            assert part.startswith("metadata."), exc.field
            assert part.removeprefix("metadata.").split(".", 1)[0] in NODE_KEYS, exc.field
        return
    assert isinstance(classified, proxy.Proxy)
    assert classified.id == node.id and classified.id
    assert classified.kind in set(proxy.Kind)
    assert 1 <= classified.listener.port <= 65535
    ipaddress.ip_address(classified.listener.address)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", classified.namespace)
    assert classified.gateway if classified.kind == proxy.Kind.GATEWAY else not classified.gateway
    assert list(classified.labels) == sorted(classified.labels)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in classified.labels)
    str(classified.view_key(frozenset(k for k, _ in classified.labels)))


@given(node=nodes())
@example(node=base_pb2.Node(id="n", metadata=_struct({"listener_port": math.nan})))
@example(node=base_pb2.Node(id="n", metadata=_struct({"listener_port": 1e300, "labels": {"a": None}})))
@example(node=base_pb2.Node(id="n", metadata=_struct({"role": "gateway"})))
def test_classify_returns_a_proxy_or_names_the_field(node: base_pb2.Node) -> None:
    _check_classified(node)


@given(node=nodes())
def test_classify_after_the_wire(node: base_pb2.Node) -> None:
    """As the server sees it: the node encoded and decoded again (what a client sends)."""
    _check_classified(base_pb2.Node.FromString(node.SerializeToString()))


# --- 3. the ADS servers on the wire ---------------------------------------------------------------

SOTW_METHOD = f"/{adsbase.SERVICE}/StreamAggregatedResources"
DELTA_METHOD = f"/{adsbase.SERVICE}/DeltaAggregatedResources"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
LIMITS = adsbase.Limits(names=40, node_bytes=4096, request_bytes=64 * 1024)  # low: their refusals get fuzzed too

type_urls = st.one_of(
    st.sampled_from(typeurls.PUSH_ORDER),
    st.sampled_from(typeurls.PUSH_ORDER),
    st.sampled_from(["", "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                     "type.googleapis.com/envoy.config.route.v3.VirtualHost",
                     "type.googleapis.com/envoy.config.cluster.v3.Cluster ", typeurls.CLUSTER.upper()]),
    st.text(max_size=40),
)
_resource_name = st.one_of(st.sampled_from(["*", MOCKB, MOCKC, "", "outbound|8000||nope.default.svc.cluster.local",
                                            "15001", f"{GATEWAY_PORT}", "http.18080"]),
                           st.text(max_size=20))
resource_names = st.one_of(
    st.lists(_resource_name, max_size=6),
    st.lists(_resource_name, min_size=LIMITS.names - 5, max_size=LIMITS.names + 10),  # about --max-names
)
nonces = st.one_of(st.just(""), st.just(""), st.sampled_from(["1", "2", "3", "0", "-1"]), st.text(max_size=10))
error_details = st.one_of(st.none(), st.builds(
    lambda code, message, details: status_pb2.Status(code=code, message=message, details=details),
    st.integers(-(2**31), 2**31 - 1), st.text(max_size=200),
    st.lists(st.builds(lambda u, v: any_pb2.Any(type_url=u, value=v), st.text(max_size=30), st.binary(max_size=30)),
             max_size=2),
))


@st.composite
def request_nodes(draw: st.DrawFn) -> base_pb2.Node | None:
    choice = draw(st.integers(0, 7))
    if choice == 7:
        return None
    if choice <= 3:  # served: the rest of the request gets looked at
        metadata = draw(st.sampled_from([None, {"role": "gateway", "gateway": "edge"},
                                         {"namespace": "default", "labels": {"version": "v1"}},
                                         {"listener_port": 15002}]))
        return ads_client.node(draw(st.sampled_from(["fuzz-1", "fuzz-2"])), region="r1", zone="z1", cluster="c1",
                               metadata=metadata)
    node = draw(nodes())
    if draw(st.integers(0, 9)) == 0:  # nested deeper than protobuf decodes, or than limits allow
        depth = draw(st.integers(1, 120))
        value: Any = "x"
        for _ in range(depth):
            value = {"k": value}
        node.metadata.update({"deep": value})
    if draw(st.integers(0, 9)) == 0:  # about --max-node-bytes
        node.metadata.update({"labels": {"big": "v" * draw(st.integers(LIMITS.node_bytes - 100, LIMITS.node_bytes))}})
    return node


later_nodes = st.one_of(st.none(), st.none(), request_nodes())  # a client sends its node once


@st.composite
def sotw_requests(draw: st.DrawFn, nodes: st.SearchStrategy[base_pb2.Node | None] = later_nodes) -> bytes:
    req = discovery_pb2.DiscoveryRequest(
        version_info=draw(st.text(max_size=20)), resource_names=draw(resource_names), type_url=draw(type_urls),
        response_nonce=draw(nonces),
    )
    return _with_node_and_error(draw, req, nodes)


@st.composite
def delta_requests(draw: st.DrawFn, nodes: st.SearchStrategy[base_pb2.Node | None] = later_nodes) -> bytes:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=draw(type_urls), resource_names_subscribe=draw(resource_names),
        resource_names_unsubscribe=draw(resource_names), response_nonce=draw(nonces),
    )
    req.initial_resource_versions.update(draw(st.dictionaries(st.text(max_size=20), st.text(max_size=10),
                                                              max_size=4)))
    return _with_node_and_error(draw, req, nodes)


def _with_node_and_error(
    draw: st.DrawFn, req: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
    nodes: st.SearchStrategy[base_pb2.Node | None],
) -> bytes:
    """The request serialised, perhaps with a node and an error_detail drawn for it."""
    node = draw(nodes)
    if node is not None:
        req.node.CopyFrom(node)
    error = draw(error_details)
    if error is not None:
        req.error_detail.CopyFrom(error)
    return req.SerializeToString()


@st.composite
def mutated_bytes(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "append"]))
        at = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def _odd_payloads(own: st.SearchStrategy[bytes], other: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        other,  # the other protocol's request: its fields mean other things here
        mutated_bytes(own),
        st.binary(max_size=300),
        st.builds(lambda unit, n: unit * n, st.binary(min_size=1, max_size=4),  # over --max-request-bytes
                  st.integers(LIMITS.request_bytes, LIMITS.request_bytes + 16)),
    )


@st.composite
def ads_streams(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    """A method and what one stream sends it: requests with generated fields, and (in a third of the
    streams, anywhere among them) one message of something else, which ends the stream."""
    method = draw(st.sampled_from([SOTW_METHOD, DELTA_METHOD]))
    requests = sotw_requests if method == SOTW_METHOD else delta_requests
    own = requests()
    other = (delta_requests if method == SOTW_METHOD else sotw_requests)(request_nodes())
    messages = [draw(requests(request_nodes())), *draw(st.lists(own, max_size=3))]
    if draw(st.integers(0, 2)) == 0:
        messages.insert(draw(st.integers(0, len(messages))), draw(_odd_payloads(own, other)))
    return method, messages


CALL_TIMEOUT = 5.0
"""A fuzzed stream's deadline: the server answers in milliseconds; a stream still open after this hangs."""


class LostStatus(AssertionError):
    """A stream that ended with a status it must not (UNKNOWN, INTERNAL), or never ended."""


def _exchange(channel: grpc.Channel, method: str, messages: list[bytes]) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send `messages` on a new stream, half-close, read everything: the status, its details and the responses."""
    call = channel.stream_stream(method)  # no (de)serialisers: bytes in, bytes out
    got: list[bytes] = []
    try:
        for response in call(iter(messages), timeout=CALL_TIMEOUT):
            got.append(response)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", got
    return grpc.StatusCode.OK, "", got


async def _exchange_in_loop(
    target: str, method: str, messages: list[bytes]
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """`_exchange` with grpc.aio on the server's own event loop: the client's writes and the server's
    reads and writes interleave one way every time, so a race between them shows every time."""
    got: list[bytes] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(method)()

        async def talk() -> None:
            for message in messages:
                await call.write(message)
            await call.done_writing()
            async for response in call:
                got.append(response)

        try:
            await asyncio.wait_for(talk(), CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", got
        except TimeoutError:
            call.cancel()
            return grpc.StatusCode.DEADLINE_EXCEEDED, "no status within the deadline", got
    return grpc.StatusCode.OK, "", got


def _check_stream(method: str, code: grpc.StatusCode, details: str, responses: list[bytes]) -> None:
    """The property, for one stream."""
    if code not in ALLOWED:
        raise LostStatus(f"{method} ended with {code.name} ({details!r}) after {len(responses)} responses")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details.strip(), "a refusal says why"
    kind = discovery_pb2.DiscoveryResponse if method == SOTW_METHOD else discovery_pb2.DeltaDiscoveryResponse
    for raw in responses:
        response = kind.FromString(raw)
        assert response.type_url in typeurls.PUSH_ORDER, response.type_url
        assert response.nonce


def _first_request(type_url: str) -> bytes:
    request = discovery_pb2.DiscoveryRequest(type_url=type_url)
    request.node.CopyFrom(ads_client.node("fuzz-1", region="r1", zone="z1", cluster="c1"))
    return request.SerializeToString()


# Found by this property: a request the server refuses, read while the stream's first response is
# being written, ends the stream on the server, but its status never reaches the client (it hangs).
LOST_STATUS = (SOTW_METHOD, [_first_request(typeurls.CLUSTER), b"\xd1\xa8"])
KNOWN_FAILURES = [LOST_STATUS]


def _fuzz_in_thread(target: str, stop: threading.Event) -> int:
    """Run the @given loop (sync gRPC, in this thread; the server runs on the test's event loop)."""
    count = 0
    with grpc.insecure_channel(target) as channel:
        @given(stream=ads_streams())
        @example(stream=LOST_STATUS)  # once fixed, it stays checked here
        def fuzz(stream: tuple[str, list[bytes]]) -> None:
            nonlocal count
            if stop.is_set():
                return
            method, messages = stream
            _check_stream(method, *_exchange(channel, method, messages))
            count += 1

        fuzz()
    return count


# LOST_STATUS was: a refused request read while the stream's first response is being written lost its
# status: the reader's context.abort() raced the writer's first context.write() (both send initial
# metadata: grpc_call_start_batch fails with GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), so the client never
# got INVALID_ARGUMENT and its stream hung. Fixed in adsbase: the reader returns the refusal and
# StreamServer._serve aborts once the writer has stopped (only the writer sends).


async def test_ads_servers_survive_generated_requests(start_plane: Any, tmp_path: Path) -> None:
    endpoints = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"mockb": [{"zone": "z1", "port": 9001}],
                                                                        "mockc": [{"zone": "z1", "port": 9002}]}))
    policy = tmp_path / "policy.yaml"
    policy.write_text(topology.demo_policy(gateway_port=GATEWAY_PORT))
    plane: app.ControlPlane = await start_plane(endpoint_files=(endpoints,), policy_file=policy, limits=LIMITS)
    target = f"127.0.0.1:{plane.ads_port}"
    node = ads_client.node("steady", region="r1", zone="z1", cluster="c1")
    # Well-behaved streams opened before the fuzzing: they must still get pushes after it.
    async with ads_client.AdsClient(target, node) as sotw, ads_client.DeltaClient(target, node) as delta:
        await sotw.request(typeurls.ENDPOINT, [MOCKB])
        first = await sotw.recv()
        await sotw.ack(first)
        await delta.delta(typeurls.ENDPOINT, [MOCKB])
        first_delta = await delta.recv_delta()
        await delta.ack_delta(first_delta)

        # What the property found before, replayed where it failed every time while the bug stood; then
        # (as hypothesis does when an @example fails) no generated examples, which would hit it only at times.
        lost: LostStatus | None = None
        for method, messages in KNOWN_FAILURES:
            try:
                _check_stream(method, *await _exchange_in_loop(target, method, messages))
            except LostStatus as exc:
                lost = exc
        if lost is None:
            stop = threading.Event()
            try:
                fuzzed = await asyncio.to_thread(_fuzz_in_thread, target, stop)
            except LostStatus as exc:
                lost = exc  # raised at the end: first, check the server still serves
            else:
                assert fuzzed, "no stream was fuzzed"
            finally:
                stop.set()

        # No stream of the fuzzing is left open on the server: only the two steady ones.
        await wait_for(lambda: len(plane.streams) == 2, what="the fuzzed streams closed on the server")
        write_yaml(endpoints, cluster_doc("c1", "r1", {"mockb": [{"zone": "z1", "port": 9001, "health": "unhealthy"}],
                                                       "mockc": [{"zone": "z1", "port": 9002}]}))
        pushed = await sotw.recv()
        assert ads_client.resource_names(pushed) == [MOCKB]
        assert pushed.version_info != first.version_info
        pushed_delta = await delta.recv_delta()
        assert [r.name for r in pushed_delta.resources] == [MOCKB]

    async with ads_client.AdsClient(target, ads_client.node("after", region="r1", zone="z1", cluster="c1")) as late:
        await late.request(typeurls.CLUSTER)
        clusters = await late.recv()
        assert MOCKB in ads_client.resource_names(clusters) and MOCKC in ads_client.resource_names(clusters)
    if lost is not None:
        raise lost
