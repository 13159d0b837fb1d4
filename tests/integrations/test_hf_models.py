"""BERT, GPT-2, Llama and ViT with attn_implementation="fna": forward, backward, masks,
attention weights, generate, save/load and training steps, each held to the same model run with
the reference implementation of hf_tiny (levyattn.fractional_attention(backend="reference") on the
q/k/v transformers hands over)."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import DECODERS, FAMILIES, VOCAB, as_reference, tiny_config, transformers

from levyattn.integrations import hf_settings
from levyattn.integrations import huggingface as hf

AUTO = {
    "bert": transformers.AutoModel,
    "gpt2": transformers.AutoModelForCausalLM,
    "llama": transformers.AutoModelForCausalLM,
    "vit": transformers.AutoModel,
}


def build(family, attn="fna", seed=0, **extra):
    torch.manual_seed(seed)
    model = AUTO[family].from_config(tiny_config(family, **extra), attn_implementation=attn)
    return model.eval()


def inputs(family, batch=2, length=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g, dtype=dtype)}
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=g)}


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_weights_and_gradients_are_the_references(family):
    model = build(family, fna_alpha=[1.2, 0.8], fna_bandwidth=0.5).double()
    hf.assign_layer_indices(model)  # ViT's attention modules carry no layer_idx
    x = inputs(family, dtype=torch.float64)

    def run(m):
        out = m(**x, output_attentions=True)
        main_output(out).pow(2).mean().backward()
        grads = {name: p.grad for name, p in m.named_parameters() if p.grad is not None}
        return main_output(out).detach(), [w.detach() for w in out.attentions], grads

    got_out, got_weights, got_grads = run(model)
    want_out, want_weights, want_grads = run(as_reference(model))
    torch.testing.assert_close(got_out, want_out, rtol=1e-10, atol=1e-12)
    assert len(got_weights) == len(want_weights) == 2
    for got, want in zip(got_weights, want_weights):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert got_grads.keys() == want_grads.keys()
    attention = [m for m in model.modules() if hf_settings._is_attention_module(m)]
    assert len(attention) == 2 and all(p.grad is not None for m in attention for p in m.parameters())
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-9, atol=1e-12, msg=name)
    with torch.no_grad():
        assert model(**x).attentions is None  # weights are not computed unless asked


@pytest.mark.parametrize("family", FAMILIES)
def test_config_keys_drive_the_model(family):
    # The same weights under sdpa and under FNA with two alphas: three different functions, each
    # FNA one the reference's for the config's values.
    x = inputs(family)
    with torch.no_grad():
        softmax = main_output(build(family, attn="sdpa")(**x))
        # Randomly initialised q and k are close together: a small bandwidth makes the kernel matter.
        model = build(family, fna_bandwidth=1e-3)
        a = main_output(model(**x))
        torch.testing.assert_close(a, main_output(as_reference(model)(**x)))
        model.config.fna_alpha = 0.5
        b = main_output(model(**x))
        torch.testing.assert_close(b, main_output(as_reference(model)(**x)))
    assert not torch.allclose(a, softmax, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-4)  # the comparisons above tell the two alphas apart


def test_encoder_padding_mask_is_honoured():
    model = build("bert")
    ids = inputs("bert", batch=1, length=5)["input_ids"]
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], 1).long()
    with torch.no_grad():
        alone = model(ids).last_hidden_state
        batched = model(padded, attention_mask=mask).last_hidden_state[:, :5]
        unmasked = model(padded).last_hidden_state[:, :5]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-4)  # the pads matter without the mask


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_causal_and_left_padding_masks_are_honoured(family):
    model = build(family)
    ids = inputs(family, batch=1, length=6)["input_ids"]
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, pad), torch.ones(1, 6)], 1).long()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(ids).logits
        after = model(changed).logits
        # The future is invisible (up to rounding: FNA centres q and k on the mean key).
        torch.testing.assert_close(after[:, :-1], logits[:, :-1], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(after[:, -1], logits[:, -1], atol=1e-3)
        left = model(padded, attention_mask=mask, position_ids=positions).logits[:, pad:]
    torch.testing.assert_close(left, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_generate_with_cache_matches_full_recomputation(family):
    model = build(family, fna_alpha=[1.0, 1.6])
    ids = inputs(family, batch=2, length=5)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in a batch
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    full = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, full)
    # A greedy loop by hand: the whole sequence through the reference model, argmax of the last logits.
    reference, tokens = as_reference(model), ids
    with torch.no_grad():
        for _ in range(6):
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = reference(tokens, attention_mask=mask, position_ids=positions).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(cached, tokens)


def _cache(kind, config):
    if kind == "dynamic":
        return transformers.DynamicCache(config=config)
    return transformers.StaticCache(config=config, max_cache_len=20)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("family", DECODERS)
def test_several_new_tokens_on_a_filled_cache_see_every_earlier_key(family, kind):
    # Chunked prefill: 5 tokens, then 4 and 3 at once on the filled cache (a static cache has
    # 20 slots, so every call has more keys than queries); the logits are the full pass's.
    model = build(family, fna_alpha=[1.0, 1.6])
    ids = inputs(family, batch=2, length=12)["input_ids"]
    with torch.no_grad():
        full = as_reference(model)(ids).logits
        cache = _cache(kind, model.config)
        spans = ((0, 5), (5, 9), (9, 12))
        chunks = [model(ids[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in spans]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_assisted_generation_scores_are_the_full_pass(family):
    # The assistant proposes several tokens; the model checks them in one call on its filled cache.
    model = build(family)
    depth = {"n_layer": 1} if family == "gpt2" else {"num_hidden_layers": 1}
    assistant = build(family, seed=1, **depth)
    ids = inputs(family, batch=1, length=5)["input_ids"]
    out = model.generate(
        ids, assistant_model=assistant, max_new_tokens=8, do_sample=False, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    with torch.no_grad():
        full = as_reference(model)(out.sequences).logits
    for i, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, ids.shape[1] - 1 + i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_transformers_leaves_the_mask_out_with_extra_keys_only_for_an_empty_cache(kind):
    # fna_attention_forward keeps the first q_len keys when there is no mask and more keys than
    # queries; that is right only if transformers never omits the mask on a filled cache.
    from transformers.masking_utils import create_causal_mask

    model = build("llama")
    cache = _cache(kind, model.config)
    ids = inputs("llama", batch=1, length=9)["input_ids"]

    def mask_for(new_tokens):
        embeds = torch.zeros(1, new_tokens, model.config.hidden_size)
        return create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=cache)

    if kind == "static":
        assert mask_for(5) is None  # empty: the 20 slots beyond the 5 queries are unwritten
    with torch.no_grad():
        model(ids[:, :5], past_key_values=cache, use_cache=True)
    mask = mask_for(4)
    assert isinstance(mask, torch.Tensor)
    assert mask[0, 0, :, :9].tolist() == [[j <= 5 + i for j in range(9)] for i in range(4)]  # bottom-right


def test_vit_per_layer_values_need_layer_indices():
    model = build("vit", fna_alpha=[1.2, 1.8])
    x = inputs("vit")
    with pytest.raises(ValueError, match="assign_layer_indices"):
        model(**x)
    assert hf.assign_layer_indices(model) == 2
    with torch.no_grad():
        first = model(**x).last_hidden_state
        torch.testing.assert_close(first, as_reference(model)(**x).last_hidden_state)
        model.config.fna_alpha = [1.8, 1.2]  # the layers really get different values
        swapped = model(**x).last_hidden_state
        torch.testing.assert_close(swapped, as_reference(model)(**x).last_hidden_state)
    assert not torch.allclose(swapped, first, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_keep_the_fna_settings(family, tmp_path):
    heads = 4 if family == "llama" else 2
    per_head = [0.5 + 0.25 * h for h in range(heads)]
    density_a = 0.0 if family in DECODERS else 0.25  # decoders refuse density normalisation
    model = build(family, fna_alpha=[1.2, per_head], fna_bandwidth=[1e-3, 2.0], fna_density_a=density_a)
    hf.assign_layer_indices(model)
    x = inputs(family)
    model.save_pretrained(tmp_path)
    again = AUTO[family].from_pretrained(tmp_path, attn_implementation="fna").eval()
    hf.assign_layer_indices(again)
    assert again.config.fna_alpha == [1.2, per_head]
    assert again.config.fna_bandwidth == [1e-3, 2.0]
    assert again.config.fna_density_a == density_a
    with torch.no_grad():
        torch.testing.assert_close(main_output(again(**x)), main_output(model(**x)))
        # transformers does not save attn_implementation: loading without it gives sdpa.
        plain = AUTO[family].from_pretrained(tmp_path).eval()
        assert plain.config._attn_implementation != "fna"
        assert not torch.allclose(main_output(plain(**x)), main_output(model(**x)), atol=1e-4)


def test_set_attn_implementation_switches_a_loaded_model():
    model = build("llama", attn="sdpa")
    x = inputs("llama")
    model.set_attn_implementation("fna")
    assert model.config._attn_implementation == "fna"
    with torch.no_grad():
        out = model(**x).logits
    fna = build("llama")
    with torch.no_grad():
        torch.testing.assert_close(fna(**x).logits, out)


@pytest.mark.parametrize("family", DECODERS)
def test_training_steps_are_the_references(family):
    model = build(family).double().train()
    reference = as_reference(model)
    ids = inputs(family, batch=4, length=8)["input_ids"]

    def losses(m):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        out = []
        for _ in range(4):
            loss = m(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    got, want = losses(model), losses(reference)
    assert got == pytest.approx(want, rel=1e-9)
    assert want[-1] < want[0] - 0.1  # the steps move the model: the comparison covers training
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10, msg=name)


def test_attention_dropout_in_training_is_the_references():
    model = build("bert", attention_probs_dropout_prob=0.5).double().train()
    reference = as_reference(model)
    x = inputs("bert")
    query = "encoder.layer.0.attention.self.query.weight"
    for seed in (0, 1):
        torch.manual_seed(seed)
        got = model(**x).last_hidden_state
        torch.manual_seed(seed)
        want = reference(**x).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(model.get_parameter(query).grad, reference.get_parameter(query).grad)
    torch.manual_seed(0)
    a = model(**x).last_hidden_state
    assert not torch.allclose(a, got)  # dropout is on: the two seeds differ


def test_trainer_step(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    model = transformers.AutoModelForSequenceClassification.from_config(
        tiny_config("bert", num_labels=2), attn_implementation="fna"
    )
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(3, VOCAB, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.long),
         "labels": torch.tensor(i % 2)}
        for i in range(8)
    ]
    reference = as_reference(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no",
    )
    result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 2
    transformers.Trainer(model=reference, args=args, train_dataset=data).train()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    attn = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(before[attn], model.get_parameter(attn))  # the steps changed the attention


@pytest.mark.parametrize("family", DECODERS)
def test_density_normalisation_is_refused_in_decoders(family):
    # With density_a > 0 each key's column sum runs over every query: position 0's logits moved by
    # 7.5e-4 when tokens 6 and 7 changed, and decoding with the cache differed from the full pass by 0.029.
    model = build(family, fna_density_a=0.5)
    with pytest.raises(ValueError, match=r"fna_density_a = 0.5 .*decoder.*tokens after it"):
        model(**inputs(family))


@pytest.mark.parametrize("density_a", [0.0, 0.5])
def test_a_fully_padded_sequence_gives_zero_weights_and_finite_outputs(density_a):
    model = build("bert", fna_density_a=density_a)
    ids = inputs("bert", length=6)["input_ids"]
    keep = torch.ones_like(ids)
    keep[0, 4:] = 0  # right padding
    keep[1] = 0  # nothing but padding
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=keep, output_attentions=True)
    assert torch.isfinite(out.last_hidden_state).all()
    for weights in out.attentions:
        assert torch.isfinite(weights).all()
        assert weights[0, :, :, 4:].abs().max() == 0 and weights[1].abs().max() == 0


@pytest.mark.parametrize("family", DECODERS)
def test_left_padding_rows_of_a_decoder_are_zero_and_finite(family):
    model = build(family)
    ids = inputs(family, length=6)["input_ids"]
    keep = torch.ones_like(ids)
    keep[0, :3] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=keep, output_attentions=True)
    assert torch.isfinite(out.logits).all()
    for weights in out.attentions:
        assert weights[0, :, :3].abs().max() == 0  # pad queries attend to nothing
        assert weights[0, :, 3:, :3].abs().max() == 0  # real queries give padding no weight
