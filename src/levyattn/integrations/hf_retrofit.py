"""Retrofit a pretrained softmax causal LM to FNA: attention transfer, then a short fine-tune.

:func:`~levyattn.integrations.hf_convert.to_fna` switches a model to FNA and calibrates one
bandwidth per layer; that alone leaves a language model far from its softmax quality, because
FNA's rows are a different function of the same queries and keys. :func:`retrofit` closes the
gap in two stages, the recipe used for other attention kernels (attention transfer):

1. **Attention transfer, layer by layer.** The softmax model runs once over the calibration
   windows and every attention module's inputs and output are recorded (the teacher). Then, for
   each layer on its own, FNA's parameters -- one log-bandwidth per head, optionally one alpha
   per head, and a low-rank update of the query and key projections (rank ``qk_rank``, zero at
   the start, so step 0 is plain ``to_fna``) -- are fitted to reproduce that layer's softmax
   output (relative mean squared error) on the recorded inputs. Layers are independent, so only
   the recordings and one layer's parameters are trained at a time. The fitted projections are
   merged into the model's own weights and the bandwidths written to its ``fna_*`` config keys:
   the result is a plain transformers model with ``attn_implementation="fna"``.
2. **Fine-tune.** LoRA adapters (``peft``) on the attention and MLP projections, trained on the
   next-token loss of the calibration windows, merged into the weights at the end.

Both stages show progress (a bar on a terminal, plain lines otherwise), checkpoint atomically
(stage 1 after every layer, stage 2 every ``checkpoint_every`` steps) into ``OUT/retrofit/``,
with the global random generators (torch, numpy, Python's ``random``: dropout draws from them),
and resume exactly from there. The converted model is saved in ``OUT`` with ``save_pretrained``
(plus the tokenizer and ``OUT/retrofit/report.json``) and loads with
``AutoModelForCausalLM.from_pretrained(OUT, attn_implementation="fna")``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from levyattn._extras import require
from levyattn.config import RetrofitOptions, check_int
from levyattn.functional import fractional_attention
from levyattn.integrations.hf_attention import ATTN_IMPLEMENTATION, layer_settings, substitute_attention
from levyattn.integrations.hf_convert import to_fna
from levyattn.integrations.hf_settings import attention_modules, layer_index
from levyattn.io import atomic_write_bytes, atomic_write_files, atomic_write_json, is_hub_id, read_json, read_text
from levyattn.training.checkpoint import optimizer_from_flat, optimizer_to_flat, rng_state, set_rng_state
from levyattn.training.progress import EpochProgress

if TYPE_CHECKING:  # imported where used: hf_attention above already names the extra when it is missing
    from transformers import PreTrainedModel

__all__ = ["RetrofitResult", "load_causal_lm", "perplexity", "retrofit", "text_windows"]

_log = logging.getLogger(__name__)
STATE_DIR = "retrofit"
#: The (query, key) projection names of the attention modules stage 1 can adapt, by family.
QK_PROJECTIONS = (("q_proj", "k_proj"), ("query", "key"))
#: Linear layers LoRA adapts in stage 2, where a model has them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "query", "key", "value")
# to_fna's bandwidth search keeps every layer's queries and keys; a few batches fix a bandwidth
# per head as well as all of them (its cost grows with the batches, its answer hardly).
TO_FNA_BATCHES = 4

_STAGE_LABELS = (("softmax", "softmax"), ("to_fna", "to_fna (bandwidths)"),
                 ("stage1", "stage 1: attention transfer"), ("stage2", "stage 2: LoRA fine-tune"))  # fmt: skip


@dataclass
class RetrofitResult:
    """Perplexities on the evaluation windows (``None`` where a stage did not run), the process
    CPU seconds of each part, and the stage-1 relative output error of each layer before and
    after its fit (``|FNA - softmax|^2 / |softmax|^2`` over the calibration windows)."""

    perplexity: dict[str, float | None]
    cpu_seconds: dict[str, float]
    layer_error_before: list[float]
    layer_error_after: list[float]
    eval_windows: int
    calibration_windows: int
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A table of perplexities (lower is better) with each one's ratio to softmax's and the CPU
        seconds of the stage, then where the conversion lands in words."""
        base = self.perplexity.get("softmax")
        lines = [f"perplexity on {self.eval_windows} held-out windows (lower is better):",
                 f"{'model':<30}{'perplexity':>12}{'x softmax':>11}{'CPU s':>9}"]  # fmt: skip
        for name, label in _STAGE_LABELS:
            ppl = self.perplexity.get(name)
            if ppl is None:
                continue
            ratio = f"{ppl / base:.2f}x" if base else "-"
            seconds = f"{self.cpu_seconds[name]:.0f}" if name in self.cpu_seconds else ""
            lines.append(f"{label:<30}{ppl:>12.2f}{ratio:>11}{seconds:>9}")
        final = next((n for n in ("stage2", "stage1", "to_fna") if self.perplexity.get(n) is not None), None)
        if base and final:
            total = sum(self.cpu_seconds.get(n, 0.0) for n in ("to_fna", "stage1", "stage2"))
            lines.append(f"\nthe converted model's perplexity is {self.perplexity[final] / base:.2f}x softmax's "
                         f"after {total / 60:.1f} CPU-minutes of conversion (evaluations not counted)")  # fmt: skip
        return "\n".join(lines)


