"""The Ray cluster: cluster.yaml (:mod:`cluster.ray.config`), starting and joining Ray on
explicit ports (:mod:`cluster.ray.runtime`), the Serve applications (:mod:`cluster.ray.app`):
one trunk deployment per tree (:mod:`cluster.ray.replica`) and the gRPC ingress that runs
:mod:`cluster.service` with remote trunks (:mod:`cluster.ray.ingress`,
:mod:`cluster.ray.backend`), the update desk actor (:mod:`cluster.ray.desk`), replica reports
(:mod:`cluster.ray.board`) and `treelm cluster status` (:mod:`cluster.ray.status`).
Only this package imports Ray.
"""

__all__: list[str] = []
