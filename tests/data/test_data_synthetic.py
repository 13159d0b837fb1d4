"""The synthetic multiscale task: determinism, its construction, and that its label lives
in tokens far apart (a bag of local windows is at chance, a wide window is not)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from levyattn.data import collate_text, make_multiscale_task
from levyattn.data.synthetic import MultiscaleTask


def tagged(ds: MultiscaleTask) -> torch.Tensor:
    k = ds.params["n_values"]
    return (ds.input_ids >= 1) & (ds.input_ids <= k)


@pytest.mark.parametrize("kind", ["order", "match"])
def test_construction(kind):
    train, test = make_multiscale_task(400, 200, seq_len=40, d_min=8, d_max=20, kind=kind, n_values=3, seed=5)
    assert train.vocab_size == 1 + 2 * 3 + 16 and train.num_classes == 2 and train.max_len == 40
    for ds in (train, test):
        mask = tagged(ds)
        assert (mask.sum(1) == 2).all()  # exactly two tagged tokens
        assert (ds.input_ids > 0).all()  # no padding inside
        pos = mask.nonzero()[:, 1].view(-1, 2)
        assert torch.equal(pos, ds.positions)
        d = ds.distances
        assert d.min() >= 8 and d.max() <= 20 and len(set(d.tolist())) > 5
        assert (pos[:, 0] >= 4).all() and (pos[:, 1] <= 40 - 1 - 4).all()  # margin
        a = ds.input_ids.gather(1, pos[:, :1]).squeeze(1)
        b = ds.input_ids.gather(1, pos[:, 1:]).squeeze(1)
        labels = torch.tensor(ds.labels)
        want = (a < b) if kind == "order" else (a == b)
        assert torch.equal(want.long(), labels)
        assert 0.4 < labels.float().mean() < 0.6
    # distractors: untagged value tokens do occur
    assert ((train.input_ids > 3) & (train.input_ids <= 6)).any()


def test_deterministic_and_prefix_stable():
    a_train, a_test = make_multiscale_task(50, 20, seed=1)
    b_train, b_test = make_multiscale_task(80, 30, seed=1)
    assert torch.equal(a_train.input_ids, b_train.input_ids[:50])
    assert a_train.labels == b_train.labels[:50]
    assert torch.equal(a_test.input_ids, b_test.input_ids[:20])
    c_train, _ = make_multiscale_task(50, 20, seed=2)
    assert not torch.equal(a_train.input_ids, c_train.input_ids)
    assert not torch.equal(a_train.input_ids[:20], a_test.input_ids)  # train and test streams differ
    d_train, _ = make_multiscale_task(50, 20, seed=1, d_min=20)
    assert not torch.equal(a_train.input_ids, d_train.input_ids)


def _pair_bag(ids: np.ndarray, vocab: int, window: int) -> np.ndarray:
    """Counts of the tokens and of every ordered pair (x_i, x_j) with 0 < j - i < window:
    everything a model that mixes only inside windows of that width can pool."""
    n, length = ids.shape
    feats = np.zeros((n, vocab + vocab * vocab), dtype=np.float32)
    rows = np.repeat(np.arange(n), length)
    np.add.at(feats, (rows, ids.reshape(-1)), 1.0)
    for off in range(1, window):
        code = vocab + ids[:, :-off] * vocab + ids[:, off:]
        r = np.repeat(np.arange(n), length - off)
        np.add.at(feats, (r, code.reshape(-1)), 1.0)
    return feats


def _baseline_accuracy(train: MultiscaleTask, test: MultiscaleTask, window: int) -> float:
    """Test accuracy of logistic regression on :func:`_pair_bag` features. The noise tokens
    are merged into one symbol first: they are drawn independently of the label, and
    fewer features keep the fit fast."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    v = 2 + 2 * train.params["n_values"]  # pad, tagged values, untagged values, one noise symbol
    xtr = _pair_bag(np.minimum(train.input_ids.numpy(), v - 1), v, window)
    xte = _pair_bag(np.minimum(test.input_ids.numpy(), v - 1), v, window)
    # Standardised counts: an affine map, so the readout stays linear in the pooled counts
    # (a non-linear one such as log(1 + count) would detect a repeated value), and lbfgs
    # converges in a few iterations instead of crawling on the large noise-pair counts.
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(scaler.transform(xtr), train.labels)
    return float((clf.predict(scaler.transform(xte)) == np.asarray(test.labels)).mean())


