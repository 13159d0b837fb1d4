from __future__ import annotations

import json

import pytest

from levyattn.cli import main
from levyattn.lens import (
    ATLAS_SCHEMA,
    PUBLISHED_SOURCE,
    AtlasEntry,
    append_to_atlas,
    load_published_atlas,
    load_user_atlas,
    select_entries,
)


def test_published_atlas_ships_with_citation():
    entries = load_published_atlas()
    # 23 entries; the published chapter says 20 models, the file holds 19 distinct ids
    assert len(entries) == 23 and len({e.model for e in entries}) == 19
    byname = {(e.model, e.corpus): e for e in entries}
    e = byname[("EleutherAI/pythia-160m", "random")]
    assert e.gamma == 1.0171 and e.r2 == 0.9817 and e.theta == 10000 and e.origin == "published"
    assert "T_attn" in e.extra
    assert "karlesmarin/tafagent" in PUBLISHED_SOURCE and "Apache-2.0" in PUBLISHED_SOURCE


def test_select_sort_filter():
    rows = select_entries(load_published_atlas(), corpus="random", sort_by="gamma")
    gammas = [e.gamma for e, _ in rows]
    assert gammas == sorted(gammas) and all(e.corpus == "random" for e, _ in rows) and len(rows) == 9
    desc = select_entries(load_published_atlas(), sort_by="s", descending=True)
    assert desc[0][1].s >= desc[-1][1].s
    smooth = select_entries(load_published_atlas(), regime="smoothing")
    assert smooth and all(r.regime == "smoothing" and e.gamma < 0.95 for e, r in smooth)
    with pytest.raises(ValueError, match="sort_by"):
        select_entries([], sort_by="nope")


def test_user_atlas_round_trip(tmp_path):
    path = tmp_path / "atlas.json"
    append_to_atlas(path, AtlasEntry(model="me/m1", corpus="random", gamma=0.9, r2=0.99, ci=(0.85, 0.95)))
    append_to_atlas(path, {"model": "me/m2", "corpus": "wiki.txt", "gamma": 1.2})
    entries = load_user_atlas(path)
    assert [e.model for e in entries] == ["me/m1", "me/m2"]
    assert entries[0].ci == (0.85, 0.95) and entries[0].reading().regime == "smoothing"
    assert json.loads(path.read_text())["schema"] == ATLAS_SCHEMA
    # the same entry again (another day) is refused and the file kept; another gamma is a new entry
    before = path.read_bytes()
    with pytest.raises(ValueError, match=rf"atlas file {path} already holds this measurement \(entry 1: me/m2"):
        append_to_atlas(path, {"model": "me/m2", "corpus": "wiki.txt", "gamma": 1.2, "date": "2030-01-01"})
    assert path.read_bytes() == before
    append_to_atlas(path, {"model": "me/m2", "corpus": "wiki.txt", "gamma": 1.21})
    assert len(load_user_atlas(path)) == 3


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('{"schema": "other", "entries": []}', "schema"),
        ('{"schema": "levyattn.atlas/1", "entries": {}}', "'entries' must be a list"),
        ('{"schema": "levyattn.atlas/1", "entries": [{"model": "m", "corpus": "random"}]}', "entry 0.*gamma"),
        ('{"schema": "levyattn.atlas/1", "entries": [{"model": "m", "corpus": "r", "gamma": "x"}]}', "'gamma'"),
        ('{"schema": "levyattn.atlas/1", "entries": [{"model": "m", "corpus": "r", "gamma": 1, "gama": 2}]}',
         "unknown field"),
        ('{"schema": "levyattn.atlas/1", "entries": [{"model": "m", "corpus": "r", "gamma": 1, "ci": [2, 1]}]}',
         "lo <= hi"),
        ('{"schema": "levyattn.atlas/1", "entries": [{"model": "", "corpus": "r", "gamma": 1}]}', "'model'"),
        ('{"schema": "levyattn.atlas/1", "entries": [{"model": "m", "corpus": "r", "gamma": 1, "r2": 2}]}', "r2"),
        ('{"schema": "levyattn.atlas/1", "entries": [{"model": "m", "corpus": "r", "gamma": 1, "ci": [0.9, 1.1], '
         '"ci_level": 95}]}', r"'ci_level' must be in \(0, 1\), got 95"),
        ('{"schema": "levyattn.atlas/1", "entries": [{"model": "m", "corpus": "r", "gamma": 1, "ci_level": 0.9}]}',
         "'ci_level'.*needs a 'ci'"),
        ('{"schema": "levyattn.atlas/1", "entries": [{"model": "m", "corpus": "r", "gamma": 1.3, "ci": [0.9, 1.1]}]}',
         r"field 'gamma' \(1.3\) lies outside its field 'ci' \[0.9, 1.1\]"),
    ],
)
def test_malformed_atlas_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_user_atlas(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError):
        append_to_atlas(path, {"model": "m", "corpus": "r", "gamma": 1.0})  # never appends to a bad file


