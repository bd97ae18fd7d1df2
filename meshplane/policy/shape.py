"""The base of every model of the policy document: closed, frozen, and named as the YAML is."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Doc(BaseModel):
    """Unknown fields are errors (a typo must not be silently ignored); values never change once read."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        # The schema is for people (editor hovers): show the YAML key, not a mangled Python name.
        field_title_generator=lambda name, info: info.alias or name,
        model_title_generator=lambda cls: cls.__name__.removesuffix("Doc"),
    )
