"""to_fna: convert a tiny pretrained-from-scratch softmax model, calibrate, save and reload."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_tiny import VOCAB, as_reference, tiny_config, tiny_llava, tiny_t5, transformers

from levyattn.integrations import huggingface as hf


def progressions(n, length, seed):
    """Arithmetic progressions mod VOCAB: a pattern a 2-layer model learns in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % VOCAB


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny GPT-2 trained from scratch with softmax attention, saved in the real format."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2"), attn_implementation="sdpa")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(60):
        ids = progressions(16, 16, seed=i)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 2.5  # it learnt something (uniform would be log(40) = 3.7)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(path)
    return path


def calibration():
    ids = progressions(8, 16, seed=1000)
    mask = torch.ones_like(ids)
    mask[:3, :4] = 0  # some left padding
    return {"input_ids": ids, "attention_mask": mask}


def mean_kl(softmax_logits, fna_logits, mask):
    p = torch.log_softmax(softmax_logits, -1)
    q = torch.log_softmax(fna_logits, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return float((kl * mask).sum() / mask.sum())


@pytest.mark.slow
def test_conversion_calibrates_and_reports_the_measured_gap(pretrained_dir, tmp_path):
    softmax = transformers.AutoModelForCausalLM.from_pretrained(pretrained_dir).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(pretrained_dir).eval()
    batch = calibration()
    report = hf.to_fna(model, batch, alpha=1.2)  # objective="output"

    assert model.config._attn_implementation == "fna"
    assert report.calibrated and report.metric == "kl" and report.n_sequences == 8
    assert isinstance(model.config.fna_bandwidth, list) and len(model.config.fna_bandwidth) == 2
    assert report.bandwidth == model.config.fna_bandwidth
    assert model.config.fna_bandwidth != [1.0, 1.0]
    assert report.gap_after < 0.5 * report.gap_before

    # The reported gaps are what an independent computation measures.
    with torch.no_grad():
        ref = softmax(**batch).logits
        assert mean_kl(ref, model(**batch).logits, batch["attention_mask"]) == pytest.approx(report.gap_after, rel=1e-4)
        fresh = transformers.AutoModelForCausalLM.from_pretrained(pretrained_dir, attn_implementation="fna").eval()
        hf.configure_fna(fresh, alpha=1.2, bandwidth=1.0)
        uncalibrated = fresh(**batch).logits
    assert mean_kl(ref, uncalibrated, batch["attention_mask"]) == pytest.approx(report.gap_before, rel=1e-4)

    # The converted model saves and reloads with its calibrated settings.
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fna").eval()
    assert again.config.fna_bandwidth == model.config.fna_bandwidth
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits)
    # The summary names each number and its direction, and says what was minimised.
    lines = report.format().splitlines()
    assert lines[0] == (
        "output KL(softmax model || FNA model), nats per position (lower is better, 0 = equal) on 8 sequences: "
        f"{report.gap_before:.6g} at the initial bandwidth, {report.gap_after:.6g} calibrated"
    )
    assert report.objective == "output" and lines[1].startswith("objective 'output': the bandwidths were tuned on")
    assert lines[2] == "attention-row KL(softmax || FNA) per layer, nats (lower is better):"
    for layer, row in enumerate(lines[4:]):
        initial, fit, final = (float(x) for x in row.split()[1:4])
        assert (initial, fit, final) == pytest.approx((report.attention_kl_before[layer],
                                                       report.attention_kl_fit[layer],
                                                       report.attention_kl_after[layer]), rel=1e-3)

    # The attention-only objective: eps = 1 is a grid point, so every layer's attention rows
    # can only get closer, and the refinement on the outputs can only do better than it.
    quick = transformers.AutoModelForCausalLM.from_pretrained(pretrained_dir).eval()
    attention_only = hf.to_fna(quick, batch, alpha=1.2, objective="attention")
    for before, after in zip(attention_only.attention_kl_before, attention_only.attention_kl_after):
        assert after <= before + 1e-9
    assert attention_only.objective == "attention"
    assert attention_only.attention_kl_fit == attention_only.attention_kl_after
    assert report.attention_kl_fit == pytest.approx(attention_only.attention_kl_after)  # the output search's start
    assert attention_only.gap_before == pytest.approx(report.gap_before)
    assert report.gap_after <= attention_only.gap_after + 1e-9


