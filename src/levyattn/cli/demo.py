"""``levyattn demo``: FNA alpha 1.2 vs alpha 2 vs softmax on embedded data; table, plots, HTML."""

from __future__ import annotations

import argparse

HELP = "FNA (alpha 1.2, alpha 2) vs softmax, one layer and one head, on digits and a multiscale task; HTML report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="levyattn-demo", help="output folder (default levyattn-demo/)")
    parser.add_argument("--quick", action="store_true", help="tiny models and data: seconds, for smoke tests")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from levyattn.training.demo import run_demo

    print("levyattn demo: training 6 one-layer, one-head models (embedded data only)", flush=True)
    result = run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress,
                      log=lambda m: print("  " + m, flush=True))
    print()
    print(result["table"])
    print(f"done in {result['total_s']:.0f} s. Report: {Path(result['report']).resolve()}")
    return 0
