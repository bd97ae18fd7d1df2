"""Generators: every kind of client has one, and the view cache's incremental build is exactly the
pure, from-scratch `generate` after any sequence of catalog and policy changes."""

from __future__ import annotations

import random

import pytest

from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import model
from meshplane.policy import routing, rules
from meshplane.xds import generators, proxy, resources, views
from meshplane.xds.generators import base


def test_every_kind_of_client_has_exactly_one_generator() -> None:
    found = generators.by_kind()
    assert set(found) == set(proxy.Kind)
    assert all(g.kind == kind for kind, g in found.items())


ZONES = ("z1", "z2", "z3")


def _cluster(rng: random.Random, cluster: str, region: str) -> dict[model.ServiceKey, model.ServiceInCluster]:
    out = {}
    for name in rng.sample(["a", "b", "c", "d", "e"], rng.randint(1, 5)):
        ports = [model.ServicePort("http", 8000)]
        if rng.random() < 0.3:
            ports.append(model.ServicePort("grpc", 9000, model.Protocol.GRPC))
        endpoints = tuple(
            model.Endpoint(
                address=f"10.{ord(cluster[-1])}.{i}.{ord(name)}", ports=tuple((p.name, 7000 + i) for p in ports),
                locality=model.Locality(region, rng.choice(ZONES), cluster),
                labels=(("version", rng.choice(["v1", "v2"])),),
                health=rng.choice(list(model.Health)), weight=rng.randint(1, 3),
            )
            for i in range(rng.randint(0, 3))
        )
        svc = model.ServiceInCluster(name=name, namespace=rng.choice(["default", "shop"]), ports=tuple(ports),
                                     endpoints=endpoints)
        out[svc.key] = svc
    return out


def _policy(rng: random.Random) -> rules.Policy:
    def one() -> rules.ServicePolicy:
        return rules.ServicePolicy(
            outlier_detection=rng.choice([None, rules.OutlierDetection(consecutive_5xx_errors=rng.randint(0, 3))]),
            locality=rng.choice([
                rules.LocalitySettings(),
                rules.LocalitySettings(enabled=False),
                rules.LocalitySettings(failover=(rules.FailoverRule("r1", "r2"),)),
                rules.LocalitySettings(failover_priority=("version",)),
            ]),
            connect_timeout_ms=rng.choice([1000, 250]),
        )
    def backend() -> routing.Backend:
        name = rng.choice(["a", "b", "c"])
        return routing.Backend(
            model.ServiceKey(f"{rng.choice(['default', 'shop'])}/{name}"), rng.choice([8000, 9000]),
            weight=rng.randint(0, 3) or 1,
            clusters=rng.choice([(), ("c1",), ("c1", "c2"), ("c2", "c1")]),
            labels=rng.choice([(), (("version", "v1"),), (("topology.istio.io/cluster", "c2"),)]),
            spread=rng.choice([None, routing.Spread.NEAREST, routing.Spread.EVERYWHERE]),
        )

    def rule() -> routing.Rule:
        return routing.Rule(
            matches=(routing.Match(routing.PathMatch(routing.PathKind.PREFIX, rng.choice(["/", "/x", "/x/y"]))),),
            backends=tuple(backend() for _ in range(rng.randint(1, 2))),
            retries=rng.choice([None, routing.Retries(attempts=1)]),
        )

    gateways = (routing.Gateway("edge", (routing.Listener("http", 8080, "HTTP", rng.choice([None, "example.com"])),
                                         routing.Listener("other", 9090, "HTTP"))),)
    parents = [routing.ParentRef("Gateway", "edge"), routing.ParentRef("Gateway", "edge", section="other"),
               routing.ParentRef("Service", rng.choice(["a", "b"]), rng.choice(["default", "shop"]))]
    routes = tuple(
        routing.Route(f"r{i}", "default", (rng.choice(parents),), hostnames=rng.choice([(), ("example.com",)]),
                      rules=tuple(rule() for _ in range(rng.randint(1, 2))))
        for i in range(rng.randint(0, 3))
    )
    return rules.Policy(defaults=one(), services={model.ServiceKey("default/a"): one()},
                        retries=rng.choice([routing.Retries(), routing.Retries(attempts=0)]),
                        gateways=gateways, routes=routes)


