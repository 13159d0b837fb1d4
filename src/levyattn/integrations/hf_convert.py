"""``to_fna``: convert a pretrained softmax ``transformers`` model to FNA, calibrating the bandwidth.

The softmax model runs once on the calibration inputs while its attention rows (queries, keys,
masks and log-softmax weights per layer) are recorded through
:func:`~levyattn.integrations.hf_attention.substitute_attention`; each layer's bandwidth is then
chosen to bring FNA's rows (and, with ``objective="output"``, the model's outputs) closest to the
softmax model's. :class:`ConversionReport` says what was chosen and how close the result is.
``levyattn.integrations.huggingface`` re-exports both.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from levyattn._extras import MissingExtraError
from levyattn.backends.common import apply_mask, combine_keep, log_softmax_rows, structural_keep
from levyattn.config import FNAConfig
from levyattn.integrations import hf_attention, hf_settings, hf_stacks
from levyattn.kernels import log_kernel

try:
    from transformers import PretrainedConfig, PreTrainedModel
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("levyattn.integrations.hf_convert needs transformers (pip install 'levyattn[hf]')") from exc

__all__ = ["ConversionReport", "to_fna"]


def _softmax_recorder(records: list[dict], batch: int, seq2seq: bool) -> hf_attention.AttentionSubstitute:
    """An attention substitute: softmax attention that appends (layer, batch, q, k, mask, log P) to ``records``,
    and whether the query rows are the decoder's of an encoder-decoder (``seq2seq``)."""

    def softmax_attention(module, query, key, value, mask, causal, scaling):
        nq, nk = query.shape[2], key.shape[2]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # One mask for the softmax rows here and the FNA rows of the calibration.
        full = mask
        if causal:
            keep = structural_keep(0, nq, nq, nk, is_causal=True, exclude_self=False, device=query.device)
            full = combine_keep(mask, keep)
        q, k = query.float(), key.float()
        log_p = log_softmax_rows(apply_mask((q @ k.transpose(-1, -2)) * scale, full))
        out = (torch.exp(log_p).to(value.dtype) @ value).transpose(1, 2).contiguous()
        decoder = seq2seq and (getattr(module, "is_decoder", False) or getattr(module.config, "is_decoder", False))
        records.append({"config": module.config, "layer": hf_settings.layer_index(module), "batch": batch,
                        "q": q, "k": k, "mask": full, "log_p": log_p, "decoder_rows": bool(decoder)})  # fmt: skip
        return out, None

    return softmax_attention


# What ConversionReport.format prints for each output metric and each calibration objective.
_METRIC_TEXT = {
    "kl": "output KL(softmax model || FNA model), nats per position (lower is better, 0 = equal)",
    "cosine": "output cosine similarity to the softmax model, mean-pooled last hidden states "
    "(higher is better, 1 = equal)",
}
_OBJECTIVE_TEXT = {
    "output": "objective 'output': the bandwidths were tuned on the output measure above, starting from a per-layer "
    "fit of the attention rows; the attention-row KL below was not the quantity minimised, so it can end above "
    "its fitted or initial value",
    "attention": "objective 'attention': each layer's bandwidth minimises its attention-row KL below; the output "
    "measure above was not optimised",
}


