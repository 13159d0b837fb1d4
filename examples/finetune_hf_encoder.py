"""Fine-tune a local pretrained Hugging Face encoder with fractional attention (FNA).

The encoder (BERT-style, with its tokenizer, in a local directory) is converted with
``levyattn.integrations.huggingface.to_fna``: its softmax attention becomes FNA, with each
layer's bandwidth calibrated on training texts so that the first forward pass stays close
to the softmax model (the measured gap is printed). It is then fine-tuned on a text
classification dataset and evaluated; the fine-tuned FNA model is saved with
``save_pretrained`` (reload it with ``attn_implementation="fna"``).

    python examples/finetune_hf_encoder.py --model path/to/bert --train train.csv --eval test.csv
    python examples/finetune_hf_encoder.py --demo --out runs/hf-demo

Data files: CSV (header row), TSV (header row) or JSON Lines, with a text column and a
label column (``--text-column``, ``--label-column``); labels may be strings or integers.

``--demo`` needs no download: it writes a toy sentiment dataset, pretrains a tiny BERT on
it with masked-language modelling (softmax attention), saves it as a local model directory,
and runs the same pipeline on it.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def read_examples(path: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """(text, label) pairs from a CSV/TSV/JSONL file; errors name the file and the problem."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    rows: list[dict] = []
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}: line {n} is not valid JSON ({err})") from None
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise ValueError(f"{path}: unsupported format {suffix!r}; use .csv, .tsv or .jsonl")
    examples = []
    for n, row in enumerate(rows, 1):
        if text_column not in row or label_column not in row:
            raise ValueError(f"{path}: record {n} lacks the column {text_column!r} or {label_column!r}")
        examples.append((str(row[text_column]), str(row[label_column])))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


# ----------------------------------------------------------------------------- demo data and model

_POSITIVE = "good great excellent wonderful superb delightful brilliant lovely".split()
_NEGATIVE = "bad awful terrible boring dreadful poor dull horrible".split()
_NOUNS = "film movie plot cast story ending script acting".split()
_FILLER = "the a this that really quite rather very so".split()


def _demo_sentence(rng: random.Random, label: int) -> str:
    # The label is the sentiment word's polarity, flipped by "not": attention must relate words.
    negate = rng.random() < 0.3
    word = rng.choice(_POSITIVE if label ^ negate else _NEGATIVE)
    words = [rng.choice(_FILLER), rng.choice(_NOUNS), "was"] + (["not"] if negate else []) + [word]
    words += [rng.choice(_FILLER) for _ in range(rng.randint(0, 4))]
    return " ".join(words)


