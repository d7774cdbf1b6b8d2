"""Fine-tuning jobs: a tenant's training file becomes a new node of the tree while it serves.

data.py checks uploads; spec.py the job's hyperparameters and the new node's id; the runner
(runner.py: ``JobRunner``, the ``Launcher`` interface, ``ProcessLauncher``) claims queued jobs from
the registry and starts each in a worker (worker.py's ``run_job``, in a separate process or a Ray
task), which trains and gates the node (train.py); the update desk then registers, signs and
serves it (``cluster.updates.grow``).

Nothing is re-exported here: train.py imports torch, and the CLI's help must not. Import from the
modules (``cluster.jobs.runner.JobRunner``, ``cluster.jobs.worker.run_job``, ...).
"""

__all__: list[str] = []
