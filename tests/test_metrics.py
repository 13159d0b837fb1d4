"""Metrics: sacrebleu BLEU/chrF on detokenised text, perplexity from summed NLL."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from levyattn.metrics import corpus_bleu, corpus_chrf, perplexity, translation_scores

REFS = ["ein mann fährt mit dem fahrrad durch den park .", "zwei hunde spielen im schnee ."]


def test_identical_output_scores_100():
    assert corpus_bleu(REFS, REFS) == pytest.approx(100.0)
    assert corpus_chrf(REFS, REFS) == pytest.approx(100.0)


def test_wrong_output_scores_low_and_partial_in_between():
    wrong = ["völlig anders", "nichts stimmt hier"]
    partial = ["ein mann fährt mit dem auto durch den park .", "zwei katzen spielen im schnee ."]
    assert corpus_bleu(wrong, REFS) < 5.0
    assert 5.0 < corpus_bleu(partial, REFS) < 100.0
    assert corpus_chrf(wrong, REFS) < corpus_chrf(partial, REFS) < 100.0


def test_scores_match_sacrebleu_directly():
    import sacrebleu

    hyps = ["ein mann fährt durch den park .", "zwei hunde spielen ."]
    s = translation_scores(hyps, REFS)
    assert s.bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [REFS]).score)
    assert s.chrf == pytest.approx(sacrebleu.corpus_chrf(hyps, [REFS]).score)
    assert s.n_sentences == 2
    assert "tok:13a" in s.bleu_signature and "nc:6" in s.chrf_signature
    assert set(s.as_dict()) == {"bleu", "chrf", "n_sentences", "bleu_signature", "chrf_signature"}


def test_bad_corpus_inputs():
    with pytest.raises(ValueError, match="same number of sentences"):
        corpus_bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one sentence"):
        corpus_chrf([], [])
    with pytest.raises(TypeError, match="hypotheses"):
        corpus_bleu("a sentence", ["a sentence"])
    with pytest.raises(TypeError, match=r"references\[1\]"):
        corpus_bleu(["a", "b"], ["a", 3])


def test_perplexity_values_and_errors():
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(10 * math.log(7.0), 10) == pytest.approx(7.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="n_tokens"):
        perplexity(1.0, 0)
    with pytest.raises(TypeError, match="n_tokens"):
        perplexity(1.0, 2.0)
    with pytest.raises(ValueError, match="nll_sum"):
        perplexity(float("nan"), 3)
    with pytest.raises(ValueError, match="nll_sum"):
        perplexity(-1.0, 3)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.0, 20.0), st.integers(1, 1000))
def test_perplexity_is_exp_of_mean_nll(mean_nll, n):
    # The law: log ppl = mean NLL, and a uniform model over V tokens has ppl V.
    assert math.log(perplexity(mean_nll * n, n)) == pytest.approx(mean_nll, abs=1e-9)