@dataclass
class ConversionReport:
    """What :func:`to_fna` chose and how close the FNA model's first forward pass is to softmax.

    metric: the output measure. "kl" -- mean KL(softmax model || FNA model) in nats between
        the models' output distributions (next-token distributions of a causal LM, token
        distributions of a masked LM, class distributions of a classifier), over non-padding
        positions (an encoder-decoder's decoder positions, by ``decoder_attention_mask``); lower
        is better, 0 is equal. "cosine" -- mean cosine similarity of mean-pooled last hidden
        states (models without logits); higher is better, 1 is equal.
    gap_before: the output measure with the initial bandwidth; gap_after: with the calibrated one.
    objective: what the bandwidths were chosen to minimise ("output": the output measure, from a
        start at the attention-row fit; "attention": each layer's attention-row KL).
    attention_kl_before / attention_kl_fit / attention_kl_after: per layer, mean
        KL(softmax rows || FNA rows) in nats over heads and valid query rows, for the
        calibration inputs' queries and keys: at the initial bandwidth, after the attention-row
        fit, and at the final bandwidth (the fit's with ``objective="attention"``; with
        ``"output"`` it can be larger, as the output measure, not this KL, was minimised).
    bandwidth: the calibrated ``fna_bandwidth`` written to the config (per layer; per layer and
        head with ``per_head=True``). alpha: ``fna_alpha`` as written. A model whose attention
        modules read several configs (an encoder and a decoder stack, a vision tower and a text
        model) gets a dict, stack name (the module path that owns the config) -> its value.
    layer_names: the name of each entry of the per-layer lists ("0", "1", ...; with several
        stacks "encoder.0", ..., "decoder.2").
    """

    metric: str | None
    gap_before: float | None
    gap_after: float | None
    alpha: Any
    bandwidth: Any
    attention_kl_before: list[float] = field(default_factory=list)
    attention_kl_after: list[float] = field(default_factory=list)
    n_sequences: int = 0
    calibrated: bool = False
    objective: str | None = None
    attention_kl_fit: list[float] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _layer_bandwidth(self, name: str) -> Any:
        """The bandwidth of the layer ``name`` ("3", or with several stacks "encoder.3")."""
        value = self.bandwidth
        if isinstance(value, dict):
            stack, name = name.rsplit(".", 1)
            value = value[stack]
        return value[int(name)] if isinstance(value, list) else value

    def format(self) -> str:
        """A short plain-text summary (for a CLI or a log): each number named, with its direction."""
        lines = []
        if self.metric is not None:
            lines.append(
                f"{_METRIC_TEXT[self.metric]} on {self.n_sequences} sequences: "
                f"{self.gap_before:.6g} at the initial bandwidth, {self.gap_after:.6g} calibrated"
            )
        if self.objective is not None:
            lines.append(_OBJECTIVE_TEXT[self.objective])
        if self.attention_kl_before:
            lines.append("attention-row KL(softmax || FNA) per layer, nats (lower is better):")
            lines.append("layer     initial  attention fit        final  bandwidth")
            names = self.layer_names or [str(i) for i in range(len(self.attention_kl_before))]
            fit = self.attention_kl_fit or self.attention_kl_after
            for name, b, f, a in zip(names, self.attention_kl_before, fit, self.attention_kl_after):
                lines.append(f"{name:>5}  {b:10.4g}  {f:13.4g}  {a:11.4g}  {self._layer_bandwidth(name)}")
        return "\n".join(lines)


def _as_batches(model: torch.nn.Module, inputs: Any) -> list[dict[str, torch.Tensor]]:
    """A tensor (the model's main input), a mapping of tensors, or a sequence of either -> batches."""
    main = getattr(model, "main_input_name", "input_ids")
    if isinstance(inputs, torch.Tensor) or isinstance(inputs, Mapping):
        inputs = [inputs]
    if not isinstance(inputs, Sequence) or isinstance(inputs, (str, bytes)) or len(inputs) == 0:
        raise TypeError(
            "calibration_inputs must be a tensor, a mapping of tensors (e.g. a tokenizer's output) or a "
            f"non-empty list of them, got {type(inputs).__name__}"
        )
    device = next(model.parameters()).device
    batches = []
    for i, item in enumerate(inputs):
        if isinstance(item, torch.Tensor):
            item = {main: item}
        if not isinstance(item, Mapping):
            raise TypeError(f"calibration_inputs[{i}] must be a tensor or a mapping, got {type(item).__name__}")
        batch = {}
        for name, t in item.items():
            if name in ("labels", "label"):
                continue  # the gap is measured on the outputs, not on a loss
            batch[name] = t.to(device) if isinstance(t, torch.Tensor) else t
        batches.append(batch)
    return batches


