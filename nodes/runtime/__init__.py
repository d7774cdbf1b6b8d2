"""Serving: the generation engine of one trunk (one base model, every node of its tree).

The request values (:mod:`nodes.runtime.requests`) are what transports translate to; the
engine (:mod:`nodes.runtime.engine`) admits them; the scheduler batches them iteration by
iteration on one model thread; the adapter bank applies every row's chain inside one
forward (plan: :mod:`nodes.runtime.plan`); the tiered adapter cache keeps chains warm; the
KV cache, sampling and incremental detokenisation are their own modules.
"""

__all__: list[str] = []