def test_per_head_calibration_on_an_encoder_reports_cosine():
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(tiny_config("bert"), attn_implementation="eager").eval()
    ids = progressions(4, 10, seed=5)
    batches = [{"input_ids": ids}, {"input_ids": ids[:2, :6]}]
    softmax = copy.deepcopy(model)
    report = hf.to_fna(model, batches, per_head=True, alpha=[1.2, 1.6], objective="attention")
    assert report.metric == "cosine" and report.n_sequences == 6
    with torch.no_grad():  # the reported gap is what an independent computation measures
        cosines = [
            torch.nn.functional.cosine_similarity(
                softmax(**b).last_hidden_state.mean(1), model(**b).last_hidden_state.mean(1), dim=-1
            )
            for b in batches
        ]
    assert report.gap_after == pytest.approx(float(torch.cat(cosines).mean()), rel=1e-5)
    assert "output cosine similarity to the softmax model" in report.format()
    assert "(higher is better, 1 = equal)" in report.format()
    assert all(isinstance(b, list) and len(b) == 2 for b in model.config.fna_bandwidth)
    assert 0.0 < report.gap_before <= 1.0 + 1e-6
    assert all(a <= b + 1e-9 for a, b in zip(report.attention_kl_after, report.attention_kl_before))
    # With the output objective the pooled embeddings never end further from softmax's.
    model.set_attn_implementation("eager")
    refined = hf.to_fna(model, batches, per_head=True, alpha=[1.2, 1.6], bandwidth=1.0)
    assert all(isinstance(b, list) and len(b) == 2 for b in model.config.fna_bandwidth)
    assert refined.gap_after >= refined.gap_before - 1e-6


def test_vit_conversion_assigns_layer_indices():
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(tiny_config("vit"), attn_implementation="sdpa").eval()
    report = hf.to_fna(model, torch.randn(2, 3, 16, 16), alpha=2.0)
    assert len(report.attention_kl_after) == 2
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():  # the calibrated per-layer bandwidths reach their layers
        torch.testing.assert_close(model(x).last_hidden_state, as_reference(model)(x).last_hidden_state)


def test_without_calibration_inputs_it_only_switches():
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    report = hf.to_fna(model, alpha=[1.0, 1.5], bandwidth=0.5)
    assert not report.calibrated and report.gap_before is None
    assert model.config._attn_implementation == "fna"
    assert model.config.fna_alpha == [1.0, 1.5] and model.config.fna_bandwidth == 0.5


def test_bad_arguments():
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.to_fna(torch.nn.Linear(2, 2), None)
    with pytest.raises(TypeError, match="calibration_inputs"):
        hf.to_fna(model, "some text")
    with pytest.raises(ValueError, match="search_range"):
        hf.to_fna(model, progressions(2, 4, 0), search_range=(0.0, 0.1))
    with pytest.raises(ValueError, match="fna_alpha"):
        hf.to_fna(model, progressions(2, 4, 0), alpha=3.0)
    with pytest.raises(ValueError, match="objective"):
        hf.to_fna(model, progressions(2, 4, 0), objective="logits")
    hf.to_fna(model, progressions(2, 4, 0), objective="attention")
    with pytest.raises(ValueError, match="already uses"):
        hf.to_fna(model, progressions(2, 4, 0))


