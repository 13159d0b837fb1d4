"""The demo's statistics (paired comparison, verdicts, spreads), its attention figures and
statistics, and its quick run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from levyattn.cli import main
from levyattn.training.compare import paired_comparison, spread, verdict_sentence
from levyattn.training.demo import DEMO_TASKS, _distance_profile, demo_preset


def test_six_seeds_on_one_side_are_a_difference_five_are_not():
    ahead = paired_comparison([0.9, 0.95, 0.99, 0.97, 0.92, 0.96], [0.7, 0.8, 0.9, 0.95, 0.72, 0.9])
    assert ahead["verdict"] == "ahead" and ahead["wins"] == 6 and ahead["sign_p"] == pytest.approx(2 / 64)
    assert 0 < ahead["ci"][0] < ahead["mean_diff"] < ahead["ci"][1]
    # Five of five: the two-sided sign test cannot go below 2/32 = 0.0625.
    five = paired_comparison([0.9, 0.95, 0.99, 0.97, 0.92], [0.7, 0.8, 0.9, 0.95, 0.72])
    assert five["verdict"] == "no clear difference" and five["sign_p"] == pytest.approx(2 / 32)
    behind = paired_comparison([0.7, 0.8, 0.9, 0.95, 0.72, 0.9], [0.9, 0.95, 0.99, 0.97, 0.92, 0.96])
    assert behind["verdict"] == "behind"


def test_a_mixed_or_tied_comparison_is_no_clear_difference():
    mixed = paired_comparison([0.97, 0.96, 0.98, 0.95, 0.97, 0.96], [0.96, 0.97, 0.97, 0.96, 0.96, 0.97])
    assert mixed["verdict"] == "no clear difference" and mixed["ci"][0] < 0 < mixed["ci"][1]
    tied = paired_comparison([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert tied["verdict"] == "no clear difference" and tied["sign_p"] is None and tied["ties"] == 3
    assert "no seed differs" in verdict_sentence("A", "B", tied)


def test_one_seed_gives_no_verdict_and_nospread():
    one = paired_comparison([0.9], [0.8])
    assert one["verdict"] == "one seed" and one["ci"] is None
    assert "n = 1" in verdict_sentence("A", "B", one)
    assert spread([0.96]) == "0.9600" and "±" not in spread([0.96])
    assert spread([0.9, 1.0]) == "0.9500 ± 0.0707" and spread([2e-5, 4e-5], ".2g") == "3e-05 ± 1.4e-05"


def test_paired_comparison_rejects_unpaired_values():
    with pytest.raises(ValueError, match="one value per seed"):
        paired_comparison([0.9, 0.8], [0.7])
    with pytest.raises(ValueError, match="one value per seed"):
        paired_comparison([], [])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=10))
def test_swapping_the_variants_mirrors_the_comparison(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    ab, ba = paired_comparison(a, b), paired_comparison(b, a)
    assert ab["mean_diff"] == pytest.approx(-ba["mean_diff"], abs=1e-12)
    assert ab["ci"][0] == pytest.approx(-ba["ci"][1], abs=1e-9) and ab["ci"][1] == pytest.approx(-ba["ci"][0], abs=1e-9)
    assert (ab["wins"], ab["losses"], ab["sign_p"]) == (ba["losses"], ba["wins"], ba["sign_p"])
    mirrored = {"ahead": "behind", "behind": "ahead", "no clear difference": "no clear difference"}
    assert ba["verdict"] == mirrored[ab["verdict"]]
    assert ab["ci"][0] <= ab["mean_diff"] + 1e-12 and ab["mean_diff"] <= ab["ci"][1] + 1e-12


def test_distance_profile_averages_both_directions_over_valid_tokens():
    n = 6
    w = torch.zeros(1, 1, n, n, dtype=torch.float64)
    w[0, 0, torch.arange(n - 1), torch.arange(1, n)] = 1.0  # every query on the next key
    valid = torch.ones(1, n, dtype=torch.bool)
    profile = _distance_profile(w, valid)
    assert len(profile) == n - 1 and profile[0] == pytest.approx(0.5) and profile[1:] == [0.0] * (n - 2)
    valid[0, -1] = False  # the last token is padding: its pair (4, 5) no longer counts
    assert _distance_profile(w, valid)[0] == pytest.approx(4 / 8)


def test_attention_panel_has_a_colour_bar_and_integer_ticks():
    from matplotlib.figure import Figure

    from levyattn.analysis.plots import draw_attention

    fig = Figure()
    ax = fig.add_subplot()
    P = np.full((5, 5), 0.2)
    draw_attention(fig, ax, P, "five tokens")
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_demo_presets_are_one_layer_one_head_and_differ_only_in_attention():
    a = demo_preset("nearest", "fna", 1.2, 3, quick=False)
    b = demo_preset("nearest", "fna", 2.0, 3, quick=False)
    s = demo_preset("nearest", "softmax", None, 3, quick=False)
    for p in (a, b, s):
        assert p["model"]["num_layers"] == 1 and p["model"]["num_heads"] == 1 and p["train"]["seed"] == 3
        assert p["model"]["positional"] == "brownian" and p["train"]["epochs"] == 4
    assert (a["model"]["alpha"], b["model"]["alpha"], s["model"]["attention"]) == (1.2, 2.0, "softmax")
    strip = [{k: v for k, v in p["model"].items() if k not in ("alpha", "attention")} for p in (a, b, s)]
    assert strip[0] == strip[1] == strip[2] and a["data"] == b["data"] == s["data"]
    assert set(DEMO_TASKS) == {"nearest", "digits"}


@pytest.mark.slow
def test_demo_quick_writes_the_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress", "--seeds", "0,1", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    report = tmp_path / "report.html"
    assert str(report.resolve()) in out and "Verdict" in out and "s CPU" in out
    html = report.read_text()
    assert "data:image/png;base64" in html and "softmax" in html and "alpha=1.2" in html
    assert html.count("<table>") == 2 and "What was compared" in html and "bootstrap interval" in html
    assert "(mean ± std (sample std, ddof = 1) over 2 seeds; band: ± one std)" in html and "mean over 2 seeds" in html
    assert "(over the seeds that differ, tied seeds left out: with 6 or 7 of them, every one on one side)" in html
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["variant"] for r in data["rows"]} == {"FNA alpha=1.2", "FNA alpha=2", "softmax"}
    assert len(data["comparisons"]) == 4 and all(c["n"] == 2 for c in data["comparisons"])
    assert data["cpu_s"] > 0 and set(data["profiles"]) == {"nearest"}
    for name in ("learning_curves.png", "attention_by_distance.png", "attention_maps.png", "table.md"):
        assert (tmp_path / name).is_file()


@pytest.mark.slow
def test_demo_with_one_seed_shows_values_without_aspread(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    html = (tmp_path / "report.html").read_text()
    assert "±" not in (tmp_path / "table.md").read_text() and "± 0.0000" not in html
    assert "n = 1" in out and "n = 1" in html
    # one seed draws no band, and the caption says none
    assert "(one seed (n = 1): values, no spread)." in html and "band: ± one std" not in html
    assert "mean over 1 seed)" in html


def test_report_tables_right_align_numbers_only():
    from levyattn.report.html import Section, render

    page = render("t", [Section("s", header=["name", "value"], rows=[["a<b", 0.5], ["FNA alpha=1.2", "0.9657 ± 0.0058"],
                                                                       ["interval", "-0.0156 to +0.0156"], ["n", 3]])])
    assert "<td>a&lt;b</td>" in page and "<td>FNA alpha=1.2</td>" in page
    for number in ("0.5", "0.9657 ± 0.0058", "-0.0156 to +0.0156", "3"):
        assert f"<td class='num'>{number}</td>" in page


def test_lower_is_better_turns_the_verdict_and_the_seed_counts():
    """Perplexity: the variant whose values are lower on every seed is ahead."""
    lower = [10.0, 11.0, 12.0, 10.5, 11.5, 12.5]
    higher = [12.0, 13.0, 14.0, 12.5, 13.5, 14.5]
    c = paired_comparison(lower, higher, higher_is_better=False)
    assert c["verdict"] == "ahead" and (c["wins"], c["losses"]) == (6, 0) and c["mean_diff"] == pytest.approx(-2.0)
    assert paired_comparison(higher, lower, higher_is_better=False)["verdict"] == "behind"
    assert paired_comparison(lower, higher)["verdict"] == "behind"
