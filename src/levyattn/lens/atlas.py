"""The gamma atlas: published measurements (package data) and the user's own (a local JSON file).

Published data
--------------
``levyattn/lens/data/gamma_atlas.json`` is a verbatim copy of the curated measurements of
"Predicting How Transformers Attend" (Marín 2026): 23 entries of 19 models (the chapter says 20). Source:
``data/master_gamma_results.json`` of the public repository karlesmarin/tafagent,
Apache-2.0 licence. :data:`PUBLISHED_SOURCE` is the citation to show with the values.
Its fields used here: ``model``, ``corpus`` ("random" tokens or "mongo" = natural text),
``theta`` (RoPE base or null), ``gamma_obs``, ``R2``, ``phase`` (the authors' label),
``source``, ``notes``; the other fields (thermodynamic quantities) are kept in ``extra``.

User atlas file (schema ``levyattn.atlas/1``)
---------------------------------------------
A JSON object::

    {"schema": "levyattn.atlas/1",
     "entries": [{"model": "my-org/my-model", "corpus": "random", "gamma": 0.91,
                  "r2": 0.99, "ci": [0.87, 0.95], "ci_level": 0.95, "protocol": "published",
                  "theta": 10000, "n_prompts": 150, "seeds": [42, 123, 7],
                  "date": "2026-11-23", "source": "levyattn lens", "notes": "",
                  "extra": {}}]}

Required per entry: ``model`` (non-empty string), ``corpus`` (non-empty string: "random",
a corpus name or a file name) and ``gamma`` (finite number). Optional: ``r2`` (number <= 1
or null), ``ci`` ([lo, hi] finite with lo <= gamma <= hi, or null), ``ci_level`` (the confidence level
of ``ci``, in (0, 1); only with a ``ci``), ``protocol`` ("published" or
"dense"), ``theta`` (positive number or null), ``n_prompts`` (positive integer), ``seeds``
(list of integers), ``date``, ``source``, ``notes``, ``phase`` (strings) and ``extra`` (an
object). Any other key is an error (it is usually a typo). The file is validated on every
load; an error names the file, the entry and the field.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from levyattn.io import atomic_write_json, read_json
from levyattn.lens.fractional import CROSSOVER_TOL, FractionalReading, fractional_order, gamma_in_interval

__all__ = [
    "ATLAS_SCHEMA",
    "PUBLISHED_SOURCE",
    "AtlasEntry",
    "DuplicateAtlasEntry",
    "append_to_atlas",
    "default_user_atlas_path",
    "entry_from_lens_result",
    "load_published_atlas",
    "load_user_atlas",
    "select_entries",
]

ATLAS_SCHEMA = "levyattn.atlas/1"

PUBLISHED_SOURCE = (
    "Published gamma atlas: data/master_gamma_results.json of github.com/karlesmarin/tafagent "
    "(Apache-2.0), from Marín 2026, 'Predicting How Transformers Attend'."
)

_REQUIRED = ("model", "corpus", "gamma")
_OPTIONAL = (
    "r2", "ci", "ci_level", "protocol", "theta", "n_prompts", "seeds", "date", "source", "notes", "phase", "extra",
)
_PUBLISHED_KEYS = ("model", "corpus", "theta", "gamma_obs", "R2", "phase", "source", "notes")
_SORT_KEYS = ("gamma", "model", "corpus", "alpha", "s", "r2", "regime")


@dataclass(frozen=True)
class AtlasEntry:
    """One measurement. ``origin`` is "published" or the user atlas file it came from."""

    model: str
    corpus: str
    gamma: float
    r2: float | None = None
    ci: tuple[float, float] | None = None
    ci_level: float | None = None
    protocol: str | None = None
    theta: float | None = None
    n_prompts: int | None = None
    seeds: tuple[int, ...] | None = None
    date: str | None = None
    source: str | None = None
    notes: str | None = None
    phase: str | None = None
    origin: str = "user"
    extra: dict = field(default_factory=dict)

    def reading(self, tol: float = CROSSOVER_TOL) -> FractionalReading:
        """The fractional reading of this gamma (with its CI when the entry has one)."""
        return fractional_order(self.gamma, self.ci, tol=tol, ci_level=self.ci_level)

    def fit_range(self) -> tuple[int, int] | None:
        """(first, last) distance of a lens entry's fit, from its ``extra`` (None when not recorded).

        gamma depends on the range (the published A(d) of pythia-160m gives 1.017 on d = 30 .. 2000
        and 0.864 on 30 .. 500), so entries fitted on other ranges than the published d >= 30 up
        to 2000 (or the model's context) do not compare.
        """
        fitted = self.extra.get("fitted_distances")
        if fitted is None and self.extra.get("distances"):
            d_min = self.extra.get("d_min") or 30
            fitted = [d for d in self.extra["distances"] if d >= d_min]
        return (int(min(fitted)), int(max(fitted))) if fitted else None

    def to_json(self) -> dict:
        """The entry in the user-atlas schema (``origin`` is not stored)."""
        out: dict[str, Any] = {"model": self.model, "corpus": self.corpus, "gamma": self.gamma}
        for key in _OPTIONAL:
            value = getattr(self, key)
            if value is None or (key == "extra" and not value):
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


def _bad(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


def _number(value: Any, where: str, name: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(where, f"field '{name}' must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise _bad(where, f"field '{name}' must be finite, got {value!r}")
    return v


def _string(value: Any, where: str, name: str, *, allow_none: bool = True, nonempty: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or (nonempty and not value.strip()):
        raise _bad(where, f"field '{name}' must be a {'non-empty ' if nonempty else ''}string, got {value!r}")
    return value


def _entry_from_user(obj: Any, where: str, origin: str) -> AtlasEntry:
    if not isinstance(obj, Mapping):
        raise _bad(where, f"must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise _bad(where, f"unknown field(s) {unknown}; allowed: {list(_REQUIRED + _OPTIONAL)}")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise _bad(where, f"missing required field(s) {missing}")
    model = _string(obj["model"], where, "model", allow_none=False, nonempty=True)
    corpus = _string(obj["corpus"], where, "corpus", allow_none=False, nonempty=True)
    gamma = _number(obj["gamma"], where, "gamma")
    r2 = _number(obj.get("r2"), where, "r2", allow_none=True)
    if r2 is not None and r2 > 1.0 + 1e-12:
        raise _bad(where, f"field 'r2' must be <= 1, got {r2}")
    ci = obj.get("ci")
    ci_t = None
    if ci is not None:
        if not isinstance(ci, list) or len(ci) != 2:
            raise _bad(where, f"field 'ci' must be a list [lo, hi] or null, got {ci!r}")
        lo, hi = _number(ci[0], where, "ci[0]"), _number(ci[1], where, "ci[1]")
        if lo > hi:  # type: ignore[operator]
            raise _bad(where, f"field 'ci' must have lo <= hi, got {ci!r}")
        ci_t = (lo, hi)
        if not gamma_in_interval(gamma, ci_t):  # type: ignore[arg-type]
            raise _bad(where, f"field 'gamma' ({gamma}) lies outside its field 'ci' {ci!r}")
    ci_level = _number(obj.get("ci_level"), where, "ci_level", allow_none=True)
    if ci_level is not None:
        if not 0.0 < ci_level < 1.0:
            raise _bad(where, f"field 'ci_level' must be in (0, 1), got {ci_level}")
        if ci_t is None:
            raise _bad(where, f"field 'ci_level' ({ci_level}) needs a 'ci' to qualify")
    protocol = _string(obj.get("protocol"), where, "protocol")
    if protocol is not None and protocol not in ("published", "dense"):
        raise _bad(where, f"field 'protocol' must be 'published' or 'dense', got {protocol!r}")
    theta = _number(obj.get("theta"), where, "theta", allow_none=True)
    if theta is not None and theta <= 0:
        raise _bad(where, f"field 'theta' must be positive, got {theta}")
    n_prompts = obj.get("n_prompts")
    if n_prompts is not None and (isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1):
        raise _bad(where, f"field 'n_prompts' must be a positive integer, got {n_prompts!r}")
    seeds = obj.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise _bad(where, f"field 'seeds' must be a list of integers, got {seeds!r}")
        seeds = tuple(seeds)
    extra = obj.get("extra", {})
    if not isinstance(extra, Mapping):
        raise _bad(where, f"field 'extra' must be an object, got {extra!r}")
    return AtlasEntry(
        model=model,  # type: ignore[arg-type]
        corpus=corpus,  # type: ignore[arg-type]
        gamma=gamma,  # type: ignore[arg-type]
        r2=r2,
        ci=ci_t,  # type: ignore[arg-type]
        ci_level=ci_level,
        protocol=protocol,
        theta=theta,
        n_prompts=n_prompts,
        seeds=seeds,
        date=_string(obj.get("date"), where, "date"),
        source=_string(obj.get("source"), where, "source"),
        notes=_string(obj.get("notes"), where, "notes"),
        phase=_string(obj.get("phase"), where, "phase"),
        origin=origin,
        extra=dict(extra),
    )


def load_published_atlas() -> list[AtlasEntry]:
    """The published measurements shipped with levyattn (cite :data:`PUBLISHED_SOURCE`)."""
    res = resources.files("levyattn.lens").joinpath("data/gamma_atlas.json")
    name = "levyattn/lens/data/gamma_atlas.json"
    try:
        raw = json.loads(res.read_text(encoding="utf-8"))
    except FileNotFoundError as err:  # pragma: no cover - broken installation
        raise FileNotFoundError(f"published atlas not found in the package: {name}") from err
    if not isinstance(raw, list):
        raise ValueError(f"published atlas {name}: expected a JSON list, got {type(raw).__name__}")
    entries = []
    for i, obj in enumerate(raw):
        where = f"published atlas {name}, entry {i}"
        if not isinstance(obj, Mapping) or any(k not in obj for k in _PUBLISHED_KEYS):
            raise _bad(where, f"expected an object with the keys {list(_PUBLISHED_KEYS)}")
        theta = _number(obj["theta"], where, "theta", allow_none=True)
        entries.append(
            AtlasEntry(
                model=_string(obj["model"], where, "model", allow_none=False, nonempty=True),  # type: ignore[arg-type]
                corpus=_string(obj["corpus"], where, "corpus", allow_none=False, nonempty=True),  # type: ignore[arg-type]
                gamma=_number(obj["gamma_obs"], where, "gamma_obs"),  # type: ignore[arg-type]
                r2=_number(obj["R2"], where, "R2", allow_none=True),
                theta=theta,
                phase=_string(obj["phase"], where, "phase"),
                source=_string(obj["source"], where, "source"),
                notes=_string(obj["notes"], where, "notes"),
                protocol="published",
                origin="published",
                extra={k: v for k, v in obj.items() if k not in _PUBLISHED_KEYS},
            )
        )
    return entries


def entry_from_lens_result(
    result: Mapping, *, corpus: str | None = None, notes: str | None = None, where: str = "lens result"
) -> AtlasEntry:
    """A user-atlas entry from a lens result (the content of a ``lens.json``), with its protocol and provenance.

    Kept: model, corpus, gamma, R², the CI and its level, protocol, prompts per seed, seeds, today's date,
    ``source`` "levyattn lens" and, in ``extra``, how it was measured (passes, distances,
    ``d_min``, attention path, token range, dtype) and the per-distance ``A(d)``. An error
    names ``where`` (the file) and the missing field.
    """
    try:
        m = result["measurement"]
        info = m.get("info", {})
        entry = {
            "model": m["model"],
            "corpus": corpus or str(info.get("corpus", "random")),
            "gamma": result["gamma"],
            "r2": result["fit_power_law"]["r2"],
            "ci": result.get("gamma_ci"),
            "ci_level": result.get("ci_level") if result.get("gamma_ci") is not None else None,
            "protocol": m["protocol"],
            "n_prompts": m["n_prompts_per_seed"],
            "seeds": list(m["seeds"]),
            "date": _dt.date.today().isoformat(),
            "source": "levyattn lens",
            "notes": notes,
            "extra": {
                "passes": m.get("passes"),
                "distances": m["distances"],
                "aggregate": m["aggregate"],
                "d_min": result.get("d_min"),
                "fitted_distances": result.get("fitted_distances"),
                "attention_path": info.get("attention_path"),
                "token_range": info.get("token_range"),
                "dtype": info.get("dtype"),
            },
        }
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{where}: not a lens result, it lacks the field {err}") from err
    return _entry_from_user({k: v for k, v in entry.items() if v is not None}, where, "new")


def default_user_atlas_path() -> Path:
    """``$LEVYATTN_ATLAS`` if set, else ``$XDG_DATA_HOME/levyattn/atlas.json`` (~/.local/share)."""
    env = os.environ.get("LEVYATTN_ATLAS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "levyattn" / "atlas.json"


def load_user_atlas(path: str | os.PathLike) -> list[AtlasEntry]:
    """Load and validate a user atlas file (schema above). Errors name the file and the entry."""
    path = Path(path)
    obj = read_json(path, "atlas file")
    if not isinstance(obj, Mapping):
        raise ValueError(f"atlas file {path}: expected a JSON object with 'schema' and 'entries'")
    if obj.get("schema") != ATLAS_SCHEMA:
        raise ValueError(f"atlas file {path}: field 'schema' must be {ATLAS_SCHEMA!r}, got {obj.get('schema')!r}")
    unknown = sorted(set(obj) - {"schema", "entries"})
    if unknown:
        raise ValueError(f"atlas file {path}: unknown top-level field(s) {unknown}")
    entries = obj.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"atlas file {path}: field 'entries' must be a list, got {type(entries).__name__}")
    return [_entry_from_user(e, f"atlas file {path}, entry {i}", str(path)) for i, e in enumerate(entries)]


class DuplicateAtlasEntry(ValueError):
    """The atlas file already holds the entry being appended."""


def append_to_atlas(path: str | os.PathLike, entry: AtlasEntry | Mapping) -> Path:
    """Append one measurement to a user atlas file (created if missing), validated, atomically.

    An entry equal to one the file holds in every field but ``date`` (the same command run
    again) raises :class:`DuplicateAtlasEntry` naming the file and the entry, and the file is
    left as it is: one measurement listed twice would count twice wherever the atlas is read.
    """
    path = Path(path)
    existing = load_user_atlas(path) if path.exists() else []
    if isinstance(entry, AtlasEntry):
        entry = entry.to_json()
    new = _entry_from_user(dict(entry), f"new atlas entry for {path}", str(path))

    def undated(e: AtlasEntry) -> str:
        return json.dumps({k: v for k, v in e.to_json().items() if k != "date"}, sort_keys=True)

    for i, old in enumerate(existing):
        if undated(old) == undated(new):
            raise DuplicateAtlasEntry(f"atlas file {path} already holds this measurement (entry {i}: {new.model}, "
                                      f"{new.corpus}, gamma {new.gamma:.4f}); not appended again")
    payload = {"schema": ATLAS_SCHEMA, "entries": [e.to_json() for e in existing] + [new.to_json()]}
    return atomic_write_json(path, payload)


def select_entries(
    entries: Iterable[AtlasEntry],
    *,
    corpus: str | Sequence[str] | None = None,
    regime: str | None = None,
    model_contains: str | None = None,
    sort_by: str = "gamma",
    descending: bool = False,
    tol: float = CROSSOVER_TOL,
) -> list[tuple[AtlasEntry, FractionalReading]]:
    """Filter (corpus, regime, model substring) and sort entries; each comes with its reading."""
    if sort_by not in _SORT_KEYS:
        raise ValueError(f"sort_by must be one of {list(_SORT_KEYS)}, got {sort_by!r}")
    if regime is not None and regime not in ("smoothing", "crossover", "differentiating"):
        raise ValueError(f"regime must be 'smoothing', 'crossover' or 'differentiating', got {regime!r}")
    corpora = {corpus} if isinstance(corpus, str) else set(corpus) if corpus is not None else None
    rows = []
    for e in entries:
        if corpora is not None and e.corpus not in corpora:
            continue
        if model_contains and model_contains.lower() not in e.model.lower():
            continue
        r = e.reading(tol)
        if regime is not None and r.regime != regime:
            continue
        rows.append((e, r))

    def key(row: tuple[AtlasEntry, FractionalReading]) -> tuple:
        e, r = row
        value = {
            "gamma": e.gamma,
            "alpha": r.alpha,
            "s": r.s,
            "r2": e.r2 if e.r2 is not None else -math.inf,
            "model": e.model.lower(),
            "corpus": e.corpus,
            "regime": r.regime,
        }[sort_by]
        return (value, e.model.lower(), e.corpus)

    return sorted(rows, key=key, reverse=descending)