def t5_batch():
    g = torch.Generator().manual_seed(5)
    return {"input_ids": torch.randint(3, VOCAB, (2, 8), generator=g),
            "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=g)}  # fmt: skip


def test_a_config_shared_with_another_model_is_left_alone():
    # from_config keeps the caller's config object: converting one model switched the other to FNA too.
    config = tiny_config("gpt2")
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    other = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    assert model.config is other.config is config
    hf.to_fna(model, progressions(2, 8, seed=0), objective="attention")
    assert model.config._attn_implementation == "fna" and model.config is not config
    assert other.config._attn_implementation == "sdpa" and not hasattr(config, "fna_bandwidth")


def test_t5_stacks_of_different_depths_are_calibrated_each_on_its_own_config():
    # The fna_* keys went to model.config alone, which T5's attention modules do not read (each stack
    # has its copy): calibration changed nothing (gap 0.039464 before and after) and FNA ran at its defaults.
    model = tiny_t5(num_layers=2, num_decoder_layers=3)
    report = hf.to_fna(model, t5_batch(), objective="attention")
    assert set(report.bandwidth) == {"encoder", "decoder"}
    assert model.encoder.config.fna_bandwidth == report.bandwidth["encoder"] and len(report.bandwidth["encoder"]) == 2
    assert model.decoder.config.fna_bandwidth == report.bandwidth["decoder"] and len(report.bandwidth["decoder"]) == 3
    assert report.layer_names == ["encoder.0", "encoder.1", "decoder.0", "decoder.1", "decoder.2"]
    assert model.encoder.config._attn_implementation == model.decoder.config._attn_implementation == "fna"
    # Every layer of both stacks runs FNA with its stack's value: changing one decoder layer's changes the output.
    with torch.no_grad():
        before = model(**t5_batch()).logits
        model.decoder.config.fna_bandwidth = [*report.bandwidth["decoder"][:2], 1e-3]
        assert not torch.allclose(model(**t5_batch()).logits, before)


def test_llava_text_and_vision_configs_get_their_own_settings():
    model, batch = tiny_llava()
    text, vision = model.config.text_config, model.config.vision_config
    report = hf.to_fna(model, batch, objective="attention")
    assert set(report.bandwidth) == {"model.language_model", "model.vision_tower"}
    assert len(model.config.text_config.fna_bandwidth) == 2 and len(model.config.vision_config.fna_bandwidth) == 3
    assert model.config.text_config is model.model.language_model.config  # the copies stay shared inside
    assert text._attn_implementation == vision._attn_implementation == "sdpa"  # the caller's are untouched
    assert not hasattr(text, "fna_bandwidth")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"density_a": 0.5}, ValueError, "density_a=0.5: to_fna calibration supports density_a = 0 only"),
        ({"calibration_inputs": "some text"}, TypeError, "calibration_inputs must be"),
        ({"calibration_inputs": [{"input_ids": "x"}]}, TypeError, "indices"),
        ({"alpha": [1.2, 1.2, 1.2]}, ValueError, r"alpha=\[1.2, 1.2, 1.2\] has 3 entries.* \{model: 2\}"),
        ({"alpha": {"decoder": 1.2}}, ValueError, r"alpha given by stack .* got the keys \['decoder'\]"),
        ({"calibration_inputs": None, "density_a": 0.5}, ValueError, "density_a=0.5 cannot be used in GPT2Attention"),
    ],
)
def test_a_bad_argument_leaves_the_model_unconverted(kwargs, error, match):
    # A density_a with calibration left the model on FNA with uncalibrated keys; bad calibration
    # inputs left 8 fna_* keys written.
    config = tiny_config("gpt2")
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    kwargs = {"calibration_inputs": progressions(2, 8, seed=0), **kwargs}
    with pytest.raises(error, match=match):
        hf.to_fna(model, **kwargs)
    assert model.config is config and config._attn_implementation == "sdpa"
    assert not any(key.startswith("fna_") for key in vars(config))
    assert not any(hasattr(m, "fna_layer_idx") for m in model.modules())


def test_a_saved_t5_reloads_with_its_calibrated_stacks(tmp_path):
    from levyattn.integrations import hf_attention

    # T5 writes only its top config and rebuilds both stacks from it when loading: the per-stack
    # bandwidths were lost and the reloaded model ran FNA at the settings passed to to_fna, in silence.
    model = tiny_t5(num_layers=2, num_decoder_layers=3)
    report = hf.to_fna(model, t5_batch(), objective="attention")
    model.save_pretrained(tmp_path / "t5")
    loaded = type(model).from_pretrained(tmp_path / "t5", attn_implementation="fna").eval()
    assert loaded.encoder.config._attn_implementation == "fna"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**t5_batch()).logits, model.eval()(**t5_batch()).logits)
    for stack in ("encoder", "decoder"):
        settings = [hf_attention.layer_settings(getattr(loaded, stack).config, i)["bandwidth"]
                    for i in range(len(report.bandwidth[stack]))]
        assert settings == report.bandwidth[stack]


