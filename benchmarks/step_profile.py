"""One stream's decode step in the engine: where the time goes, model forward against the engine's Python.

    .venv/bin/python benchmarks/step_profile.py [--tree examples/demo/build] [--node NODE] [--threads 2]

One request at a time (greedy, ``--tokens`` new tokens, eos ignored) on the node with the
deepest chain, through :class:`nodes.runtime.Engine` in this process. Reported, per decode step
(medians over ``--requests`` requests after a warm-up):

* ``step``     the scheduler's whole ``_decode`` (plan, inputs, forward, sampling, delivery);
* ``forward``  the model's forward inside it; ``engine`` = step - forward;
* of the forward, the share outside torch operators (torch.profiler, one more request: each
  decode forward is a ``decode_forward`` range, whose own time is what its operators do not
  account for): the module tree's Python (transformers' layers, the adapter bank's
  ``BankLinear``) and the dispatcher; ``ops`` and ``python`` split the forward by that share;
* tokens/s of the stream (wall clock, prefill included), then the top operators and, from
  cProfile, the top Python functions by own time.

Writes benchmarks/results/step_profile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from nodes.runtime.engine import Engine, EngineConfig  # noqa: E402
from nodes.runtime.requests import GenerationRequest, SamplingParams  # noqa: E402
from nodes.runtime.scheduler import Scheduler  # noqa: E402
from nodes.store.versions import open_served_tree  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PROMPT = "REPORT: CT of the chest performed on Tuesday. COMPARISON: none available."


class StepClock:
    """Times every ``Scheduler._decode`` and the model forward inside it (patched on the class).

    Each decode forward is also a ``decode_forward`` range for torch.profiler, so that the
    operators' time can be summed over decode forwards alone (no prefill).
    """

    def __init__(self, model: torch.nn.Module):
        self.steps: list[float] = []
        self.forwards: list[float] = []
        self._original = Scheduler._decode
        self._in_decode = False
        self._start = 0.0
        self._range: Any = None
        clock = self

        def decode(scheduler: Any) -> None:
            started = time.perf_counter()
            clock._in_decode = True
            try:
                clock._original(scheduler)
            finally:
                clock._in_decode = False
            clock.steps.append(time.perf_counter() - started)

        def before(*_: object) -> None:
            if self._in_decode:
                self._range = torch.profiler.record_function("decode_forward")
                self._range.__enter__()
                self._start = time.perf_counter()

        def after(*_: object) -> None:
            if self._in_decode:
                self.forwards.append(time.perf_counter() - self._start)
                self._range.__exit__(None, None, None)

        self._patched = decode
        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)

    def __enter__(self) -> StepClock:
        Scheduler._decode = self._patched  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        Scheduler._decode = self._original  # type: ignore[method-assign]

    def reset(self) -> None:
        self.steps.clear()
        self.forwards.clear()


def python_share(events: Any) -> float:
    """Of the profiled decode forwards' time, the share outside torch operators (Python, dispatch)."""
    ranges = [e for e in events if e.name == "decode_forward"]
    total = sum(e.cpu_time_total for e in ranges)
    return sum(e.self_cpu_time_total for e in ranges) / total if total else float("nan")


def stream(engine: Engine, node: str, tokens: int, requests: int) -> float:
    """Tokens/s of ``requests`` greedy requests one after another."""

    async def run() -> int:
        done = 0
        for _ in range(requests):
            params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
            result = await engine.generate(GenerationRequest(node=node, prompt=PROMPT, params=params))
            done += len(result.token_ids)
        return done

    started = time.perf_counter()
    done = asyncio.run(run())
    return done / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=REPO / "examples" / "demo" / "build")
    parser.add_argument("--node", default="", help="default: the node with the deepest chain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.tree / "tree.json").is_file():
        print(f"skipped: no built tree at {args.tree}; build it with `make demo`")
        return 0
    torch.set_num_threads(args.threads)
    engine = Engine(open_served_tree(args.tree).base_dir, args.tree, EngineConfig(prefix_cache_bytes=0))
    try:
        deepest = max(engine.tree.nodes, key=lambda n: (len(engine.tree.chain(n.node_id)), str(n.node_id)))
        node = args.node or str(deepest.node_id)  # as llamacpp_bench.py picks it
        clock = StepClock(engine.base.model)
        with clock:
            stream(engine, node, args.tokens, 1)  # warm
            clock.reset()
            tps = stream(engine, node, args.tokens, args.requests)
            steps, forwards = clock.steps[:], clock.forwards[:]
            # Both profilers run on the engine's model thread: scheduler.call runs a function there.
            on_engine = engine._scheduler.call
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            on_engine(profiler.__enter__).result()
            stream(engine, node, args.tokens, 1)
            on_engine(lambda: profiler.__exit__(None, None, None)).result()
            profile = cProfile.Profile()
            on_engine(profile.enable).result()
            stream(engine, node, args.tokens, 1)
            on_engine(profile.disable).result()
        share = python_share(profiler.events())
        top_ops = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(15)
    finally:
        engine.close()
    step, forward = statistics.median(steps), statistics.median(forwards)
    figures = {
        "node": node,
        "threads": args.threads,
        "tokens_per_s": tps,
        "step_ms": 1000 * step,
        "forward_ms": 1000 * forward,
        "engine_ms": 1000 * (step - forward),
        "python_share_of_forward": share,
        "ops_ms_per_forward": 1000 * forward * (1 - share),
        "python_in_forward_ms": 1000 * forward * share,
    }
    print(top_ops)
    print("\n".join(text.getvalue().splitlines()[:40]))
    print(
        f"one stream on {node}, {args.threads} threads: {tps:.1f} tok/s; per decode step {figures['step_ms']:.2f} ms = "
        f"forward {figures['forward_ms']:.2f} ms (torch ops {figures['ops_ms_per_forward']:.2f}, python "
        f"{figures['python_in_forward_ms']:.2f}) + engine {figures['engine_ms']:.2f} ms"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_profile.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