def test_order_local_windows_are_at_chance_and_wide_windows_are_not():
    # margin >= window: no window sees a tagged token and an end of the sequence at once
    train, test = make_multiscale_task(1500, 2000, seq_len=56, d_min=12, d_max=24, kind="order", margin=12, seed=0)
    local = _baseline_accuracy(train, test, window=12)
    wide = _baseline_accuracy(train, test, window=25)
    # chance is 0.5; 2000 test items give a standard error of 0.011
    assert abs(local - 0.5) < 0.05, local
    assert wide > 0.95, wide


def test_match_needs_the_far_pair():
    train, test = make_multiscale_task(1500, 2000, seq_len=48, d_min=12, d_max=24, kind="match", seed=0)
    local = _baseline_accuracy(train, test, window=12)
    wide = _baseline_accuracy(train, test, window=25)
    # a linear readout of pooled local features cannot test equality: about 2/3 at best with 4 values
    assert local < 0.72, local
    assert wide > 0.95, wide


def test_batches_for_the_classifier():
    train, _ = make_multiscale_task(8, 4, seq_len=32, d_min=4, d_max=10)
    ids, pad, labels = collate_text([train[i] for i in range(8)], pad_id=train.pad_id)
    assert ids.shape == (8, 32) and not pad.any() and labels.shape == (8,)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="seq_len=20 is too short .* = 25"):
        make_multiscale_task(10, 10, seq_len=20, d_min=16, d_max=16)
    with pytest.raises(ValueError, match=r"d_max must be an int in \[16, 55\]"):
        make_multiscale_task(10, 10, seq_len=64, d_min=16, d_max=60)
    with pytest.raises(ValueError, match="kind"):
        make_multiscale_task(10, 10, kind="xor3")
    with pytest.raises(ValueError, match="n_values"):
        make_multiscale_task(10, 10, n_values=1)
    with pytest.raises(ValueError, match="distractor_rate"):
        make_multiscale_task(10, 10, distractor_rate=1.5)
    with pytest.raises(TypeError, match="n_train|n must be an int"):
        make_multiscale_task(10.5, 10)


def test_the_training_task_reads_its_sizes_from_the_data():
    from levyattn.training.tasks.classification import PRESETS, ClassificationTask

    preset = {**PRESETS["multiscale-1layer"]}
    preset["data"] = {**preset["data"], "task_args": {"n_train": 16, "n_test": 8}}
    task = ClassificationTask(preset)
    train, _ = task.datasets()
    cfg = task.model_config
    assert cfg["vocab_size"] == train.vocab_size and cfg["max_len"] == 64 and cfg["num_classes"] == 2
    ids, pad, labels = task.collate([train[i] for i in range(4)])
    assert ids.shape == (4, 64) and pad.dtype == torch.bool


def _check_nearest(ds: MultiscaleTask) -> None:
    _check_query_and_two_markers(ds)
    g = ds.marker_distances
    assert torch.equal((g[:, 0] < g[:, 1]).long(), torch.tensor(ds.labels))


def _check_ratio(ds: MultiscaleTask) -> None:
    _check_query_and_two_markers(ds)
    g = ds.marker_distances.double()
    r = ds.params["ratio"]
    assert (g[:, 0] < g[:, 1]).all() and (g[:, 1] <= r * r * g[:, 0]).all()  # a nearer, b within ratio**2
    assert torch.equal((g[:, 1] >= r * g[:, 0]).long(), torch.tensor(ds.labels))