def test_a_per_layer_list_must_fit_every_stack_and_a_dict_gives_each_stack_its_own(tmp_path):
    # The list was refused as "config.fna_alpha has 2 entries but the model has num_hidden_layers=3",
    # a key and one depth the caller never gave; per-stack values had no form in to_fna.
    model = tiny_t5(num_layers=2, num_decoder_layers=3)
    with pytest.raises(ValueError, match=r"alpha=\[1.0, 1.5\] has 2 entries.*\{encoder: 2, decoder: 3\}"):
        hf.to_fna(model, alpha=[1.0, 1.5])
    assert model.config._attn_implementation == "sdpa"
    alpha = {"encoder": [1.0, 1.5], "decoder": [1.1, 1.3, 1.9]}
    report = hf.to_fna(model, alpha=alpha, bandwidth=0.5)
    assert report.alpha == alpha
    assert model.encoder.config.fna_alpha == alpha["encoder"] and model.decoder.config.fna_alpha == alpha["decoder"]
    assert model.config.fna_bandwidth == 0.5 and not hasattr(model.config, "fna_alpha")  # only what the stacks share
    # T5 saves its top config alone: the per-stack values travel in it (fna_stacks) and come back.
    model.save_pretrained(tmp_path / "t5")
    loaded = type(model).from_pretrained(tmp_path / "t5", attn_implementation="fna").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**t5_batch()).logits, model.eval()(**t5_batch()).logits)
        model.decoder.config.fna_alpha = [1.2] * 3  # the decoder's values matter
        assert not torch.allclose(loaded(**t5_batch()).logits, model(**t5_batch()).logits)


@pytest.mark.parametrize(
    ("build", "role"),
    [
        (lambda: tiny_t5(), "copied"),
        (lambda: tiny_llava()[0], "holds"),
        (lambda: transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2")), "read"),
        (lambda: transformers.AutoModel.from_config(tiny_config("bert")), "read"),
    ],
)
def test_the_top_config_is_classified_once(build, role):
    from levyattn.integrations import hf_convert, hf_settings

    model = build()
    configs = hf_convert._stack_configs(hf_settings.attention_modules(model))
    assert hf_convert._top_config_role(model, configs) == role


def test_a_stack_the_inputs_never_reach_keeps_its_values_and_the_table_its_layers():
    # A Llava calibrated on text alone: objective="output" failed with "'float' object is not
    # iterable" (it refined the unreached vision tower), and with per-layer vision bandwidths the
    # table printed the vision tower's 0.5 and 0.6 beside the language model's layers.
    model, _ = tiny_llava()
    ids = torch.randint(3, VOCAB - 1, (2, 10), generator=torch.Generator().manual_seed(3))
    vision = [0.5, 0.6, 0.7]
    report = hf.to_fna(model, {"input_ids": ids}, bandwidth={"model.vision_tower": vision, "model.language_model": 1.0})
    assert report.bandwidth["model.vision_tower"] == vision == model.config.vision_config.fna_bandwidth
    assert report.layer_names == ["model.language_model.0", "model.language_model.1"]
    rows = report.format().splitlines()[-2:]
    for row, bandwidth in zip(rows, report.bandwidth["model.language_model"]):
        assert row.split()[-1] == str(bandwidth)
    scalar, _ = tiny_llava()
    assert hf.to_fna(scalar, {"input_ids": ids}).bandwidth["model.vision_tower"] == 1.0  # was the TypeError


def test_an_encoder_decoders_gap_weights_decoder_positions_by_the_decoder_mask():
    # The encoder's attention_mask weighted the decoder's positions where the lengths matched:
    # the reported gap was 0.0504 nats, the mean over the positions it measures 0.0447.
    model = tiny_t5(2, 2)
    g = torch.Generator().manual_seed(1)
    enc, dec = torch.randint(3, VOCAB, (4, 8), generator=g), torch.randint(3, VOCAB, (4, 8), generator=g)
    enc_mask, dec_mask = torch.ones_like(enc), torch.ones_like(dec)
    enc_mask[:2, 3:] = 0
    dec_mask[1:, 6:] = 0
    softmax = copy.deepcopy(model)
    for batch, weights in (
        ({"input_ids": enc, "attention_mask": enc_mask, "decoder_input_ids": dec}, torch.ones_like(dec)),
        ({"input_ids": enc, "attention_mask": enc_mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask},
         dec_mask),
    ):  # fmt: skip
        converted = copy.deepcopy(model)
        report = hf.to_fna(converted, batch, objective="attention")
        with torch.no_grad():
            p = torch.log_softmax(softmax(**batch).logits, -1)
            q = torch.log_softmax(converted(**batch).logits, -1)
        kl = (p.exp() * (p - q)).sum(-1)
        assert report.gap_after == pytest.approx(float((kl * weights).sum() / weights.sum()), rel=1e-5)


@pytest.mark.parametrize("calibrate", [False, True])
def test_a_t5_saves_the_values_its_stacks_hold_when_saved(tmp_path, calibrate):
    # fna_stacks was a copy made by to_fna: a value set on a stack afterwards ran but was not saved
    # (reloaded logits off by 0.0051 uncalibrated, 0.074 calibrated, after configure_fna(decoder, alpha=1.7)).
    model = tiny_t5(num_layers=2, num_decoder_layers=3)
    hf.to_fna(model, t5_batch() if calibrate else None, objective="attention")
    hf.configure_fna(model.decoder.config, alpha=1.7)
    model.save_pretrained(tmp_path / "t5")
    loaded = type(model).from_pretrained(tmp_path / "t5", attn_implementation="fna").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**t5_batch()).logits, model.eval()(**t5_batch()).logits)
    assert copy.deepcopy(model.config).fna_stacks["decoder"]["fna_alpha"] == 1.7


