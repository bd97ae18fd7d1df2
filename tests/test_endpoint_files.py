"""Endpoint files as an operator meets them: the JSON Schema agreeing with `meshplane validate --endpoints`,
one file per cluster (at start and on an edit), and a broken edit never reaching a real Envoy."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshplane.demo import envoy
from meshplane.discovery import fileparse, fileschema, model
from tests.conftest import cluster_doc, wait_for, write_yaml
from tests.test_filesource import CASES

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "docs" / "endpoints.schema.json"


def _meshplane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshplane", *args], capture_output=True, text=True, timeout=60)


# --- the JSON Schema --------------------------------------------------------------------------------------


def _schema() -> jsonschema.Draft202012Validator:
    """The published schema, as an editor's YAML language server applies it."""
    return jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))


def _schema_errors(text: str) -> list[str]:
    return [e.message for e in _schema().iter_errors(yaml.safe_load(text))]


def test_committed_schema_is_current_and_a_schema() -> None:
    expected = fileschema.json_schema()
    assert json.loads(SCHEMA.read_text()) == expected, f"{SCHEMA} is stale: regenerate it (see fileschema.py)"
    jsonschema.Draft202012Validator.check_schema(expected)


def _examples() -> list[tuple[str, str]]:
    """Every endpoint file the docs and deploy/examples show."""
    found = [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
             if yaml.safe_load(p.read_text()).keys() >= {"cluster", "region"}]
    for doc in ("serving.md", "grpc.md", "operating.md", "deploying.md"):
        text = (ROOT / "docs" / doc).read_text()
        found += [(f"docs/{doc}", body) for body in re.findall(r"^```yaml\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
                  if re.match(r"(#.*\n)*cluster:", body)]
    return found


def test_every_example_is_valid_to_the_schema_and_the_validator() -> None:
    examples = _examples()
    assert len(examples) >= 4 and any(where.startswith("docs/serving.md") for where, _ in examples)
    for where, text in examples:
        assert _schema_errors(text) == [], where
        fileparse.parse(text, path=where)  # raises, naming every problem, if not


# What the schema cannot say alone: values related to each other, and YAML itself (a key twice, broken text).
RELATED = {"port-of-several", "ports-name", "ports-name-far", "port-name-twice", "port-number-twice", "endpoint-twice",
           "ipv6-twice-written-apart", "service-twice", "key-twice", "yaml-one-line", "control-character"}


@pytest.mark.parametrize(("text", "expected"), [case for case in CASES if case.id not in RELATED])
def test_the_schema_refuses_what_the_validator_refuses(text: str, expected: str) -> None:
    assert _schema_errors(text) != [], f"the schema accepts what validate refuses: {expected}"


def test_what_only_the_validator_refuses_is_accepted_by_the_schema() -> None:
    """RELATED is exactly what the schema lets through (were one caught, it belongs above)."""
    ids = {case.id for case in CASES}
    assert ids >= RELATED
    for case in CASES:
        if case.id in RELATED - {"control-character", "yaml-one-line"}:  # not even YAML to a YAML library
            assert _schema_errors(case.values[0]) == [], case.id


# Written by hand as an editor would check them (the text forms of one address vary).
@settings(max_examples=300, deadline=None, database=None)
@given(address=st.one_of(st.ip_addresses().map(str), st.ip_addresses(v=6).map(lambda a: a.exploded),
                         st.ip_addresses(v=6).map(lambda a: str(a).upper()),
                         st.ip_addresses(v=6).map(lambda a: f"{str(a).rsplit(':', 2)[0]}:1.2.3.4"),
                         st.text("0123456789abcdefABCDEF:.%", max_size=20)))
def test_the_schema_and_the_validator_agree_on_addresses(address: str) -> None:
    text = f"cluster: c1\nregion: r1\nservices:\n- name: web\n  ports: [{{name: http, port: 80}}]\n  endpoints:\n" \
           f"  - {{address: '{address}', zone: z1}}\n"
    try:
        fileparse.parse(text, path="c1.yaml")
        valid = True
    except fileparse.EndpointFileError:
        valid = False
    assert (_schema_errors(text) == []) is valid, (address, _schema_errors(text))
    if valid:
        ipaddress.ip_address(address)


# --- one file per cluster -----------------------------------------------------------------------------------


def _doc(cluster: str, port: int = 9001) -> dict[str, Any]:
    return cluster_doc(cluster, "r1", {f"svc-{cluster}": [{"zone": "z1", "port": port}]})


async def test_two_files_of_one_cluster_are_refused_at_start_naming_both(start_plane: Any, tmp_path: Path) -> None:
    first = write_yaml(tmp_path / "a.yaml", _doc("c1"))
    second = write_yaml(tmp_path / "b.yaml", _doc("c1", 9002))
    with pytest.raises(fileparse.EndpointFileError) as error:
        await start_plane(endpoint_files=(first, second))
    assert str(error.value) == (f"{second}:1: cluster: 'c1' is already the cluster of {first}: each cluster has one "
                                "endpoint file (a second would replace the first's services)")

    result = _meshplane("serve", "--endpoints", str(first), "--endpoints", str(second),
                        "--ads", "127.0.0.1:0", "--http", "127.0.0.1:0")
    assert result.returncode == 1
    assert result.stderr.endswith(f"\nmeshplane: {error.value}\n"), result.stderr  # after a's "loaded" line


async def test_an_edit_claiming_another_files_cluster_is_rejected_and_the_last_good_kept(
    start_plane: Any, tmp_path: Path
) -> None:
    a = write_yaml(tmp_path / "a.yaml", _doc("c1"))
    b = write_yaml(tmp_path / "b.yaml", _doc("c2"))
    plane = await start_plane(endpoint_files=(a, b))
    catalog = plane.catalog
    write_yaml(b, _doc("c1", 9002))  # b now says it is c1, which a feeds
    await wait_for(lambda: catalog.status()[model.ClusterId("c2")].stale, what="the edit rejected")
    assert catalog.status()[model.ClusterId("c2")].error == (
        f"{b}:1: cluster: 'c1' is already the cluster of {a}: each cluster has one endpoint file (a second would "
        "replace the first's services)")
    assert sorted(catalog.services) == ["default/svc-c1", "default/svc-c2"]  # both kept as they were
    assert catalog.services[model.ServiceKey("default/svc-c1")].clusters == ("c1",)
    assert not catalog.status()[model.ClusterId("c1")].stale

    write_yaml(a, _doc("c9"))  # a moves away: c1 is free
    await wait_for(lambda: "default/svc-c9" in catalog.services, what="a's move")
    write_yaml(b, _doc("c1", 9003))
    await wait_for(lambda: "default/svc-c1" in catalog.services and model.ClusterId("c2") not in catalog.status(),
                   what="b taking the free cluster")
    assert sorted(catalog.services) == ["default/svc-c1", "default/svc-c9"]
    assert [ep.port_for("http") for ep in catalog.services[model.ServiceKey("default/svc-c1")].endpoints] == [9003]


# --- `meshplane validate --endpoints` --------------------------------------------------------------------------


def test_validate_endpoints_alone_prints_every_problem_and_exits_1(tmp_path: Path) -> None:
    broken = tmp_path / "c1.yaml"
    broken.write_text("cluster: c1\nregion: r1\nservices:\n- name: web\n  ports: [{name: http, port: 8000}]\n"
                      "  endpoints:\n  - {address: 10.0.0.300, zone: z1}\n  - {address: 10.0.0.2, zon: z1}\n")
    good = write_yaml(tmp_path / "c2.yaml", _doc("c2"))
    result = _meshplane("validate", "--endpoints", str(broken), "--endpoints", str(good))
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [
        f"{broken}:7: services[0].endpoints[0].address: '10.0.0.300' is not an IPv4 or IPv6 address",
        f"{broken}:8: services[0].endpoints[1].zon: unknown field 'zon'; did you mean 'zone'?",
        f"{broken}:8: services[0].endpoints[1].zone: required field 'zone' is missing (the endpoint's zone: failover "
        "goes to the nearest zone first)",
        f"{broken}: 3 error(s); endpoint file rejected",
    ]
    assert result.stdout == f"{good}: ok\n"


def test_validate_names_a_file_it_cannot_read_and_checks_the_others(tmp_path: Path) -> None:
    missing, good = tmp_path / "nosuch.yaml", write_yaml(tmp_path / "c2.yaml", _doc("c2"))
    result = _meshplane("validate", "-e", str(missing), "-e", str(good))
    assert (result.returncode, result.stdout) == (1, f"{good}: ok\n")
    assert result.stderr == f"meshplane validate: --endpoints {missing}: cannot read it: No such file or directory\n"


def test_validate_endpoints_ok_with_and_without_a_policy(tmp_path: Path) -> None:
    one, two = write_yaml(tmp_path / "c1.yaml", _doc("c1")), write_yaml(tmp_path / "c2.yaml", _doc("c2"))
    result = _meshplane("validate", "-e", str(one), "-e", str(two))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{one}: ok\n{two}: ok\n", "")
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: meshplane.io/v1\nservices:\n- name: svc-c1\n  connectTimeout: 1s\n")
    result = _meshplane("validate", str(policy), "-e", str(one))
    assert (result.returncode, result.stdout) == (0, f"{one}: ok\n{policy}: ok\n"), result.stderr


def test_validate_refuses_two_files_of_one_cluster_and_needs_something_to_check(tmp_path: Path) -> None:
    one, two = write_yaml(tmp_path / "a.yaml", _doc("c1")), write_yaml(tmp_path / "b.yaml", _doc("c1"))
    result = _meshplane("validate", "-e", str(one), "-e", str(two))
    assert result.returncode == 1
    assert f"{two}:1: cluster: 'c1' is already the cluster of {one}" in result.stderr, result.stderr
    nothing = _meshplane("validate")
    assert nothing.returncode == 2
    assert "give a POLICY_FILE, --endpoints FILE, or both" in nothing.stderr


def test_the_validate_example_in_the_docs_is_what_validate_prints(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "serving.md").read_text()
    listing, shown = re.search(r"Given this \(broken\) `cluster-2.yaml`:\n\n```text\n(.*?)```\n\n```text\n"
                               r"\$ meshplane validate --endpoints cluster-2.yaml\n(.*?)```", text, re.DOTALL).groups()
    lines = [re.sub(r"^ ?\d+  ", "", line) for line in listing.splitlines()]
    (tmp_path / "cluster-2.yaml").write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "meshplane", "validate", "--endpoints", "cluster-2.yaml"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == shown
    # ... and the YAML error it quotes, for line 14 written as it says
    edit, message = re.search(r"with line 14 above written\n`(.*?)`, `(.*?)`\.", text, re.DOTALL).groups()
    lines[13] = lines[13][:lines[13].index("port")] + edit
    (tmp_path / "cluster-2.yaml").write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "meshplane", "validate", "--endpoints", "cluster-2.yaml"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.stderr.splitlines()[0] == " ".join(message.split())


# --- a broken edit never reaches a real Envoy -----------------------------------------------------------------


def test_serve_refuses_a_malformed_address_before_serving(tmp_path: Path) -> None:
    broken = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009,
                                                                                "address": "10.0.0.300"}]}))
    result = _meshplane("serve", "--endpoints", str(broken), "--ads", "127.0.0.1:0", "--http", "127.0.0.1:0")
    assert result.returncode == 1
    line = _line_of(broken, "- address: 10.0.0.300")
    assert result.stderr == (f"meshplane: {broken}:{line}: services[0].endpoints[0].address: '10.0.0.300' is not an "
                             "IPv4 or IPv6 address\n")