def _check_query_and_two_markers(ds: MultiscaleTask) -> None:
    """One query, two markers of distinct values at their recorded positions and gaps
    (the invariants "nearest" and "ratio" share; the label laws are the callers')."""
    p = ds.params
    q_id = ds.vocab_size - 1
    assert ds.token_names[q_id] == "Q"
    ids = ds.input_ids
    assert ((ids == q_id).sum(1) == 1).all()  # one query
    assert (tagged(ds).sum(1) == 2).all()  # two markers
    q = (ids == q_id).float().argmax(1)
    assert torch.equal(q, ds.query_positions)
    pos = tagged(ds).nonzero()[:, 1].view(-1, 2)
    assert torch.equal(pos, ds.positions)
    vals = ids.gather(1, pos)  # marker tokens, 1 + value
    assert (vals[:, 0] != vals[:, 1]).all()
    gaps = (pos - q[:, None]).abs()
    # marker_distances is (gap of the smaller value, gap of the larger value)
    small_first = vals[:, 0] < vals[:, 1]
    want = torch.where(small_first[:, None], gaps, gaps.flip(1))
    assert torch.equal(want, ds.marker_distances)
    g = ds.marker_distances
    assert (g[:, 0] != g[:, 1]).all() and g.min() >= p["d_min"] and g.max() <= p["d_max"]
    lo, hi = p["margin"], p["seq_len"] - 1 - p["margin"]
    assert (pos >= lo).all() and (pos <= hi).all() and (q >= lo).all() and (q <= hi).all()


def test_nearest_construction_and_multiscale_gaps():
    train, test = make_multiscale_task(600, 300, seq_len=64, d_min=1, d_max=40, kind="nearest", n_values=3, seed=3)
    assert train.vocab_size == 1 + 2 * 3 + 16 + 1
    for ds in (train, test):
        _check_nearest(ds)
        assert 0.4 < torch.tensor(ds.labels).float().mean() < 0.6
    near = train.marker_distances.min(1).values
    far = train.marker_distances.max(1).values
    # log-uniform gaps: every scale occurs, small gaps most often
    assert (near <= 2).float().mean() > 0.3 and (near >= 10).any() and (far >= 30).any()
    # the bag of tokens is the same for both labels: one Q and two distinct markers always,
    # and the marker values alone do not predict the label
    ids = train.input_ids
    labels = torch.tensor(train.labels)
    for v in range(1, 4):
        has = (ids == v).any(1).float()
        assert abs(has[labels == 1].mean() - has[labels == 0].mean()) < 0.12


@given(seq_len=st.integers(8, 40), d_min=st.integers(1, 5), span=st.integers(1, 20), margin=st.integers(0, 2),
       seed=st.integers(0, 50))  # fmt: skip
@settings(max_examples=25, deadline=None)
def test_nearest_invariants_hold_for_any_valid_parameters(seq_len, d_min, span, margin, seed):
    d_max = min(d_min + span, seq_len - 1 - 2 * margin)
    assume(d_max > d_min)
    train, _ = make_multiscale_task(20, 1, seq_len=seq_len, d_min=d_min, d_max=d_max, kind="nearest",
                                    margin=margin, seed=seed)  # fmt: skip
    _check_nearest(train)


def test_nearest_needs_two_distinct_gaps():
    with pytest.raises(ValueError, match=r"d_max must be an int in \[5, "):
        make_multiscale_task(10, 10, seq_len=32, d_min=4, d_max=4, kind="nearest")


def test_the_nearest_preset_builds_its_data():
    from levyattn.training.tasks.classification import PRESETS, ClassificationTask

    preset = {**PRESETS["multiscale-nearest-1layer"]}
    preset["data"] = {**preset["data"], "task_args": {**preset["data"]["task_args"], "n_train": 16, "n_test": 8}}
    task = ClassificationTask(preset)
    train, _ = task.datasets()
    assert train.kind == "nearest" and task.model_config["vocab_size"] == train.vocab_size == 1 + 4 + 1 + 1


