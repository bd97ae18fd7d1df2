"""The policy's JSON Schema, for editors (yaml-language-server) and CI linters.

Generated from the pydantic models so it cannot drift from what meshplane
accepts; `tests/test_policy_validate.py` fails if the committed copy is stale.
Regenerate with::

    python -m meshplane.policy.schema > meshplane/policy/schema.json
    cp meshplane/policy/schema.json docs/policy.schema.json

The schema checks shape only; rules across fields (failover vs distribute,
weights summing to 100) need `meshplane validate`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from meshplane.policy import document

SCHEMA_ID = "https://meshplane.io/schemas/policy.json"


def json_schema() -> dict[str, Any]:
    body = document.PolicyDoc.model_json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **body,
        # An empty file (or one of comments only) is YAML null, and meshplane reads it as the
        # default policy; an editor must not flag it. (`required` applies to mappings only.)
        "type": ["object", "null"],
        "title": f"meshplane policy ({' or '.join(document.API_VERSIONS)})",
        # v1 files keep v1's meaning: gateways, routes and retries need v2.
        "if": {"properties": {"apiVersion": {"const": "meshplane.io/v1"}}, "required": ["apiVersion"]},
        "then": {"properties": {
            "gateways": {"type": ["array", "null"], "maxItems": 0},
            "routes": {"type": ["array", "null"], "maxItems": 0},
            "defaults": {"properties": {"retries": {"type": "null"}}},
        }},
    }


def render() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
