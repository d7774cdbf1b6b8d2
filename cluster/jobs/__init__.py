"""Fine-tuning jobs: a tenant's training file becomes a new node of the tree while it serves.

data.py checks uploads; spec.py the job's hyperparameters and the new node's id; the runner
(runner.py) claims queued jobs from the registry, trains each in a worker (train.py, in a separate
process or a Ray task), gates it against its parent on held-out text, and has the update desk
register, sign and serve it (cluster.updates.grow).
"""

__all__: list[str] = []
