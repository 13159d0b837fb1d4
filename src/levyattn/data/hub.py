"""The Hugging Face datasets hub, optional: only when ``datasets`` is installed and the
machine is online. Everything in :mod:`levyattn.data` also reads the local files."""

from __future__ import annotations

from typing import Any

from levyattn._extras import MissingExtraError


def load_hub_dataset(name: str, *args: Any, local_alternative: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset(name, *args, **kwargs)``, with a clear error when the
    ``datasets`` package is missing (``local_alternative`` says which local files to use)."""
    try:
        import datasets
    except ImportError as err:
        raise MissingExtraError(
            f"loading {name!r} from the Hugging Face hub needs the datasets package: "
            f"install levyattn[hub] (pip install datasets), or use the local files: {local_alternative}"
        ) from err
    return datasets.load_dataset(name, *args, **kwargs)
