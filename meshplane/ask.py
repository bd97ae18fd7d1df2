"""`meshplane status | config-dump | explain`: questions to a running control plane, over its HTTP port.

Each command reads one debug endpoint (`/debug/syncz`, `/debug/config_dump`,
`/debug/explain`) and prints it for a person; `--json` prints the JSON as
served. They talk to `--server` (default the `serve --http` default).
"""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

DEFAULT_SERVER = "http://127.0.0.1:18001"
TYPES = ("cds", "eds", "lds", "rds")
KINDS = ("sidecar", "gateway", "grpc")
"""The kinds of client (meshplane/xds/proxy.py's Kind; this module imports nothing of the server's)."""
STATES = ("SYNCED", "STALE", "NACKED", "NOT SENT")
"""Where a type of a client stands (meshplane/xds/streams.py's Sync)."""
TIMEOUT = 10.0


class Unanswered(Exception):
    """The control plane could not be asked, or said no; the message says which, in one line."""

    def __init__(self, message: str, answer: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.answer = answer or {}


def server_url(text: str) -> str:
    """`--server`: a URL, or HOST:PORT or :PORT (as `serve --http` takes it); ValueError says what is wrong."""
    url = text if "://" in text else f"http://{'127.0.0.1' if text.startswith(':') else ''}{text}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: the control plane's HTTP port is http://HOST:PORT, not {parts.scheme}://")
    try:
        parts.port  # noqa: B018 (it checks the port)
    except ValueError:
        raise ValueError(f"{text!r}: the port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"{text!r}: give HOST:PORT (serve --http's address), e.g. 127.0.0.1:18001")
    return url.rstrip("/")


def get(server: str, path: str, params: Mapping[str, str | Sequence[str]] | None = None) -> Any:
    query = {k: ",".join(v) if isinstance(v, list | tuple) else v for k, v in (params or {}).items() if v}
    url = f"{server.rstrip('/')}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        with error:
            text = error.read().decode(errors="replace")
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            answer = None
        if isinstance(answer, dict) and "error" in answer:
            raise Unanswered(_as_flag(str(answer["error"]), answer.get("parameter")), answer) from None
        raise Unanswered(f"{url} answered {error.code} {error.reason}: is {server} (--server) the HTTP port "
                         "of `meshplane serve` (its --http)?") from None
    except (OSError, ValueError) as exc:
        raise Unanswered(f"no control plane answers at {server} (--server): {_reason(exc)}; is `meshplane serve` "
                         "running with that --http address?") from None
    try:
        return json.loads(body)
    except ValueError:
        raise Unanswered(f"{url} did not answer JSON: is {server} (--server) the HTTP port of `meshplane serve` "
                         "(its --http)?") from None


def _as_flag(error: str, parameter: object) -> str:
    """A page's error about one of its parameters (`down zone=Z: ...`), as the command says it: naming
    the flag (`--down zone=Z: ...`), which is the parameter's name."""
    if isinstance(parameter, str) and parameter and error.startswith(parameter) \
            and error[len(parameter):len(parameter) + 1] in (" ", ":"):
        return f"--{error}"
    return error


def _reason(exc: BaseException) -> str:
    """Why a request failed, in words: urllib wraps the socket's error in its own."""
    cause = exc.reason if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException) else exc
    if isinstance(cause, socket.gaierror):
        return "cannot resolve its host name"
    if isinstance(cause, TimeoutError):
        return f"no answer within {TIMEOUT:g} s"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror[0].lower() + cause.strerror[1:]
    return str(cause)


# status


def status(server: str, *, filters: Mapping[str, str], wait_synced: float | None, as_json: bool,
           allow_none: bool = False, out: TextIO = sys.stdout) -> int:
    """The sync table; with `wait_synced`, wait until every listed client is SYNCED (exit 1 if not in
    time). Waiting with no client listed fails too (a rollout gated on no proxy has checked nothing),
    unless `allow_none`."""
    deadline = time.monotonic() + (wait_synced or 0)
    while True:
        answer = get(server, "/debug/syncz", filters)
        clients = answer["clients"]
        # A change the control plane has seen but not yet handed to its views puts every client behind.
        synced = answer["pending_change_s"] is None and all(c["state"] == "SYNCED" for c in clients) \
            and (bool(clients) or allow_none)
        if wait_synced is None or synced or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if as_json:
        print(json.dumps(clients, indent=2), file=out)
    else:
        print(format_page(answer, server=server, sections=() if filters else SECTIONS, filters=filters), file=out)
    if wait_synced is not None and not synced:
        waiting = [c["node"] for c in clients if c["state"] != "SYNCED"]
        if not clients:
            why = "no client connected" + (f" matching {_filters(filters)}" if filters else "") \
                + f" after {wait_synced:g}s (--allow-none accepts none)"
        else:
            why = f"{len(waiting)} of {len(clients)} clients not SYNCED after {wait_synced:g}s" + (
                f": {', '.join(waiting)}" if waiting else "; a change is still being built")
        print(f"meshplane status: {why}", file=sys.stderr)
        return 1
    return 0


def _filters(filters: Mapping[str, str]) -> str:
    return " ".join(f"--{k} {v!r}" if " " in v else f"--{k} {v}" for k, v in filters.items())


def format_page(answer: Mapping[str, Any], *, server: str,
                sections: Sequence[Callable[[Mapping[str, Any]], str]] = (),
                filters: Mapping[str, str] | None = None) -> str:
    """What `meshplane status` prints: which control plane answered, the table, then each of `sections`.
    With `filters` that no client matches, it says so, and how many are connected."""
    table = format_status(answer["clients"])
    if filters and not answer["clients"] and answer.get("connected"):
        table = f"no client matches {_filters(filters)} ({answer['connected']} connected)"
    parts = [f"meshplane {answer.get('version', 'unknown')} at {server}", table]
    parts += [text for section in sections if (text := section(answer))]
    return "\n".join(parts)


def format_status(clients: Sequence[Mapping[str, Any]], *, narrow: bool = False) -> str:
    """A table in the manner of `istioctl proxy-status`, with NACK messages under their client;
    `narrow` (the demo's, in 80 columns) leaves out the locality, the view and when it connected."""
    if not clients:
        return "no clients connected"
    wide = not narrow
    rows = [["NAME", "KIND", "XDS", *["LOCALITY"] * wide, *(t.upper() for t in TYPES), *["VIEW", "CONNECTED"] * wide]]
    notes: dict[int, list[str]] = {}
    for client in clients:
        cells = [client["node"], client["kind"], client.get("protocol", ""), *[client["locality"]] * wide]
        for t in TYPES:
            entry = client["types"].get(t)
            if entry is None:
                cells.append("-")
            elif entry["state"] == "STALE":
                cells.append(f"STALE ({entry.get('stale_for_s', 0):.1f}s)")
            else:
                cells.append(entry["state"])
            if entry is not None and entry["state"] == "NACKED":
                nack = entry["last_nack"]
                notes.setdefault(len(rows), []).append(
                    f"    {t} NACKED version {nack['rejected']} at {nack['at']}: {nack['message']}")
        cells += [client.get("view") or "", client["connected_since"]] * wide
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        lines.extend(notes.get(n, []))
    return "\n".join(lines)


def format_refused(answer: Mapping[str, Any]) -> str:
    """Clients refused lately (they are not in the table): one line each, who, why, how often, when last."""
    refused = answer.get("refused") or ()
    if not refused:
        return ""
    window = float(answer.get("refused_window_s") or 600)
    lines = ["", f"refused in the last {window / 60:g} minutes (they retry; each is counted in "
             "meshplane_xds_refused_streams_total):"]
    for r in refused:
        who = " ".join(str(w) for w in (r["peer"], r["node"], r["identity"]) if w)
        lines.append(f"  {who}: {r['code']} ({r['reason']}) x{r['count']}, last {r['last_at']}: {r['message']}")
    return "\n".join(lines)


SECTIONS: tuple[Callable[[Mapping[str, Any]], str], ...] = (format_refused,)
"""What `status` prints under the table when it is not filtered, in order: each takes /debug/syncz's
answer and returns its lines ("" when it has nothing to say)."""


# config-dump


def config_dump(server: str, node: str, out: TextIO = sys.stdout) -> int:
    try:
        answer = get(server, "/debug/config_dump", {"proxy": node})
    except Unanswered as exc:
        if "connected" not in exc.answer:
            raise
        ids = list(exc.answer["connected"])
        more = f" and {len(ids) - 10} more (meshplane status lists them)" if len(ids) > 10 else ""
        shown = ", ".join(ids[:10]) + more
        raise Unanswered(f"{exc}; connected: {shown or 'none'}") from None
    print(json.dumps(answer, indent=2), file=out)
    return 0


# explain


def explain(server: str, params: Mapping[str, str | Sequence[str]], *, as_json: bool, out: TextIO = sys.stdout) -> int:
    answer = get(server, "/debug/explain", params)
    print(json.dumps(answer, indent=2) if as_json else format_explain(answer), file=out)
    return 0


def format_explain(answer: Mapping[str, Any], *, narrow: bool = False) -> str:
    """`narrow` (the demo's, in 80 columns): each row's reason and endpoints on a line of their own."""
    down = f" with {', '.join(answer['down'])} down" if answer.get("down") else ""
    if "gateway" in answer:
        head = f"gateway {answer['gateway']}: {answer['host']}{answer['path']}{down}"
        matched = answer.get("matched")
        if matched is None:
            return f"{head}\n  no route matches: 404"
        lines = [f"{head}\n  route {matched['route']}, rule {matched['rule']} (match {matched['match']}), "
                 f"port {matched['port']}"]
        for backend in answer["backends"]:
            lines.append(f"  backend {backend['upstream']} (weight {backend['weight']})")
            lines.extend(_table(backend, indent="    ", narrow=narrow))
        if answer.get("note"):  # a redirect: no backend
            lines.append(f"  {answer['note']}")
        return "\n".join(lines)
    labels = "".join(f" {k}={v}" for k, v in answer.get("labels", {}).items())
    return "\n".join([f"{answer['service']} from {answer['from']}{labels}{down}",
                      *_table(answer, indent="  ", narrow=narrow)])


def _table(answer: Mapping[str, Any], *, indent: str, narrow: bool) -> list[str]:
    if answer.get("note"):
        return [f"{indent}{answer['note']}"]
    lines = []
    width = max((len(row["locality"]) for row in answer["placements"]), default=0)
    for row in answer["placements"]:
        endpoints = ", ".join(
            f"{e['address']}:{'/'.join(str(p) for p in e['ports'].values())} {e['health']}"
            + (", down" if e["down"] else "") for e in row["endpoints"])
        head = f"{indent}priority {row['priority']}  {row['locality']:<{width}}  weight {row['weight']:<3}"
        if narrow:
            lines += [head.rstrip(), f"{indent}    {row['reason']}  [{endpoints}]"]
        else:
            lines.append(f"{head} {row['reason']}  [{endpoints}]")
    if answer["traffic"]:
        shares = ", ".join(f"{t['share']:g}% to priority {t['priority']}" for t in answer["traffic"])
        lines.append(f"{indent}traffic: {shares}")
    else:
        lines.append(f"{indent}traffic: no healthy endpoint (503)")
    return lines
