"""``levyattn translate``: translate sentences with a trained seq2seq checkpoint."""

from __future__ import annotations

import argparse

HELP = "translate a sentence (or --input FILE, one per line) with a trained translation checkpoint"

EPILOG = """
examples:
  levyattn translate runs/multi30k-fna "A man rides a bike through the park."
  levyattn translate runs/multi30k-fna --input test.en --output test.hyp.de --reference test.de --beam-size 4

CHECKPOINT is a run folder of `levyattn train --preset multi30k-...` (or its checkpoint.json);
the tokenizer saved beside it is used. With --reference, BLEU and chrF (sacrebleu, on the
detokenised output) are printed to stderr.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("checkpoint", help="run folder (or its checkpoint.json) of a translation model")
    parser.add_argument("sentence", nargs="?", default=None, help="the sentence to translate")
    parser.add_argument("--input", default=None, metavar="FILE", help="translate every line of FILE instead")
    parser.add_argument("--output", default=None, metavar="FILE", help="write the translations here (atomically)")
    parser.add_argument("--reference", default=None, metavar="FILE", help="reference translations: print BLEU/chrF")
    parser.add_argument("--beam-size", type=int, default=1, help="1 = greedy (default)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam score / length ** this")
    parser.add_argument("--max-len", type=int, default=None, help="longest output in tokens")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def _read_lines(path: str, what: str) -> list[str]:
    from levyattn.io import read_lines

    return read_lines(path, f"{what} file", allow_empty_lines=True)


def run(args: argparse.Namespace) -> int:
    import sys

    from levyattn.io import atomic_write_text
    from levyattn.training.tasks.tokenized import load_model_with_tokenizer
    from levyattn.training.tasks.translation import translate_sentences

    if (args.sentence is None) == (args.input is None):
        raise ValueError("give either a sentence or --input FILE (exactly one)")
    if args.beam_size < 1:
        raise ValueError(f"--beam-size must be >= 1, got {args.beam_size}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    sentences = [args.sentence] if args.sentence is not None else _read_lines(args.input, "input")
    references = None
    if args.reference is not None:
        from levyattn._extras import require

        require("translate", "sacrebleu", purpose="levyattn translate --reference (BLEU and chrF)")
        references = _read_lines(args.reference, "reference")
        if len(references) != len(sentences):
            raise ValueError(
                f"reference file {args.reference} has {len(references)} lines but the input has {len(sentences)}"
            )
    model, tokenizer = load_model_with_tokenizer(args.checkpoint, "seq2seq", device=args.device)
    hyps = translate_sentences(model, tokenizer, sentences, beam_size=args.beam_size,
                               length_penalty=args.length_penalty, max_len=args.max_len, batch_size=args.batch_size)
    if args.output:
        atomic_write_text(args.output, "".join(h + "\n" for h in hyps))
        print(f"wrote {len(hyps)} translations to {args.output}", file=sys.stderr)
    else:
        for h in hyps:
            print(h)
    if references is not None:
        from levyattn.metrics import translation_scores

        s = translation_scores(hyps, references)
        print(f"BLEU {s.bleu:.2f}  chrF {s.chrf:.2f}  ({s.n_sentences} sentences; {s.bleu_signature})",
              file=sys.stderr)
    return 0
