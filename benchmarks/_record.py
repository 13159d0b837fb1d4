"""The JSON record every benchmark writes: its rows, with the command, the software and the machine
that produced them (RESULTS cites each number with these)."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from levyattn.io import atomic_write_json


def write_record(out: str | Path, args: argparse.Namespace, rows: list[dict[str, Any]], **fields: Any) -> Path:
    """Write ``{"command", "args", "torch", "machine", "threads", **fields, "rows"}`` to ``out``
    atomically, and say where."""
    record = {
        "command": "python " + " ".join(sys.argv),
        "args": {name: str(v) if isinstance(v, Path) else v for name, v in vars(args).items()},
        "torch": torch.__version__,
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        **fields,
        "rows": rows,
    }
    path = atomic_write_json(out, record)
    print(f"wrote {path}")
    return path
