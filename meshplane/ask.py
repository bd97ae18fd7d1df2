"""`meshplane status | config-dump | explain`: questions to a running control plane, over its HTTP port.

Each command reads one debug endpoint (`/debug/syncz`, `/debug/config_dump`,
`/debug/explain`) and prints it for a person; `--json` prints the JSON as
served. They talk to `--server` (default the `serve --http` default).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

DEFAULT_SERVER = "http://127.0.0.1:18001"
TYPES = ("cds", "eds", "lds", "rds")


class Unanswered(Exception):
    """The control plane could not be asked, or said no; the message says which."""


def get(server: str, path: str, params: Mapping[str, str | Sequence[str]] | None = None) -> Any:
    query = {k: ",".join(v) if isinstance(v, list | tuple) else v for k, v in (params or {}).items() if v}
    url = f"{server.rstrip('/')}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            body = error.read().decode(errors="replace")
        try:
            raise Unanswered(json.loads(body).get("error", body)) from None
        except json.JSONDecodeError:
            raise Unanswered(f"{url}: {error.code} {body.strip()}") from None
    except (OSError, ValueError) as exc:
        raise Unanswered(f"cannot ask {url}: {exc}") from None


# status


def status(server: str, *, filters: Mapping[str, str], wait_synced: float | None, as_json: bool,
           out: TextIO = sys.stdout) -> int:
    """The sync table; with `wait_synced`, wait until every listed client is SYNCED (exit 1 if not in time)."""
    deadline = time.monotonic() + (wait_synced or 0)
    while True:
        answer = get(server, "/debug/syncz", filters)
        clients = answer["clients"]
        # A change the control plane has seen but not yet handed to its views puts every client behind.
        synced = answer["pending_change_s"] is None and all(c["state"] == "SYNCED" for c in clients)
        if wait_synced is None or synced or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if as_json:
        print(json.dumps(clients, indent=2), file=out)
    else:
        print(format_status(clients), file=out)
        if not filters and answer.get("refused"):
            print(format_refused(answer["refused"]), file=out)
    if wait_synced is not None and not synced:
        waiting = [c["node"] for c in clients if c["state"] != "SYNCED"]
        print(f"meshplane status: {len(waiting)} of {len(clients)} clients not SYNCED after {wait_synced:g}s"
              + (f": {', '.join(waiting)}" if waiting else "; a change is still being built"), file=sys.stderr)
        return 1
    return 0


def format_status(clients: Sequence[Mapping[str, Any]], *, now: float | None = None) -> str:
    """A table in the manner of `istioctl proxy-status`, with NACK messages under their client."""
    if not clients:
        return "no clients connected"
    rows = [["NAME", "KIND", "XDS", "LOCALITY", *(t.upper() for t in TYPES), "VIEW", "CONNECTED"]]
    notes: dict[int, list[str]] = {}
    for client in clients:
        cells = [client["node"], client["kind"], client.get("protocol", ""), client["locality"]]
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
        cells += [client.get("view") or "", client["connected_since"]]
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        lines.extend(notes.get(n, []))
    return "\n".join(lines)


def format_refused(refused: Sequence[Mapping[str, Any]]) -> str:
    """Clients refused lately (they are not in the table): one line each, who, why, how often, when last."""
    lines = ["", "refused in the last 10 minutes (they retry; each is counted in meshplane_xds_refused_streams_total):"]
    for r in refused:
        who = " ".join(str(w) for w in (r["peer"], r["node"], r["identity"]) if w)
        lines.append(f"  {who}: {r['code']} ({r['reason']}) x{r['count']}, last {r['last_at']}: {r['message']}")
    return "\n".join(lines)


# config-dump


def config_dump(server: str, node: str, out: TextIO = sys.stdout) -> int:
    print(json.dumps(get(server, "/debug/config_dump", {"proxy": node}), indent=2), file=out)
    return 0


# explain


def explain(server: str, params: Mapping[str, str | Sequence[str]], *, as_json: bool, out: TextIO = sys.stdout) -> int:
    answer = get(server, "/debug/explain", params)
    print(json.dumps(answer, indent=2) if as_json else format_explain(answer), file=out)
    return 0


def format_explain(answer: Mapping[str, Any]) -> str:
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
            lines.extend(_table(backend, indent="    "))
        return "\n".join(lines)
    labels = "".join(f" {k}={v}" for k, v in answer.get("labels", {}).items())
    return "\n".join([f"{answer['service']} from {answer['from']}{labels}{down}", *_table(answer, indent="  ")])


def _table(answer: Mapping[str, Any], *, indent: str) -> list[str]:
    if answer.get("note"):
        return [f"{indent}{answer['note']}"]
    lines = []
    width = max((len(row["locality"]) for row in answer["placements"]), default=0)
    for row in answer["placements"]:
        endpoints = ", ".join(
            f"{e['address']}:{'/'.join(str(p) for p in e['ports'].values())} {e['health']}"
            + (", down" if e["down"] else "") for e in row["endpoints"])
        lines.append(f"{indent}priority {row['priority']}  {row['locality']:<{width}}  weight {row['weight']:<3} "
                     f"{row['reason']}  [{endpoints}]")
    if answer["traffic"]:
        shares = ", ".join(f"{t['share']:g}% to priority {t['priority']}" for t in answer["traffic"])
        lines.append(f"{indent}traffic: {shares}")
    else:
        lines.append(f"{indent}traffic: no healthy endpoint (503)")
    return lines
