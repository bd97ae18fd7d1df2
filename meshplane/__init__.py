"""meshplane: an Envoy xDS control plane for multi-cluster locality failover."""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    """The installed package's version (`meshplane --version`, `/ready`, `meshplane_build_info`)."""
    from importlib import metadata  # here, not at import: every module imports this package

    try:
        return metadata.version("meshplane")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
