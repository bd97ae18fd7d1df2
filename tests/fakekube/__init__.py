"""A fake Kubernetes API server for tests, spoken to with the real `kubernetes` client.

    with FakeKubeAPI("east") as east:
        east.put("services", service("web", "shop", ports=[80]))
        api = kubernetes.config.new_client_from_config_dict(east.kubeconfig(cluster="east"))

Modules: server (FakeKubeAPI: state and failure injection), wire (the HTTP list/watch
protocol), store (objects, history, compaction, selectors), builders (Kubernetes objects).
"""

from tests.fakekube.builders import (
    endpoint,
    endpoint_slice,
    kubeconfig_secret,
    namespace,
    node,
    pod,
    service,
)
from tests.fakekube.server import FakeKubeAPI
from tests.fakekube.store import KINDS
from tests.fakekube.wire import RequestRecord

__all__ = [
    "KINDS",
    "FakeKubeAPI",
    "RequestRecord",
    "endpoint",
    "endpoint_slice",
    "kubeconfig_secret",
    "namespace",
    "node",
    "pod",
    "service",
]
