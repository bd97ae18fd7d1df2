"""`meshplane serve | validate | status | config-dump | explain | demo`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import meshplane
from meshplane import ask, flags, forms
from meshplane.xds import limits

# Only what every command needs is imported here: `status`, `config-dump` and `explain` are a question
# over HTTP, and start in a tenth of a second because they never load the server (gRPC, protobuf,
# the Kubernetes client); `serve`, `validate` and `demo` import it when they run.

CLIENT_COMMANDS = ("status", "config-dump", "explain")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--log-level and --log-format, before the command or after it: a subcommand's copy defaults to
    nothing, so that it never overwrites what was given before the command."""
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None if top else argparse.SUPPRESS,
                        help="how much is logged (default: info; warning for the demo, whose screen is the traffic)")
    parser.add_argument("--log-format", choices=["console", "json"], default="console" if top else argparse.SUPPRESS,
                        help="log lines for a person, or one JSON object each (default: console)")


def build_parser() -> argparse.ArgumentParser:
    """Every command and flag (the docs are checked against it: tests/test_docs_commands.py)."""
    parser = argparse.ArgumentParser(
        prog="meshplane", formatter_class=flags.Help, description=meshplane.__doc__,
        epilog="`meshplane COMMAND --help` for a command's options; docs/operating.md for the client commands")
    parser.add_argument("--version", action=flags.Version, help="print meshplane's version and exit")
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, about: str) -> argparse.ArgumentParser:
        found = sub.add_parser(name, help=about, description=about, formatter_class=flags.Help)
        _global_options(found, top=False)
        return found

    serve = command("serve", "run the control plane from endpoint files and a policy file")
    serve.add_argument("--endpoints", "-e", type=Path, action="append", default=[], metavar="FILE",
                       help="an endpoint source file (one per cluster; repeatable)")
    serve.add_argument("--policy", "-p", type=Path, metavar="FILE", help="the policy YAML file")
    serve.add_argument("--ads", default="127.0.0.1:18000", type=_address, metavar="HOST:PORT",
                       help="where the ADS gRPC server listens")
    serve.add_argument("--http", default="127.0.0.1:18001", type=_address, metavar="HOST:PORT",
                       help="where /metrics, /ready and /debug are served")
    serve.add_argument("--debounce", type=flags.seconds, default=0.005, metavar="SECONDS",
                       help="quiet before a burst of changes is pushed")
    serve.add_argument("--max-delay", type=flags.seconds, default=0.1, metavar="SECONDS",
                       help="longest a change waits for a burst to end")
    serve.add_argument("--poll-interval", type=flags.positive_seconds, default=0.1, metavar="SECONDS",
                       help="between checks of the endpoint and policy files for edits where inotify "
                            "is unavailable (with inotify, edits are seen at once and this is a backstop)")
    serve.add_argument("--no-inotify", dest="inotify", action="store_false",
                       help="find file edits by polling only (network filesystems, where inotify misses "
                            "writes made on other machines)")
    serve.add_argument("--max-concurrent-pushes", type=flags.positive_int, default=100, metavar="N",
                       help="streams composing and writing at once; bounds memory in a reconnect storm")
    serve.add_argument("--max-connection-age", type=flags.seconds, default=1800.0, metavar="SECONDS",
                       help="close each ADS connection after about this long (+-10 %%), so proxies rebalance "
                            "over replicas (docs/deploying.md); 0: never")
    serve.add_argument("--max-connection-age-grace", type=flags.seconds, default=10.0, metavar="SECONDS",
                       help="how long a closing connection's streams may go on before they are ended")
    sec = serve.add_argument_group("TLS and identity on the ADS port (docs/security.md)")
    sec.add_argument("--tls-cert", type=Path, metavar="PEM",
                     help="serve ADS over TLS with this certificate (re-read when the file changes)")
    sec.add_argument("--tls-key", type=Path, metavar="PEM", help="the certificate's private key")
    sec.add_argument("--client-ca", type=Path, metavar="PEM",
                     help="check client certificates against this CA; a client's SPIFFE id must match its node")
    sec.add_argument("--client-cert", choices=["required", "optional"], default="required",
                     help="with --client-ca: required, or optional: a client without a certificate is served as an "
                          "unauthenticated sidecar, never a gateway; one given is checked all the same")
    sec.add_argument("--trust-domain", default="cluster.local", metavar="DOMAIN",
                     help="the trust domain of client SPIFFE ids (spiffe://TRUST_DOMAIN/ns/NS/sa/SA)")
    sec.add_argument("--ads-plaintext", metavar="HOST:PORT", type=_address,
                     help="with --tls-cert: also serve plaintext ADS here (off unless asked for)")
    lim = serve.add_argument_group("limits on clients (docs/security.md; 0: none)")
    default = limits.Limits()
    lim.add_argument("--max-streams", type=flags.count, default=default.streams, metavar="N",
                     help="open ADS streams, all clients together")
    lim.add_argument("--max-streams-per-peer", type=flags.count, default=default.streams_per_peer, metavar="N",
                     help="open ADS streams from one address")
    lim.add_argument("--max-node-bytes", type=flags.count, default=default.node_bytes, metavar="BYTES",
                     help="a request's node, encoded")
    lim.add_argument("--max-names", type=flags.count, default=default.names, metavar="N",
                     help="resource names in one request")
    lim.add_argument("--max-request-bytes", type=flags.count, default=default.request_bytes, metavar="BYTES",
                     help="one request, encoded")
    kube = serve.add_argument_group("Kubernetes clusters (docs/kubernetes.md)")
    kube.add_argument("--local-cluster", metavar="ID[=KUBECONFIG[#CONTEXT]]",
                      help="the cluster meshplane runs in (service account in a pod, else the current context)")
    kube.add_argument("--kubeconfig", action="append", default=[], metavar="[ID=]PATH[#CONTEXT]",
                      help="a cluster to discover (repeatable); the id defaults to the context name")
    kube.add_argument("--kubeconfig-dir", type=Path, action="append", default=[], metavar="DIR",
                      help="one kubeconfig per file, cluster id = file name; files may come and go")
    kube.add_argument("--remote-secrets", metavar="NAMESPACE",
                      help='discover clusters from Secrets labelled meshplane.io/multicluster="true" there')
    kube.add_argument("--sync-timeout", type=flags.seconds, default=30.0, metavar="SECONDS",
                      help="how long a cluster may take to list before readiness goes on without it")
    kube.add_argument("--stale-ttl", type=flags.seconds, default=None, metavar="SECONDS",
                      help="drop an unreachable cluster's endpoints after this long (default: keep them)")
    kube.add_argument("--default-region", default="", metavar="REGION",
                      help="region of endpoints whose node has no topology.kubernetes.io/region label")
    kube.add_argument("--no-pod-labels", action="store_true",
                      help="do not watch pods (endpoints then carry no labels)")
    kube.add_argument("--namespaces", action="append", default=[], metavar="NS[,NS...]",
                      help="watch services, endpoint slices and pods only in these namespaces (repeatable; "
                           "default: all); nodes are always watched cluster-wide")

    val = command("validate", "check a policy file and endpoint files; prints file:line: field: reason for every "
                              "problem")
    val.add_argument("policy", type=Path, nargs="?", metavar="POLICY_FILE",
                     help="the policy YAML file (may be left out with --endpoints)")
    val.add_argument("--endpoints", "-e", type=Path, action="append", default=[], metavar="FILE",
                     help="an endpoint file to check, and to check the policy's services, ports and clusters against "
                          "(repeatable)")

    server_help = "the control plane's HTTP port: serve --http's HOST:PORT, or a URL"

    def server(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--server", type=flags.server, default=ask.DEFAULT_SERVER, metavar="URL", help=server_help)

    status = command("status", "every connected proxy and, per type, SYNCED / STALE / NACKED / NOT SENT")
    server(status)
    status.add_argument("--kind", type=str.lower, choices=ask.KINDS, help="only proxies of this kind (any case)")
    status.add_argument("--locality", type=flags.form(forms.locality_prefix), metavar="REGION[/ZONE[/CLUSTER]]",
                        help="only proxies in this locality")
    status.add_argument("--state", type=str.upper, choices=ask.STATES,
                        help="only proxies with a type in this state (any case)")
    status.add_argument("--wait-synced", type=flags.seconds, metavar="TIMEOUT",
                        help="wait until every listed proxy is SYNCED; exit 1 if one is not after TIMEOUT seconds, "
                             "or if none is listed")
    status.add_argument("--allow-none", action="store_true",
                        help="with --wait-synced: no proxy listed counts as synced")
    status.add_argument("--json", action="store_true", help="print /debug/syncz's JSON")

    dump = command("config-dump", "what meshplane sent one proxy and what it ACKed, per type")
    dump.add_argument("node", metavar="NODE_ID", help="the proxy's node id (as `meshplane status` lists it)")
    server(dump)

    exp = command("explain", "where a client's traffic for a service goes and why; with --down, what if")
    exp.add_argument("service", nargs="?", metavar="SERVICE",
                     help="NAMESPACE/NAME (default namespace: default); not with --gateway")
    exp.add_argument("--from", dest="origin", type=flags.form(forms.origin), metavar="REGION/ZONE/CLUSTER",
                     help="the client's locality (a zone alone if the catalog knows its region); with "
                          "--gateway, default: where a connected proxy of that gateway runs")
    exp.add_argument("--label", action="append", default=[], type=flags.pair("KEY=VALUE"), metavar="KEY=VALUE",
                     help="a label of the client's (repeatable; failoverPriority and distribute rules read them)")
    exp.add_argument("--down", action="append", default=[], type=flags.form(forms.down),
                     metavar="zone=Z|cluster=C|region=R|endpoint=ADDR[:PORT]",
                     help="suppose these endpoints failed (repeatable)")
    exp.add_argument("--gateway", metavar="NAME", help="explain a request at this gateway instead of a service")
    exp.add_argument("--host", help="with --gateway: the request's Host (default: none)")
    exp.add_argument("--path", help="with --gateway: the request's path (and ?query) (default: /)")
    exp.add_argument("--header", action="append", default=[], type=flags.pair("NAME=VALUE"), metavar="NAME=VALUE",
                     help="with --gateway: a request header (repeatable)")
    exp.add_argument("--method", help="with --gateway: the request's method (default: GET)")
    exp.add_argument("--json", action="store_true", help="print /debug/explain's JSON")
    server(exp)

    demo = command("demo", "a local multi-cluster mesh with real Envoys; break things and watch")
    demo.add_argument("--workdir", type=Path, metavar="DIR", help="where to write files and logs (default: a temp dir)")
    demo.add_argument("--interval", type=flags.positive_seconds, default=1.0, metavar="SECONDS",
                      help="between rounds of requests")
    demo.add_argument("--script", metavar="COMMANDS",
                      help="commands to run instead of reading the keyboard, ';'-separated; exit 1 at the first "
                           "that fails")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would print the program's usage: the command's says what it takes
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        code = _dispatch(parser, args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`meshplane explain --json | head -1`): nothing more to say, to anyone.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command in CLIENT_COMMANDS:
        return _ask(parser, args)  # logs nothing: no logging to configure
    _configure_logging(args.log_level or ("warning" if args.command == "demo" else "info"), args.log_format)
    if args.command == "validate":
        if args.policy is None and not args.endpoints:
            _subparser(parser, "validate").error("give a POLICY_FILE, --endpoints FILE, or both")
        return _validate(args.policy, args.endpoints)
    if args.command == "serve":
        _check_serve(_subparser(parser, "serve"), args)
        return _run(_serve(args))
    if args.command == "demo":
        from meshplane.demo import run as demo_run

        return _run(demo_run.main(workdir=args.workdir, interval=args.interval, script=args.script))
    return 2


def _validate(path: Path | None, endpoint_files: list[Path]) -> int:
    """Every problem of every file given, errors on stderr; exit 1 if there is an error."""
    from meshplane import app, problems
    from meshplane.discovery import catalog, fileparse, filesource
    from meshplane.policy import validate

    merged = catalog.Catalog()
    claims = filesource.Claims()
    broken = False
    for endpoints in endpoint_files:
        try:
            cluster, services, text = fileparse.read(endpoints)
            taken = claims.claim(cluster, path=endpoints, text=text)
            if taken is not None:
                raise taken
        except OSError as exc:
            print(f"meshplane validate: --endpoints {endpoints}: {problems.cannot_read(exc)}", file=sys.stderr)
            broken = True
            continue
        except fileparse.EndpointFileError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            print(f"{endpoints}: {len(exc.problems)} error(s); endpoint file rejected", file=sys.stderr)
            broken = True
            continue
        merged.apply(cluster, services, seen_at=0.0)
        print(f"{endpoints}: ok")
    if path is None:
        return 1 if broken else 0
    # Checked against the endpoint files only when all of them are good: a broken one would make the
    # policy's references to its services look wrong.
    known = app.known_from(merged.services, merged.status()) if endpoint_files and not broken else None
    try:
        data = path.read_bytes()
    except OSError as exc:
        print(f"meshplane validate: {path}: {problems.cannot_read(exc)}", file=sys.stderr)
        return 1
    result = validate.load_policy_bytes(data, path=str(path), known=known)
    for problem in (*result.errors, *result.warnings):
        prefix = "" if problem.severity == "error" else "warning: "
        print(f"{prefix}{problem}", file=sys.stderr if problem.severity == "error" else sys.stdout)
    if result.errors:
        print(f"{path}: {len(result.errors)} error(s); policy rejected", file=sys.stderr)
        return 1
    print(f"{path}: ok")
    return 1 if broken else 0


def _ask(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command == "status":
            filters = {"kind": args.kind, "locality": args.locality, "state": args.state}
            return ask.status(args.server, filters={k: v for k, v in filters.items() if v},
                              wait_synced=args.wait_synced, allow_none=args.allow_none, as_json=args.json)
        if args.command == "config-dump":
            return ask.config_dump(args.server, args.node)
        return ask.explain(args.server, _explain_params(_subparser(parser, "explain"), args), as_json=args.json)
    except ask.Unanswered as exc:
        print(f"meshplane {args.command}: {exc}", file=sys.stderr)
        return 1


def _explain_params(usage: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str | list[str]]:
    """/debug/explain's parameters; a mix the page would refuse is a usage error here."""
    if bool(args.gateway) == bool(args.service):
        usage.error("give a SERVICE, or --gateway NAME (with --host, --path, --header): one of them")
    params: dict[str, str | list[str]] = {"from": args.origin or "", "down": args.down}
    if args.service:
        for flag in ("host", "path", "header", "method"):
            if getattr(args, flag):
                usage.error(f"--{flag} is for a request at a gateway: give --gateway NAME, not a SERVICE")
        if not args.origin:
            usage.error("give the client's locality: --from REGION/ZONE/CLUSTER (or a zone alone)")
        return params | {"service": args.service, "label": args.label}
    if args.label:
        usage.error("--label is a sidecar client's: a gateway's placement reads none")
    return params | {"gateway": args.gateway, "host": args.host or "", "path": args.path or "/",
                     "header": args.header, "method": args.method or "GET"}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """A command's own parser, so that its usage errors print its usage."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: argparse.ArgumentParser = action.choices[name]
    return found


def _address(text: str) -> tuple[str, int]:
    from meshplane import listen

    try:
        return listen.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_serve(usage: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that need others: a usage error naming those given, and what they need."""
    if (args.tls_cert is None) != (args.tls_key is None):
        given, missing = ("--tls-cert", "--tls-key") if args.tls_key is None else ("--tls-key", "--tls-cert")
        usage.error(f"{given} needs {missing}: a certificate and its private key go together")
    why = {"--client-ca": ": client certificates are checked in the TLS handshake",
           "--ads-plaintext": ": it adds a plaintext port beside ADS over TLS (without TLS, --ads is plaintext)"}
    needing = [flag for flag in why if getattr(args, flag[2:].replace("-", "_")) is not None]
    if args.tls_cert is None and needing:
        usage.error(" and ".join(needing) + (" need --tls-cert and --tls-key" if len(needing) > 1
                                             else f" needs --tls-cert and --tls-key{why[needing[0]]}"))
    if args.client_cert == "optional" and args.client_ca is None:
        usage.error("--client-cert optional needs --client-ca (and --tls-cert, --tls-key): without a CA no "
                    "client certificate is asked for")
    if args.remote_secrets is not None and not args.local_cluster:
        usage.error("--remote-secrets needs --local-cluster: the Secrets are read from the local cluster")


async def _serve(args: argparse.Namespace) -> int:
    from meshplane import aio, app, gc_tuning, listen, tls
    from meshplane.discovery import fileparse, kubesource
    from meshplane.policy import validate

    tls_files = None if args.tls_cert is None else tls.TlsFiles(
        cert=args.tls_cert, key=args.tls_key, client_ca=args.client_ca,
        require_client_cert=args.client_cert == "required")
    config = app.Config(
        endpoint_files=tuple(args.endpoints), policy_file=args.policy,
        ads_host=args.ads[0], ads_port=args.ads[1], http_host=args.http[0], http_port=args.http[1],
        debounce=args.debounce, max_delay=args.max_delay, poll_interval=args.poll_interval, inotify=args.inotify,
        max_concurrent_pushes=args.max_concurrent_pushes,
        max_connection_age=args.max_connection_age, max_connection_age_grace=args.max_connection_age_grace,
        tls=tls_files, ads_plaintext=listen.join(*args.ads_plaintext) if args.ads_plaintext else None,
        trust_domain=args.trust_domain,
        limits=limits.Limits(streams=args.max_streams, streams_per_peer=args.max_streams_per_peer,
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
    with _signals() as stop:  # from the start: a Ctrl-C while a big policy loads stops it, with no traceback
        starting = asyncio.create_task(plane.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        await aio.cancel(stopping)
        if not starting.done():
            await aio.cancel(starting)
            await plane.stop()
            return 0
        try:
            starting.result()
        except (validate.PolicyError, fileparse.EndpointFileError, OSError, ValueError) as exc:  # TlsError too
            print(f"meshplane: {exc}", file=sys.stderr)
            await plane.stop()
            return 1
        gc_tuning.tune_gc()
        try:
            await stop.wait()
        finally:
            await plane.stop()
    return 0


@contextlib.contextmanager
def _signals() -> Iterator[asyncio.Event]:
    """An event set by SIGINT or SIGTERM, for as long as the block runs."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _run(coro: object) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        return int(asyncio.run(coro))  # type: ignore[arg-type]
    return 130


def _configure_logging(level: str, fmt: str) -> None:
    import logging

    import structlog

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