def test_density_normalisation_in_a_t5_encoder_alone_is_accepted():
    # It was refused for the decoder's attention although the decoder's density_a was 0.
    model = tiny_t5(num_layers=2, num_decoder_layers=3)
    hf.to_fna(model, density_a={"encoder": 0.5, "decoder": 0.0})
    with torch.no_grad():
        model(**t5_batch())
    with pytest.raises(ValueError, match="cannot be used in T5Attention"):
        hf.to_fna(tiny_t5(2, 3), density_a={"encoder": 0.0, "decoder": [0.0, 0.5, 0.0]})


def test_a_reloaded_t5_takes_and_saves_an_edit_of_a_stack(tmp_path):
    # Each stack of a reloaded T5 read its fna_stacks entry from its own copy of the saved config:
    # configure_fna(loaded.decoder.config, alpha=1.7) changed the logits by 0.0 (0.074 on the model
    # to_fna returned), and saving again wrote the old values.
    model = tiny_t5(num_layers=2, num_decoder_layers=3)
    hf.to_fna(model, t5_batch(), objective="attention")
    model.save_pretrained(tmp_path / "t5")
    loaded = type(model).from_pretrained(tmp_path / "t5", attn_implementation="fna").eval()
    with pytest.raises(ValueError, match=r"fna_stacks as loaded .* configure_fna\(model\) links"):
        hf.configure_fna(loaded.decoder.config, alpha=1.7)
    with pytest.raises(ValueError, match="fna_stacks as loaded"):
        hf.configure_fna(loaded.config, alpha=1.7)
    hf.configure_fna(loaded)  # links: each stack's values become its config's own keys
    assert not hasattr(loaded.decoder.config, "fna_stacks")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**t5_batch()).logits, model(**t5_batch()).logits)
        hf.configure_fna(model.decoder.config, alpha=1.7)
        hf.configure_fna(loaded.decoder.config, alpha=1.7)
        edited = loaded(**t5_batch()).logits
        torch.testing.assert_close(edited, model(**t5_batch()).logits)
    loaded.save_pretrained(tmp_path / "again")
    again = type(model).from_pretrained(tmp_path / "again", attn_implementation="fna").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**t5_batch()).logits, edited)
    assert again.decoder.config.fna_stacks["decoder"]["fna_alpha"] == 1.7


