"""``levyattn demo``: FNA alpha 1.2 vs alpha 2 vs softmax on embedded data; verdicts, table, plots, HTML."""

from __future__ import annotations

import argparse

HELP = ("FNA (alpha 1.2, alpha 2) vs softmax, one layer and one head, on a multiscale task and digits, several "
        "seeds; verdicts with their uncertainty and an HTML report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="levyattn-demo", help="output folder (default levyattn-demo/)")
    parser.add_argument("--quick", action="store_true", help="tiny models and data: seconds, for smoke tests")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds (default 0,1,2,3,4,5; 0 with --quick); a difference is claimed "
                             "only with 6 or more")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while training (default 1: these models are too small to gain from more)")
    parser.add_argument("--workers", type=int, default=None,
                        help="models trained at a time, one process each (default: CPU cores, up to 2)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (bars show with --workers 1; else one line per model)")


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from levyattn._extras import require_all

    require_all({"train": ("sklearn",), "report": ()}, purpose="levyattn demo")
    from levyattn.training.demo import run_demo

    try:
        seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else None
    except ValueError as err:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from err
    print("levyattn demo: one-layer, one-head models that differ only in their attention (embedded data only)",
          flush=True)
    result = run_demo(args.out, quick=args.quick, seeds=seeds, progress=not args.no_progress,
                      log=lambda m: print("  " + m, flush=True), threads=args.threads,
                      workers=args.workers if args.workers is not None else min(2, os.cpu_count() or 1))
    print()
    print(result["table"])
    print("Verdict (paired by seed, test accuracy):")
    for comparison in result["comparisons"]:
        print("  " + comparison["sentence"])
    print(f"done in {result['total_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU. "
          f"Report: {Path(result['report']).resolve()}")
    return 0
