"""``levyattn analyze INPUT``: attention as a random walk, for saved attention tensors or a
trained levyattn model run on inputs.

INPUT is either

- a .npy/.npz/.pt/.pth/.safetensors file holding one attention tensor or several named ones
  (``layer0``, ``layer1``, ...), each (B, H, N, N), (H, N, N) or (N, N) with rows summing to 1;
- or a levyattn checkpoint -- a run folder written by ``levyattn train`` (``checkpoint.json`` +
  ``ckpt-*.safetensors``) or its ``checkpoint.json`` -- together with inputs to run the model
  on, given by ``--input`` or ``--preset-data N``. The model is rebuilt, loaded and run in eval
  mode with ``output_attentions=True`` by ``levyattn.training.inputs.checkpoint_attention``;
  every layer's (B, H, L, L) self-attention is analysed.

What ``--input`` accepts, per model type:

==================  ===========================================================================
model type          --input
==================  ===========================================================================
text_classifier     token ids: .npy/.pt/.pth/.safetensors integer tensor (L,) or (B, L), or a
                    .txt file of integers (one sequence per line, separated by spaces or commas;
                    shorter lines are padded and masked). Ids in [0, vocab_size). With
                    ``pooling="cls"`` the class token is position 0 of the analysed matrices.
lm                  token ids as above, or a text string (encoded with the tokenizer saved in
                    the run folder). Attention is causal (lower-triangular matrices).
seq2seq             source token ids as above, or a source sentence (the run's tokenizer, then
                    EOS, as the model reads it when translating); the encoder's self-attention
                    is analysed (layers ``encoder0``, ...).
vit                 images: .npy/.pt/.pth/.safetensors float tensor (B, C, H, W), (C, H, W), or
                    (H, W) for one-channel models, at the model's image size. With
                    ``pooling="cls"`` the class token is position 0; patches are row-major.
==================  ===========================================================================

Tensor files holding several entries must name the one to use with ``--input-key`` (or hold
an ``input_ids`` / ``images`` entry). ``--lengths`` marks padding in id inputs as for tensors.

``--preset-data N`` takes the first N test examples of the task the run was trained on (the
preset recorded in its checkpoint: classification, language modelling (the causal
self-attention) and translation (the encoder's self-attention)) and also reports the model's
metrics on them.

Writes ``summary.json``, PNG figures per analysed layer (eigenvalues in the complex plane, the
attention heatmap, the diffusion-map scatter) and ``report.html`` to ``--out``; prints a table.
Figures an earlier analysis left in ``--out`` that this one does not draw are removed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

# The figures this command draws: spectrum.png, attention.png, diffusion_map.png, with _<layer>
# before .png when it draws several layers.
FIGURE_NAME = re.compile(r"(spectrum|attention|diffusion_map)(_.+)?\.png")

HELP = "spectral gap, mixing, path lengths and diffusion maps of saved attention weights or a trained model"

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", metavar="INPUT",
        help="attention tensor file (.npy, .npz, .pt, .pth, .safetensors), or a levyattn run folder / "
        "checkpoint.json (then give --input or --preset-data)",
    )
    parser.add_argument("--out", default="analysis", help="output folder (default: ./analysis)")
    parser.add_argument("--key", default=None, help="analyse only this entry of a file with several tensors")
    parser.add_argument(
        "--input", dest="model_input", default=None, metavar="DATA",
        help="for a checkpoint: the inputs to run the model on (token ids .npy/.pt/.safetensors/.txt, an "
        "image tensor file, or a text string for LM/seq2seq runs; see `levyattn analyze --help`)",
    )
    parser.add_argument("--input-key", default=None, help="entry of a --input tensor file with several entries")
    parser.add_argument(
        "--preset-data", type=int, default=None, metavar="N",
        help="for a checkpoint: run the model on the first N test examples of its own preset's task",
    )
    parser.add_argument(
        "--lengths", default=None,
        help="valid tokens per batch element, comma-separated (e.g. 12,9); the rest is padding",
    )
    parser.add_argument("--layer", default=None, help="layer to plot (default: every layer)")
    parser.add_argument("--batch", type=int, default=0, help="batch element to plot (default 0)")
    parser.add_argument("--head", type=int, default=0, help="head to plot (default 0)")
    parser.add_argument(
        "--atol", type=float, default=None, help="row-sum tolerance (default 1e-3; 1e-2 for float16/bfloat16 files)"
    )
    parser.add_argument("--no-mixing", action="store_true", help="skip mixing times")
    parser.add_argument("--no-paths", action="store_true", help="skip shortest paths")


def _fmt(x: object) -> str:
    if x is None:
        return "inf"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def is_checkpoint_path(path: str | Path) -> bool:
    """A run folder or a ``.json`` file is a checkpoint; tensor files are not."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() == ".json"