def _check_majority(ds: MultiscaleTask) -> None:
    """Every invariant of a "majority" split: one query, M markers at their recorded
    positions and gaps, a bare majority value, and the label law."""
    p = ds.params
    k, m = p["n_values"], p["n_markers"]
    q_first = 1 + 2 * k + p["n_noise"]
    assert ds.vocab_size == q_first + k and ds.token_names[q_first] == "Q0"
    ids = ds.input_ids
    is_q = ids >= q_first
    assert (is_q.sum(1) == 1).all()  # one query
    q = is_q.float().argmax(1)
    assert torch.equal(q, ds.query_positions)
    assert torch.equal(ids.gather(1, q[:, None]).squeeze(1) - q_first, ds.query_values)
    mask = tagged(ds)
    assert (mask.sum(1) == m).all()
    pos = mask.nonzero()[:, 1].view(-1, m)
    assert torch.equal(pos, ds.positions)
    assert torch.equal(ids.gather(1, pos) - 1, ds.marker_values)
    gaps = (pos - q[:, None]).abs()
    assert torch.equal(gaps, ds.marker_distances)
    assert gaps.min() >= p["d_min"] and gaps.max() <= p["d_max"]
    lo, hi = p["margin"], p["seq_len"] - 1 - p["margin"]
    assert (pos >= lo).all() and (pos <= hi).all() and (q >= lo).all() and (q <= hi).all()
    counts = torch.nn.functional.one_hot(ds.marker_values, k).sum(1)  # (N, K)
    top = counts.max(1)
    assert (top.values == (m + 1) // 2).all()  # the barest strict majority, always
    labels = torch.tensor(ds.labels)
    assert torch.equal((top.indices == ds.query_values).long(), labels)


def test_majority_construction_label_law_and_scales():
    train, test = make_multiscale_task(800, 300, seq_len=64, d_min=1, d_max=48, kind="majority", n_values=4,
                                       n_markers=7, n_noise=1, distractor_rate=0.0, seed=3)  # fmt: skip
    for ds in (train, test):
        _check_majority(ds)
        assert ds.input_ids.shape == (len(ds), 64) and ds.positions.shape == (len(ds), 7)
        assert 0.4 < torch.tensor(ds.labels).float().mean() < 0.6
    g = train.marker_distances
    # log-uniform gaps: neighbours and far markers in the same sequences
    assert (g.min(1).values <= 2).float().mean() > 0.5 and (g.max(1).values >= 24).float().mean() > 0.5
    # the query's value alone and the majority value alone say nothing about the label
    labels = torch.tensor(train.labels)
    for v in range(4):
        for values in (train.query_values, torch.mode(train.marker_values, 1).values):
            has = (values == v).float()
            assert abs(has[labels == 1].mean() - has[labels == 0].mean()) < 0.1
    # the nearest marker alone is a poor guide: its value agrees with the label law far from always
    nearest = train.marker_values.gather(1, g.argmin(1, keepdim=True)).squeeze(1)
    assert ((nearest == train.query_values).long() == labels).float().mean() < 0.8


def test_majority_is_deterministic_by_seed_and_leaves_other_kinds_alone():
    kw = dict(seq_len=32, d_min=1, d_max=20, kind="majority", n_markers=5)
    a, _ = make_multiscale_task(30, 5, seed=4, **kw)
    b, _ = make_multiscale_task(60, 5, seed=4, **kw)
    c, _ = make_multiscale_task(30, 5, seed=5, **kw)
    assert torch.equal(a.input_ids, b.input_ids[:30]) and a.labels == b.labels[:30]
    assert not torch.equal(a.input_ids, c.input_ids)
    # n_markers enters the stream of "majority" only: the other kinds keep their sequences
    m1, _ = make_multiscale_task(20, 5, seed=4, kind="match")
    m2, _ = make_multiscale_task(20, 5, seed=4, kind="match", n_markers=9)
    assert torch.equal(m1.input_ids, m2.input_ids)


@given(seq_len=st.integers(12, 48), d_min=st.integers(1, 4), span=st.integers(4, 30), margin=st.integers(0, 3),
       n_markers=st.sampled_from([3, 5]), n_values=st.integers(2, 5), seed=st.integers(0, 50))  # fmt: skip
@settings(max_examples=25, deadline=None)
def test_majority_invariants_hold_for_any_valid_parameters(seq_len, d_min, span, margin, n_markers, n_values, seed):
    d_max = min(d_min + span, seq_len - 1 - 2 * margin)
    assume(d_max - d_min + 1 >= n_markers)
    train, _ = make_multiscale_task(12, 1, seq_len=seq_len, d_min=d_min, d_max=d_max, kind="majority",
                                    margin=margin, n_markers=n_markers, n_values=n_values, seed=seed)  # fmt: skip
    _check_majority(train)


def test_majority_bad_marker_counts_are_named():
    with pytest.raises(ValueError, match="n_markers must be odd"):
        make_multiscale_task(10, 10, kind="majority", n_markers=6)
    with pytest.raises(ValueError, match=r"n_markers must be an int in \[3, 5\]"):
        make_multiscale_task(10, 10, seq_len=32, d_min=4, d_max=8, kind="majority", n_markers=7)


def test_the_majority_preset_builds_its_data_and_shares_the_nearest_presets_setting():
    from levyattn.training.tasks.classification import PRESETS, ClassificationTask

    maj, near = PRESETS["multiscale-majority-1layer"], PRESETS["multiscale-nearest-1layer"]
    # one model and one training setting for both position tasks (and, by the sweep, every alpha)
    assert maj["model"] == near["model"] and maj["train"] == near["train"] and maj["sweep"] == near["sweep"]
    preset = {**maj, "data": {**maj["data"], "task_args": {**maj["data"]["task_args"], "n_train": 16, "n_test": 8}}}
    task = ClassificationTask(preset)
    train, _ = task.datasets()
    assert train.kind == "majority" and task.model_config["vocab_size"] == train.vocab_size == 1 + 8 + 1 + 4
    _check_majority(train)


def test_the_brownian_nearest_preset_differs_from_the_nearest_preset_only_in_its_positions():
    from levyattn.training.tasks.classification import PRESETS, ClassificationTask

    near, brown = PRESETS["multiscale-nearest-1layer"], PRESETS["multiscale-nearest-brownian-1layer"]
    assert brown["model"] == {**near["model"], "positional": "brownian"} and near["model"]["positional"] == "sinusoidal"
    assert all(brown[key] == near[key] for key in ("data", "train", "sweep"))
    task_args = {**brown["data"]["task_args"], "n_train": 16, "n_test": 8}
    preset = {**brown, "data": {**brown["data"], "task_args": task_args}}
    model = ClassificationTask(preset).build_model()
    assert model.config.positional == "brownian"


def test_the_256_token_brownian_preset_is_the_brownian_preset_at_256_tokens():
    from levyattn.training.presets import apply_overrides
    from levyattn.training.tasks.classification import PRESETS

    brown, long = PRESETS["multiscale-nearest-brownian-1layer"], PRESETS["multiscale-nearest-brownian-256-1layer"]
    # the benchmark trains the 64-token preset with these two overrides: the same runs
    overridden = apply_overrides(brown, ["data.task_args.seq_len=256", "data.task_args.d_max=192"])
    assert {**overridden, "description": long["description"]} == long
    assert long["data"]["task_args"]["seq_len"] == 256 and brown["data"]["task_args"]["seq_len"] == 64


def test_ratio_construction_label_law_and_scales():
    train, test = make_multiscale_task(1500, 500, seq_len=64, d_min=4, d_max=40, kind="ratio", ratio=1.25,
                                       n_values=3, n_noise=1, distractor_rate=0.0, seed=3)  # fmt: skip
    assert train.vocab_size == 1 + 2 * 3 + 1 + 1 and train.params["ratio"] == 1.25
    for ds in (train, test):
        _check_ratio(ds)
        assert 0.4 < torch.tensor(ds.labels).float().mean() < 0.6
    g = train.marker_distances.double()
    labels = torch.tensor(train.labels)
    # every scale on both sides of the threshold: near pairs (4 vs 5, 4 vs 6) and far ones
    for label in (0, 1):
        near = g[labels == label, 0]
        assert (near <= 6).any() and (near >= 20).any()
    # the difference of the gaps does not decide: one difference, both labels, at different scales
    diff = (g[:, 1] - g[:, 0]).long()
    assert any(set(labels[diff == d].tolist()) == {0, 1} for d in range(1, 10))
    # the nearer marker's gap alone is a weak guide (the lookup reaches about 0.62 on the preset)
    rule = {int(n): int(labels[g[:, 0] == n].float().mean() > 0.5) for n in g[:, 0].unique()}
    assert sum(rule[int(n)] == y for n, y in zip(g[:, 0], labels.tolist())) / len(labels) < 0.7


def test_ratio_is_deterministic_and_leaves_other_kinds_alone():
    kw = dict(seq_len=48, d_min=3, d_max=30, kind="ratio")
    a, _ = make_multiscale_task(30, 5, seed=4, **kw)
    b, _ = make_multiscale_task(60, 5, seed=4, **kw)
    c, _ = make_multiscale_task(30, 5, seed=4, ratio=1.5, **kw)
    assert torch.equal(a.input_ids, b.input_ids[:30]) and a.labels == b.labels[:30]
    assert not torch.equal(a.input_ids, c.input_ids)
    _check_ratio(c)
    # ratio enters the stream of "ratio" only
    n1, _ = make_multiscale_task(20, 5, seed=4, kind="nearest", d_min=1, d_max=30)
    n2, _ = make_multiscale_task(20, 5, seed=4, kind="nearest", d_min=1, d_max=30, ratio=3.0)
    assert torch.equal(n1.input_ids, n2.input_ids)


@given(seq_len=st.integers(16, 48), d_min=st.integers(2, 6), span=st.integers(6, 30), margin=st.integers(0, 2),
       ratio=st.floats(1.1, 2.0), seed=st.integers(0, 50))  # fmt: skip
@settings(max_examples=25, deadline=None)
def test_ratio_invariants_hold_for_any_valid_parameters(seq_len, d_min, span, margin, ratio, seed):
    d_max = min(d_min + span, seq_len - 1 - 2 * margin)
    kw = dict(seq_len=seq_len, d_min=d_min, d_max=d_max, kind="ratio", margin=margin, ratio=ratio, seed=seed)
    try:
        train, _ = make_multiscale_task(20, 1, **kw)
    except ValueError as err:  # only when the gaps cannot give both labels
        assert "cannot give both labels" in str(err)
        pairs = [(n, f) for n in range(d_min, d_max + 1) for f in range(n + 1, d_max + 1) if f <= ratio * ratio * n]
        assert all(f >= ratio * n for n, f in pairs) or all(f < ratio * n for n, f in pairs)
        return
    _check_ratio(train)


def test_ratio_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"ratio must be in \(1.0, inf\), got 1.0"):
        make_multiscale_task(10, 10, kind="ratio", ratio=1.0)
    with pytest.raises(ValueError, match=r"ratio must be in \(1.0, inf\), got inf"):
        make_multiscale_task(10, 10, kind="ratio", ratio=math.inf)
    with pytest.raises(TypeError, match="ratio must be a number"):
        make_multiscale_task(10, 10, kind="ratio", ratio="2")
    # gaps 4-5 at ratio 2: 4 vs 5 is the only pair, always below the threshold
    with pytest.raises(ValueError, match="ratio=2.0 with gaps d_min=4 to d_max=5 cannot give both labels"):
        make_multiscale_task(10, 10, seq_len=32, d_min=4, d_max=5, kind="ratio", ratio=2.0)


def test_the_ratio_preset_is_the_brownian_nearest_preset_with_the_ratio_task():
    from levyattn.training.tasks.classification import PRESETS, ClassificationTask

    brown, ratio = PRESETS["multiscale-nearest-brownian-1layer"], PRESETS["multiscale-ratio-brownian-1layer"]
    assert all(ratio[key] == brown[key] for key in ("model", "train", "sweep"))
    want = {**brown["data"]["task_args"], "kind": "ratio", "ratio": 1.25, "d_min": 4}
    assert ratio["data"] == {**brown["data"], "task_args": want}
    preset = {**ratio, "data": {**ratio["data"], "task_args": {**want, "n_train": 16, "n_test": 8}}}
    task = ClassificationTask(preset)
    train, _ = task.datasets()
    assert train.kind == "ratio" and task.model_config["vocab_size"] == train.vocab_size == 1 + 4 + 1 + 1
    _check_ratio(train)