def test_missing_atlas_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_user_atlas(tmp_path / "missing.json")


def test_atlas_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LEVYATTN_ATLAS", str(tmp_path / "mine.json"))
    assert main(["atlas", "--corpus", "mongo", "--sort", "gamma", "--desc"]) == 0
    out = capsys.readouterr().out
    assert "pythia-31m" in out and "karlesmarin/tafagent" in out and "random" not in out.split("Source")[0]
    assert main(["atlas", "--add", "me/tiny", "--gamma", "1.5", "--add-corpus", "random", "--ci", "1.4", "1.6"]) == 0
    assert capsys.readouterr().out == f"added me/tiny (random, gamma 1.5000) to {tmp_path / 'mine.json'} (local)\n"
    assert main(["atlas", "--no-published", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (entry,) = data["entries"]
    assert entry["model"] == "me/tiny" and entry["regime"] == "differentiating" and entry["levy_valid"]
    assert entry["ci_level"] == 0.95  # --ci without --ci-level: the usual 95%, written down
    assert main(["atlas", "--add", "me/t2", "--gamma", "0.8", "--add-corpus", "random", "--ci", "0.7", "0.9",
                 "--ci-level", "0.8"]) == 0
    assert main(["atlas", "--no-published", "--model", "me/t2"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if "me/t2" in line][-1]  # the table row
    assert "[0.700, 0.900] (80%)" in row
    assert main(["atlas", "--add", "me/t3", "--gamma", "0.8", "--add-corpus", "random", "--ci-level", "0.8"]) == 2
    assert "--ci-level 0.8 needs --ci" in capsys.readouterr().err
    (tmp_path / "mine.json").write_text('{"schema": "levyattn.atlas/1", "entries": [{"model": 1}]}')
    assert main(["atlas"]) == 2
    assert "mine.json" in capsys.readouterr().err


def test_atlas_add_lens_json(tmp_path, capsys, monkeypatch):
    """`levyattn atlas --add lens.json`: the measurement with its protocol and provenance, shown as local."""
    from levyattn.lens import analyze_decay, measure_decay, write_lens_outputs
    from levyattn.lens.synthetic import PowerLawAttentionModel

    meas = measure_decay(PowerLawAttentionModel(gamma=1.3, max_positions=400), distances=[30, 60, 120, 240],
                         n_prompts=2, seeds=(42,))
    lens_json = write_lens_outputs(analyze_decay(meas, n_boot=20), tmp_path / "out", plots=False)["json"]
    mine = tmp_path / "data" / "atlas.json"
    monkeypatch.setenv("LEVYATTN_ATLAS", str(mine))
    assert main(["atlas", "--add", str(lens_json)]) == 0
    assert "(local)" in capsys.readouterr().out
    (entry,) = json.loads(mine.read_text())["entries"]
    assert entry["gamma"] == pytest.approx(1.3, abs=0.01) and entry["protocol"] == "published"
    assert entry["source"] == "levyattn lens" and entry["seeds"] == [42] and entry["n_prompts"] == 2
    assert entry["ci_level"] == 0.95 and len(entry["ci"]) == 2
    assert entry["extra"]["distances"] == [30, 60, 120, 240] and len(entry["extra"]["aggregate"]) == 4
    assert main(["atlas", "--model", "PowerLaw"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "PowerLaw" in line)
    assert row.rstrip().endswith("local") and "published d30-240" in row  # the protocol and fit range, the origin
    assert "d LO-HI: the distances a local entry's fit used" in table  # 30-240 is not the published 30-2000
    assert "pythia" not in table.split("Source")[0] and "karlesmarin/tafagent" in table
    bad = tmp_path / "bad.json"
    bad.write_text('{"gamma": 1.0}')
    assert main(["atlas", "--add", str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err and not (tmp_path / "data" / "atlas.json.tmp").exists()


def test_the_module_docstring_counts_the_shipped_data():
    import levyattn.lens.atlas as atlas_module

    entries = load_published_atlas()
    n_models = len({e.model for e in entries})
    assert f"{len(entries)} entries of {n_models} models" in " ".join(atlas_module.__doc__.split())