# ----------------------------------------------------------------------------- models and text


def load_causal_lm(source: str | Path) -> tuple[PreTrainedModel, Any]:
    """A causal LM and its tokenizer from a ``save_pretrained`` folder, a ``.gguf`` file
    (de-quantized to float32 by transformers; needs ``gguf``) or a hub id (local cache first;
    downloads only when the hub is online). The model is in float32, eval mode, softmax (SDPA)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    kwargs: dict[str, Any] = {}
    if path.is_file() and path.suffix == ".gguf":
        path, kwargs = path.parent, {"gguf_file": path.name}
    elif not path.is_dir() and path.exists():
        raise ValueError(f"model must be a model folder, a .gguf file or a hub id, got the file {source}")
    elif not path.exists() and (path.suffix == ".gguf" or not is_hub_id(str(source))):
        raise FileNotFoundError(f"model folder or file not found: {source}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="sdpa", **kwargs
        )
    except OSError as err:
        if path.exists():
            raise
        # transformers took the missing folder for a hub id and could not fetch it.
        raise FileNotFoundError(
            f"model {source!r} is no local folder or file, and loading it as a hub id failed: {err}"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    return model.eval(), tokenizer


def text_windows(tokenizer: Any, paths: Sequence[str | Path], window: int) -> torch.Tensor:
    """The texts of ``paths`` (UTF-8), tokenized and joined (EOS between files), cut into
    non-overlapping windows: (N, window) int64. A text too short for one window is an error."""
    check_int("window", window, 2)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for path in paths:
        ids.extend(tokenizer(read_text(path, "text file"), add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    n = len(ids) // window
    if n == 0:
        raise ValueError(
            f"the text files {list(map(str, paths))} hold {len(ids)} tokens, fewer than one window of {window}"
        )
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token negative log-likelihood over every position of ``windows`` (N, T)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def _plain_weights(model: PreTrainedModel) -> None:
    # A model loaded from GGUF keeps transformers' GGUF quantizer after de-quantizing, and
    # save_pretrained refuses it ("quantized with gguf and is not serializable"); its weights are
    # plain float tensors by then, so the model is saved as the float model it is.
    model.hf_quantizer = None
    for holder in (model, model.config):
        if getattr(holder, "quantization_config", None) is not None:
            holder.quantization_config = None
        if hasattr(holder, "is_quantized"):
            holder.is_quantized = False


# ----------------------------------------------------------------------------- stage 1


@dataclass
class _Recording:
    """One attention module's calls during the teacher pass: per batch, (args, kwargs, output)."""

    calls: list[tuple[tuple, dict, torch.Tensor]]


