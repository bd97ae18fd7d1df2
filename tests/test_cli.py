"""The command line as an operator meets it: validate, and serve's start-up errors and readiness."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshplane.demo import backend, topology
from meshplane.demo.ports import free_port
from tests.conftest import cluster_doc, wait_for, write_yaml


def _meshplane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshplane", *args], capture_output=True, text=True, timeout=60)


def test_validate_ok(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(topology.s1_policy())
    result = _meshplane("validate", str(policy))
    assert result.returncode == 0, result.stderr
    assert f"{policy}: ok" in result.stdout


def test_validate_reports_file_line_field_reason(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: meshplane.io/v1\n"
        "services:\n"
        "  - name: reviews\n"
        "    locality:\n"
        "      failover:\n"
        "        - from: cn-hangzhou\n"
        "          to: cn-hangzhou\n"
    )
    result = _meshplane("validate", str(policy))
    assert result.returncode == 1
    assert f"{policy}:7: services[0].locality.failover[0].to: " in result.stderr, result.stderr
    assert "to itself" in result.stderr
    assert "policy rejected" in result.stderr


def test_validate_names_an_endpoint_file_it_cannot_read(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: meshplane.io/v1\n")
    missing = tmp_path / "nosuch.yaml"
    result = _meshplane("validate", str(policy), "-e", str(missing))
    assert result.returncode == 1
    assert result.stderr == f"meshplane validate: --endpoints {missing}: cannot read it: No such file or directory\n"


@pytest.mark.parametrize(("argv", "says"), [
    (["validate", "{missing}"], "meshplane validate: {missing}: cannot read it: No such file or directory"),
    (["serve", "-e", "{missing}"], "meshplane: --endpoints {missing}: cannot read it: No such file or directory"),
    (["serve", "-p", "{missing}"], "meshplane: --policy {missing}: cannot read it: No such file or directory"),
    (["serve", "--kubeconfig", "cluster-2={missing}"],
     "meshplane: --kubeconfig cluster-2={missing}: {missing}: cannot read it: No such file or directory"),
    (["serve", "--kubeconfig", "{missing}"], "meshplane: --kubeconfig {missing}: cannot read it: No such file or "
                                             "directory"),
    (["serve", "--local-cluster", "c1={missing}#ctx"],
     "meshplane: --local-cluster c1={missing}#ctx: {missing}: cannot read it: No such file or directory"),
])
def test_a_file_that_cannot_be_read_is_one_line_naming_the_flag_and_the_file(
    tmp_path: Path, argv: list[str], says: str
) -> None:
    missing = str(tmp_path / "nosuch.yaml")
    ports = ["--ads", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}"] if argv[0] == "serve" else []
    result = _meshplane(*[a.format(missing=missing) for a in argv], *ports)
    assert (result.returncode, result.stderr) == (1, says.format(missing=missing) + "\n")


def test_a_kubeconfig_that_is_not_yaml_is_one_line_with_its_line(tmp_path: Path) -> None:
    broken = tmp_path / "c2.yaml"
    broken.write_text("apiVersion: v1\nclusters: [{name: c1\n")
    result = _meshplane("serve", "--kubeconfig", f"cluster-2={broken}", "--ads", f"127.0.0.1:{free_port()}",
                        "--http", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr == (f"meshplane: --kubeconfig cluster-2={broken}: {broken}:3: invalid YAML: while parsing a "
                             "flow mapping expected ',' or '}', but got '<stream end>' (column 1)\n")


async def test_serve_refuses_a_broken_endpoint_file(tmp_path: Path) -> None:
    broken = tmp_path / "c1.yaml"
    broken.write_text("cluster: c1\nregion: r1\nservices:\n  - name: svc\n    ports: [{name: http, port: 80}]\n"
                      "    endpoints:\n      - {address: 10.0.0.1, zone: z1, health: sick}\n")
    result = _meshplane("serve", "--endpoints", str(broken), "--ads", "127.0.0.1:0", "--http", "127.0.0.1:0")
    assert result.returncode == 1
    assert f"{broken}:7: services[0].endpoints[0].health: 'sick'" in result.stderr, result.stderr


async def test_serve_becomes_ready_and_stops_on_sigint(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009}]}))
    http_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshplane", "serve", "--endpoints", str(path),
        "--ads", "127.0.0.1:0", "--http", f"127.0.0.1:{http_port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async def ready() -> dict[str, object] | None:
            try:
                status, body = await backend.http_get(http_port, "localhost", "/ready")
            except OSError:
                return None
            return json.loads(body) if status == 200 else None

        state = await wait_for(ready, timeout=20, what="/ready answering 200")
        assert state["clusters"] == {"c1": {"synced": True, "stale": False, "error": ""}}
        status, metrics = await backend.http_get(http_port, "localhost", "/metrics")
        assert status == 200 and 'meshplane_discovery_cluster_synced{cluster="c1"} 1.0' in metrics
    finally:
        proc.send_signal(2)
        assert await asyncio.wait_for(proc.wait(), 10) == 0


# Conventions: --version, global flags anywhere, defaults in --help, numbers checked, a command's own usage.


def test_version_is_the_installed_packages() -> None:
    result = _meshplane("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"meshplane {importlib.metadata.version('meshplane')}\n"


@pytest.mark.parametrize("where", ["before", "after"])
async def test_global_flags_go_before_or_after_the_command(tmp_path: Path, where: str) -> None:
    path = write_yaml(tmp_path / "c1.yaml", cluster_doc("c1", "r1", {"svc": [{"zone": "z1", "port": 9009}]}))
    flags = ["--log-format", "json", "--log-level", "info"]
    serve = ["serve", "--endpoints", str(path), "--ads", "127.0.0.1:0", "--http", "127.0.0.1:0"]
    argv = [*flags, *serve] if where == "before" else [*serve, *flags]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "meshplane", *argv,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        async def serving() -> bool:
            line = await proc.stderr.readline()  # type: ignore[union-attr]
            assert line, "serve exited"
            return bool(json.loads(line)["event"] == "control plane serving")  # JSON, not the console's lines

        await wait_for(serving, timeout=30, what="the JSON log line saying it serves")
    finally:
        proc.send_signal(2)
        await asyncio.wait_for(proc.communicate(), 10)


def test_a_flag_given_before_the_command_is_not_undone_by_the_commands_default(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("apiVersion: meshplane.io/v1\n")
    # The command's copy of --log-level must not reset --log-level error given before it.
    result = _meshplane("--log-level", "error", "validate", str(policy), "--log-format", "json")
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("command", ["serve", "validate", "status", "config-dump", "explain", "demo"])
def test_help_shows_every_default_and_no_empty_one(command: str) -> None:
    result = _meshplane(command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    for noise in ("default: None", "default: []", "default: False", "default: True", "default: )"):
        assert noise not in text, (noise, result.stdout)
    expected = {
        "serve": ["--debounce SECONDS quiet before a burst of changes is pushed (default: 0.005)",
                  "(default: 127.0.0.1:18000)", "(default: 20000)", "(default: 1800.0)", "(default: required)",
                  "(default: 30.0)", "(default: keep them)"],
        "status": ["(default: http://127.0.0.1:18001)", "(default: console)"],
        "config-dump": ["(default: http://127.0.0.1:18001)"],
        "explain": ["(default: /)", "(default: GET)", "(default: http://127.0.0.1:18001)"],
        "demo": ["(default: 1.0)", "(default: a temp dir)"],
        "validate": ["(default: info; warning for the demo, whose screen is the traffic)"],
    }[command]
    for words in expected:
        assert words in text, (words, result.stdout)


@pytest.mark.parametrize(("argv", "flag"), [
    (["serve", "--debounce", "-1"], "--debounce"),
    (["serve", "--max-delay", "nan"], "--max-delay"),
    (["serve", "--poll-interval", "0"], "--poll-interval"),
    (["serve", "--max-connection-age", "-5"], "--max-connection-age"),
    (["serve", "--max-connection-age-grace", "-1"], "--max-connection-age-grace"),
    (["serve", "--sync-timeout", "-1"], "--sync-timeout"),
    (["serve", "--stale-ttl", "-1"], "--stale-ttl"),
    (["status", "--wait-synced", "-1"], "--wait-synced"),
    (["demo", "--interval", "-1"], "--interval"),
    (["demo", "--interval", "inf"], "--interval"),
])
def test_negative_or_impossible_numbers_are_usage_errors_naming_the_flag(argv: list[str], flag: str) -> None:
    result = _meshplane(*argv)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"usage: meshplane {argv[0]} ")  # the command's usage, not the program's
    assert lines[-1].startswith(f"meshplane {argv[0]}: error: argument {flag}"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("argv", "says"), [
    (["explain"], "give a SERVICE, or --gateway NAME"),
    (["explain", "mockb", "--gateway", "edge"], "give a SERVICE, or --gateway NAME"),
    (["explain", "mockb", "--host", "example.com"], "--host is for a request at a gateway"),
    (["explain", "--gateway", "edge", "--label", "version=v1"], "--label is a sidecar client's"),
    (["explain", "mockb", "--label", "version"], "argument --label: 'version': write KEY=VALUE"),
    (["explain", "--gateway", "edge", "--header", "x-canary"], "argument --header: 'x-canary': write NAME=VALUE"),
    (["status", "--server", "127.0.0.1:abc"], "argument --server: '127.0.0.1:abc': the port is not a number"),
    (["status", "--server", "ftp://127.0.0.1:18001"], "argument --server: 'ftp://127.0.0.1:18001': the control"),
    # Forms the command checks before asking the server (the page checks them too, for scripts).
    (["explain", "mockb", "--from", "a/b/c/d"], "argument --from: 'a/b/c/d' is not REGION/ZONE/CLUSTER (or a zone "
                                                "alone)"),
    (["explain", "mockb"], "give the client's locality: --from REGION/ZONE/CLUSTER (or a zone alone)"),
    (["explain", "mockb", "--from", "z", "--down", "endpoint=10.1.0.2:99999"],
     "argument --down: 'endpoint=10.1.0.2:99999': 99999 is not a port number (1-65535)"),
    (["explain", "mockb", "--from", "z", "--down", "endpoint=not-an-address"],
     "argument --down: 'endpoint=not-an-address': 'not-an-address' is not an IP address"),
    (["explain", "mockb", "--from", "z", "--down", "datacenter=dc1"],
     "argument --down: 'datacenter=dc1': write zone=Z, cluster=C, region=R or endpoint=ADDR[:PORT]"),
    (["status", "--locality", "a/b/c/d"], "argument --locality: 'a/b/c/d' is not REGION[/ZONE[/CLUSTER]]"),
    (["status", "--kind", "proxyless"], "argument --kind: invalid choice: 'proxyless'"),
    # serve's flags that need others name only those given.
    (["serve", "--client-cert", "optional"], "--client-cert optional needs --client-ca (and --tls-cert, --tls-key)"),
    (["serve", "--tls-cert", "c.pem"], "error: --tls-cert needs --tls-key: a certificate and its private key go "
                                       "together"),
    (["serve", "--tls-key", "k.pem"], "error: --tls-key needs --tls-cert: "),
    (["serve", "--client-ca", "/x"], "error: --client-ca needs --tls-cert and --tls-key: client certificates are "
                                     "checked in the TLS handshake"),
    (["serve", "--ads-plaintext", ":18002"], "error: --ads-plaintext needs --tls-cert and --tls-key: "),
    (["serve", "--remote-secrets", "meshplane-system"], "error: --remote-secrets needs --local-cluster: the Secrets "
                                                        "are read from the local cluster"),
    # A flag of another command: this command's usage, not the program's.
    (["validate", "p.yaml", "--http", "127.0.0.1:1"], "meshplane validate: error: unrecognized arguments: --http "
                                                      "127.0.0.1:1"),
])
def test_a_commands_usage_error_prints_that_commands_usage(argv: list[str], says: str) -> None:
    result = _meshplane(*argv)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"usage: meshplane {argv[0]} "), result.stderr
    assert says in result.stderr.splitlines()[-1], result.stderr