def _row_weights(batch: Mapping[str, Any], length: int, decoder_rows: bool) -> torch.Tensor | None:
    """(B, L) float weights of non-padding positions, or None when the batch has no matching mask.

    The rows of an encoder-decoder's decoder (``decoder_rows``) are weighted by ``decoder_attention_mask``:
    ``attention_mask`` pads the encoder's input.
    """
    am = batch.get("decoder_attention_mask" if decoder_rows else "attention_mask")
    if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[-1] == length:
        return am.float()
    return None


def _summary(output: Any, batch: Mapping[str, Any], seq2seq: bool) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """(metric, per-position quantity, weights) from one model output (an encoder-decoder's, ``seq2seq``:
    its outputs are the decoder's positions)."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        logp = torch.log_softmax(logits.float(), -1)
        w = _row_weights(batch, logp.shape[1], seq2seq) if logp.dim() == 3 else None
        return "kl", logp, w
    hidden = getattr(output, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{type(output).__name__} has neither logits nor last_hidden_state to compare")
    w = _row_weights(batch, hidden.shape[1], seq2seq)
    w3 = torch.ones(hidden.shape[:2], device=hidden.device) if w is None else w
    pooled = (hidden.float() * w3.unsqueeze(-1)).sum(1) / w3.sum(1, keepdim=True).clamp_min(1)
    return "cosine", pooled, None


def _seq2seq(model: torch.nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _gap(reference: list, model: torch.nn.Module, batches: list) -> float:
    total, count = 0.0, 0.0
    for (metric, ref, w), batch in zip(reference, batches):
        _, new, _ = _summary(model(**batch), batch, _seq2seq(model))
        if metric == "kl":
            kl = (ref.exp() * (ref - new)).sum(-1)  # KL(softmax || FNA) per position
            if w is None:
                total, count = total + float(kl.sum()), count + kl.numel()
            else:
                total, count = total + float((kl * w).sum()), count + float(w.sum())
        else:
            cos = torch.nn.functional.cosine_similarity(ref, new, dim=-1)
            total, count = total + float(cos.sum()), count + cos.numel()
    return total / max(count, 1.0)


def _layer_kl(records: list[dict], batches: list, alpha: Any, log10_bw: torch.Tensor, fixed: dict) -> torch.Tensor:
    """Per-head mean KL(softmax rows || FNA rows) of one layer at bandwidth 10**log10_bw (H,)."""
    num = den = None
    for rec in records:
        q, k, log_p = rec["q"], rec["k"], rec["log_p"]
        heads = q.shape[1]
        bw = (10.0 ** log10_bw.to(q.device, torch.float64)).float().reshape(heads, 1, 1)
        log_q = log_softmax_rows(apply_mask(log_kernel(q, k, alpha=alpha, bandwidth=bw, **fixed), rec["mask"]))
        p = log_p.exp()
        row_kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)  # (B, H, Lq)
        valid = torch.isfinite(log_p).any(-1).float()  # rows with at least one allowed key
        w = _row_weights(batches[rec["batch"]], q.shape[2], rec["decoder_rows"])  # padding queries do not count
        if w is not None:
            valid = valid * w[:, None, :]
        n = (row_kl * valid).sum((0, 2)).double()
        d = valid.sum((0, 2)).double()
        num, den = (n, d) if num is None else (num + n, den + d)
    return (num / den.clamp_min(1)).cpu()


def _search_bandwidth(
    objective: Callable[[torch.Tensor], torch.Tensor], heads: int, per_head: bool, lo: float, hi: float
) -> torch.Tensor:
    """log10 bandwidth per head minimising ``objective`` ((H,) -> (H,) per-head KL).

    A grid over [lo, hi] in steps of 0.25 (it contains every integer, so eps = 1 is among
    the candidates), then golden-section search inside the best grid cell's neighbours,
    vectorised over heads. With ``per_head=False`` all heads share the mean-KL minimiser.
    """

    def f(x: torch.Tensor) -> torch.Tensor:
        kl = objective(x)
        return kl if per_head else kl.mean().expand(heads)

    step = 0.25
    grid = torch.arange(lo, hi + step / 2, step, dtype=torch.float64)
    values = torch.stack([f(torch.full((heads,), float(g), dtype=torch.float64)) for g in grid])  # (G, H)
    best = values.argmin(0)
    best_x, best_f = grid[best], values.gather(0, best[None]).squeeze(0)
    a, b = (best_x - step).clamp(min=lo), (best_x + step).clamp(max=hi)
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(20):
        left = fc < fd  # the minimum lies in [a, d]
        a, b = torch.where(left, a, c), torch.where(left, d, b)
        new = torch.where(left, b - inv_phi * (b - a), a + inv_phi * (b - a))
        fn = f(new)
        c, d, fc, fd = (
            torch.where(left, new, d),
            torch.where(left, c, new),
            torch.where(left, fn, fd),
            torch.where(left, fc, fn),
        )
    for x, fx in ((c, fc), (d, fd)):
        better = fx < best_f
        best_x, best_f = torch.where(better, x, best_x), torch.where(better, fx, best_f)
    return best_x


def _round(x: float) -> float:
    return float(f"{x:.6g}")  # readable config.json; the gap is measured with the rounded values


def to_fna(
    model: PreTrainedModel,
    calibration_inputs: Any = None,
    *,
    alpha: Any = FNAConfig.alpha,
    bandwidth: Any = FNAConfig.bandwidth,
    manifold: Any = FNAConfig.manifold,
    rescale: Any = FNAConfig.rescale,
    d_intrinsic: Any = FNAConfig.d_intrinsic,
    sphere_radius: Any = FNAConfig.sphere_radius,
    density_a: Any = FNAConfig.density_a,
    backend: str = hf_settings.CONFIG_KEYS["fna_backend"],
    per_head: bool = False,
    objective: str = "output",
    search_range: tuple[float, float] = (-6.0, 3.0),
) -> ConversionReport:
    """Convert a pretrained softmax model to FNA in place, calibrating the bandwidth.

    The model's attention implementation becomes ``"fna"``, and the configs its attention
    modules read (one per stack: a T5's encoder and decoder, a Llava's vision tower and text
    model) get the ``fna_*`` keys, per-layer values indexed per stack. The model first gets
    its own copies of its configs, so config objects shared with other models stay as they
    were; every argument is checked before anything changes, and a failure during the
    conversion restores the model. With ``calibration_inputs``, the
    bandwidth of each layer (and head, with ``per_head=True``) is chosen to minimise the
    mean KL divergence between the softmax model's attention rows and FNA's on the same
    queries and keys (recorded from the softmax model), by a grid and golden-section search
    over ``log10(bandwidth)`` in ``search_range``. The gap between the softmax model's
    outputs and the FNA model's is measured before calibration (with ``bandwidth``) and
    after, on the same inputs.

    Args:
        model: a transformers model using a softmax attention implementation
            (``eager``/``sdpa``/...); its attention modules must read ``model.config``.
        calibration_inputs: a tensor of the model's main input (``input_ids``,
            ``pixel_values``), a mapping of tensors (a tokenizer's output, with
            ``attention_mask`` for padding), or a list of them; None skips calibration.
        alpha: as the ``fna_alpha`` config key (a scalar, per layer or per layer and head).
            Every setting may also be a dict by stack name (the names of
            ``ConversionReport.bandwidth``, e.g. ``{"encoder": ..., "decoder": ...}``), one
            value per stack; a per-layer list must fit every stack's depth.
        manifold: as ``fna_manifold`` (a scalar or per layer).
        rescale: as ``fna_rescale`` (a scalar or per layer).
        d_intrinsic: as ``fna_d_intrinsic`` (a scalar or per layer).
        sphere_radius: as ``fna_sphere_radius`` (a scalar or per layer).
        density_a: as ``fna_density_a`` (a scalar or per layer).
        backend: as ``fna_backend`` (one for the whole model).
        bandwidth: the initial bandwidth (kept as is without calibration inputs).
        per_head: calibrate one bandwidth per head instead of per layer.
        objective: "attention" -- stop after the layer-wise attention-row calibration (one
            forward pass in all); "output" (default) -- then refine each layer's bandwidth in
            turn (a common factor for its heads) by golden-section search on the measured
            output gap itself, starting from the better of the initial and the
            attention-calibrated bandwidths, so the output gap never ends above its
            initial value. Costs about 13 forward passes over the inputs per layer.
        search_range: (lo, hi) bounds of ``log10(bandwidth)``.

    Returns:
        A :class:`ConversionReport` with the measured gaps and the chosen bandwidths.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    current = model.config._attn_implementation
    if current == hf_attention.ATTN_IMPLEMENTATION:
        raise ValueError("model already uses attn_implementation='fna'; to_fna converts a softmax model")
    if not isinstance(per_head, bool):
        raise TypeError(f"per_head must be a bool, got {per_head!r}")
    if objective not in ("attention", "output"):
        raise ValueError(f"objective must be 'attention' or 'output', got {objective!r}")
    try:
        lo, hi = (float(v) for v in search_range)
    except (TypeError, ValueError):
        raise TypeError(f"search_range must be a pair of numbers (log10 bandwidth), got {search_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi - lo >= 0.5):
        raise ValueError(
            f"search_range must be finite (lo, hi) with hi - lo >= 0.5 (log10 bandwidth), got {search_range!r}"
        )
    settings = dict(alpha=alpha, bandwidth=bandwidth, manifold=manifold, rescale=rescale, d_intrinsic=d_intrinsic,
                    sphere_radius=sphere_radius, density_a=density_a, backend=backend)  # fmt: skip
    modules = hf_settings.attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention module in {type(model).__name__} (modules with config, is_causal, scale)")
    # Everything is checked before anything changes: a bad argument leaves the model as it was.
    batches = None if calibration_inputs is None else _as_batches(model, calibration_inputs)
    configs = _stack_configs(modules)
    stack_settings = _settings_per_stack(model, configs, settings)
    dense = []  # the configs of the stacks with density normalisation in some layer
    for config, own in zip(configs, stack_settings):
        density = hf_settings.check_fna_settings(config, **own)["fna_density_a"]
        if any(v > 0 for v in (density if isinstance(density, list) else [density])):
            dense.append(config)
    density = settings["density_a"]
    if dense:
        if batches is not None:
            # The objective compares plain rows; density normalisation shifts them by column sums.
            raise ValueError(f"density_a={density!r}: to_fna calibration supports density_a = 0 only")
        in_dense = [m for m in modules if any(m.config is c for c in dense)]
        causal = next((m for m in in_dense if hf_attention.causal_context(m)), None)
        if causal is not None:
            raise ValueError(
                f"density_a={density!r} cannot be used in {type(causal).__name__}, a decoder's attention: "
                f"{hf_attention.DENSITY_IN_DECODER}"
            )
    hf_attention.register()
    originals = _own_configs(model)
    was_training = model.training
    try:
        return _convert(model, modules, stack_settings, batches, per_head, objective, lo, hi)
    except BaseException:
        _restore(model, originals)
        raise
    finally:
        model.train(was_training)


def _stack_configs(modules: Sequence[torch.nn.Module]) -> list[Any]:
    """The distinct configs the attention modules read, in module order (one per stack)."""
    configs: dict[int, Any] = {}
    for module in modules:
        configs.setdefault(id(module.config), module.config)
    return list(configs.values())


def _stack_names(model: torch.nn.Module, configs: Sequence[Any]) -> list[str]:
    """Each config's name: the shortest path of a module that holds it ("model" for the top)."""
    names = []
    for config in configs:
        paths = [name for name, m in model.named_modules() if m.__dict__.get("config") is config]
        names.append(min(paths, key=len) or "model" if paths else "model")
    return names


def _settings_per_stack(model: torch.nn.Module, configs: Sequence[Any], settings: Mapping[str, Any]) -> list[dict]:
    """``settings`` for each stack's config: a dict value is read by stack name, other values go to every stack.

    A per-layer list must fit every stack's depth; the refusal names the setting and the depths.
    """
    names = _stack_names(model, configs)
    depths = ", ".join(f"{name}: {hf_settings.num_layers(c)}" for name, c in zip(names, configs))
    for name, value in settings.items():
        if isinstance(value, Mapping):
            if sorted(value) != sorted(names):
                raise ValueError(
                    f"{name} given by stack must name each stack of {type(model).__name__} once, "
                    f"got the keys {sorted(value)}; its stacks are {names}"
                )
        elif isinstance(value, (list, tuple)):
            wrong = [c for c in configs if hf_settings.num_layers(c) not in (None, len(value))]
            if wrong:
                raise ValueError(
                    f"{name}={value!r} has {len(value)} entries, but the attention layers of "
                    f"{type(model).__name__} per stack are {{{depths}}}: give a scalar, one entry per layer "
                    f"of every stack, or a dict by stack name, {{{', '.join(repr(n) + ': ...' for n in names)}}}"
                )
    return [{key: value[name] if isinstance(value, Mapping) else value for key, value in settings.items()}
            for name in names]  # fmt: skip


def _top_config_role(model: torch.nn.Module, configs: Sequence[Any]) -> str:
    """How ``model.config``, the config ``save_pretrained`` writes, relates to the configs the
    attention modules read (one per stack):

    "read": a stack reads it (GPT-2, Llama, BERT); it holds that stack's ``fna_*`` keys.
    "holds": it holds the stacks' configs as sub-configs (a Llava's ``text_config`` and
    ``vision_config``), saved inside it with their keys.
    "copied": the stacks read copies of it (a T5's encoder and decoder), which are not saved:
    loading rebuilds each stack from the top config, so the stacks' values must be written there.
    """
    if any(model.config is c for c in configs):
        return "read"
    saved = list(vars(model.config).values())
    return "holds" if all(any(c is s for s in saved) for c in configs) else "copied"


def _own_configs(model: torch.nn.Module) -> list[tuple[torch.nn.Module, Any]]:
    """Give every module of ``model`` a copy of its config; returns (module, original config) pairs.

    A config object can be shared with other models (``from_config`` keeps the caller's object; a
    composite model's sub-models hold its sub-configs), and the conversion writes the attention
    implementation and the ``fna_*`` keys into it. One memo keeps shared objects shared.
    """
    memo: dict[int, Any] = {}
    originals = []
    for module in model.modules():
        config = module.__dict__.get("config")
        if isinstance(config, PretrainedConfig):
            originals.append((module, config))
            module.config = copy.deepcopy(config, memo)
    return originals


def _restore(model: torch.nn.Module, originals: list[tuple[torch.nn.Module, Any]]) -> None:
    """Undo a conversion that failed: the original configs, no layer numbers or cached settings."""
    for module, config in originals:
        module.config = config
    hf_attention.forget_module_state(model)


def _convert(model, modules, stack_settings, batches, per_head, objective, lo, hi) -> ConversionReport:
    configs = _stack_configs(modules)  # the model's own copies, in the order of stack_settings
    hf_stacks.link_stacks(model)  # a T5 loaded from an FNA save: its stacks' keys become their own
    for config, own in zip(configs, stack_settings):
        hf_attention.configure_fna(config, **own)
    role = _top_config_role(model, configs)
    if role != "read":
        # The settings every stack shares (kept where a Llava's saved config.json has had them, though
        # nothing reads them there); "copied" (a T5) also gets each stack's values by _record_stacks.
        shared = {k: v for k, v in stack_settings[0].items() if all(s[k] == v for s in stack_settings)}
        # Written to the top config alone: configure_fna would pass them on to a Llava's sub-configs.
        for key, value in hf_settings.check_fna_settings(model.config, **shared).items():
            setattr(model.config, key, value)
    hf_settings.assign_layer_indices(model)
    names = _stack_names(model, configs)

    def values(key: str) -> Any:
        if len(configs) == 1:
            return getattr(configs[0], key)
        return {name: getattr(config, key) for name, config in zip(names, configs)}

    if batches is None:
        model.set_attn_implementation(hf_attention.ATTN_IMPLEMENTATION)
        if role == "copied":
            _record_stacks(model, configs)
        return ConversionReport(None, None, None, values("fna_alpha"), values("fna_bandwidth"))

    model.eval()
    with torch.no_grad():
        reference = [_summary(model(**b), b, _seq2seq(model)) for b in batches]
        model.set_attn_implementation(hf_attention.ATTN_IMPLEMENTATION)
        records: list[dict] = []
        for i, b in enumerate(batches):
            with hf_attention.substitute_attention(_softmax_recorder(records, i, _seq2seq(model))):
                model(**b)
        unknown = [r for r in records if all(r["config"] is not c for c in configs)]
        if unknown:
            raise ValueError("an attention call came from a module to_fna did not find (no config/is_causal/scaling)")
        gap_before = _gap(reference, model, batches)
        # Stacks the inputs never reached (a Llava's vision tower on text alone) keep their values.
        reached = [c for c in configs if any(r["config"] is c for r in records)]
        initial = [c.fna_bandwidth for c in reached]
        kl_initial, kl_fit, layer_names = _calibrate(configs, names, records, batches, per_head, lo, hi)
        kl_final = kl_fit
        if objective == "output":
            _refine_output(model, reached, reference, batches, initial, gap_before, lo, hi)
            kl_final = _calibrate(configs, names, records, batches, None, lo, hi)[1]
        gap_after = _gap(reference, model, batches)
    if role == "copied":
        _record_stacks(model, configs)
    n_sequences = sum(int(r[1].shape[0]) for r in reference)
    return ConversionReport(
        metric=reference[0][0],
        gap_before=gap_before,
        gap_after=gap_after,
        alpha=values("fna_alpha"),
        bandwidth=values("fna_bandwidth"),
        attention_kl_before=kl_initial,
        attention_kl_after=kl_final,
        n_sequences=n_sequences,
        calibrated=True,
        objective=objective,
        attention_kl_fit=kl_fit,
        layer_names=layer_names,
    )


def _record_stacks(model: torch.nn.Module, configs: Sequence[Any]) -> None:
    """Give a top config the stacks copy (a T5's, see :func:`_top_config_role`) the stacks' values
    as ``hf_stacks.STACKS_KEY``: T5 saves only its top config and rebuilds both stacks from
    copies of it when loading, so per-stack values would otherwise be lost on reload."""
    setattr(model.config, hf_stacks.STACKS_KEY, hf_stacks.stack_values(model, configs))


def _calibrate(configs, names, records, batches, per_head, lo, hi) -> tuple[list[float], list[float], list[str]]:
    """Choose fna_bandwidth per layer (and head) of every stack from the recorded softmax attention; write it.

    Returns the per-layer attention-row KL at the bandwidths in the configs and at the chosen
    ones, and the layers' names. With ``per_head=None`` nothing is searched or written: both
    KLs are at the bandwidths in the configs.
    """
    kl_before, kl_after, layer_names = [], [], []
    for config, name in zip(configs, names):
        by_layer: dict[int, list[dict]] = {}
        for rec in records:
            if rec["config"] is not config:
                continue
            if rec["layer"] is None:
                raise ValueError("an attention module has no layer index; assign_layer_indices(model) found none")
            by_layer.setdefault(rec["layer"], []).append(rec)
        if not by_layer:
            continue
        n_layers = hf_settings.num_layers(config) or (max(by_layer) + 1)
        current = hf_settings.validate_fna_config(config)["fna_bandwidth"]
        new_bw: list[Any] = []
        for layer in range(n_layers):
            recs = by_layer.get(layer)
            start = current[layer] if isinstance(current, list) else current
            if not recs:  # a layer the inputs never reached keeps its bandwidth
                new_bw.append(start)
                continue
            layer_names.append(str(layer) if len(configs) == 1 else f"{name}.{layer}")
            heads = recs[0]["q"].shape[1]
            settings = hf_attention.layer_settings(config, layer, heads)
            alpha = settings["alpha"]
            if isinstance(alpha, list):
                alpha = torch.tensor(alpha, dtype=torch.float32, device=recs[0]["q"].device).reshape(heads, 1, 1)
            fixed = {k: settings[k] for k in ("manifold", "rescale", "d_intrinsic", "sphere_radius")}

            def objective(x, recs=recs, alpha=alpha, fixed=fixed):
                return _layer_kl(recs, batches, alpha, x, fixed)

            start_vec = torch.tensor(start if isinstance(start, list) else [start] * heads, dtype=torch.float64)
            kl_before.append(float(objective(start_vec.log10()).mean()))
            if per_head is None:
                kl_after.append(kl_before[-1])
                continue
            best = _search_bandwidth(objective, heads, per_head, lo, hi)
            values = [_round(10.0 ** float(x)) for x in best]
            kl_after.append(float(objective(torch.tensor(values, dtype=torch.float64).log10()).mean()))
            new_bw.append(values if per_head else values[0])
        if per_head is not None:
            hf_attention.configure_fna(config, bandwidth=new_bw)
    return kl_before, kl_after, layer_names


def _objective_gap(reference: list, model: torch.nn.Module, batches: list) -> float:
    """The output gap as a quantity to minimise: KL as is, cosine as 1 - cosine."""
    gap = _gap(reference, model, batches)
    return gap if reference[0][0] == "kl" else 1.0 - gap


def _scaled(value: Any, factor: float, lo: float, hi: float) -> Any:
    def one(x: float) -> float:
        return _round(min(max(x * factor, 10.0**lo), 10.0**hi))

    return [one(x) for x in value] if isinstance(value, list) else one(value)


def _refine_output(
    model, configs: list, reference: list, batches: list, initial: list, gap_initial: float, lo: float, hi: float
) -> None:
    """Coordinate search, layer by layer of every stack, on the output gap; writes each config's fna_bandwidth.

    Each layer's bandwidth (all its heads together) is multiplied by 10**t, t in [-1, 1]:
    five grid points, then golden-section search in the best one's neighbours. A candidate
    is kept only when it lowers the gap, so the gap never rises.
    """
    calibrated = [list(config.fna_bandwidth) for config in configs]

    def write(tables: list[list]) -> None:
        for config, table in zip(configs, tables):
            config.fna_bandwidth = list(table)

    best = _objective_gap(reference, model, batches)
    initial_gap = gap_initial if reference[0][0] == "kl" else 1.0 - gap_initial
    if initial_gap < best:  # the attention calibration made the outputs worse: start from the initial values
        for c, (table, start) in enumerate(zip(calibrated, initial)):
            start = list(start) if isinstance(start, list) else [start] * len(table)
            # Keep the calibrated shape (per head stays per head), with the initial values.
            calibrated[c] = [
                [s] * len(t) if isinstance(t, list) and not isinstance(s, list) else s for s, t in zip(start, table)
            ]
        write(calibrated)
        best = initial_gap
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    for c in range(len(calibrated)):
        for layer in range(len(calibrated[c])):
            base = calibrated[c][layer]

            def gap_at(t: float, c: int = c, layer: int = layer, base: Any = base) -> float:
                trial = [list(table) for table in calibrated]
                trial[c][layer] = _scaled(base, 10.0**t, lo, hi)
                write(trial)
                return _objective_gap(reference, model, batches)

            grid = [-1.0, -0.5, 0.5, 1.0]
            values = {0.0: best}
            values.update({t: gap_at(t) for t in grid})
            t_best = min(values, key=values.get)
            a, b = t_best - 0.5, t_best + 0.5
            x1, x2 = b - inv_phi * (b - a), a + inv_phi * (b - a)
            f1, f2 = gap_at(x1), gap_at(x2)
            for _ in range(6):
                if f1 < f2:
                    b, x2, f2 = x2, x1, f1
                    x1 = b - inv_phi * (b - a)
                    f1 = gap_at(x1)
                else:
                    a, x1, f1 = x1, x2, f2
                    x2 = a + inv_phi * (b - a)
                    f2 = gap_at(x2)
            values.update({x1: f1, x2: f2})
            t_best = min(values, key=values.get)
            if values[t_best] < best:
                calibrated[c][layer] = _scaled(base, 10.0**t_best, lo, hi)
                best = values[t_best]
            write(calibrated)
    for config, table in zip(configs, calibrated):
        hf_attention.configure_fna(config, bandwidth=table)


