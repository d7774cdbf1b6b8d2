"""Serving: the generation engine of one trunk (one base model, every node of its tree).

The request values (:mod:`nodes.runtime.requests`) are what transports translate to; the
engine (:mod:`nodes.runtime.engine`) admits them; the scheduler batches them iteration by
iteration on one model thread, taking waiting requests from one queue per tenant by deficit
round robin (:mod:`nodes.runtime.fair`), each request a job of ``n`` rows (:mod:`nodes.runtime.jobs`);
the adapter bank applies every row's chain inside one forward (plan: :mod:`nodes.runtime.plan`);
the tiered adapter cache keeps chains warm; the KV cache, per-row token choice (sampling,
penalties, bias: :mod:`nodes.runtime.sampling`), structured output (:mod:`nodes.runtime.grammar`),
log-probabilities (:mod:`nodes.runtime.logprobs`) and incremental detokenisation are their own
modules.
"""

__all__: list[str] = []
