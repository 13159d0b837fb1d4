"""Datasets in their real formats, embedded data, synthetic tasks and tokenisation.

Nothing here downloads: the real datasets are read from the files they are distributed
as; the Hugging Face hub is an option (``*_hub`` functions, needs ``datasets``).

=====================  ==================================================  =======================================
task                   loader                                              item
=====================  ==================================================  =======================================
text classification    :func:`load_imdb` (``aclImdb`` tree)                ``(input_ids (L,), label)``
images                 :func:`load_cifar10`, :func:`load_mnist`,          ``(image (C, H, W) float, label)``
                       :func:`load_digits` (embedded)
synthetic sequences    :func:`make_multiscale_task` (embedded)             ``(input_ids (L,), label)``
translation            :func:`load_multi30k`, :func:`load_toy_translation`  ``(src_ids (S,), tgt_ids (T,))``
language modelling     :func:`load_text_files`                            ``(input_ids (L,), targets (L,))``
=====================  ==================================================  =======================================

Batching: :func:`collate_text` (alias :func:`collate_sequences`) gives
``(input_ids (B, L), key_padding_mask (B, L) bool True = padding, labels (B,))``;
:func:`collate_images`, :func:`collate_translation`, :func:`collate_lm`.
Missing or malformed files raise ``FileNotFoundError`` or :class:`DataFormatError`
(a ``ValueError``) naming the file and what is wrong.
"""

from levyattn.data._common import (
    DataFormatError,
    SequenceClassificationDataset,
    collate_sequences,
    collate_text,
    pad_sequences,
)
from levyattn.data.images import (
    ImageDataset,
    collate_images,
    load_cifar10,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    read_cifar_batch,
    read_idx,
)
from levyattn.data.lm import LMBlockDataset, LMData, build_lm_data, collate_lm, load_lm_hub, load_text_files
from levyattn.data.synthetic import MultiscaleTask, make_multiscale_task
from levyattn.data.text import load_imdb, read_aclimdb_split
from levyattn.data.tokenization import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    load_tokenizer,
    train_tokenizer,
)
from levyattn.data.translation import (
    TranslationData,
    TranslationDataset,
    collate_translation,
    load_multi30k,
    load_toy_translation,
    load_translation_tokenizers,
    make_toy_translation,
    read_multi30k,
    read_parallel,
    toy_agreement_accuracy,
    toy_tokenizer,
)

__all__ = [
    "ByteTokenizer",
    "DataFormatError",
    "HFTokenizer",
    "ImageDataset",
    "LMBlockDataset",
    "LMData",
    "MultiscaleTask",
    "SentencePieceTokenizer",
    "SequenceClassificationDataset",
    "Tokenizer",
    "TranslationData",
    "TranslationDataset",
    "WordTokenizer",
    "build_lm_data",
    "collate_images",
    "collate_lm",
    "collate_sequences",
    "collate_text",
    "collate_translation",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_imdb",
    "load_lm_hub",
    "load_mnist",
    "load_multi30k",
    "load_text_files",
    "load_tokenizer",
    "load_toy_translation",
    "load_translation_tokenizers",
    "make_multiscale_task",
    "make_toy_translation",
    "pad_sequences",
    "read_aclimdb_split",
    "read_cifar_batch",
    "read_idx",
    "read_multi30k",
    "read_parallel",
    "toy_agreement_accuracy",
    "toy_tokenizer",
    "train_tokenizer",
]
