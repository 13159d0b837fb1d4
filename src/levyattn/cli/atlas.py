"""`levyattn atlas`: the published gamma measurements (and yours) with alpha, s and regime."""

from __future__ import annotations

import argparse
import json

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
    a.add_argument("--add", metavar="MODEL", default=None, help="model id of the new entry")
    a.add_argument("--gamma", type=float, default=None)
    a.add_argument("--add-corpus", default=None, help="corpus of the new entry (random, a name or a file)")
    a.add_argument("--r2", type=float, default=None)
    a.add_argument("--ci", type=float, nargs=2, metavar=("LO", "HI"), default=None)
    a.add_argument("--notes", default=None)
    a.add_argument("--add-result", metavar="LENS_JSON", default=None,
                   help="add the measurement in a lens.json written by `levyattn lens`")


def run(args: argparse.Namespace) -> int:
    from levyattn.io import read_json
    from levyattn.lens.atlas import (
        PUBLISHED_SOURCE,
        append_to_atlas,
        default_user_atlas_path,
        load_published_atlas,
        load_user_atlas,
        select_entries,
    )

    user_path = args.user or default_user_atlas_path()
    if args.add or args.add_result:
        if args.add_result:
            res = read_json(args.add_result, "lens result")
            try:
                m = res["measurement"]
                entry = {"model": m["model"], "corpus": args.add_corpus or m["info"].get("corpus", "random"),
                         "gamma": res["gamma"], "r2": res["fit_power_law"]["r2"], "ci": res["gamma_ci"],
                         "protocol": m["protocol"], "n_prompts": m["n_prompts_per_seed"], "seeds": m["seeds"],
                         "source": "levyattn lens"}
            except (KeyError, TypeError) as err:
                raise ValueError(f"lens result {args.add_result} lacks the field {err}") from err
        else:
            if args.gamma is None or args.add_corpus is None:
                raise ValueError("--add needs --gamma and --add-corpus")
            entry = {"model": args.add, "corpus": args.add_corpus, "gamma": args.gamma, "r2": args.r2,
                     "ci": list(args.ci) if args.ci else None, "notes": args.notes}
        path = append_to_atlas(user_path, {k: v for k, v in entry.items() if v is not None})
        print(f"added {entry['model']} ({entry['corpus']}, gamma {entry['gamma']:.4f}) to {path}")
        return 0

    entries = [] if args.no_published else load_published_atlas()
    from pathlib import Path

    if Path(user_path).exists():
        entries += load_user_atlas(user_path)
    elif args.user:
        raise FileNotFoundError(f"atlas file not found: {user_path}")
    rows = select_entries(entries, corpus=args.corpus, regime=args.regime, model_contains=args.model,
                          sort_by=args.sort, descending=args.desc, tol=args.tol)
    if args.json:
        out = [{**e.to_json(), "origin": e.origin, "alpha": r.alpha, "s": r.s, "regime": r.regime,
                "levy_valid": r.levy_valid} for e, r in rows]
        print(json.dumps({"source": PUBLISHED_SOURCE, "entries": out}, indent=2))
        return 0
    header = ("model", "corpus", "gamma", "95% CI", "R²", "alpha", "s", "regime", "Lévy", "authors' phase", "origin")
    table = []
    for e, r in rows:
        table.append((
            e.model, e.corpus, f"{e.gamma:.4f}", f"[{e.ci[0]:.3f}, {e.ci[1]:.3f}]" if e.ci else "-",
            f"{e.r2:.4f}" if e.r2 is not None else "-", f"{r.alpha:+.4f}", f"{r.s:+.4f}", r.regime,
            "yes" if r.levy_valid else "no", e.phase or "-", "published" if e.origin == "published" else "user",
        ))
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    counts = {k: sum(1 for _, r in rows if r.regime == k) for k in ("smoothing", "crossover", "differentiating")}
    print(f"\n{len(rows)} entries: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    print(f"regime: CI contains 1 -> crossover; without CI |gamma - 1| <= {args.tol:g} -> crossover.")
    print("alpha = gamma - 1, s = (gamma - 1)/2 are interpretations; position decay is not FNA's feature-space kernel.")
    if not args.no_published:
        print(f"Source: {PUBLISHED_SOURCE}")
    return 0