def test_to_fna_on_a_t5_loaded_from_an_fna_save_sets_its_stacks(tmp_path):
    # Each stack's fna_stacks entry took precedence over the keys to_fna wrote: alpha=1.9 ran at 1.2.
    model = tiny_t5(num_layers=2, num_decoder_layers=3)
    hf.to_fna(model)
    model.save_pretrained(tmp_path / "t5")
    loaded = type(model).from_pretrained(tmp_path / "t5", attn_implementation="sdpa").eval()
    hf.to_fna(loaded, alpha=1.9)
    fresh = tiny_t5(num_layers=2, num_decoder_layers=3)
    hf.to_fna(fresh, alpha=1.9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**t5_batch()).logits, fresh(**t5_batch()).logits)
    assert copy.deepcopy(loaded.config).fna_stacks["encoder"]["fna_alpha"] == 1.9


def test_an_edit_of_a_t5s_top_config_reaches_both_stacks_and_is_saved(tmp_path):
    # No attention module reads a T5's top config: configure_fna(model.config, alpha=1.7) changed the
    # converted model's logits by 0.0, and its fna_stacks saved the old alpha.
    model = tiny_t5(num_layers=2, num_decoder_layers=3)
    hf.to_fna(model, t5_batch(), objective="attention")
    expected = copy.deepcopy(model)
    for stack in (expected.encoder, expected.decoder):
        hf.configure_fna(stack.config, alpha=1.7)
    with pytest.raises(ValueError, match="has 2 entries but the model has num_hidden_layers=3"):
        hf.configure_fna(model.config, alpha=[1.5, 1.7])  # one stack's depth: refused before any write
    assert model.config.fna_alpha == model.encoder.config.fna_alpha == 1.2
    hf.configure_fna(model.config, alpha=1.7)
    with torch.no_grad():
        torch.testing.assert_close(model(**t5_batch()).logits, expected(**t5_batch()).logits)
    model.save_pretrained(tmp_path / "t5")
    loaded = type(model).from_pretrained(tmp_path / "t5", attn_implementation="fna").eval()
    assert loaded.config.fna_stacks["decoder"]["fna_alpha"] == 1.7
    hf.configure_fna(loaded, alpha=1.2)  # the model: linked, then both stacks
    hf.configure_fna(model, alpha=1.2)
    assert loaded.encoder.config.fna_alpha == loaded.decoder.config.fna_alpha == 1.2
    with torch.no_grad():
        torch.testing.assert_close(loaded(**t5_batch()).logits, model.eval()(**t5_batch()).logits)


def test_a_deep_copy_of_a_converted_t5_saves_its_own_stacks(tmp_path):
    # The copy's fna_stacks was plain data: an edit of its decoder ran but was not saved (reloaded
    # logits off by 0.074 after configure_fna(twin.decoder.config, alpha=1.7)).
    model = tiny_t5(num_layers=2, num_decoder_layers=3)
    hf.to_fna(model, t5_batch(), objective="attention")
    twin = copy.deepcopy(model)
    hf.configure_fna(twin.decoder.config, alpha=1.7)
    assert model.config.fna_stacks["decoder"]["fna_alpha"] == 1.2  # the original follows its own stacks
    twin.save_pretrained(tmp_path / "t5")
    loaded = type(model).from_pretrained(tmp_path / "t5", attn_implementation="fna").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**t5_batch()).logits, twin(**t5_batch()).logits)
    assert isinstance(copy.deepcopy(twin.config).fna_stacks, dict)  # what to_dict serialises


