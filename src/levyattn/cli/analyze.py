"""``levyattn analyze INPUT``: attention as a random walk, for saved attention tensors.

INPUT is a .npy/.npz/.pt/.pth/.safetensors file holding one attention tensor or several named
ones (``layer0``, ``layer1``, ...), each (B, H, N, N), (H, N, N) or (N, N) with rows summing
to 1. Writes ``summary.json``, PNG figures (eigenvalues in the complex plane, the attention
heatmap, the diffusion-map scatter) and ``report.html`` to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse

HELP = "spectral gap, mixing, path lengths and diffusion maps of saved attention weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT", help="attention tensor file (.npy, .npz, .pt, .pth, .safetensors)")
    parser.add_argument("--out", default="analysis", help="output folder (default: ./analysis)")
    parser.add_argument("--key", default=None, help="analyse only this entry of a file with several tensors")
    parser.add_argument(
        "--lengths", default=None,
        help="valid tokens per batch element, comma-separated (e.g. 12,9); the rest is padding",
    )
    parser.add_argument("--layer", default=None, help="layer to plot (default: the first)")
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


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from levyattn.analysis import ROW_SUM_ATOL_LOW, DiffusionMap, attention_summary, spectral_gap
    from levyattn.analysis.io import load_attention_with_dtypes
    from levyattn.analysis.plots import plot_attention, plot_embedding, plot_spectrum
    from levyattn.analysis.summary import _as_bhnn
    from levyattn.io import atomic_write_json
    from levyattn.report import Section, write_html_report

    tensors, dtypes = load_attention_with_dtypes(args.input, key=args.key)
    atol = args.atol
    if atol is None and any(d in ("float16", "bfloat16") for d in dtypes.values()):
        atol = ROW_SUM_ATOL_LOW  # half-precision rounding alone moves row sums by ~4e-3
    tensors = {name: _as_bhnn(name, t) for name, t in tensors.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    mask = None
    if args.lengths:
        try:
            lengths = np.array([int(v) for v in args.lengths.split(",")])
        except ValueError:
            raise ValueError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
        n = next(iter(tensors.values())).shape[-1]
        if (lengths < 1).any() or (lengths > n).any():
            raise ValueError(f"--lengths must lie in [1, N = {n}], got {args.lengths!r}")
        mask = np.arange(n)[None, :] < lengths[:, None]

    summary: dict = {"input": str(args.input), "layers": [], "heads": [], "records": []}
    for name, P in tqdm(tensors.items(), desc="layers", disable=len(tensors) < 2):
        part = attention_summary({name: P}, mask=mask, mixing=not args.no_mixing, paths=not args.no_paths,
                                 atol=atol)
        summary["conventions"] = part["conventions"]
        for key in ("layers", "heads", "records"):
            summary[key].extend(part[key])

    layer = args.layer if args.layer is not None else next(iter(tensors))
    if layer not in tensors:
        raise ValueError(f"--layer {layer!r} is not in {args.input}; it has {sorted(tensors)}")
    P = tensors[layer]
    B, H, N, _ = P.shape
    if not (0 <= args.batch < B and 0 <= args.head < H):
        raise ValueError(f"--batch/--head must lie in [0, {B}) x [0, {H}), got {args.batch}, {args.head}")
    n_valid = int(mask[min(args.batch, mask.shape[0] - 1)].sum()) if mask is not None else N
    one = P[args.batch, args.head, :n_valid, :n_valid]
    one = one / one.sum(axis=1, keepdims=True)
    tag = f"{layer} b{args.batch} h{args.head}"

    spectra = {}
    for h in range(H):
        head = P[args.batch, h, :n_valid, :n_valid]
        _, spec = spectral_gap(head / head.sum(axis=1, keepdims=True), return_spectrum=True, atol=atol)
        spectra[f"head {h}"] = spec
    figures = [
        plot_spectrum(spectra, out / "spectrum.png", title=f"Eigenvalues, {layer}, batch {args.batch}"),
        plot_attention(one, out / "attention.png", title=f"Attention {tag}"),
    ]
    diffusion_note = ""
    if n_valid >= 4:
        try:
            dm = DiffusionMap(n_components=2, kernel="precomputed").fit(one)
            figures.append(plot_embedding(dm.embedding_, out / "diffusion_map.png", title=f"Diffusion map {tag}"))
            diffusion_note = f"Diffusion-map eigenvalues {np.round(dm.eigenvalues_, 4).tolist()}" + (
                "" if dm.reversible_ else " (non-reversible: complex pairs give Re/Im coordinates)"
            )
        except ValueError as err:
            diffusion_note = f"No diffusion map: {err}"
    atomic_write_json(out / "summary.json", summary)

    header = ["layer", "head", "gap", "mixing", "path -log P", "diameter", "hops", "entropy/log n"]
    rows = [
        [h["layer"], h["head"], h["spectral_gap"], h["mixing_steps"], h["mean_path_length"], h["diameter"],
         h["mean_hops"], h["row_entropy_normalised"]]
        for h in summary["heads"]
    ]
    write_html_report(
        out / "report.html",
        f"Attention analysis: {Path(args.input).name}",
        [
            Section("Per layer and head (means over the batch)", text=[
                "gap = 1 - |lambda_2|; mixing = steps to total variation <= 1/4 from every start; path = mean "
                "shortest path with edge length -log P_ij; hops = unweighted over edges P_ij >= 1/n; "
                "'inf' = unreachable pairs or no mixing."], header=header,
                rows=[[_fmt(c) if c is None else c for c in r] for r in rows]),
            Section(f"Figures for {tag}", text=[diffusion_note] if diffusion_note else [], figures=figures),
        ],
        note=f"{sum(t.shape[0] * t.shape[1] for t in tensors.values())} matrices from {args.input}",
    )
    widths = [max(len(header[i]), *(len(_fmt(r[i])) for r in rows)) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(_fmt(c).ljust(w) for c, w in zip(r, widths)))
    print(f"wrote {out / 'summary.json'}, {len(figures)} figures and {out / 'report.html'}")
    return 0
