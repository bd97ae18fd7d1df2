"""The view cache: shared per view, rebuilt per changed service only."""

from __future__ import annotations

import pytest

from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import model
from meshplane.policy import types as policy_types
from meshplane.xds import types, views

MOCKB = "outbound|8000||mockb.default.svc.cluster.local"
MOCKC = "outbound|8000||mockc.default.svc.cluster.local"


def _services(mockb_weight: int = 1) -> dict[model.ServiceKey, model.ServiceInCluster]:
    out = {}
    for name, weight in (("mockb", mockb_weight), ("mockc", 1)):
        eps = tuple(
            model.Endpoint(address=f"10.0.{i}.1", ports=(("http", 8080),),
                           locality=model.Locality("r1", zone, "c1"), weight=weight)
            for i, zone in enumerate(("z1", "z2"))
        )
        svc = model.ServiceInCluster(name=name, namespace="default", ports=(model.ServicePort("http", 8000),),
                                     endpoints=eps)
        out[svc.key] = svc
    return out


def _key(zone: str, port: int = 15001) -> views.ViewKey:
    return views.ViewKey(role="sidecar", locality=model.Locality("r1", zone, "c1"), listener_port=port)


def test_a_change_rebuilds_only_that_service_for_live_views() -> None:
    catalog = catalog_mod.Catalog()
    catalog.apply(model.ClusterId("c1"), _services(), seen_at=0.0)
    cache = views.ViewCache(services=catalog.services, policy=policy_types.Policy())
    z1, z2 = cache.acquire(_key("z1")), cache.acquire(_key("z2"))
    same_locality_other_port = cache.acquire(_key("z1", 15002))
    before_z1 = dict(z1.resources[types.ENDPOINT])
    clusters_before = z1.resources[types.CLUSTER]

    # Views of one locality share the very same built assignment; clusters are shared by all.
    assert same_locality_other_port.resources[types.ENDPOINT][MOCKB] is before_z1[MOCKB]
    assert z2.resources[types.CLUSTER] is clusters_before

    change = catalog.apply(model.ClusterId("c1"), _services(mockb_weight=5), seen_at=1.0)
    assert change is not None and change.services == {"default/mockb"}
    changed = cache.update(services=catalog.services, policy=cache.policy, changed=change.services, seen_at=1.0)

    # Only mockb's assignment changed, in every live view; nothing else is reported.
    assert changed == {k: {types.ENDPOINT: {MOCKB}} for k in (_key("z1"), _key("z2"), _key("z1", 15002))}
    assert z1.resources[types.ENDPOINT][MOCKC] is before_z1[MOCKC]  # untouched service: not rebuilt
    assert z1.resources[types.ENDPOINT][MOCKB].version != before_z1[MOCKB].version
    assert z1.resources[types.ENDPOINT][MOCKB].seen_at == 1.0
    assert z1.resources[types.CLUSTER] is clusters_before  # endpoint changes leave CDS alone


def test_equal_content_keeps_versions_and_views_are_dropped_with_their_last_stream() -> None:
    catalog = catalog_mod.Catalog()
    catalog.apply(model.ClusterId("c1"), _services(), seen_at=0.0)
    cache = views.ViewCache(services=catalog.services, policy=policy_types.Policy())
    view = cache.acquire(_key("z1"))
    changed = cache.update(services=catalog.services, policy=cache.policy,
                           changed=frozenset({model.ServiceKey("default/mockb")}), seen_at=2.0)
    assert changed == {}
    assert view.resources[types.ENDPOINT][MOCKB].seen_at is None  # still the original build
    cache.release(_key("z1"))
    assert cache.views == {}


def test_a_policy_change_rebuilds_assignments_only_where_locality_settings_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    placed: list[str] = []  # the services whose assignments were computed (locality.place called)
    place = views.locality_mod.place
    monkeypatch.setattr(views.locality_mod, "place",
                        lambda endpoints, **kw: placed.append(endpoints[0].address) or place(endpoints, **kw))
    catalog = catalog_mod.Catalog()
    catalog.apply(model.ClusterId("c1"), _services(), seen_at=0.0)
    cache = views.ViewCache(services=catalog.services, policy=policy_types.Policy())
    z1 = cache.acquire(_key("z1"))
    eds_before = dict(z1.resources[types.ENDPOINT])
    placed.clear()

    # Outlier detection for every service: every cluster changes, no assignment is rebuilt.
    ejecting = policy_types.ServicePolicy(outlier_detection=policy_types.OutlierDetection(consecutive_5xx_errors=1))
    changed = cache.update(services=catalog.services, policy=policy_types.Policy(defaults=ejecting),
                           changed=frozenset(), seen_at=1.0)
    assert changed == {_key("z1"): {types.CLUSTER: {MOCKB, MOCKC}}}
    assert placed == []
    assert all(z1.resources[types.ENDPOINT][n] is eds_before[n] for n in (MOCKB, MOCKC))

    # mockb's locality settings change: its assignment is rebuilt (no more priorities), mockc's is not.
    flat = policy_types.ServicePolicy(outlier_detection=ejecting.outlier_detection,
                                      locality=policy_types.LocalitySettings(enabled=False))
    policy = policy_types.Policy(defaults=ejecting, services={model.ServiceKey("default/mockb"): flat})
    changed = cache.update(services=catalog.services, policy=policy, changed=frozenset(), seen_at=2.0)
    assert changed[_key("z1")][types.ENDPOINT] == {MOCKB}
    assert len(placed) == 1
    assert z1.resources[types.ENDPOINT][MOCKB].version != eds_before[MOCKB].version
    assert z1.resources[types.ENDPOINT][MOCKC] is eds_before[MOCKC]