def _parse_lengths(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated integers, got {text!r}") from None


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from levyattn._extras import require

    require("report", purpose="levyattn analyze (its plots)")

    from levyattn.analysis import ROW_SUM_ATOL_LOW, DiffusionMap, attention_summary, spectral_gap
    from levyattn.analysis.io import load_attention_with_dtypes
    from levyattn.analysis.plots import plot_attention, plot_embedding, plot_spectrum
    from levyattn.analysis.summary import _as_bhnn
    from levyattn.io import atomic_write_json
    from levyattn.report import Section, write_html_report
    from levyattn.training.inputs import checkpoint_attention, valid_from_lengths

    atol = args.atol
    source: dict[str, Any] = {}
    lengths = _parse_lengths(args.lengths)
    if is_checkpoint_path(args.input):
        if (args.model_input is None) == (args.preset_data is None):
            raise ValueError(
                f"{args.input} is a checkpoint: give exactly one of --input DATA and --preset-data N "
                "(the inputs to run the model on)"
            )
        if args.preset_data is not None and args.preset_data < 1:
            raise ValueError(f"--preset-data must be a positive number of test examples, got {args.preset_data}")
        tensors, mask, source = checkpoint_attention(
            args.input, inputs=args.model_input, preset_data=args.preset_data, input_key=args.input_key,
            lengths=lengths,
        )
        if args.key is not None:
            if args.key not in tensors:
                raise ValueError(f"--key {args.key!r}: the model's layers are {sorted(tensors)}")
            tensors = {args.key: tensors[args.key]}
    else:
        if args.model_input is not None or args.preset_data is not None:
            raise ValueError(f"--input/--preset-data need a checkpoint; {args.input} is a tensor file")
        tensors, dtypes = load_attention_with_dtypes(args.input, key=args.key)
        if atol is None and any(d in ("float16", "bfloat16") for d in dtypes.values()):
            atol = ROW_SUM_ATOL_LOW  # half-precision rounding alone moves row sums by ~4e-3
        tensors = {name: _as_bhnn(name, t) for name, t in tensors.items()}
        mask = None
        if lengths is not None:
            B, _, _, N = next(iter(tensors.values())).shape
            mask = valid_from_lengths(lengths, B, N).numpy()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    summary: dict = {"input": str(args.input), "layers": [], "heads": [], "records": []}
    if source:
        summary["source"] = source
    for name, P in tqdm(tensors.items(), desc="layers", disable=True if len(tensors) < 2 else None):
        part = attention_summary({name: P}, mask=mask, mixing=not args.no_mixing, paths=not args.no_paths, atol=atol)
        summary["conventions"] = part["conventions"]
        for key in ("layers", "heads", "records"):
            summary[key].extend(part[key])

    if args.layer is not None and args.layer not in tensors:
        raise ValueError(f"--layer {args.layer!r} is not in {args.input}; it has {sorted(tensors)}")
    plot_layers = [args.layer] if args.layer is not None else list(tensors)
    figures, notes = [], []
    for layer in plot_layers:
        P = tensors[layer]
        B, H, N, _ = P.shape
        if not (0 <= args.batch < B and 0 <= args.head < H):
            raise ValueError(f"--batch/--head must lie in [0, {B}) x [0, {H}), got {args.batch}, {args.head}")
        # One layer keeps the plain file names; several get the layer name as a suffix.
        suffix = "" if len(plot_layers) == 1 else f"_{layer}"
        n_valid = int(mask[min(args.batch, mask.shape[0] - 1)].sum()) if mask is not None else N
        keep = np.flatnonzero(mask[min(args.batch, mask.shape[0] - 1)]) if mask is not None else np.arange(N)
        one = P[args.batch, args.head][np.ix_(keep, keep)]
        one = one / one.sum(axis=1, keepdims=True)
        tag = f"{layer} b{args.batch} h{args.head}"
        spectra = {}
        for h in range(H):
            head = P[args.batch, h][np.ix_(keep, keep)]
            _, spec = spectral_gap(head / head.sum(axis=1, keepdims=True), return_spectrum=True, atol=atol)
            spectra[f"head {h}"] = spec
        figures.append(plot_spectrum(spectra, out / f"spectrum{suffix}.png",
                                     title=f"Eigenvalues, {layer}, batch {args.batch}"))
        figures.append(plot_attention(one, out / f"attention{suffix}.png", title=f"Attention {tag}"))
        if n_valid >= 4:
            try:
                dm = DiffusionMap(n_components=2, kernel="precomputed").fit(one)
                figures.append(plot_embedding(dm.embedding_, out / f"diffusion_map{suffix}.png",
                                              color=keep, title=f"Diffusion map {tag}"))
                notes.append(f"{tag}: diffusion-map eigenvalues {np.round(dm.eigenvalues_, 4).tolist()}" + (
                    "" if dm.reversible_ else " (non-reversible: complex pairs give Re/Im coordinates)"
                ))
            except ValueError as err:
                notes.append(f"{tag}: no diffusion map: {err}")
    atomic_write_json(out / "summary.json", summary)

    header = ["layer", "head", "gap", "mixing", "path -log P", "diameter", "hops", "entropy/log n"]
    # "inf" is reserved for a measured infinity (null in JSON); analyses not run show "-".
    rows = [
        [h["layer"], h["head"], h["spectral_gap"], "-" if args.no_mixing else h["mixing_steps"]]
        + (["-"] * 3 if args.no_paths else [h["mean_path_length"], h["diameter"], h["mean_hops"]])
        + [h["row_entropy_normalised"]]
        for h in summary["heads"]
    ]
    source_text = []
    metrics = source.get("metrics", {}) if "preset_data" in source else {}
    if source:
        source_text.append(
            f"Model: {source['model_type']} from {source['checkpoint']} (step {source.get('global_step')}), "
            + (f"on the first {source['preset_data']} test examples of its preset"
               if "preset_data" in source else f"on --input {source.get('input')}")
        )
    write_html_report(
        out / "report.html",
        f"Attention analysis: {Path(args.input).name}",
        [
            Section("Per layer and head (means over the batch)", text=source_text + [
                "gap = 1 - |lambda_2|; mixing = steps to total variation <= 1/4 from every start; path = mean "
                "shortest path with edge length -log P_ij; hops = unweighted over edges P_ij >= 1/n; "
                "'inf' = unreachable pairs or no mixing in at least one batch element; '-' = not computed."],
                header=header,
                rows=[[_fmt(c) if c is None else c for c in r] for r in rows]),
            *([Section("Model metrics on these examples", header=["metric", "value"],
                       rows=[[k, v] for k, v in metrics.items()])] if metrics else []),
            Section(f"Figures (batch {args.batch}, head {args.head})", text=notes, figures=figures),
        ],
        note=f"{sum(t.shape[0] * t.shape[1] for t in tensors.values())} matrices from {args.input}",
    )
    # Figures of an earlier analysis in this folder that this one did not draw would pass for its own.
    drawn = {Path(f).name for f in figures}
    for p in out.glob("*.png"):
        if FIGURE_NAME.fullmatch(p.name) and p.name not in drawn:
            p.unlink()
    if source_text:
        print(source_text[0] + "".join(f"; {k} {_fmt(v)}" for k, v in metrics.items()))
    widths = [max(len(header[i]), *(len(_fmt(r[i])) for r in rows)) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(_fmt(c).ljust(w) for c, w in zip(r, widths)))
    print(f"wrote {out / 'summary.json'}, {len(figures)} figures and {out / 'report.html'}")
    return 0
