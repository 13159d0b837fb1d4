"""``levyattn analyze INPUT``: attention as a random walk, for saved attention tensors or a
trained levyattn model run on inputs.

INPUT is either

- a .npy/.npz/.pt/.pth/.safetensors file holding one attention tensor or several named ones
  (``layer0``, ``layer1``, ...), each (B, H, N, N), (H, N, N) or (N, N) with rows summing to 1;
- or a levyattn checkpoint -- a run folder written by ``levyattn train`` (``checkpoint.json`` +
  ``ckpt-*.safetensors``) or its ``checkpoint.json`` -- together with inputs to run the model
  on, given by ``--input`` or ``--preset-data N``. The model is rebuilt and loaded with
  ``levyattn.training.checkpoint.load_checkpoint`` / ``load_model_state`` and run in eval mode
  with ``output_attentions=True``; every layer's (B, H, L, L) self-attention is analysed.

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
seq2seq             source token ids as above, or a source sentence (the run's tokenizer);
                    the encoder's self-attention is analysed (layers ``encoder0``, ...).
vit                 images: .npy/.pt/.pth/.safetensors float tensor (B, C, H, W), (C, H, W), or
                    (H, W) for one-channel models, at the model's image size. With
                    ``pooling="cls"`` the class token is position 0; patches are row-major.
==================  ===========================================================================

Tensor files holding several entries must name the one to use with ``--input-key`` (or hold
an ``input_ids`` / ``images`` entry). ``--lengths`` marks padding in id inputs as for tensors.

``--preset-data N`` takes the first N test examples of the task the run was trained on (the
preset recorded in its checkpoint; tasks whose class provides ``attention(model, batch)``, i.e.
classification: text, images, multiscale) and also reports the model's metrics on them.

Writes ``summary.json``, PNG figures per analysed layer (eigenvalues in the complex plane, the
attention heatmap, the diffusion-map scatter) and ``report.html`` to ``--out``; prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "spectral gap, mixing, path lengths and diffusion maps of saved attention weights or a trained model"

TENSOR_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")


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


# ----------------------------------------------------------------------------- model inputs


def _parse_lengths(text: str | None, n: int) -> Any:
    import numpy as np

    if not text:
        return None
    try:
        lengths = np.array([int(v) for v in text.split(",")])
    except ValueError:
        raise ValueError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if (lengths < 1).any() or (lengths > n).any():
        raise ValueError(f"--lengths must lie in [1, N = {n}], got {text!r}")
    return lengths


def load_input_tensor(path: str | Path, key: str | None = None, prefer: tuple[str, ...] = ()) -> Any:
    """One tensor from a .npy/.npz/.pt/.pth/.safetensors file, as a torch tensor (dtype kept).

    A file with several entries needs ``key`` unless it holds exactly one entry or one named
    in ``prefer`` (e.g. ``input_ids``). ``.pt`` files are read with ``weights_only=True``.
    """
    import numpy as np
    import torch

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES:
        raise ValueError(f"--input {path}: unsupported file type {suffix!r}; expected .txt or one of {TENSOR_SUFFIXES}")
    try:
        if suffix == ".npy":
            obj: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                obj = {k: torch.from_numpy(data[k]) for k in data.files}
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            obj = load_file(str(path))
    except Exception as err:  # corrupt files raise many error types (unpickling, OSError, ...)
        raise ValueError(f"--input {path}: cannot read it as {suffix} ({type(err).__name__}: {err})") from err
    if isinstance(obj, (list, tuple)) and len(obj) == 1:
        obj = obj[0]
    if isinstance(obj, dict):
        if key is not None:
            if key not in obj:
                raise ValueError(f"--input {path} has no entry {key!r} (--input-key); it has {sorted(obj)}")
            obj = obj[key]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
        else:
            hits = [k for k in prefer if k in obj]
            if not hits:
                raise ValueError(f"--input {path} holds several entries {sorted(obj)}; choose one with --input-key")
            obj = obj[hits[0]]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"--input {path} holds a {type(obj).__name__}, not a tensor")
    return obj


def load_token_ids(
    source: str, vocab_size: int, max_len: int | None, key: str | None = None, tokenizer_dir: Path | None = None
) -> tuple[Any, Any]:
    """Token ids for a sequence model: ((B, L) long ids, (B, L) bool padding mask or None).

    ``source`` is a tensor file, a ``.txt`` file of integers (one sequence per line; ragged
    lines are right-padded with 0 and masked), or -- when ``tokenizer_dir`` is given and
    ``source`` is not a file -- a text string encoded with the tokenizer saved there.
    """
    import torch

    from levyattn.io import read_lines

    path = Path(source)
    pad = None
    if path.is_file() and path.suffix.lower() == ".txt":
        rows = []
        for lineno, line in enumerate(read_lines(path, "--input file", allow_empty_lines=True), 1):
            if not line.strip():
                continue
            try:
                rows.append([int(v) for v in line.replace(",", " ").split()])
            except ValueError:
                raise ValueError(
                    f"--input {path}, line {lineno}: expected integers (token ids), got {line!r}"
                ) from None
        if not rows:
            raise ValueError(f"--input {path} holds no token ids")
        length = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), length), dtype=torch.long)
        pad = torch.ones((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            pad[i, : len(r)] = False
        if not pad.any():
            pad = None
    elif path.is_file():
        ids = load_input_tensor(path, key, prefer=("input_ids", "src_ids", "ids"))
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"--input {path}: token ids must be integers, got dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"--input {path}: token ids must be (L,) or (B, L), got shape {tuple(ids.shape)}")
        ids = ids.long()
    elif tokenizer_dir is not None:
        from levyattn.training.tasks.tokenized import load_tokenizer_beside

        tokens = load_tokenizer_beside(tokenizer_dir).encode(source)
        if not tokens:
            raise ValueError(f"--input {source!r} encodes to no tokens")
        ids = torch.tensor([tokens], dtype=torch.long)
    else:
        raise FileNotFoundError(
            f"--input {source}: no such file (this model type takes a token-id file: .npy/.pt/.safetensors/.txt)"
        )
    where = f"--input {source}"
    if ids.numel() == 0:
        raise ValueError(f"{where} holds no tokens")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"{where}: token ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"{where}: sequence length must be <= {max_len} for this model, got {ids.shape[1]}")
    return ids, pad


def load_images(source: str, key: str | None, channels: int, size: int) -> Any:
    """(B, C, H, W) float32 images from a tensor file; (C, H, W) and, for C = 1, (H, W) accepted."""
    import torch

    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--input {source}: no such file (a ViT takes an image tensor file)")
    x = load_input_tensor(path, key, prefer=("images", "pixel_values"))
    if x.dim() == 2 and channels == 1:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[None]
    expected = (channels, size, size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"--input {path}: images must be (B, {channels}, {size}, {size}) or (C, H, W), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"--input {path}: images must be real numbers, got dtype {x.dtype}")
    return x.to(torch.float32)


def attention_from_checkpoint(args: argparse.Namespace) -> tuple[dict, Any, dict[str, Any]]:
    """Run the checkpoint's model on ``--input`` / ``--preset-data`` inputs.

    Returns ({layer name: (B, H, L, L) float64 array}, valid mask (B, L) bool or None,
    a JSON-able description of the source: checkpoint, model type, inputs, outputs).
    """
    import numpy as np
    import torch

    from levyattn.training.checkpoint import load_checkpoint, model_from_checkpoint

    if (args.model_input is None) == (args.preset_data is None):
        raise ValueError(
            f"{args.input} is a checkpoint: give exactly one of --input DATA and --preset-data N "
            "(the inputs to run the model on)"
        )
    ckpt = load_checkpoint(args.input)
    model = model_from_checkpoint(ckpt).eval()
    cfg = model.config
    source: dict[str, Any] = {"checkpoint": str(ckpt.path), "model_type": ckpt.model_type,
                              "global_step": ckpt.state.get("position", {}).get("global_step")}
    valid = None
    with torch.no_grad():
        if args.preset_data is not None:
            weights, valid = _preset_data(args, ckpt, model, source)
        else:
            inputs, padding_masks = _model_inputs(args, ckpt, cfg, source)
            out = model(*inputs, output_attentions=True, **padding_masks)
            if ckpt.model_type == "seq2seq":  # the encoder's self-attention
                weights = {f"encoder{i}": w for i, w in enumerate(out.encoder_attentions)}
            else:
                weights = out.attentions
            if ckpt.model_type in ("text_classifier", "vit"):
                source["predictions"] = out.logits.argmax(-1).tolist()
            if padding_masks:
                valid = ~next(iter(padding_masks.values()))
    if not isinstance(weights, dict):
        weights = {f"layer{i}": w for i, w in enumerate(weights)}
    tensors = {}
    for name, w in weights.items():
        w = w.detach().to("cpu", torch.float64)
        if w.dim() == 3:  # heads averaged
            w = w.unsqueeze(1)
        tensors[name] = w.numpy()
    if not tensors:
        raise ValueError(f"checkpoint {ckpt.path}: the model returned no attention weights")
    if valid is not None:
        valid = valid.cpu().numpy().astype(bool)
        n = next(iter(tensors.values())).shape[-1]
        if valid.shape[-1] == n - 1:  # a class token at position 0 is always valid
            valid = np.pad(valid, ((0, 0), (1, 0)), constant_values=True)
    return tensors, valid, source


def _model_inputs(args: argparse.Namespace, ckpt: Any, cfg: Any, source: dict[str, Any]) -> tuple[tuple, dict]:
    """The ``--input`` data as the checkpoint's model takes it: (positional inputs, padding
    masks by keyword, empty when nothing is padding); ``source`` records what was read."""
    import torch

    if ckpt.model_type == "vit":
        images = load_images(args.model_input, args.input_key, cfg.in_channels, cfg.image_size)
        source.update(input=args.model_input, batch=int(images.shape[0]))
        return (images,), {}
    if ckpt.model_type not in ("text_classifier", "lm", "seq2seq"):
        raise ValueError(f"checkpoint {ckpt.path}: model type {ckpt.model_type!r} is not supported by analyze")
    vocab = cfg.src_vocab_size if ckpt.model_type == "seq2seq" else cfg.vocab_size
    max_len = cfg.block_size if ckpt.model_type == "lm" else cfg.max_len
    tok_dir = ckpt.path if ckpt.model_type in ("lm", "seq2seq") else None
    ids, pad = load_token_ids(args.model_input, vocab, max_len, args.input_key, tok_dir)
    lengths = _parse_lengths(args.lengths, ids.shape[1])
    if lengths is not None:
        if len(lengths) not in (1, ids.shape[0]):
            raise ValueError(f"--lengths needs 1 or B = {ids.shape[0]} values, got {len(lengths)}")
        given = torch.arange(ids.shape[1])[None, :] >= torch.as_tensor(lengths)[:, None]
        pad = given.expand(ids.shape[0], -1) if pad is None else pad | given
    if pad is None and getattr(cfg, "pad_id", None) is not None:
        pad = ids == cfg.pad_id
        pad = pad if pad.any() else None
    source.update(input=args.model_input, batch=int(ids.shape[0]), length=int(ids.shape[1]))
    if ckpt.model_type == "seq2seq":
        # The encoder's attention does not depend on the target: a lone BOS is enough.
        bos = torch.full((ids.shape[0], 1), cfg.bos_id, dtype=torch.long)
        return (ids, bos), ({} if pad is None else {"src_key_padding_mask": pad})
    return (ids,), ({} if pad is None else {"key_padding_mask": pad})


def _preset_data(args: argparse.Namespace, ckpt: Any, model: Any, source: dict[str, Any]) -> tuple[list, Any]:
    from levyattn.training.presets import preset_from_run
    from levyattn.training.tasks import make_task

    n = args.preset_data
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--preset-data must be a positive number of test examples, got {n!r}")
    task = make_task(preset_from_run(ckpt.path))
    if not callable(getattr(task, "attention", None)):
        raise ValueError(
            f"--preset-data: the {task.name!r} task of {ckpt.path} has no attention(model, batch) method "
            "(classification tasks do); pass --input instead"
        )
    _, test = task.datasets()
    n = min(n, len(test))
    batch = task.collate([test[i] for i in range(n)])
    weights, valid = task.attention(model, batch)
    source.update(preset_data=n, metrics=task.evaluate(model, [batch]))
    return weights, valid


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

    atol = args.atol
    source: dict[str, Any] = {}
    if is_checkpoint_path(args.input):
        tensors, mask, source = attention_from_checkpoint(args)
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
        lengths = _parse_lengths(args.lengths, next(iter(tensors.values())).shape[-1])
        mask = None
        if lengths is not None:
            n = next(iter(tensors.values())).shape[-1]
            mask = np.arange(n)[None, :] < lengths[:, None]
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
                "'inf' = unreachable pairs or no mixing; '-' = not computed."], header=header,
                rows=[[_fmt(c) if c is None else c for c in r] for r in rows]),
            *([Section("Model metrics on these examples", header=["metric", "value"],
                       rows=[[k, v] for k, v in metrics.items()])] if metrics else []),
            Section(f"Figures (batch {args.batch}, head {args.head})", text=notes, figures=figures),
        ],
        note=f"{sum(t.shape[0] * t.shape[1] for t in tensors.values())} matrices from {args.input}",
    )
    if source_text:
        print(source_text[0] + "".join(f"; {k} {_fmt(v)}" for k, v in metrics.items()))
    widths = [max(len(header[i]), *(len(_fmt(r[i])) for r in rows)) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(_fmt(c).ljust(w) for c, w in zip(r, widths)))
    print(f"wrote {out / 'summary.json'}, {len(figures)} figures and {out / 'report.html'}")
    return 0
