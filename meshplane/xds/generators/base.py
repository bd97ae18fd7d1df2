"""What a generator is: for each resource type a kind of client receives, how to build it.

A generator is pure (docs/architecture.md, layer 2): data in, protos out.
Each type's builder says what it reads, so the view cache can build once
what many views share and rebuild only what a change reaches, without
knowing anything of the kind it builds for:

- `PerService`: the type's resources come one service at a time (clusters,
  endpoint assignments); a view holds the union over every service. A
  change of one service rebuilds that service's resources only.
- `PerView`: the type's resources are built from the whole catalog at once
  (a listener, a route configuration), and rebuilt when what they read of
  a service, or of the policy, changes.

`scope` picks out what of a view key a builder reads (for clusters:
nothing; for endpoint assignments: the client's locality and labels).
Views whose keys have equal scopes share what is built, and the build is
handed the scope, not the key, so it cannot read more than it declared.
`generate` builds everything of a view from scratch: the function the
cache computes incrementally, and the reference its tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf import message

from meshplane.discovery import model
from meshplane.policy import rules
from meshplane.xds import proxy

Scope = TypeVar("Scope", bound=Hashable)
Built = Mapping[str, message.Message]
"""Resource name -> the resource."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PerService(Generic[Scope]):
    """Resources built from one service at a time."""

    scope: Callable[[proxy.ViewKey], Scope]
    reads_policy: Callable[[rules.Policy, model.ServiceKey, Scope], object]
    """What of the policy the build of this service for this scope reads: a policy change rebuilds
    only where this changed."""
    build: Callable[[model.Service, rules.Policy, Scope], Built]


@dataclass(frozen=True, slots=True, kw_only=True)
class PerView(Generic[Scope]):
    """Resources built from the whole catalog at once."""

    scope: Callable[[proxy.ViewKey], Scope]
    reads_service: Callable[[model.Service | None], object]
    """What of a service (None: absent) the build reads: a change of a service rebuilds only if this changed."""
    reads_policy: Callable[[rules.Policy, Scope], object]
    build: Callable[[Mapping[model.ServiceKey, model.Service], rules.Policy, Scope], Built]


Builder = PerService[Any] | PerView[Any]


@dataclass(frozen=True, slots=True)
class Generator:
    """Everything one kind of client receives: a builder per type URL."""

    kind: proxy.Kind
    types: Mapping[str, Builder]


def generate(
    generator: Generator, services: Mapping[model.ServiceKey, model.Service], policy: rules.Policy,
    key: proxy.ViewKey,
) -> dict[str, dict[str, message.Message]]:
    """Every resource of a view of `key`, per type URL, built from scratch."""
    out: dict[str, dict[str, message.Message]] = {}
    for type_url, builder in generator.types.items():
        built: dict[str, message.Message] = {}
        if isinstance(builder, PerService):
            for service in services.values():
                built.update(builder.build(service, policy, builder.scope(key)))
        else:
            built.update(builder.build(services, policy, builder.scope(key)))
        out[type_url] = built
    return out
