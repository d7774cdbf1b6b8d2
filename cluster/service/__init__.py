"""One server's composition: the gRPC servicers (translation only), auth and node access,
the catalog over the registry, the error -> status table (interceptors), Prometheus
metrics, health, and the trunk shape the servicers call. ``treelm serve`` runs it in one
process; the Ray ingress runs the same code with remote trunks (:mod:`cluster.ray`).
"""

__all__: list[str] = []
