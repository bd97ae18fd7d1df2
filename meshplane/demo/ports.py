"""Loopback ports chosen ahead of binding, outside the kernel's ephemeral range.

The demo and the tests must name ports before the processes that bind them start
(an endpoint file names each replica's port; an Envoy bootstrap names its admin and
listener ports). Asking the kernel for port 0 and closing the socket hands out a port
from the ephemeral range, which the kernel may give to any outgoing connection
(an Envoy's upstream connection, a gRPC client) before our process binds it: CI saw
exactly that as `address already in use`. Ports below the ephemeral range are never
handed out implicitly, so here the only competitors are other explicit binders; a
per-process random start, a counter and a bind check keep those apart.
"""

from __future__ import annotations

import itertools
import random
import socket
import threading
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000


def _pool() -> range:
    try:
        ephemeral_low = int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(_LOWEST, ephemeral_low) if ephemeral_low - _LOWEST >= 1000 else range(0)


_POOL = _pool()
_lock = threading.Lock()
_cursor = itertools.count(random.randrange(len(_POOL))) if _POOL else itertools.count()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A loopback TCP port nobody holds now and the kernel will not hand to an outgoing connection."""
    if _POOL:
        with _lock:
            for _ in range(len(_POOL)):
                port = _POOL[next(_cursor) % len(_POOL)]
                if _bindable(port):
                    return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no usable range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
