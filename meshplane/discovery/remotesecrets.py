"""Remote clusters from labelled Secrets in the local cluster (the multi-primary "remote secret" model).

A Secret labelled `meshplane.io/multicluster: "true"` in the watched
namespace carries one kubeconfig per data key; the key is the cluster id.
Whenever the set of such Secrets changes (added, rotated, deleted), the
registry is handed the new set of remote clusters and adds, reconnects or
removes them. Nothing happens before the first list: an empty set before
we have looked would remove every remote cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

import structlog

from meshplane.discovery import clusters, kube, kubemodel

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SecretRecord:
    name: str
    data: tuple[tuple[str, str], ...]


def _decode(obj: kubemodel.Obj, problems: kubemodel.Problems) -> SecretRecord | None:
    meta = obj.get("metadata") or {}
    data = obj.get("data") or {}
    return SecretRecord(name=str(meta.get("name", "")), data=tuple(sorted((str(k), str(v)) for k, v in data.items())))


class RemoteSecrets:
    """Watches labelled Secrets in `namespace` of the local cluster; keeps the registry's remote clusters in step."""

    def __init__(
        self, *, api_client: Any, namespace: str, registry: clusters.ClusterRegistry,
        options: kube.ReflectorOptions | None = None,
    ) -> None:
        self.namespace = namespace
        self.registry = registry
        base = options or kube.ReflectorOptions()
        self._owned = api_client  # ours to close
        self._client = kube.private_client(api_client)
        self._reflector: kube.Reflector[SecretRecord] = kube.Reflector(
            api_client=self._client,
            resource="secrets",
            namespace=namespace,
            decode=_decode,
            owner=self,
            problems=kubemodel.Problems(cluster="local"),
            options=dataclasses.replace(base, label_selector=f"{clusters.SECRET_LABEL}=true"),
            cluster="local",
        )
        self._pending: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()

    @property
    def origin(self) -> str:
        return f"secrets:{self.namespace}"

    async def start(self) -> None:
        self._reflector.start(asyncio.get_running_loop())

    async def stop(self) -> None:
        self._reflector.stop()
        await self._reflector.join()
        self._client.close()
        self._owned.close()
        if self._pending is not None:
            await self._pending

    # kube.Owner

    def on_change(self, reflector: kube.Reflector[Any], key: str, old: Any, new: Any, seen_at: float) -> None:
        if self._reflector.synced and not self._reflector.listing:
            self._sync()

    def on_listed(self, reflector: kube.Reflector[Any], seen_at: float) -> None:
        self._sync()

    def on_reachable(self, reflector: kube.Reflector[Any], reachable: bool, error: str) -> None:
        if not reachable:
            log.warning("remote secrets unreachable; keeping the remote clusters we have",
                        namespace=self.namespace, error=error)

    def _sync(self) -> None:
        secrets = {r.name: dict(r.data) for r in self._reflector.store.values()}
        specs, broken = clusters.specs_from_secrets(secrets, namespace=self.namespace)
        previous = self._pending

        async def apply() -> None:
            if previous is not None:
                await previous  # keep the order of successive updates
            await self.registry.set_origin(self.origin, specs, broken=broken)
            self.synced.set()

        self._pending = asyncio.get_running_loop().create_task(apply(), name=f"remote-secrets:{self.namespace}")
