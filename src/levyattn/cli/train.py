"""``levyattn train``: train a preset (or continue a run) and print its metrics."""

from __future__ import annotations

import argparse

HELP = "train a preset (the paper's settings or a small one); --resume DIR continues a run exactly"

EPILOG = """
Presets: `levyattn train --list`. Settings: --set key=value (repeatable), with key a dotted
path (train.lr=3e-4, model.alpha=1.4) or a bare key (epochs=3, alpha=1.6, data_dir=PATH).
Real datasets are never downloaded: point data_dir at them, e.g.
  levyattn train --preset imdb-1layer-h32 --set data_dir=/data/aclImdb
  levyattn train --preset cifar10-vit --set data_dir=/data/cifar-10-batches-py
Data parallel: torchrun --nproc_per_node 2 -m levyattn train --preset digits-vit
(gloo on CPU, NCCL on GPU; the batch_size setting is the global batch).
"""


def _run_folder(args: argparse.Namespace) -> str | None:
    """The folder the run writes: --resume's, else --out, else runs/<preset>; None without either."""
    return args.resume or args.out or (f"runs/{args.preset}" if args.preset else None)


def after_interrupt(args: argparse.Namespace) -> str:
    """How to continue a run stopped by Ctrl-C: from its last checkpoint, or from the start."""
    from pathlib import Path

    from levyattn.training.checkpoint import JSON_NAME

    out = _run_folder(args)
    if out is None:
        return ""
    if (Path(out) / JSON_NAME).is_file():
        return f"its last checkpoint is in {out}; continue it with: levyattn train --resume {out}"
    return f"no checkpoint was written in {out} yet; start it again with --overwrite"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--preset", help="preset name (see --list)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a preset setting; repeatable")
    parser.add_argument("--out", default=None,
                        help="run folder (default runs/<preset>); one that holds a run is refused (see --overwrite)")
    parser.add_argument("--resume", metavar="DIR", default=None,
                        help="continue the run in DIR from its checkpoint (its preset is read from there)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a --out folder that holds a run, deleting that run")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default: the preset's")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _unreadable(err: Exception, run_dir: str) -> str:
    """``err`` (a checkpoint that cannot be used) with what the user can do: a run folder keeps
    one checkpoint, so there is no older one to fall back on."""
    return (f"{err}. {run_dir} keeps one checkpoint: restore its checkpoint.json and ckpt-*.safetensors from a "
            f"copy to continue the run, or start it over with levyattn train --preset NAME --out {run_dir} --overwrite")


def run(args: argparse.Namespace) -> int:
    import json

    from levyattn.io import DataFormatError
    from levyattn.training.checkpoint import CheckpointError
    from levyattn.training.distributed import cleanup, init_distributed
    from levyattn.training.presets import all_presets, apply_overrides, get_preset, preset_from_run, train_preset

    if args.list:
        presets = all_presets()
        width = max(map(len, presets))
        for name, p in sorted(presets.items()):
            print(f"{name:<{width}}  {p.get('description', '')}")
        return 0
    if args.resume and args.overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces one: give one of them")
    if args.resume:
        try:
            preset = apply_overrides(preset_from_run(args.resume), args.overrides)
        except DataFormatError as err:
            raise DataFormatError(_unreadable(err, args.resume)) from err
    elif args.preset:
        preset = apply_overrides(get_preset(args.preset), args.overrides)
    else:
        raise ValueError("give --preset NAME (see --list) or --resume DIR")
    out = _run_folder(args)
    if args.device:
        preset["train"]["device"] = args.device
    info = init_distributed(None if preset["train"].get("device", "auto") == "auto" else preset["train"]["device"])
    try:
        def show(record: dict) -> None:
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()}),
                  flush=True)

        try:
            result, _ = train_preset(preset, out, resume=bool(args.resume), overwrite=args.overwrite,
                                     progress=not args.no_progress, dist_info=info, on_epoch_end=show)
        except CheckpointError as err:
            raise CheckpointError(_unreadable(err, out) if args.resume else str(err)) from err
    finally:
        cleanup()
    if info.is_main:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
        print(f"done: {metrics}; {result['params']} parameters, {result['train_time_s']:.1f}s training, "
              f"{result['samples_per_s']:.0f} samples/s")
        print(f"run folder: {out} (metrics.csv, metrics.jsonl, checkpoint.json)")
    return 0
