"""`levyattn atlas`: the published gamma measurements (and yours) with alpha, s and regime."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "print the gamma atlas (published + your own) with the fractional reading; add entries"

_SORT = ("gamma", "model", "corpus", "alpha", "s", "r2", "regime")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", nargs="+", default=None, help="keep these corpora only (random, mongo, ...)")
    p.add_argument("--regime", choices=("smoothing", "crossover", "differentiating"), default=None)
    p.add_argument("--model", default=None, help="keep models whose id contains this text")
    p.add_argument("--sort", choices=_SORT, default="gamma", help="sort key (default gamma)")
    p.add_argument("--desc", action="store_true", help="sort descending")
    p.add_argument("--user", default=None, metavar="FILE",
                   help="your atlas file (default $LEVYATTN_ATLAS or ~/.local/share/levyattn/atlas.json)")
    p.add_argument("--no-published", action="store_true", help="show only your entries")
    p.add_argument("--tol", type=float, default=0.05, help="crossover half-width for entries without a CI")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.add_argument_group("add an entry to your atlas file")
    a.add_argument("--add", metavar="LENS_JSON|MODEL", default=None,
                   help="a lens.json written by `levyattn lens` (its measurement with protocol and provenance), "
                        "or a model id with --gamma and --add-corpus")
    a.add_argument("--gamma", type=float, default=None)
    a.add_argument("--add-corpus", default=None, help="corpus of the new entry (random, a name or a file)")
    a.add_argument("--r2", type=float, default=None)
    a.add_argument("--ci", type=float, nargs=2, metavar=("LO", "HI"), default=None)
    a.add_argument("--ci-level", type=float, default=None, metavar="LEVEL",
                   help="confidence level of --ci, in (0, 1) (default 0.95)")
    a.add_argument("--notes", default=None)


def _ci_text(ci: tuple[float, float] | None, level: float | None) -> str:
    """'[lo, hi] (95%)'; an entry written before levels were recorded shows '(level ?)'."""
    if ci is None:
        return "-"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}] " + (f"({level * 100:g}%)" if level is not None else "(level ?)")


def run(args: argparse.Namespace) -> int:
    from levyattn.io import read_json
    from levyattn.lens.atlas import (
        PUBLISHED_SOURCE,
        append_to_atlas,
        default_user_atlas_path,
        entry_from_lens_result,
        load_published_atlas,
        load_user_atlas,
        select_entries,
    )

    user_path = args.user or default_user_atlas_path()
    if args.add:
        if Path(args.add).is_file():
            entry = entry_from_lens_result(read_json(args.add, "lens result"), corpus=args.add_corpus,
                                           notes=args.notes, where=f"lens result {args.add}")  # fmt: skip
        else:
            if args.gamma is None or args.add_corpus is None:
                raise ValueError(f"--add {args.add!r} is no file: a manual entry needs --gamma and --add-corpus")
            if args.ci_level is not None and args.ci is None:
                raise ValueError(f"--ci-level {args.ci_level} needs --ci LO HI")
            ci_level = (0.95 if args.ci_level is None else args.ci_level) if args.ci else None
            entry = {"model": args.add, "corpus": args.add_corpus, "gamma": args.gamma, "r2": args.r2,
                     "ci": list(args.ci) if args.ci else None, "ci_level": ci_level, "notes": args.notes}  # fmt: skip
            entry = {k: v for k, v in entry.items() if v is not None}
        path = append_to_atlas(user_path, entry)
        e = entry if isinstance(entry, dict) else entry.to_json()
        print(f"added {e['model']} ({e['corpus']}, gamma {e['gamma']:.4f}) to {path} (local)")
        return 0

    entries = [] if args.no_published else load_published_atlas()
    if Path(user_path).exists():
        entries += load_user_atlas(user_path)
    elif args.user:
        raise FileNotFoundError(f"atlas file not found: {user_path}")
    rows = select_entries(entries, corpus=args.corpus, regime=args.regime, model_contains=args.model,
                          sort_by=args.sort, descending=args.desc, tol=args.tol)
    if args.json:
        out = [{**e.to_json(), "origin": e.origin, "local": e.origin != "published", "alpha": r.alpha, "s": r.s,
                "regime": r.regime, "levy_valid": r.levy_valid} for e, r in rows]
        print(json.dumps({"source": PUBLISHED_SOURCE, "entries": out}, indent=2))
        return 0
    header = ("model", "corpus", "protocol", "gamma", "CI (level)", "R²", "alpha", "s", "regime", "Lévy",
              "authors' phase", "origin")
    table = []
    for e, r in rows:
        fit = e.fit_range()
        protocol = (e.protocol or "-") + (f" d{fit[0]}-{fit[1]}" if fit else "")
        table.append((
            e.model, e.corpus, protocol, f"{e.gamma:.4f}",
            _ci_text(e.ci, e.ci_level),
            f"{e.r2:.4f}" if e.r2 is not None else "-", f"{r.alpha:+.4f}", f"{r.s:+.4f}", r.regime,
            "yes" if r.levy_valid else "no", e.phase or "-", "published" if e.origin == "published" else "local",
        ))
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    counts = {k: sum(1 for _, r in rows if r.regime == k) for k in ("smoothing", "crossover", "differentiating")}
    print(f"\n{len(rows)} entries: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    print(f"regime: CI contains 1 -> crossover; without CI |gamma - 1| <= {args.tol:g} -> crossover.")
    if any(e.fit_range() not in (None, (30, 2000)) for e, _ in rows):
        print("d LO-HI: the distances a local entry's fit used; the published gammas fit d >= 30 up to 2000 (or the "
              "model's context), and gamma depends on the range.")
    print("alpha = gamma - 1, s = (gamma - 1)/2 are interpretations; position decay is not FNA's feature-space kernel.")
    if not args.no_published:
        print(f"Source: {PUBLISHED_SOURCE}")
    return 0