def test_a_key_set_directly_on_a_reloaded_t5s_stack_is_refused_until_linked_then_kept(tmp_path):
    # loaded.decoder.config.fna_alpha = 1.7 changed the logits by 0.0: the stack read its fna_stacks entry.
    model = tiny_t5(num_layers=2, num_decoder_layers=3)
    hf.to_fna(model, t5_batch(), objective="attention")
    model.save_pretrained(tmp_path / "t5")
    loaded = type(model).from_pretrained(tmp_path / "t5", attn_implementation="fna").eval()
    with torch.no_grad():
        loaded(**t5_batch())  # as loaded, nothing counts as set
        loaded.decoder.config.fna_alpha = 1.7
        with pytest.raises(ValueError, match=r"config.fna_alpha = 1.7 was set on the decoder's copy"):
            loaded(**t5_batch())
        hf.configure_fna(loaded)
        model.decoder.config.fna_alpha = 1.7
        edited = loaded(**t5_batch()).logits
        torch.testing.assert_close(edited, model.eval()(**t5_batch()).logits)
    assert loaded.encoder.config.fna_bandwidth == model.encoder.config.fna_bandwidth  # the rest from fna_stacks
    loaded.save_pretrained(tmp_path / "again")
    again = type(model).from_pretrained(tmp_path / "again", attn_implementation="fna").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**t5_batch()).logits, edited)


def test_configure_fna_on_a_t5_before_switching_to_fna_reaches_its_stacks(tmp_path):
    # configure_fna(model, alpha=1.7) wrote the top config alone, which the stacks' copies do not read:
    # switched to "fna", the model ran alpha 1.2 (logits 0.0090 off to_fna(alpha=1.7)'s).
    model = tiny_t5(num_layers=2, num_decoder_layers=3)
    hf.configure_fna(model, alpha=1.7)
    model.set_attn_implementation("fna")
    converted = tiny_t5(num_layers=2, num_decoder_layers=3)
    hf.to_fna(converted, alpha=1.7)
    with torch.no_grad():
        expected = converted(**t5_batch()).logits
        torch.testing.assert_close(model(**t5_batch()).logits, expected)
    model.save_pretrained(tmp_path / "t5")
    loaded = type(model).from_pretrained(tmp_path / "t5", attn_implementation="fna").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**t5_batch()).logits, expected)


@pytest.mark.parametrize("target", ["model", "model.config"])
def test_configure_fna_on_a_llava_reaches_its_text_and_vision_configs(target, tmp_path):
    # configure_fna(llava, alpha=1.7) (or on llava.config) wrote the top config alone, which no attention
    # module reads: the logits changed by 0.0 (to_fna(alpha=1.7)'s differ from the defaults' by 0.00035).
    model, batch = tiny_llava()
    converted, _ = tiny_llava()
    hf.to_fna(converted, alpha=1.7)
    model.set_attn_implementation("fna")
    with pytest.raises(ValueError, match=r"^(model\.)?config\.vision_config\.fna_alpha has 2 entries .*=3"):
        hf.configure_fna(model if target == "model" else model.config, alpha=[1.5, 1.7])  # the text model's depth
    assert not any(hasattr(c, "fna_alpha") for c in (model.config, model.config.text_config))  # nothing written
    with torch.no_grad():
        before = model(**batch).logits
        hf.configure_fna(model if target == "model" else model.config, alpha=1.7)
        after = model(**batch).logits
        torch.testing.assert_close(after, converted(**batch).logits)
    assert not torch.allclose(after, before)
    assert model.config.text_config.fna_alpha == model.config.vision_config.fna_alpha == 1.7
    model.save_pretrained(tmp_path / "llava")
    loaded = type(model).from_pretrained(tmp_path / "llava", attn_implementation="fna").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, after)


def test_configure_fna_on_a_model_leaves_a_sub_config_no_attention_module_reads():
    # Given the model, the configs its attention modules read are known: a sub-config of another
    # depth that none reads neither takes the values nor refuses a per-layer list that fits the model.
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    model.config.unread_config = transformers.BertConfig(num_hidden_layers=5)
    hf.configure_fna(model, alpha=[1.5, 1.7])
    assert model.config.fna_alpha == [1.5, 1.7] and not hasattr(model.config.unread_config, "fna_alpha")
    with pytest.raises(ValueError, match=r"^config\.unread_config\.fna_alpha has 2 entries .*=5"):
        hf.configure_fna(model.config, alpha=[1.5, 1.5])  # the config alone: every sub-config is written
    assert model.config.fna_alpha == [1.5, 1.7]
