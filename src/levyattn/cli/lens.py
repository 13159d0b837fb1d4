"""`levyattn lens MODEL`: measure a model's attention decay, fit gamma, read it as a fractional order."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from levyattn.lens import DenseOptions

HELP = "measure any transformer's attention decay A(d) ~ d^-gamma and read gamma as a fractional order"


def parse_distances(text: str) -> list[int] | None:
    """'published' -> None (the published grid); '10,20,30' -> list; 'log:30:2000:12' -> geometric grid."""
    text = text.strip()
    if text == "published":
        return None
    if text.startswith("log:"):
        parts = text.split(":")
        if len(parts) != 4:
            raise ValueError(f"--distances log grid must be log:START:STOP:N, got {text!r}")
        import numpy as np

        try:
            start, stop, n = int(parts[1]), int(parts[2]), int(parts[3])
        except ValueError as err:
            raise ValueError(f"--distances log grid must hold integers, got {text!r}") from err
        if not (1 <= start < stop) or n < 2:
            raise ValueError(f"--distances log grid needs 1 <= START < STOP and N >= 2, got {text!r}")
        return sorted({int(round(x)) for x in np.geomspace(start, stop, n)})
    try:
        return [int(x) for x in re.split(r"[,\s]+", text) if x]
    except ValueError as err:
        raise ValueError(
            f"--distances must be 'published', a comma list of integers or log:START:STOP:N, got {text!r}"
        ) from err


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a local model directory (save_pretrained) or a Hugging Face hub id (needs network)")
    p.add_argument("--protocol", choices=("published", "dense"), default="published",
                   help="published: last query, key d back, length d+50 (docs/lens.md); dense: all pairs")
    p.add_argument("--prompts", type=int, default=150, help="prompts per seed (published atlas: 150)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 123, 7],
                   help="distinct prompt seeds (default: 42 123 7)")
    p.add_argument("--distances", default="published",
                   help="'published' (10..2000, those that fit), '30,100,300' or log:START:STOP:N")
    p.add_argument("--corpus", default="random", help="'random' token ids (published range) or a UTF-8 text FILE")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16", "float64"),
                   help="load/cast the model in this dtype (default: as saved)")
    p.add_argument("--out", default=None, help="output folder (default lens_results/<model>)")
    p.add_argument("--passes", choices=("auto", "one", "per_distance"), default="auto",
                   help="published protocol: one pass per prompt (causal, exact) or one per distance")
    p.add_argument("--prompt-stream", choices=("nested", "published"), default="nested",
                   help="nested: prefixes of one prompt; published: the published tool's exact token ids "
                        "(needs --passes per_distance)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per forward pass")
    p.add_argument("--d-min", type=float, default=30.0, help="fit distances >= this (published: 30)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the gamma CI")
    p.add_argument("--level", type=float, default=0.95,
                   help="confidence level of the gamma CI, in (0, 1) (default 0.95; recorded as ci_level)")
    p.add_argument("--tol", type=float, default=0.05, help="crossover half-width when there is no CI")
    p.add_argument("--token-range", type=int, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="random token ids range (default 1000 .. min(vocab-1, 49000))")
    p.add_argument("--causal", choices=("auto", "yes", "no"), default="auto", help="model causality (auto: detect)")
    p.add_argument("--capture", choices=("auto", "eager"), default="auto",
                   help="auto: compute only the attention rows read, inside the model's fused attention (falls back "
                        "to eager for models that cannot be hooked); eager: every layer's full attention matrix")
    g = p.add_argument_group("dense protocol")
    g.add_argument("--keep-sink", action="store_true", help="keep key 0 (the attention sink) in the average")
    g.add_argument("--keep-special", action="store_true", help="keep pairs involving special tokens")
    g.add_argument("--normalize", choices=("none", "renorm", "relative"), default="none",
                   help="none: raw weights; renorm: rows renormalised over kept keys; relative: ratio to uniform")
    g.add_argument("--direction", choices=("auto", "backward", "forward", "both"), default="auto",
                   help="encoders: keys before/after the query (auto: both for encoders, backward for causal)")
    g.add_argument("--seq-len", type=int, default=None, help="dense pass length (default max distance + 50)")
    g.add_argument("--frame-special", action="store_true",
                   help="wrap every prompt in the tokenizer's special tokens ([CLS] ... [SEP] for BERT encoders)")
    g.add_argument("--query-rows", type=int, default=None, metavar="N",
                   help="read N queries evenly spaced over each pass instead of all (less memory and time)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-hub", action="store_true", help="never contact the Hugging Face hub")
    p.add_argument("--atlas", default=None, metavar="FILE",
                   help="append this measurement to a user atlas file (see `levyattn atlas`)")
    p.add_argument("--corpus-name", default=None, help="corpus label stored in the atlas (default: random or file)")


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plain_progress(every_s: float = 15.0, stream=None) -> Callable[[int, int], None]:
    """``on_progress`` for a stderr that is not a terminal: a plain line at most every ``every_s`` seconds."""
    start = time.monotonic()
    last = [-float("inf")]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < every_s:
            return
        last[0] = now
        elapsed = now - start
        eta = elapsed / done * (total - done)
        print(f"lens: prompt {done}/{total}, elapsed {_fmt_seconds(elapsed)}, ETA {_fmt_seconds(eta)}",
              file=stream or sys.stderr, flush=True)  # fmt: skip

    return report


#: The command-line names of measure_decay's and analyze_decay's parameters, for the option messages.
OPTION_NAMES = {
    "protocol": "--protocol",
    "passes": "--passes",
    "prompt_stream": "--prompt-stream",
    "capture": "--capture",
    "distances": "--distances",
    "n_prompts": "--prompts",
    "seeds": "--seeds",
    "batch_size": "--batch-size",
    "corpus": "--corpus",
    "token_range": "--token-range",
    "seq_len": "--seq-len",
    "d_min": "--d-min",
    "n_boot": "--bootstrap",
    "level": "--level",
    "tol": "--tol",
}


def check_options(args: argparse.Namespace) -> tuple[list[int] | None, DenseOptions]:
    """Refuse bad options before the model loads (seconds to minutes), with the library's own checks
    (:func:`levyattn.lens.check_lens_options`); returns the parsed distances and the dense options.

    What depends on the model (the context, the vocabulary) is checked by ``measure_decay`` once loaded.
    """
    from levyattn.lens import DenseOptions, check_lens_options

    distances = parse_distances(args.distances)
    dense = DenseOptions(
        exclude_sink=0 if args.keep_sink else 1,
        exclude_special=not args.keep_special,
        normalize=args.normalize,
        direction=args.direction,
        seq_len=args.seq_len,
        frame_special=args.frame_special,
        query_rows=args.query_rows,
    )
    check_lens_options(
        protocol=args.protocol,
        passes=args.passes,
        prompt_stream=args.prompt_stream,
        capture=args.capture,
        distances=distances,
        n_prompts=args.prompts,
        seeds=args.seeds,
        batch_size=args.batch_size,
        corpus=args.corpus,
        token_range=args.token_range,
        seq_len=dense.seq_len if args.protocol == "dense" else None,
        d_min=args.d_min,
        n_boot=args.bootstrap,
        level=args.level,
        tol=args.tol,
        names=OPTION_NAMES,
    )
    return distances, dense


def run(args: argparse.Namespace) -> int:
    from levyattn._extras import require

    distances, dense = check_options(args)
    require("hf", "transformers", purpose="levyattn lens")
    if not args.no_plots:
        require("report", purpose="levyattn lens (its plots; --no-plots skips them)")
    from levyattn.lens import analyze_decay, append_to_atlas, measure_decay, write_lens_outputs
    from levyattn.lens.atlas import DuplicateAtlasEntry
    from levyattn.lens.prompts import CorpusNeedsTokenizer
    from levyattn.lens.report import summary_rows

    causal = {"auto": None, "yes": True, "no": False}[args.causal]
    print(f"levyattn lens: measuring {args.model} ({args.protocol} protocol) ...", file=sys.stderr)
    on_terminal = sys.stderr.isatty()
    try:
        m = measure_decay(
            args.model,
            protocol=args.protocol,
            distances=distances,
            n_prompts=args.prompts,
            seeds=args.seeds,
            corpus=args.corpus,
            token_range=tuple(args.token_range) if args.token_range else None,
            passes=args.passes,
            prompt_stream=args.prompt_stream,
            causal=causal,
            dense=dense,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            allow_hub=not args.no_hub,
            capture=args.capture,
            progress=on_terminal,
            on_progress=None if on_terminal else plain_progress(),
        )
    except CorpusNeedsTokenizer as err:  # the library's advice (tokenizer=) is for Python callers
        raise ValueError(
            f"--corpus {err.path} is text and needs the model's tokenizer, but none is saved with {args.model}: "
            "save it into the model folder (tokenizer.save_pretrained(FOLDER) writes tokenizer.json and "
            "tokenizer_config.json) and pass that folder, or measure on --corpus random"
        ) from None
    path, note = m.info.get("attention_path"), m.info.get("attention_path_note")
    if path == "rows":
        print("attention: only the rows read, inside the model's fused attention", file=sys.stderr)
    else:
        print(f"attention: eager, every layer's full attention matrix ({note})", file=sys.stderr)
    if m.info.get("fna_attention"):
        print("attention: FNA, weights from levyattn's reference kernel with the model's fna_* settings",
              file=sys.stderr)  # fmt: skip
    missing = m.info.get("load", {}).get("missing_keys")
    if missing:
        print(f"warning: the checkpoint lacks {len(missing)} weight(s) of the model, left at their initial values: "
              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", file=sys.stderr)
    if m.info.get("dropped_distances"):
        print(f"note: distances {m.info['dropped_distances']} do not fit the context "
              f"({m.info['context']} positions) and were left out", file=sys.stderr)
    result = analyze_decay(m, d_min=args.d_min, n_boot=args.bootstrap, level=args.level, tol=args.tol)
    out = Path(args.out) if args.out else Path("lens_results") / re.sub(r"[^\w.-]+", "_", str(args.model)).strip("_")
    paths = write_lens_outputs(result, out, plots=not args.no_plots)
    rows = summary_rows(result)
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"\n  {result.reading.caveat}")
    print(f"\nreport: {paths['html']}\ndata:   {paths['json']}")
    if args.atlas:
        try:
            entry = result.atlas_entry(args.corpus_name)
            path = append_to_atlas(args.atlas, entry)
            print(f"atlas:  added {entry.model} ({entry.corpus}, gamma {entry.gamma:.4f}) to {path}")
        except DuplicateAtlasEntry as err:  # the same command run again: its measurement is there
            print(f"atlas:  {err}")
    return 0
