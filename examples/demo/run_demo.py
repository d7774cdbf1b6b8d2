"""`make demo`'s scenario: python examples/demo/run_demo.py [--cluster examples/demo/cluster.yaml].

Needs a built tree (`treelm tree build examples/demo/tree.yaml --out examples/demo/build`).
Writes demo-report/ (tables as JSON, tree.png, tokens_per_s.png); Ctrl-C stops every server.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `examples.demo.scenario` and the project's packages

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=here / "build", help="built tree dir")
    parser.add_argument("--state", type=Path, default=here / "state", help="keys, registry, working copy")
    parser.add_argument("--report", type=Path, default=ROOT / "demo-report", help="where tables and PNGs go")
    parser.add_argument("--notes", type=Path, default=here / "oncology-notes.txt", help="the hospital's local notes")
    parser.add_argument(
        "--cluster",
        type=Path,
        default=None,
        help="cluster.yaml: serve on a Ray cluster (treelm cluster up) instead of one process",
    )
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--update-steps", type=int, default=4)
    parser.add_argument("--update-lr", type=float, default=0.002)
    parser.add_argument("--policy", type=Path, default=here / "update-policy.yaml", help="the tree's update policy")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the hospital's local fine-tune (it runs beside the cluster's start: one core each)",
    )
    parser.add_argument(
        "--clinic-answers",
        type=int,
        default=120,
        help="step 5: cardiology answers the clinicians rate and correct (0 skips the step)",
    )
    parser.add_argument(
        "--clinic-notes",
        type=Path,
        default=here / "northfield-notes.txt",
        help="step 6: a second clinic's notes for its own node through a fine-tuning job ('none' skips the step)",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from examples.demo.scenario import DemoConfig, DemoError, run

    try:
        from rich.console import Console

        console = Console() if sys.stdout.isatty() else Console(width=140)  # logs: wide enough for the tables
        run(
            DemoConfig(
                args.tree,
                args.state,
                args.report,
                args.notes,
                args.cluster,
                args.max_new_tokens,
                args.update_steps,
                args.update_lr,
                args.policy,
                args.threads,
                args.clinic_answers,
                None if str(args.clinic_notes) == "none" else args.clinic_notes,
            ),
            console,
        )
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
