"""`meshplane` under tracemalloc: SIGUSR2 writes where its Python memory was allocated.

    .venv/bin/python -m bench.traced OUT.txt --log-level warning serve --endpoints ...

Everything after OUT.txt is meshplane's own command line.
On SIGUSR2 the process writes to OUT.txt the traced total and the top allocation sites
(by line, and by file), then carries on. Tracing slows the server and costs memory of its own,
so nothing timed runs under it; bench.memory uses it to say what the RSS is made of.
"""

from __future__ import annotations

import signal
import sys
import tracemalloc
from pathlib import Path


def dump(out: Path, top: int = 30) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")))
    lines = [f"traced Python memory: {sum(s.size for s in snapshot.statistics('filename')) / 2**20:.1f} MiB", ""]
    for key in ("lineno", "filename"):
        lines.append(f"top by {key}:")
        for stat in snapshot.statistics(key)[:top]:
            frame = stat.traceback[0]
            lines.append(f"  {stat.size / 2**20:8.1f} MiB {stat.count:9d} blocks  {frame.filename}:{frame.lineno}")
        lines.append("")
    out.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    out = Path(argv[0])
    tracemalloc.start(1)
    signal.signal(signal.SIGUSR2, lambda *_: dump(out))
    from meshplane import cli

    return cli.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
