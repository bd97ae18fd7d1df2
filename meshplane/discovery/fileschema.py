"""The endpoint file's JSON Schema, for editors (yaml-language-server) and CI linters.

Built from filemodel's field tables, so a field, a choice or a range cannot be named in one and
not the other; `tests/test_endpoint_files.py` fails if the committed copy is stale, and checks
that the schema and `meshplane validate --endpoints` agree on valid and broken files.
Regenerate with::

    python -m meshplane.discovery.fileschema > docs/endpoints.schema.json

The schema checks each value alone; what relates values (`port` on a service of several ports,
`ports` naming the service's ports, an address or a service given twice, `protocol` and
`appProtocol` disagreeing) needs `meshplane validate --endpoints`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from meshplane.discovery import filemodel, model

SCHEMA_ID = "https://meshplane.io/schemas/endpoints.json"

_IPV4 = filemodel.IPV4_PATTERN
_H = "[0-9a-fA-F]{1,4}"


def _ipv6() -> str:
    """RFC 4291's text forms: eight groups, or `::` standing for one or more zero groups between `a` groups
    and the rest; the last two groups may be written as an IPv4 address. No scope (`%eth0`)."""
    def groups(n: int) -> str:
        return {0: "", 1: _H}.get(n, f"{_H}(:{_H}){{{n - 1}}}")

    forms = [groups(8), f"({_H}:){{6}}{_IPV4}"]
    forms += [f"{groups(a)}::({_H}(:{_H}){{0,{6 - a}}})?" for a in range(6)] + [f"{groups(6)}::({_H})?"]
    forms += [f"{groups(7)}::", f"{groups(5)}::{_IPV4}"]
    forms += [f"{groups(a)}::({_H}:){{0,{5 - a}}}{_IPV4}" for a in range(5)]
    return "|".join(f"({form})" for form in forms)


_IPV6 = _ipv6()
# What no endpoint can be: 0.0.0.0 and :: (however written), multicast (224.0.0.0/4, ff00::/8).
_UNREACHABLE = r"^([0:]*0\.0\.0\.0|[0:]+|2(2[4-9]|3[0-9])\.[0-9.]+|[fF][fF][0-9a-fA-F]{2}:.*)$"


def json_schema() -> dict[str, Any]:
    text = {"type": "string", "minLength": 1}
    place = {**text, "pattern": f"^[^{re.escape(filemodel.PLACE_FORBIDDEN)}]+$"}
    name = {"type": "string", "pattern": model.NAME_PATTERN, "maxLength": filemodel.NAME_LENGTH}
    low, high = filemodel.PORT_RANGE
    port = {"type": "integer", "minimum": low, "maximum": high}
    weight_low, weight_high = filemodel.WEIGHT
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "meshplane endpoint file (one cluster's services and endpoints)",
        "type": "object",
        "required": ["cluster", "region"],
        "additionalProperties": False,
        "properties": _ordered(filemodel.TOP, {
            "cluster": {**place, "description": "The cluster's id: the sub_zone proxies see. One file per cluster."},
            "region": {**place, "description": "The region of every endpoint in the file."},
            "services": {"type": ["array", "null"], "items": {"$ref": "#/$defs/Service"}},
        }),
        "$defs": {
            "Service": {
                "type": "object",
                "required": ["name", "ports"],
                "additionalProperties": False,
                "properties": _ordered(filemodel.SERVICE, {
                    "name": {**name, "description": "The Kubernetes Service name."},
                    "namespace": {**name, "type": ["string", "null"], "description": 'Default "default".'},
                    "ports": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Port"}},
                    "endpoints": {"type": ["array", "null"], "items": {"$ref": "#/$defs/Endpoint"}},
                }),
            },
            "Port": {
                "type": "object",
                "required": ["name", "port"],
                "additionalProperties": False,
                "properties": _ordered(filemodel.PORT, {
                    "name": {**text, "description": "What endpoints' `ports` call this port."},
                    "port": {**port, "description": "The service port (clusters are named after it)."},
                    "protocol": {"type": ["string", "null"], "pattern": _any_case(filemodel.PROTOCOLS),
                                 "description": "What Envoy speaks to the port (default HTTP; TCP: not served)."},
                    "appProtocol": {**text, "type": ["string", "null"],
                                    "description": "Kubernetes' appProtocol, read as on a Service port."},
                }),
            },
            "Endpoint": {
                "type": "object",
                "required": ["address", "zone"],
                "additionalProperties": False,
                "not": {"required": ["port", "ports"]},
                "properties": _ordered(filemodel.ENDPOINT, {
                    "address": {"type": "string", "pattern": f"^({_IPV4}|{_IPV6})$", "not": {"pattern": _UNREACHABLE},
                                # yaml-language-server's (and VS Code's) wording for a mismatch; others ignore it
                                "patternErrorMessage": "not an IPv4 or IPv6 address (names are not resolved here)",
                                "description": "An IPv4 or IPv6 address (Envoy resolves no names here)."},
                    "port": {**port, "description": "The port it listens on (a service of one port)."},
                    "ports": {"type": "object", "minProperties": 1, "additionalProperties": port,
                              "description": "Service port name -> the port it listens on."},
                    "zone": {**place, "description": "The endpoint's zone: failover goes to the nearest zone first."},
                    "labels": {"type": ["object", "null"], "propertyNames": {"minLength": 1},
                               "additionalProperties": {"type": "string"}},
                    "health": {"type": ["string", "null"], "pattern": _any_case(filemodel.HEALTH),
                               "description": "Default healthy."},
                    "weight": {"type": ["integer", "null"], "minimum": weight_low, "maximum": weight_high,
                               "description": "Default 1."},
                }),
            },
        },
    }


def _ordered(keys: Sequence[str], properties: dict[str, Any]) -> dict[str, Any]:
    """The properties in the order of filemodel's table, which must name exactly these."""
    if set(keys) != set(properties):
        raise AssertionError(f"filemodel names {sorted(keys)}, the schema {sorted(properties)}")
    return {key: properties[key] for key in keys}


def _any_case(words: Sequence[str]) -> str:
    """A pattern matching any of `words` in any case (the validator reads them so)."""
    return "^(" + "|".join("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)
                           for word in words) + ")$"


def render() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