def write_demo(out: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Toy train/eval CSVs and a tiny MLM-pretrained BERT with its tokenizer, under ``out``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    from levyattn.io import atomic_write_text

    rng = random.Random(seed)
    paths = []
    for name, n in (("train", 600), ("eval", 300)):
        lines = ["text,label"]
        for _ in range(n):
            label = rng.randint(0, 1)
            lines.append(f"{_demo_sentence(rng, label)},{'positive' if label else 'negative'}")
        paths.append(atomic_write_text(out / f"{name}.csv", "\n".join(lines) + "\n"))

    words = sorted(set(_POSITIVE + _NEGATIVE + _NOUNS + _FILLER + ["was", "not"]))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, pad_token_id=0,
    )
    model = BertForMaskedLM(config)  # softmax attention (the default sdpa)
    texts = [t for t, _ in read_examples(paths[0], "text", "label")]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in tqdm(range(150), desc="demo: MLM pretraining (softmax)", file=sys.stderr):
        batch = tokenizer(rng.sample(texts, 32), return_tensors="pt", padding=True)
        ids = batch["input_ids"]
        labels = ids.clone()
        chosen = (torch.rand(ids.shape) < 0.2) & batch["attention_mask"].bool() & (ids > 4)
        labels[~chosen] = -100
        masked = ids.masked_fill(chosen, vocab["[MASK]"])
        loss = model(input_ids=masked, attention_mask=batch["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model_dir = out / "pretrained-encoder"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, paths[0], paths[1]


# ----------------------------------------------------------------------------- fine-tuning


def evaluate(model, tokenizer, examples, label_ids, batch_size, max_length) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = tokenizer(
                [t for t, _ in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            pred = model(**batch).logits.argmax(-1)
            correct += int((pred == torch.tensor([label_ids[y] for _, y in chunk])).sum())
    return correct / len(examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="local directory of a pretrained encoder and its tokenizer")
    parser.add_argument("--train", type=Path, help="training data (.csv, .tsv or .jsonl)")
    parser.add_argument("--eval", type=Path, help="evaluation data (.csv, .tsv or .jsonl)")
    parser.add_argument("--demo", action="store_true", help="offline demo: toy data and a tiny pretrained encoder")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--alpha", type=float, default=1.2, help="FNA Lévy index in (0, 2]")
    parser.add_argument("--per-head", action="store_true", help="calibrate one bandwidth per head")
    parser.add_argument("--calibration-size", type=int, default=64, help="training texts used to calibrate")
    parser.add_argument("--epochs", type=int, help="default 3 (--demo: 6)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, help="peak learning rate, linear decay; default 3e-5 (--demo: 2e-3)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/finetune-hf-encoder"), help="output directory")
    args = parser.parse_args(argv)
    if not args.demo and not (args.model and args.train and args.eval):
        parser.error("give --model, --train and --eval, or --demo")
    # A pretrained encoder fine-tunes at a small learning rate; the demo's tiny one needs more.
    if args.epochs is None:
        args.epochs = 6 if args.demo else 3
    if args.lr is None:
        args.lr = 2e-3 if args.demo else 3e-5
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    for name in ("calibration_size", "epochs", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import levyattn.integrations.huggingface as fna_hf
    from levyattn.io import atomic_write_json

    if args.demo:
        args.model, args.train, args.eval = write_demo(args.out / "demo", seed=args.seed)
    train = read_examples(args.train, args.text_column, args.label_column)
    test = read_examples(args.eval, args.text_column, args.label_column)
    labels = sorted({y for _, y in train})
    label_ids = {y: i for i, y in enumerate(labels)}
    unknown = sorted({y for _, y in test} - set(labels))
    if unknown:
        raise ValueError(f"{args.eval}: labels {unknown} do not occur in {args.train}")

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_ids
    )

    # Calibrate on the encoder's embeddings: the classification head is new (random) and says
    # nothing yet about how close FNA is to the pretrained softmax encoder.
    calib = tokenizer(
        [t for t, _ in rng.sample(train, min(args.calibration_size, len(train)))],
        return_tensors="pt", padding=True, truncation=True, max_length=args.max_length,
    )
    report = fna_hf.to_fna(model.base_model, calib, alpha=args.alpha, per_head=args.per_head)
    # to_fna gave the encoder its own copy of the config; the head and save_pretrained read the
    # model's, so the model shares the converted one again (as it shared the original).
    model.config = model.base_model.config
    print(report.format())

    accuracy_before = evaluate(model, tokenizer, test, label_ids, args.batch_size, args.max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps = args.epochs * ((len(train) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    bar = tqdm(total=steps, desc="fine-tuning with FNA", file=sys.stderr)
    for _ in range(args.epochs):
        model.train()
        rng.shuffle(train)
        for start in range(0, len(train), args.batch_size):
            chunk = train[start : start + args.batch_size]
            batch = tokenizer(
                [t for t, _ in chunk], return_tensors="pt", padding=True, truncation=True, max_length=args.max_length
            )
            loss = model(**batch, labels=torch.tensor([label_ids[y] for _, y in chunk])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    accuracy = evaluate(model, tokenizer, test, label_ids, args.batch_size, args.max_length)
    print(f"accuracy on {len(test)} examples: {accuracy:.3f} (before fine-tuning {accuracy_before:.3f})")

    model_dir = args.out / "fna-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    atomic_write_json(
        args.out / "metrics.json",
        {
            "model": str(args.model),
            "alpha": args.alpha,
            "conversion": report.to_dict(),
            "accuracy_before_fine_tuning": accuracy_before,
            "accuracy": accuracy,
            "epochs": args.epochs,
            "train_examples": len(train),
            "eval_examples": len(test),
        },
    )
    print(f"saved the fine-tuned FNA model to {model_dir} (load with attn_implementation='fna')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
