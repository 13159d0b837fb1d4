"""Evaluation metrics: BLEU and chrF for translation, perplexity for language models.

BLEU and chrF are computed by sacrebleu on *detokenised* text (plain strings, as a
human would read them), never on subword pieces, so that scores are comparable with
published numbers: sacrebleu applies its own standard tokenisation (``13a`` for BLEU)
internally. Scores are on sacrebleu's 0-100 scale.

Perplexity is ``exp(mean token negative log-likelihood)`` in nats; the mean is over
predicted (non-padding) tokens, so pass a sum and a count, not a batch mean of means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from levyattn._extras import require

__all__ = ["TranslationScores", "corpus_bleu", "corpus_chrf", "translation_scores", "perplexity"]


@dataclass(frozen=True)
class TranslationScores:
    """Corpus-level scores of a set of translations (sacrebleu, 0-100)."""

    bleu: float
    chrf: float
    n_sentences: int
    bleu_signature: str
    chrf_signature: str

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "bleu": self.bleu,
            "chrf": self.chrf,
            "n_sentences": self.n_sentences,
            "bleu_signature": self.bleu_signature,
            "chrf_signature": self.chrf_signature,
        }


def _check_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    for name, value in (("hypotheses", hypotheses), ("references", references)):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a sequence of strings (one per sentence), got {type(value).__name__}")
        for i, s in enumerate(value):
            if not isinstance(s, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(s).__name__}")
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses and references must have the same number of sentences, "
            f"got {len(hypotheses)} and {len(references)}"
        )
    if len(hypotheses) == 0:
        raise ValueError("hypotheses must hold at least one sentence, got 0")
    return list(hypotheses), list(references)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing), 0-100.

    ``hypotheses[i]`` is the detokenised system output for sentence ``i`` and
    ``references[i]`` its single reference.
    """
    require("translate", "sacrebleu", purpose="BLEU")
    from sacrebleu.metrics import BLEU

    hyps, refs = _check_corpus(hypotheses, references)
    return float(BLEU().corpus_score(hyps, [refs]).score)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100."""
    require("translate", "sacrebleu", purpose="chrF")
    from sacrebleu.metrics import CHRF

    hyps, refs = _check_corpus(hypotheses, references)
    return float(CHRF().corpus_score(hyps, [refs]).score)


def translation_scores(
    hypotheses: Sequence[str], references: Sequence[str], *, tokenized: bool = False
) -> TranslationScores:
    """BLEU and chrF together, with sacrebleu's signatures (for reproducible reports).

    ``tokenized=True`` says the text is space-tokenised on purpose (the toy grammar's
    sentences end in " ." in hypotheses and references alike): sacrebleu then does not warn,
    at every call, that the hypotheses look tokenised (its ``force``; the scores are the same).
    """
    require("translate", "sacrebleu", purpose="BLEU and chrF")
    from sacrebleu.metrics import BLEU, CHRF

    hyps, refs = _check_corpus(hypotheses, references)
    bleu, chrf = BLEU(force=bool(tokenized)), CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return TranslationScores(
        bleu=float(b.score),
        chrf=float(c.score),
        n_sentences=len(hyps),
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
    )


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """Perplexity ``exp(nll_sum / n_tokens)`` from a summed token NLL in nats.

    Returns ``inf`` when the mean NLL overflows ``exp`` (an untrained model can do that).
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int):
        raise TypeError(f"n_tokens must be an int, got {type(n_tokens).__name__}")
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    nll_sum = float(nll_sum)
    if not math.isfinite(nll_sum) or nll_sum < 0:
        raise ValueError(f"nll_sum must be a finite non-negative number of nats, got {nll_sum}")
    mean = nll_sum / n_tokens
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf
