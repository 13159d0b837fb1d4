"""The paper's presets on small fixtures written in the real on-disk formats (IMDb aclImdb)."""

from __future__ import annotations

import random

from levyattn.training.presets import apply_overrides, get_preset, train_preset
from levyattn.training.sweep import run_sweep

GOOD = "great wonderful superb moving brilliant".split()
BAD = "awful boring terrible dull waste".split()


def _write_aclimdb(root, n=12):
    rng = random.Random(0)
    for split in ("train", "test"):
        for label, words in (("pos", GOOD), ("neg", BAD)):
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                text = " ".join(rng.choice(words + ["the", "film", "was", "a"]) for _ in range(rng.randint(5, 30)))
                (folder / f"{i}_{8 if label == 'pos' else 2}.txt").write_text(text)
    return root


def test_imdb_one_layer_preset_on_an_aclimdb_fixture(tmp_path):
    data = _write_aclimdb(tmp_path / "data")
    preset = apply_overrides(get_preset("imdb-1layer-h8"), [f"data_dir={data}", "epochs=2", "max_len=32"])
    result, trainer = train_preset(preset, tmp_path / "run")
    cfg = trainer.task.model_config
    assert cfg["max_len"] == 32 and cfg["num_classes"] == 2 and cfg["vocab_size"] > 10
    assert trainer.model.config.orthogonal and trainer.model.config.qk_share
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0 and len(result["history"]) == 2
    # a sweep over the paper's alphas on the same data, with the spectral gap of padded batches
    res = run_sweep(apply_overrides(preset, ["epochs=1"]), alphas=[1.2, 2.0], attentions=["fna"], seeds=[0],
                    out_dir=tmp_path / "sweep", gap_samples=6)
    assert all(0.0 <= r["spectral_gap"] <= 1.0 + 1e-9 for r in res.runs)