def _record_teacher(model: PreTrainedModel, modules: list[nn.Module], batches: list[torch.Tensor]) -> list[_Recording]:
    recordings = [_Recording([]) for _ in modules]

    def hook_for(rec: _Recording) -> Callable:
        def hook(module, args, kwargs, output):
            kept = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
            rec.calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), kept, output[0].detach()))

        return hook

    handles = [m.register_forward_hook(hook_for(r), with_kwargs=True) for m, r in zip(modules, recordings)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return recordings


def _qk_projections(module: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    for q_name, k_name in QK_PROJECTIONS:
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            return q, k
    return None


class _LowRankUpdate(nn.Module):
    """``W x + B (A x)`` added to a linear layer's output by a forward hook; ``B`` starts at 0."""

    def __init__(self, linear: nn.Linear, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        a = torch.randn(rank, linear.in_features, generator=generator) / math.sqrt(linear.in_features)
        self.a = nn.Parameter(a.to(linear.weight))
        self.b = nn.Parameter(torch.zeros(linear.out_features, rank, dtype=linear.weight.dtype))
        self.linear = linear
        self.handle = linear.register_forward_hook(lambda _m, args, out: out + (args[0] @ self.a.T) @ self.b.T)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the linear layer's weight and remove the hook."""
        self.handle.remove()
        self.linear.weight += self.b @ self.a


@contextmanager
def _trainable_fna(
    layer: int, settings: dict[str, Any], log_bw: torch.Tensor, alpha: Callable[[], Any]
) -> Iterator[None]:
    """Within the block, the FNA attention of ``layer`` uses the trainable per-head bandwidth
    ``exp(log_bw)`` and ``alpha()``; its other settings are ``settings`` (the config's)."""

    def substitute(module, q, k, v, mask, causal, _scaling):
        layer_idx = layer_index(module)
        if layer_idx != layer:
            raise RuntimeError(f"stage 1 trains layer {layer} but layer {layer_idx} was called")
        out = fractional_attention(
            q, k, v, alpha=alpha(), bandwidth=log_bw.exp(), attn_mask=mask, is_causal=causal, **settings
        )
        return out.transpose(1, 2).contiguous(), None

    with substitute_attention(substitute):
        yield


def _relative_error(module: nn.Module, recording: _Recording) -> torch.Tensor:
    num = den = 0.0
    for args, kwargs, target in recording.calls:
        out = module(*args, **kwargs)[0]
        num = num + (out - target).pow(2).sum()
        den = den + target.pow(2).sum()
    return num / den


def _fit_layer(
    model: PreTrainedModel,
    layer: int,
    module: nn.Module,
    recording: _Recording,
    options: RetrofitOptions,
    progress: EpochProgress,
) -> tuple[float, float, dict[str, Any]]:
    """Stage 1 on one layer; returns (error before, error after, the layer's fitted values)."""
    heads = model.config.num_attention_heads
    settings = layer_settings(model.config, layer, heads)
    settings.pop("backend")
    bandwidth = torch.as_tensor(settings.pop("bandwidth"), dtype=torch.float32).expand(heads).clone()
    alpha0 = torch.as_tensor(settings.pop("alpha"), dtype=torch.float32).expand(heads).clone()
    log_bw = nn.Parameter(bandwidth.log())
    # alpha = 2 sigmoid(raw) keeps it in (0, 2); started at the configured alpha (clipped off 2).
    raw_alpha = nn.Parameter(torch.logit(alpha0.clamp(max=1.98) / 2))
    alpha = (lambda: 2 * torch.sigmoid(raw_alpha)) if options.fit_alpha else (lambda: alpha0)
    generator = torch.Generator().manual_seed(options.seed * 1000 + layer)
    updates: list[_LowRankUpdate] = []
    if options.qk_rank:
        projections = _qk_projections(module)
        if projections is None:
            raise ValueError(
                f"qk_rank={options.qk_rank} needs query/key projections named {QK_PROJECTIONS} in "
                f"{type(module).__name__}; pass qk_rank=0 to fit the bandwidths only"
            )
        updates = [_LowRankUpdate(p, options.qk_rank, generator) for p in projections]
    groups = [{"params": [log_bw] + ([raw_alpha] if options.fit_alpha else []), "lr": options.stage1_lr}]
    if updates:
        groups.append({"params": [p for u in updates for p in (u.a, u.b)], "lr": options.stage1_lr / 10})
    optimizer = torch.optim.Adam(groups)
    frozen = [p for p in module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with _trainable_fna(layer, settings, log_bw, alpha):
            with torch.no_grad():
                before = float(_relative_error(module, recording))
            for step in range(options.stage1_steps):
                args, kwargs, target = recording.calls[step % len(recording.calls)]
                out = module(*args, **kwargs)[0]
                loss = (out - target).pow(2).mean() / target.pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.update(loss.detach(), options.stage1_lr)
            with torch.no_grad():
                after = float(_relative_error(module, recording))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    for u in updates:
        u.merge()
    fitted = {"bandwidth": [round(float(v), 6) for v in log_bw.detach().exp()],
              "alpha": [round(float(v), 6) for v in alpha().detach()]}  # fmt: skip
    return before, after, fitted


def _set_layer_values(model: PreTrainedModel, layer: int, values: dict[str, list[float]]) -> None:
    """Write one layer's per-head bandwidths and alphas into the config's per-layer lists."""
    n_layers = model.config.num_hidden_layers
    for name, per_head in values.items():
        key = f"fna_{name}"
        current = getattr(model.config, key)
        table = list(current) if isinstance(current, list) else [current] * n_layers
        table[layer] = per_head
        setattr(model.config, key, table)


# ----------------------------------------------------------------------------- stage 2


def _lora_model(model: PreTrainedModel, options: RetrofitOptions) -> nn.Module:
    require("convert", "peft", purpose="the retrofit's fine-tune (stage 2)")
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = sorted(names & set(LORA_TARGETS))
    if not targets:
        raise ValueError(f"no linear layer named {LORA_TARGETS} in {type(model).__name__} for LoRA")
    config = LoraConfig(r=options.lora_rank, lora_alpha=2 * options.lora_rank, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, config)


def _learning_rate(step: int, options: RetrofitOptions) -> float:
    warm = max(1, options.stage2_steps // 20)
    if step < warm:
        return options.stage2_lr * (step + 1) / warm
    progress = (step - warm) / max(1, options.stage2_steps - warm)
    return options.stage2_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- checkpoints


def _digest(windows: torch.Tensor) -> dict[str, Any]:
    """The shape and a SHA-256 of a (N, T) tensor of token ids, to recognise it on resume."""
    import hashlib

    ids = windows.detach().to("cpu", torch.int64).contiguous()
    return {"shape": list(ids.shape), "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}


class _Checkpoints:
    """``OUT/retrofit/``: state.json (options, stage, results so far) and safetensors files.

    A stage's tensors go to a new file named by its progress (``stage2-00000040.safetensors``)
    which state.json then names, so a run killed between the two writes resumes from the state
    and the tensors saved with it; older files of the stage are deleted once state.json names
    the new one."""

    def __init__(self, out: Path) -> None:
        self.dir = out / STATE_DIR
        self.state_path = self.dir / "state.json"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def load_state(self) -> dict[str, Any]:
        return read_json(self.state_path, "retrofit state file")

    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.state_path, state)

    def commit(self, stage: str, progress: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Save ``stage``'s tensors at ``progress`` (layers or steps done), then ``state`` naming them."""
        from safetensors.torch import save

        name = f"{stage}-{progress:08d}.safetensors"
        atomic_write_bytes(self.dir / name, save({k: v.detach().contiguous() for k, v in tensors.items()}))
        state[f"{stage}_file"] = name
        self.save_state(state)
        for old in self.dir.glob(f"{stage}*.safetensors"):
            if old.name != name:
                old.unlink()

    def load_tensors(self, stage: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        # state.json files written before the tensors files were named by progress name none.
        path = self.dir / state.get(f"{stage}_file", f"{stage}.safetensors")
        if not path.is_file():
            raise FileNotFoundError(f"retrofit checkpoint file missing: {path} ({self.state_path} refers to it)")
        try:
            return load_file(str(path))
        except Exception as err:  # a truncated or corrupt file raises safetensors' own error types
            raise ValueError(f"retrofit checkpoint file {path} cannot be read ({type(err).__name__}: {err}); "
                             f"delete {self.dir} to convert from the start") from err


def _qk_state(module: nn.Module) -> dict[str, torch.Tensor]:
    projections = _qk_projections(module)
    return {} if projections is None else {"q": projections[0].weight, "k": projections[1].weight}


def _restore_layer(module: nn.Module, tensors: dict[str, torch.Tensor], layer: int) -> None:
    projections = _qk_projections(module)
    with torch.no_grad():
        for name, linear in zip(("q", "k"), projections or ()):
            key = f"{layer}.{name}"
            if key in tensors:
                linear.weight.copy_(tensors[key])


# ----------------------------------------------------------------------------- the run


def retrofit(
    model: PreTrainedModel,
    train_windows: torch.Tensor,
    eval_windows: torch.Tensor,
    out: str | Path,
    options: RetrofitOptions | None = None,
    *,
    tokenizer: Any = None,
    resume: bool = False,
    source: str | None = None,
) -> RetrofitResult:
    """Convert ``model`` (a softmax causal LM, changed in place) to FNA in two stages (module docstring).

    Args:
        model: a transformers causal LM with a softmax attention implementation, float32.
        train_windows: (N, T) token ids; the first ``options.calibration_windows`` are used.
        eval_windows: (M, T) held-out token ids for the perplexities.
        out: the output folder: the converted model (``save_pretrained``), its tokenizer, and
            ``retrofit/`` (checkpoints, ``report.json``).
        options: :class:`RetrofitOptions` (defaults if None).
        tokenizer: saved beside the model when given.
        resume: continue from ``out/retrofit/`` (the options must be the same); without it an
            existing checkpoint there is an error.
        source: where the model came from, recorded in the report.

    Returns:
        :class:`RetrofitResult` (also written to ``out/retrofit/report.json``).
    """
    options = options or RetrofitOptions()
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if model.config._attn_implementation == ATTN_IMPLEMENTATION:
        raise ValueError("model already uses attn_implementation='fna'; retrofit converts a softmax model")
    for name, w in (("train_windows", train_windows), ("eval_windows", eval_windows)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != torch.long or w.shape[0] == 0:
            raise ValueError(
                f"{name} must be a non-empty (N, T) int64 tensor of token ids, got {getattr(w, 'shape', w)}"
            )
    if any(m.config is not model.config for m in attention_modules(model)):
        # Stage 1 reads and writes the per-layer values of model.config alone.
        raise ValueError(
            f"retrofit converts a causal LM whose attention modules all read model.config; {type(model).__name__} "
            "has attention modules with other configs (an encoder, a vision tower): use to_fna"
        )
    out = Path(out)
    ckpt = _Checkpoints(out)
    state: dict[str, Any]
    if ckpt.exists():
        if not resume:
            raise FileExistsError(
                f"{ckpt.dir} already holds a retrofit run; pass resume=True (--resume) to continue it"
            )
        state = ckpt.load_state()
        if state.get("options") != dataclasses.asdict(options):
            saved = state.get("options") or {}
            diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(options).items() if saved.get(k) != v}
            raise ValueError(f"the checkpoint in {ckpt.dir} was made with other options (saved, given): {diff}")
    else:
        state = {"options": dataclasses.asdict(options), "source": source, "perplexity": {}, "cpu_seconds": {},
                 "layers_done": 0, "layer_error_before": [], "layer_error_after": [], "stage2_step": 0}  # fmt: skip
    torch.manual_seed(options.seed)
    calibration = train_windows[: options.calibration_windows]
    # A resumed run that read other windows would report perplexities measured on two held-out sets
    # as one table (a checkpoint written before the digests were kept has none to compare).
    data = {"train_windows": _digest(calibration), "eval_windows": _digest(eval_windows)}
    changed = [k for k, v in data.items() if state.setdefault("data", data).get(k, v) != v]
    if changed:
        raise ValueError(
            f"the checkpoint in {ckpt.dir} was made on other {' and '.join(changed)} than given (a resumed run "
            "needs the same text: the same --text and --eval-text)"
        )
    batches = list(calibration.split(options.batch_size))
    model.eval()

    def timed(name: str, work: Callable[[], Any]) -> Any:
        start = time.process_time()
        result = work()
        state["cpu_seconds"][name] = state["cpu_seconds"].get(name, 0.0) + time.process_time() - start
        return result

    def measure(name: str) -> None:
        if name not in state["perplexity"]:
            state["perplexity"][name] = timed("evaluation", lambda: perplexity(model, eval_windows, options.batch_size))
            _log.info("perplexity %s: %.3f", name, state["perplexity"][name])
            ckpt.save_state(state)

    measure("softmax")
    modules = attention_modules(model)
    needs_teacher = options.stage1_steps > 0 and state["layers_done"] < len(modules)
    recordings = timed("stage1", lambda: _record_teacher(model, modules, batches)) if needs_teacher else None
    if "to_fna" in state:
        to_fna(model, alpha=options.alpha, bandwidth=state["to_fna"]["bandwidth"])
    else:
        report = timed(
            "to_fna",
            lambda: to_fna(model, batches[:TO_FNA_BATCHES], alpha=options.alpha, per_head=True, objective="attention"),
        )
        state["to_fna"] = {"bandwidth": report.bandwidth}
        ckpt.save_state(state)
    measure("to_fna")

    if options.stage1_steps:
        done = state["layers_done"]
        if done:
            tensors = ckpt.load_tensors("stage1", state)
            for layer in range(done):
                _restore_layer(modules[layer], tensors, layer)
            set_rng_state(tensors, state["stage1_rng"])
            for layer, values in enumerate(state["stage1_values"]):
                _set_layer_values(model, layer, values)
        for layer in range(done, len(modules)):
            progress = EpochProgress(
                layer + 1,
                len(modules),
                options.stage1_steps,
                unit="stage 1: layer",
                run_steps_left=(len(modules) - layer) * options.stage1_steps,
            )
            try:
                before, after, values = timed(
                    "stage1",
                    lambda layer=layer, progress=progress: _fit_layer(
                        model, layer, modules[layer], recordings[layer], options, progress
                    ),
                )
            finally:
                progress.close()
            _set_layer_values(model, layer, values)
            recordings[layer] = None  # free the layer's recording
            _log.info(
                "stage 1: layer %d/%d, relative output error %.4f -> %.4f", layer + 1, len(modules), before, after
            )
            state["layer_error_before"].append(before)
            state["layer_error_after"].append(after)
            state.setdefault("stage1_values", []).append(values)
            state["layers_done"] = layer + 1
            rng_tensors, state["stage1_rng"] = rng_state()
            ckpt.commit(
                "stage1",
                layer + 1,
                {f"{i}.{n}": t for i in range(layer + 1) for n, t in _qk_state(modules[i]).items()} | rng_tensors,
                state,
            )
        recordings = None
        measure("stage1")

    if options.stage2_steps:
        timed("stage2", lambda: _fine_tune(model, calibration, options, ckpt, state))
        measure("stage2")

    _plain_weights(model)
    # A run again of a finished conversion, killed while saving, must leave the saved model whole.
    atomic_write_files(out, model.save_pretrained)
    if tokenizer is not None:
        atomic_write_files(out, tokenizer.save_pretrained)
    result = RetrofitResult(
        perplexity={k: state["perplexity"].get(k) for k in ("softmax", "to_fna", "stage1", "stage2")},
        cpu_seconds=dict(state["cpu_seconds"]),
        layer_error_before=state["layer_error_before"],
        layer_error_after=state["layer_error_after"],
        eval_windows=int(eval_windows.shape[0]),
        calibration_windows=int(calibration.shape[0]),
        options=dataclasses.asdict(options),
    )
    atomic_write_json(ckpt.dir / "report.json", {"source": source, **result.to_dict()})
    return result


def fine_tune(
    model: PreTrainedModel, windows: torch.Tensor, out: str | Path, options: RetrofitOptions, *, resume: bool = False
) -> None:
    """Stage 2 alone, on any causal LM (softmax or FNA; changed in place): LoRA on the next-token
    loss of the first ``options.calibration_windows`` of ``windows`` (N, T), exactly as in
    :func:`retrofit`, checkpointed in ``out/retrofit/`` and resumable, merged at the end. Given
    to the softmax model, it is the controlled baseline of a retrofit: what the same fine-tune
    does without the change of attention."""
    ckpt = _Checkpoints(Path(out))
    if ckpt.exists():
        if not resume:
            raise FileExistsError(f"{ckpt.dir} already holds a fine-tune; pass resume=True to continue it")
        state = ckpt.load_state()
        if state.get("options") != dataclasses.asdict(options):
            raise ValueError(f"the checkpoint in {ckpt.dir} was made with other options")
    else:
        state = {"options": dataclasses.asdict(options), "stage2_step": 0}
    torch.manual_seed(options.seed)
    _fine_tune(model, windows[: options.calibration_windows], options, ckpt, state)


def _fine_tune(
    model: PreTrainedModel, windows: torch.Tensor, options: RetrofitOptions, ckpt: _Checkpoints, state: dict
) -> None:
    """Stage 2: LoRA on the next-token loss, checkpointed every ``checkpoint_every`` steps; merges at the end."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    peft_model = _lora_model(model, options)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.stage2_lr, weight_decay=0.0)
    step = state["stage2_step"]
    generator = torch.Generator().manual_seed(options.seed)
    if step:
        tensors = ckpt.load_tensors("stage2", state)
        set_peft_model_state_dict(
            peft_model, {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
        )
        optimizer_from_flat(optimizer, tensors, state["stage2_optimizer"])
        generator.set_state(tensors["generator"])
        # The global generators draw the model's dropout masks (attention, hidden): without them a
        # resumed run trained on other masks than the uninterrupted one.
        set_rng_state(tensors, state["stage2_rng"])
    peft_model.train()
    progress = EpochProgress(
        1, 1, options.stage2_steps, done=step, run_steps_left=options.stage2_steps - step, unit="stage 2: fine-tune"
    )
    try:
        while step < options.stage2_steps:
            lr = _learning_rate(step, options)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = torch.randint(0, windows.shape[0], (options.batch_size,), generator=generator)
            batch = windows[index]
            loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            progress.update(loss.detach(), lr)
            if step % options.checkpoint_every == 0 or step == options.stage2_steps:
                flat, flat_json = optimizer_to_flat(optimizer)
                lora = {f"lora.{k}": v for k, v in get_peft_model_state_dict(peft_model).items()}
                rng_tensors, state["stage2_rng"] = rng_state()
                state["stage2_step"], state["stage2_optimizer"] = step, flat_json
                ckpt.commit("stage2", step, {**lora, **flat, **rng_tensors, "generator": generator.get_state()}, state)
    finally:
        progress.close()
    peft_model.eval()
    peft_model.merge_and_unload()
