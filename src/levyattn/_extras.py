"""Optional dependencies (the extras of ``pyproject.toml``), checked before any work starts.

``require("hf", "transformers", purpose="levyattn lens")`` raises :class:`MissingExtraError`
(an ``ImportError``) naming the missing modules and the extra that installs them, before a
model is loaded or a run folder is written; the CLI prints its message as one line.
Modules are looked up with :func:`importlib.util.find_spec`, without importing them.
"""

from __future__ import annotations

from importlib.util import find_spec

# The import names of what each extra installs (as listed in pyproject.toml).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "report": ("matplotlib",),
    "train": ("safetensors", "sklearn", "matplotlib"),
    "hf": ("transformers", "safetensors", "accelerate"),
    "translate": ("sacrebleu", "sentencepiece"),
    "hub": ("datasets",),
    "convert": ("peft",),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def missing_modules(*modules: str) -> list[str]:
    """The names among ``modules`` (top-level import names) that cannot be imported."""
    absent = []
    for module in modules:
        try:
            found = find_spec(module) is not None
        except (ImportError, ValueError):  # a broken parent package, or a module entry set to None
            found = False
        if not found:
            absent.append(module)
    return absent


def require(extra: str, *modules: str, purpose: str) -> None:
    """Raise :class:`MissingExtraError` unless ``modules`` (default: all of ``extra``'s) are installed.

    ``purpose`` says what needs them ("levyattn lens", "preset 'toy-translation-fna'").
    """
    require_all({extra: modules}, purpose=purpose)


def require_all(requirements: dict[str, tuple[str, ...]], *, purpose: str) -> None:
    """:func:`require` for every ``extra -> modules`` of ``requirements`` (empty modules: all of the
    extra's); one error naming every missing module and the extras that install them."""
    unknown = sorted(set(requirements) - set(EXTRA_MODULES))
    if unknown:
        raise ValueError(f"extras must be among {sorted(EXTRA_MODULES)}, got {unknown}")
    absent = {extra: missing_modules(*(modules or EXTRA_MODULES[extra])) for extra, modules in requirements.items()}
    absent = {extra: names for extra, names in absent.items() if names}
    if absent:
        names = list(dict.fromkeys(name for names in absent.values() for name in names))
        raise MissingExtraError(
            f"{purpose} needs {', '.join(names)}, not installed: pip install 'levyattn[{','.join(absent)}]'",
            name=names[0],
        )
