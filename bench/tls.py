"""What TLS on the ADS port costs: the same 1,000 simulated proxies over plaintext, over mTLS done by
gRPC (`--client-ca`, client certificates required) and over mTLS done by meshplane's own relay
(`--client-cert optional`, meshplane/tlsfront.py, decision 0020).

For each: a fresh `meshplane serve`, the proxies connecting at once (time from the first stream to
every proxy holding a full ACKed configuration, the server's CPU over it), then one endpoint change
(each proxy's ACK of it, p50/p99/all) and a policy change (every cluster re-sent: the heaviest push).
Each proxy has its own connection (`--per-channel 1`, as Envoys do; bench.convergence shares one
among 50), all with the same client certificate (`spiffe://cluster.local/ns/default/sa/bench`).

    .venv/bin/python -m bench.tls [--proxies 1000] [--repeat 3] [--per-channel 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench import common, convergence
from tests import pki

MODES = ("plaintext", "required", "optional")


def once(mode: str, mesh: common.Mesh, *, proxies: int, localities: int, processes: int, timeout: float,
         per_channel: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meshplane-bench-tls-") as tmp:
        workdir = Path(tmp)
        args: list[str] = []
        credentials = None
        if mode != "plaintext":
            ca = pki.CA()
            cert, key, _ = ca.write_server(workdir / "server")
            args = ["--tls-cert", str(cert), "--tls-key", str(key), "--client-ca", str(ca.write_ca(workdir / "ca.pem")),
                    "--client-cert", mode]
            client_cert, client_key, _ = ca.issue("bench", uris=("spiffe://cluster.local/ns/default/sa/bench",))
            credentials = (ca.pem, client_key, client_cert)
        target, setup = convergence.start_target(mesh, workdir, proxies, localities, processes, timeout,
                                                 server_args=args, credentials=credentials, per_channel=per_channel)
        try:
            target.measure_idle()
            return {"connect": setup["connect"], "endpoint_change": target.endpoint_change(timeout),
                    "policy_change": target.policy_change(timeout),
                    "rss_mib": common.memory_mib(target.server.pid)["rss_mib"]}
        finally:
            convergence.stop_target(target)


def run(*, proxies: int, localities: int, repeat: int, processes: int, timeout: float, per_channel: int,
        **mesh_args: int) -> dict[str, Any]:
    mesh = common.Mesh(**mesh_args)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for _ in range(repeat):
        for mode in MODES:  # interleaved: a machine that gets busier weighs on every mode alike
            runs[mode].append(once(mode, mesh, proxies=proxies, localities=localities, processes=processes,
                                   timeout=timeout, per_channel=per_channel))
    return {"params": {"proxies": proxies, "localities": localities, "repeat": repeat, "per_channel": per_channel,
                       **mesh_args},
            "modes": {m: _summary(r) for m, r in runs.items()}}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def spread(path: tuple[str, ...]) -> dict[str, Any]:
        values = []
        for r in runs:
            value: Any = r
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            values.append(value)
        return common.spread(values)

    return {"runs": runs, "connect_all_ms": spread(("connect", "all_ms")),
            "connect_cpu_s": spread(("connect", "server_cpu_s")),
            "endpoint_p50_ms": spread(("endpoint_change", "p50")),
            "endpoint_p99_ms": spread(("endpoint_change", "p99")),
            "endpoint_cpu_s": spread(("endpoint_change", "server_cpu_s")),
            "policy_all_ms": spread(("policy_change", "all_ms")),
            "policy_cpu_s": spread(("policy_change", "server_cpu_s")),
            "rss_mib": spread(("rss_mib",))}


def print_result(result: dict[str, Any]) -> None:
    p = result["params"]
    rows = [[mode, d["connect_all_ms"]["median"], d["connect_cpu_s"]["median"], d["endpoint_p50_ms"]["median"],
             d["endpoint_p99_ms"]["median"], d["endpoint_cpu_s"]["median"], d["policy_all_ms"]["median"],
             d["policy_cpu_s"]["median"], d["rss_mib"]["median"]] for mode, d in result["modes"].items()]
    common.print_table(["ADS port", "connect all ms", "CPU s", "endpoint p50 ms", "p99 ms", "CPU s",
                        "policy all ms", "CPU s", "RSS MiB"], rows,
                       title=f"TLS: {p['proxies']} proxies ({p['per_channel']} per connection), {p['services']} "
                             f"services x {p['endpoints']} endpoints, median of {p['repeat']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxies", type=int, default=1000)
    parser.add_argument("--localities", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--per-channel", type=int, default=1, help="streams per connection")
    convergence.add_mesh_args(parser)
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/tls.json)")
    args = parser.parse_args(argv)
    common.stop_on_sigterm()
    quiet = common.wait_quiet(max_wait=0)
    result = run(proxies=args.proxies, localities=args.localities, repeat=args.repeat, processes=args.processes,
                 timeout=max(args.timeout, 300.0), per_channel=args.per_channel, services=args.services,
                 endpoints=args.endpoints,
                 clusters=args.clusters, zones=args.zones)
    path = common.write_results("tls", {"machine": common.machine(), "quiet": quiet, "tls": result}, args.out)
    print_result(result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
