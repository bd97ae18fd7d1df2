"""Generators, one per kind of client (docs/architecture.md, layer 2).

Each module here that defines `GENERATOR` (a `base.Generator`) serves the
kind it names. `by_kind()` finds them, so a new kind of client is a new
module beside `sidecar.py` and a new `proxy.Kind`: nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from meshplane.xds import proxy
from meshplane.xds.generators import base


def by_kind() -> dict[proxy.Kind, base.Generator]:
    """Every generator in this package, by the kind it serves; each kind has exactly one."""
    found: dict[proxy.Kind, base.Generator] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        generator = getattr(module, "GENERATOR", None)
        if not isinstance(generator, base.Generator):
            continue
        if generator.kind in found:
            raise RuntimeError(f"two generators for {generator.kind}: {module.__name__} and another")
        found[generator.kind] = generator
    missing = [kind.value for kind in proxy.Kind if kind not in found]
    if missing:
        raise RuntimeError(f"no generator for {', '.join(missing)} in {__name__}")
    return found
