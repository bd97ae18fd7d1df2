"""The view cache: shared per view, rebuilt per changed service only, signalled per watch."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from meshplane.discovery import catalog as catalog_mod
from meshplane.discovery import model
from meshplane.policy import rules
from meshplane.xds import cache, generators, proxy, resources, typeurls, views
from meshplane.xds.generators import sidecar

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


def _proxy(zone: str, port: int = 15001, name: str = "") -> proxy.Proxy:
    return proxy.Proxy(id=name or f"{zone}:{port}", kind=proxy.Kind.SIDECAR, locality=model.Locality("r1", zone, "c1"),
                       listener=proxy.Listener(port=port))


def _key(zone: str, port: int = 15001) -> proxy.ViewKey:
    return _proxy(zone, port).view_key(frozenset())


class Signals:
    """What each watch was told changed, by view key."""

    def __init__(self) -> None:
        self.seen: dict[proxy.ViewKey, dict[str, set[str]]] = {}

    def watch(self, view_cache: views.ViewCache, client: proxy.Proxy) -> cache.ViewWatch:
        key = client.view_key(frozenset())

        def on_change(changes: Mapping[str, cache.Names]) -> None:
            for type_url, names in changes.items():
                assert names is not cache.EVERY
                self.seen.setdefault(key, {}).setdefault(type_url, set()).update(names)

        return view_cache.watch(client, on_change)


def _cache(catalog: catalog_mod.Catalog) -> views.ViewCache:
    return views.ViewCache(services=catalog.services, policy=rules.Policy(), generators=generators.by_kind())


def test_a_change_rebuilds_only_that_service_for_live_views() -> None:
    catalog = catalog_mod.Catalog()
    catalog.apply(model.ClusterId("c1"), _services(), seen_at=0.0)
    view_cache = _cache(catalog)
    signals = Signals()
    z1, z2 = signals.watch(view_cache, _proxy("z1")), signals.watch(view_cache, _proxy("z2"))
    same_locality_other_port = signals.watch(view_cache, _proxy("z1", 15002))
    before_z1 = dict(z1.resources(typeurls.ENDPOINT))
    clusters_before = z1.resources(typeurls.CLUSTER)

    # Views of one locality share the very same built assignment; clusters are shared by all.
    assert same_locality_other_port.resources(typeurls.ENDPOINT)[MOCKB] is before_z1[MOCKB]
    assert z2.resources(typeurls.CLUSTER) is clusters_before

    change = catalog.apply(model.ClusterId("c1"), _services(mockb_weight=5), seen_at=1.0)
    assert change is not None and change.services == {"default/mockb"}
    touched = view_cache.update(services=catalog.services, policy=view_cache.policy, changed=change.services,
                                seen_at=1.0)

    # Only mockb's assignment changed, in every live view; nothing else is reported.
    assert touched == 3
    assert signals.seen == {k: {typeurls.ENDPOINT: {MOCKB}} for k in (_key("z1"), _key("z2"), _key("z1", 15002))}
    assert z1.resources(typeurls.ENDPOINT)[MOCKC] is before_z1[MOCKC]  # untouched service: not rebuilt
    assert z1.resources(typeurls.ENDPOINT)[MOCKB].version != before_z1[MOCKB].version
    assert z1.resources(typeurls.ENDPOINT)[MOCKB].seen_at == 1.0
    assert z1.resources(typeurls.CLUSTER) is clusters_before  # endpoint changes leave CDS alone


def test_equal_content_keeps_versions_and_views_are_dropped_with_their_last_stream() -> None:
    catalog = catalog_mod.Catalog()
    catalog.apply(model.ClusterId("c1"), _services(), seen_at=0.0)
    view_cache = _cache(catalog)
    signals = Signals()
    watch = signals.watch(view_cache, _proxy("z1"))
    touched = view_cache.update(services=catalog.services, policy=view_cache.policy,
                                changed=frozenset({model.ServiceKey("default/mockb")}), seen_at=2.0)
    assert touched == 0 and signals.seen == {}
    assert watch.resources(typeurls.ENDPOINT)[MOCKB].seen_at is None  # still the original build
    watch.close()
    assert view_cache.views == {}
    watch.close()  # a second close (a stream ending twice) changes nothing


def test_a_policy_change_rebuilds_assignments_only_where_locality_settings_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    placed: list[str] = []  # the services whose assignments were computed (placement.place called)
    place = sidecar.placement.place
    monkeypatch.setattr(sidecar.placement, "place",
                        lambda endpoints, **kw: placed.append(endpoints[0].address) or place(endpoints, **kw))
    catalog = catalog_mod.Catalog()
    catalog.apply(model.ClusterId("c1"), _services(), seen_at=0.0)
    view_cache = _cache(catalog)
    signals = Signals()
    z1 = signals.watch(view_cache, _proxy("z1"))
    eds_before = dict(z1.resources(typeurls.ENDPOINT))
    placed.clear()

    # Outlier detection for every service: every cluster changes, no assignment is rebuilt.
    ejecting = rules.ServicePolicy(outlier_detection=rules.OutlierDetection(consecutive_5xx_errors=1))
    view_cache.update(services=catalog.services, policy=rules.Policy(defaults=ejecting),
                      changed=frozenset(), seen_at=1.0)
    assert signals.seen == {_key("z1"): {typeurls.CLUSTER: {MOCKB, MOCKC}}}
    assert placed == []
    assert all(z1.resources(typeurls.ENDPOINT)[n] is eds_before[n] for n in (MOCKB, MOCKC))

    # mockb's locality settings change: its assignment is rebuilt (no more priorities), mockc's is not.
    signals.seen.clear()
    flat = rules.ServicePolicy(outlier_detection=ejecting.outlier_detection,
                               locality=rules.LocalitySettings(enabled=False))
    policy = rules.Policy(defaults=ejecting, services={model.ServiceKey("default/mockb"): flat})
    view_cache.update(services=catalog.services, policy=policy, changed=frozenset(), seen_at=2.0)
    assert signals.seen[_key("z1")][typeurls.ENDPOINT] == {MOCKB}
    assert len(placed) == 1
    assert z1.resources(typeurls.ENDPOINT)[MOCKB].version != eds_before[MOCKB].version
    assert z1.resources(typeurls.ENDPOINT)[MOCKC] is eds_before[MOCKC]


def test_a_piece_s_version_kept_up_to_date_is_the_version_summed_afresh() -> None:
    """The version of a per-service piece is kept as a running sum of marks (not summed again over
    10,000 assignments at every change): through changes, removals and additions it must equal the
    version of what the piece holds, and come back to the first version when the content does."""
    catalog = catalog_mod.Catalog()
    catalog.apply(model.ClusterId("c1"), _services(), seen_at=0.0)
    view_cache = _cache(catalog)
    watch = Signals().watch(view_cache, _proxy("z1"))
    first = watch.version(typeurls.ENDPOINT)
    assert first == resources.type_version(watch.resources(typeurls.ENDPOINT).values())

    mockc_only = {k: v for k, v in _services().items() if v.name == "mockc"}
    for step, services in enumerate((_services(mockb_weight=5), mockc_only, _services(mockb_weight=3), _services())):
        change = catalog.apply(model.ClusterId("c1"), services, seen_at=float(step))
        assert change is not None
        view_cache.update(services=catalog.services, policy=view_cache.policy, changed=change.services,
                          seen_at=float(step))
        held = watch.resources(typeurls.ENDPOINT)
        assert (MOCKB in held) == (services is not mockc_only)
        assert watch.version(typeurls.ENDPOINT) == resources.type_version(held.values()), f"step {step}"
    assert watch.version(typeurls.ENDPOINT) == first  # the same content again: the same version
