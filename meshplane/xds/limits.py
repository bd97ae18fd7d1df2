"""What one client may ask of the ADS server (docs/security.md).

A module of its own, importing nothing, so that `meshplane serve --help`
shows the defaults without loading gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one client may ask of the server (docs/security.md); 0: no limit."""

    streams: int = 20_000  # open streams, all clients together
    streams_per_peer: int = 1_000  # open streams from one address (a node hosts at most a few hundred pods)
    node_bytes: int = 64 * 1024  # a request's node, encoded (Istio's run to a few KB)
    names: int = 50_000  # resource names in one request (subscribed, or subscribed and unsubscribed)
    request_bytes: int = 4 * 1024 * 1024  # one request, encoded (gRPC's own default)
