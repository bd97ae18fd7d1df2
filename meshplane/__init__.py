"""meshplane: an Envoy xDS control plane for multi-cluster locality failover."""