def _encoded(built: dict[str, dict[str, object]]) -> dict[str, dict[str, str]]:
    return {t: {n: resources.build(n, m, type_url=t, seen_at=None).version  # type: ignore[arg-type]
                for n, m in msgs.items()} for t, msgs in built.items()}


@pytest.mark.parametrize("seed", range(12))
def test_the_incremental_cache_equals_a_build_from_scratch(seed: int) -> None:
    rng = random.Random(seed)
    catalog = catalog_mod.Catalog()
    catalog.apply(model.ClusterId("c1"), _cluster(rng, "c1", "r1"), seen_at=0.0)
    catalog.apply(model.ClusterId("c2"), _cluster(rng, "c2", "r2"), seen_at=0.0)
    kinds = generators.by_kind()
    view_cache = views.ViewCache(services=catalog.services, policy=rules.Policy(), generators=kinds)
    clients = [
        proxy.Proxy(id=f"p{i}", kind=proxy.Kind.SIDECAR, locality=model.Locality(region, zone, cluster),
                    namespace=namespace, labels=(("version", version),), listener=proxy.Listener(port=port))
        for i, (region, zone, cluster, namespace, version, port) in enumerate([
            ("r1", "z1", "c1", "default", "v1", 15001), ("r1", "z2", "c1", "shop", "v2", 15001),
            ("r2", "z1", "c2", "default", "v2", 15002), ("r1", "z1", "c1", "default", "v2", 15001),
        ])
    ]
    clients += [
        proxy.Proxy(id="edge", kind=proxy.Kind.GATEWAY, locality=model.Locality("r1", "z2", "c1"), gateway="edge",
                    listener=proxy.Listener("127.0.0.1")),
        proxy.Proxy(id="ghost", kind=proxy.Kind.GATEWAY, locality=model.Locality("r2", "z1", "c2"), gateway="ghost"),
        proxy.Proxy(id="grpc-1", kind=proxy.Kind.GRPC, locality=model.Locality("r1", "z1", "c1"),
                    labels=(("version", "v1"),)),
        proxy.Proxy(id="grpc-2", kind=proxy.Kind.GRPC, locality=model.Locality("r2", "z3", "c2"), namespace="shop"),
    ]
    signalled: dict[str, int] = {}
    watches = [view_cache.watch(c, lambda changes, c=c: signalled.__setitem__(c.id, signalled.get(c.id, 0) + 1))
               for c in clients]

    for step in range(25):
        policy = view_cache.policy
        changed: frozenset[model.ServiceKey] = frozenset()
        what = rng.random()
        if what < 0.7:
            cluster, region = rng.choice([("c1", "r1"), ("c2", "r2")])
            change = catalog.apply(model.ClusterId(cluster), _cluster(rng, cluster, region), seen_at=float(step))
            changed = change.services if change is not None else frozenset()
        else:
            policy = _policy(rng)
        view_cache.update(services=catalog.services, policy=policy, changed=changed, seen_at=float(step))
        for client, watch in zip(clients, watches, strict=True):
            key = client.view_key(policy.client_label_keys())
            assert watch.key == key  # moved to its new view when the policy reads other labels
            expected = _encoded(base.generate(kinds[key.kind], catalog.services, policy, key))  # type: ignore[arg-type]
            served = {t: {n: r.version for n, r in watch.resources(t).items()} for t in expected}
            assert served == expected, f"step {step}, {client.id}"
            assert watch.version(next(iter(expected))) == resources.type_version(
                watch.resources(next(iter(expected))).values())
    assert signalled, "no change was ever signalled"
