"""The fused CPU kernel's one-time build, as a new user meets it: the first run, the next one, a
second checkout of the same source, a version with another source, and the first checkout again.

Each row is a fresh Python process that loads the kernel (``fused_cpu.ensure_built()``), timed
from start to exit, so it includes importing torch. The builds go to a new, empty
``TORCH_EXTENSIONS_DIR``; the second checkout and the other version are copies of ``--src``
(the other version with a comment appended to ``fna_cpu.cpp``).

    python benchmarks/kernel_build.py                      # this checkout
    python benchmarks/kernel_build.py --src /path/to/another/checkout/src

Prints a table and writes JSON (default benchmarks/results/kernel_build.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LOAD = "from levyattn.backends.fused_cpu import ensure_built; assert ensure_built(), 'the kernel did not build'"


def _timed_load(src: Path, extensions: Path) -> float:
    """Seconds for a fresh process with ``src`` first on the path to load (or build) the kernel."""
    env = {**os.environ, "PYTHONPATH": str(src), "TORCH_EXTENSIONS_DIR": str(extensions)}
    env.pop("LEVYATTN_COMPILE", None)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOAD], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def _shown(src: Path) -> str:
    """``src`` as the results file records it: relative to this checkout when inside it, so the
    file names no folder of the machine it was measured on."""
    resolved = src.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(src)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the checkout's src folder")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kernel_build.json")
    args = parser.parse_args()
    from levyattn.io import atomic_write_json

    with tempfile.TemporaryDirectory(prefix="levyattn-kernel-build-") as tmp:
        tmp = Path(tmp)
        same, other = tmp / "same" / "src", tmp / "other" / "src"
        for copy in (same, other):
            shutil.copytree(args.src, copy, ignore=shutil.ignore_patterns("__pycache__"))
        with open(other / "levyattn" / "backends" / "csrc" / "fna_cpu.cpp", "a") as fh:
            fh.write("\n// another version\n")
        extensions = tmp / "torch_extensions"
        plan = [("first run (builds)", args.src), ("second run", args.src), ("second checkout, same source", same),
                ("another version, first run (builds)", other), ("another version, second run", other),
                ("first checkout again", args.src)]
        rows = [{"run": label, "seconds": round(_timed_load(src, extensions), 2)} for label, src in plan]
    width = max(len(r["run"]) for r in rows)
    print(f"{'run':<{width}}  seconds")
    for r in rows:
        print(f"{r['run']:<{width}}  {r['seconds']:7.1f}")
    atomic_write_json(args.out, {"rows": rows, "torch": torch.__version__, "python": platform.python_version(),
                                 "cpu_count": os.cpu_count(), "src": _shown(args.src)})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