def _line_of(path: Path, text: str) -> int:
    return [line.strip() for line in path.read_text().splitlines()].index(text) + 1


def _eds_ports(dump: dict[str, Any]) -> list[int]:
    eds = next(c for c in dump["configs"] if c["@type"].endswith(".EndpointsConfigDump"))
    groups = [g for c in eds.get("dynamic_endpoint_configs", []) for g in c["endpoint_config"].get("endpoints", [])]
    return sorted(lb["endpoint"]["address"]["socket_address"]["port_value"]
                  for group in groups for lb in group.get("lb_endpoints", []))


@pytest.mark.envoy
async def test_an_edit_with_a_bad_address_is_rejected_and_envoy_keeps_the_last_good(
    start_plane: Any, tmp_path: Path
) -> None:
    path = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9001}]}))
    plane = await start_plane(endpoint_files=(path,))
    node = envoy.EnvoyNode(id="sidecar-1", cluster="test", region="r1", zone="z1", sub_zone="c1")
    async with envoy.EnvoyProcess(node=node, ads_port=plane.ads_port, workdir=tmp_path) as proxy:
        async def ports() -> list[int]:
            return _eds_ports(await proxy.config_dump())

        await proxy.wait_for(lambda: _has(ports, [9001]), what="the first endpoint")
        write_yaml(path, cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9001},
                                                          {"zone": "z1", "port": 9002, "address": "10.0.0.300"}]}))
        status = plane.catalog.status()[model.ClusterId("c1")]
        await wait_for(lambda: status.stale, what="the edit rejected")
        line = _line_of(path, "- address: 10.0.0.300")
        assert status.error == f"{path}:{line}: services[0].endpoints[1].address: '10.0.0.300' is not an IPv4 or " \
            "IPv6 address"
        assert await ports() == [9001]  # the last good
        # A good edit after it is pushed and ACKed: had the bad one been sent, Envoy would have NACKed it first.
        write_yaml(path, cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9001}, {"zone": "z1", "port": 9003}]}))
        await proxy.wait_for(lambda: _has(ports, [9001, 9003]), what="the next good edit")
        stats = await proxy.stats(filter=r"update_rejected$")
        assert stats and all(value == 0 for value in stats.values()), stats
        nacks = plane.metrics.registry.get_sample_value("meshplane_xds_nacks_total", {"type": "eds"})
        assert not nacks


async def _has(ports: Any, expected: list[int]) -> bool:
    return bool(await ports() == expected)
