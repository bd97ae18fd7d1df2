"""`meshplane serve | validate | status | config-dump | explain | demo`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

import structlog

from meshplane import app, ask, gc_tuning
from meshplane.xds import adsbase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshplane", description=__doc__)
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="default: info (warning for the demo, whose screen is the traffic)")
    parser.add_argument("--log-format", default="console", choices=["console", "json"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the control plane from endpoint files and a policy file")
    serve.add_argument("--endpoints", "-e", type=Path, action="append", default=[],
                       help="an endpoint source file (one per cluster; repeatable)")
    serve.add_argument("--policy", "-p", type=Path, help="the policy YAML file")
    serve.add_argument("--ads", default="127.0.0.1:18000", help="HOST:PORT for the ADS gRPC server")
    serve.add_argument("--http", default="127.0.0.1:18001",
                       help="HOST:PORT for /metrics, /ready and /debug")
    serve.add_argument("--debounce", type=float, default=0.005,
                       help="seconds of quiet before a burst of changes is pushed")
    serve.add_argument("--max-delay", type=float, default=0.1,
                       help="longest a change waits for a burst to end")
    serve.add_argument("--poll-interval", type=float, default=0.1,
                       help="seconds between checks of the endpoint and policy files for edits where inotify "
                            "is unavailable (with inotify, edits are seen at once and this is a backstop)")
    serve.add_argument("--no-inotify", dest="inotify", action="store_false",
                       help="find file edits by polling only (network filesystems, where inotify misses "
                            "writes made on other machines)")
    serve.add_argument("--max-concurrent-pushes", type=_positive_int, default=100,
                       help="streams composing and writing at once; bounds memory in a reconnect storm")
    serve.add_argument("--max-connection-age", type=float, default=1800.0, metavar="SECONDS",
                       help="close each ADS connection after about this long (+-10 %%), so proxies rebalance "
                            "over replicas (docs/deploying.md); 0: never")
    serve.add_argument("--max-connection-age-grace", type=float, default=10.0, metavar="SECONDS",
                       help="how long a closing connection's streams may go on before they are ended")
    sec = serve.add_argument_group("TLS and identity on the ADS port (docs/security.md)")
    sec.add_argument("--tls-cert", type=Path, metavar="PEM",
                     help="serve ADS over TLS with this certificate (re-read when the file changes)")
    sec.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key")
    sec.add_argument("--client-ca", type=Path, metavar="PEM",
                     help="check client certificates against this CA; a client's SPIFFE id must match its node")
    sec.add_argument("--client-cert", choices=["required", "optional"], default="required",
                     help="with --client-ca: whether a client without a certificate is refused (default required)")
    sec.add_argument("--trust-domain", default="cluster.local",
                     help="the trust domain of client SPIFFE ids (spiffe://TRUST_DOMAIN/ns/NS/sa/SA)")
    sec.add_argument("--ads-plaintext", metavar="HOST:PORT",
                     help="with --tls-cert: also serve plaintext ADS here (off unless asked for)")
    lim = serve.add_argument_group("limits on clients (docs/security.md; 0: none)")
    default = adsbase.Limits()
    lim.add_argument("--max-streams", type=_count, default=default.streams, metavar="N",
                     help=f"open ADS streams, all clients together (default {default.streams})")
    lim.add_argument("--max-streams-per-peer", type=_count, default=default.streams_per_peer, metavar="N",
                     help=f"open ADS streams from one address (default {default.streams_per_peer})")
    lim.add_argument("--max-node-bytes", type=_count, default=default.node_bytes, metavar="BYTES",
                     help=f"a request's node, encoded (default {default.node_bytes})")
    lim.add_argument("--max-names", type=_count, default=default.names, metavar="N",
                     help=f"resource names in one request (default {default.names})")
    lim.add_argument("--max-request-bytes", type=_count, default=default.request_bytes, metavar="BYTES",
                     help=f"one request, encoded (default {default.request_bytes})")
    kube = serve.add_argument_group("Kubernetes clusters (docs/kubernetes.md)")
    kube.add_argument("--local-cluster", metavar="ID[=KUBECONFIG[#CONTEXT]]",
                      help="the cluster meshplane runs in (service account in a pod, else the current context)")
    kube.add_argument("--kubeconfig", action="append", default=[], metavar="[ID=]PATH[#CONTEXT]",
                      help="a cluster to discover (repeatable); the id defaults to the context name")
    kube.add_argument("--kubeconfig-dir", type=Path, action="append", default=[], metavar="DIR",
                      help="one kubeconfig per file, cluster id = file name; files may come and go")
    kube.add_argument("--remote-secrets", metavar="NAMESPACE",
                      help='discover clusters from Secrets labelled meshplane.io/multicluster="true" there')
    kube.add_argument("--sync-timeout", type=float, default=30.0,
                      help="seconds a cluster may take to list before readiness goes on without it")
    kube.add_argument("--stale-ttl", type=float, default=None,
                      help="drop an unreachable cluster's endpoints after this many seconds (default: keep)")
    kube.add_argument("--default-region", default="",
                      help="region of endpoints whose node has no topology.kubernetes.io/region label")
    kube.add_argument("--no-pod-labels", action="store_true",
                      help="do not watch pods (endpoints then carry no labels)")
    kube.add_argument("--namespaces", action="append", default=[], metavar="NS[,NS...]",
                      help="watch services, endpoint slices and pods only in these namespaces (repeatable; "
                           "default: all); nodes are always watched cluster-wide")

    val = sub.add_parser("validate", help="check a policy file; prints file:line: field: reason")
    val.add_argument("policy", type=Path)
    val.add_argument("--endpoints", "-e", type=Path, action="append", default=[],
                     help="endpoint files to check the policy's services, ports and clusters against (repeatable)")

    server_help = f"the control plane's HTTP port (its serve --http; default {ask.DEFAULT_SERVER})"
    status = sub.add_parser("status", help="every connected proxy and, per type, SYNCED / STALE / NACKED / NOT SENT")
    status.add_argument("--server", default=ask.DEFAULT_SERVER, help=server_help)
    status.add_argument("--kind", choices=["sidecar", "gateway"], help="only proxies of this kind")
    status.add_argument("--locality", metavar="REGION[/ZONE[/CLUSTER]]", help="only proxies in this locality")
    status.add_argument("--state", choices=["SYNCED", "STALE", "NACKED", "NOT SENT"],
                        help="only proxies with a type in this state")
    status.add_argument("--wait-synced", type=float, metavar="TIMEOUT",
                        help="wait until every listed proxy is SYNCED; exit 1 if one is not after TIMEOUT seconds")
    status.add_argument("--json", action="store_true", help="print /debug/syncz's JSON")

    dump = sub.add_parser("config-dump", help="what meshplane sent one proxy and what it ACKed, per type")
    dump.add_argument("node", metavar="NODE_ID", help="the proxy's node id (as `meshplane status` lists it)")
    dump.add_argument("--server", default=ask.DEFAULT_SERVER, help=server_help)

    exp = sub.add_parser("explain", help="where a client's traffic for a service goes and why; with --down, what if")
    exp.add_argument("service", nargs="?", help="NAMESPACE/NAME (default namespace: default); not with --gateway")
    exp.add_argument("--from", dest="origin", metavar="REGION/ZONE/CLUSTER",
                     help="the client's locality (a zone alone if the catalog knows its region); with "
                          "--gateway, default: where a connected proxy of that gateway runs")
    exp.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                     help="a label of the client's (repeatable; failoverPriority and distribute rules read them)")
    exp.add_argument("--down", action="append", default=[],
                     metavar="zone=Z|cluster=C|region=R|endpoint=ADDR[:PORT]",
                     help="suppose these endpoints failed (repeatable)")
    exp.add_argument("--gateway", metavar="NAME", help="explain a request at this gateway instead of a service")
    exp.add_argument("--host", default="", help="with --gateway: the request's Host")
    exp.add_argument("--path", default="/", help="with --gateway: the request's path (and ?query)")
    exp.add_argument("--header", action="append", default=[], metavar="NAME=VALUE",
                     help="with --gateway: a request header (repeatable)")
    exp.add_argument("--method", default="GET", help="with --gateway: the request's method")
    exp.add_argument("--json", action="store_true", help="print /debug/explain's JSON")
    exp.add_argument("--server", default=ask.DEFAULT_SERVER, help=server_help)

    demo = sub.add_parser("demo", help="a local multi-cluster mesh with real Envoys; break things and watch")
    demo.add_argument("--workdir", type=Path, help="where to write files and logs (default: a temp dir)")
    demo.add_argument("--interval", type=float, default=1.0, help="seconds between rounds of requests")
    demo.add_argument("--script", help="commands to run instead of reading the keyboard, ';'-separated")

    args = parser.parse_args(argv)
    _configure_logging(args.log_level or ("warning" if args.command == "demo" else "info"), args.log_format)
    if args.command == "validate":
        return _validate(args.policy, args.endpoints)
    if args.command == "serve":
        return _run(_serve(args))
    if args.command in ("status", "config-dump", "explain"):
        return _ask(parser, args)
    if args.command == "demo":
        from meshplane.demo import run as demo_run

        return _run(demo_run.main(workdir=args.workdir, interval=args.interval, script=args.script))
    return 2


def _validate(path: Path, endpoint_files: list[Path]) -> int:
    from meshplane.discovery import catalog, filesource
    from meshplane.policy import validate

    known = None
    if endpoint_files:
        merged = catalog.Catalog()
        for endpoints in endpoint_files:
            try:
                cluster, services = filesource.parse(endpoints.read_text(), path=str(endpoints))
            except (OSError, filesource.EndpointFileError) as exc:
                print(f"meshplane: {exc}", file=sys.stderr)
                return 1
            merged.apply(cluster, services, seen_at=0.0)
        known = app.known_from(merged.services, merged.status())
    result = validate.load_policy_file(path, known=known)
    for problem in (*result.errors, *result.warnings):
        prefix = "" if problem.severity == "error" else "warning: "
        print(f"{prefix}{problem}", file=sys.stderr if problem.severity == "error" else sys.stdout)
    if result.errors:
        print(f"{path}: {len(result.errors)} error(s); policy rejected", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 0


def _ask(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command == "status":
            filters = {"kind": args.kind, "locality": args.locality, "state": args.state}
            return ask.status(args.server, filters={k: v for k, v in filters.items() if v},
                              wait_synced=args.wait_synced, as_json=args.json)
        if args.command == "config-dump":
            return ask.config_dump(args.server, args.node)
        if bool(args.gateway) == bool(args.service):
            parser.error("explain: give a SERVICE, or --gateway NAME (with --host, --path, --header)")
        params = {"from": args.origin or "", "label": args.label, "down": args.down}
        if args.gateway:
            params |= {"gateway": args.gateway, "host": args.host, "path": args.path, "header": args.header,
                       "method": args.method}
        else:
            params["service"] = args.service
        return ask.explain(args.server, params, as_json=args.json)
    except ask.Unanswered as exc:
        print(f"meshplane {args.command}: {exc}", file=sys.stderr)
        return 1


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, not {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _serve(args: argparse.Namespace) -> int:
    from meshplane.discovery import filesource
    from meshplane.policy import validate

    ads_host, ads_port = _split(args.ads)
    http_host, http_port = _split(args.http)
    from meshplane import tls
    from meshplane.discovery import kubesource

    if (args.tls_cert is None) != (args.tls_key is None):
        print("meshplane: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.tls_cert is None and (args.client_ca is not None or args.ads_plaintext):
        print("meshplane: --client-ca and --ads-plaintext need --tls-cert and --tls-key", file=sys.stderr)
        return 2
    tls_files = None if args.tls_cert is None else tls.TlsFiles(
        cert=args.tls_cert, key=args.tls_key, client_ca=args.client_ca,
        require_client_cert=args.client_cert == "required")
    config = app.Config(
        endpoint_files=tuple(args.endpoints), policy_file=args.policy,
        ads_host=ads_host, ads_port=ads_port, http_host=http_host, http_port=http_port,
        debounce=args.debounce, max_delay=args.max_delay, poll_interval=args.poll_interval, inotify=args.inotify,
        max_concurrent_pushes=args.max_concurrent_pushes,
        max_connection_age=args.max_connection_age, max_connection_age_grace=args.max_connection_age_grace,
        tls=tls_files, ads_plaintext=args.ads_plaintext, trust_domain=args.trust_domain,
        limits=adsbase.Limits(streams=args.max_streams, streams_per_peer=args.max_streams_per_peer,
                              node_bytes=args.max_node_bytes, names=args.max_names,
                              request_bytes=args.max_request_bytes),
        local_cluster=args.local_cluster, kubeconfigs=tuple(args.kubeconfig),
        kubeconfig_dirs=tuple(args.kubeconfig_dir), remote_secrets_namespace=args.remote_secrets,
        sync_timeout=args.sync_timeout,
        kube=kubesource.KubeOptions(
            default_region=args.default_region, watch_pods=not args.no_pod_labels, stale_ttl=args.stale_ttl,
            namespaces=tuple(dict.fromkeys(ns for arg in args.namespaces for ns in arg.split(",") if ns)),
        ),
    )
    plane = app.ControlPlane(config)
    try:
        await plane.start()
    except (validate.PolicyError, filesource.EndpointFileError, OSError, ValueError) as exc:  # TlsError too
        print(f"meshplane: {exc}", file=sys.stderr)
        await plane.stop()
        return 1
    gc_tuning.tune_gc()
    try:
        await _until_signalled()
    finally:
        await plane.stop()
    return 0


async def _until_signalled() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _run(coro: object) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        return int(asyncio.run(coro))  # type: ignore[arg-type]
    return 130


def _configure_logging(level: str, fmt: str) -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


if __name__ == "__main__":
    raise SystemExit(main())
