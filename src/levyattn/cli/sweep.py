"""``levyattn sweep``: a preset over alpha x attention x seed; table, JSON, CSV, spectral gaps."""

from __future__ import annotations

import argparse

HELP = "sweep a preset over alphas, attention kinds and seeds (finished runs are skipped on re-run)"


def after_interrupt(args: argparse.Namespace) -> str:
    return ("run the same command again to continue: finished runs are kept and the interrupted one "
            "resumes from its last checkpoint")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help="preset name (see `levyattn train --list`)")
    parser.add_argument("--alphas", type=_floats, default=None, help="e.g. 1,1.2,1.6,2 (default: the preset's)")
    parser.add_argument("--attention", type=_names, default=None, help="fna,softmax (default: the preset's)")
    parser.add_argument("--seeds", type=_ints, default=None, help="e.g. 0,1,2 (default: the preset's)")
    parser.add_argument("--restarts", type=int, default=None,
                        help="trainings per seed, the lowest final training loss kept (default: the preset's, else 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a preset setting for every run; repeatable")
    parser.add_argument("--out", default=None, help="sweep folder (default runs/sweep-<preset>)")
    parser.add_argument("--gap-samples", type=int, default=64, help="test inputs for the spectral gap")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from levyattn.training.presets import apply_overrides, get_preset
    from levyattn.training.sweep import run_sweep

    preset = apply_overrides(get_preset(args.preset), args.overrides)
    defaults = preset.get("sweep", {})
    alphas = args.alphas if args.alphas is not None else defaults.get("alphas", [preset["model"].get("alpha", 1.2)])
    attention = args.attention if args.attention is not None else defaults.get("attention", ["fna"])
    seeds = args.seeds if args.seeds is not None else defaults.get("seeds", [0])
    restarts = args.restarts if args.restarts is not None else defaults.get("restarts", 1)
    out = args.out or f"runs/sweep-{args.preset}"
    result = run_sweep(preset, alphas=alphas, attentions=attention, seeds=seeds, restarts=restarts, out_dir=out,
                       progress=not args.no_progress, gap_samples=args.gap_samples,
                       log=lambda m: print(m, flush=True))
    print()
    print(result.table())
    print(f"\nresults: {out}/results.json, {out}/runs.csv, {out}/summary.csv, {out}/table.md")
    return 0
