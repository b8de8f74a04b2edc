"""Selection policies on synthetic ErrorRows, and Selection's JSON round trip."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fxptqat as fq
from fxptqat.selection import badness

from helpers import examples


def stats(mse: float = 0.0, sqnr_db: float = 30.0, cosine: float = 1.0) -> fq.ErrorStats:
    return fq.ErrorStats(mse=mse, sqnr_db=sqnr_db, cosine=cosine, max_abs=0.0, count=10)


def row(name: str, mse: float = 0.0, *, sqnr_db: float = 30.0, cosine: float = 1.0, params: int = 10,
        propagated: fq.ErrorStats | None = None) -> fq.ErrorRow:
    iso = stats(mse, sqnr_db, cosine)
    return fq.ErrorRow(name=name, source=f"src.{name}", module_type="Linear", params=params, isolated=iso,
                       propagated=iso if propagated is None else propagated)


MSES = {"a": 1e-4, "b": 5e-3, "c": 0.01, "d": 0.02, "e": 0.5}
ROWS = [row(n, m) for n, m in MSES.items()]
NAMES = set(MSES)

finite_mse = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)
rows_strategy = st.lists(
    st.tuples(finite_mse, st.integers(min_value=1, max_value=1000)), min_size=1, max_size=8
).map(lambda vals: [row(f"n{i}", m, params=p) for i, (m, p) in enumerate(vals)])


# -- Threshold ---------------------------------------------------------------------------------------
def test_threshold_low_picks_rows_strictly_below_theta():
    assert fq.Threshold(0.01).choose(ROWS) == {"a", "b"}  # "c" sits exactly at theta: not below
    assert fq.Threshold(0.015).choose(ROWS) == {"a", "b", "c"}
    assert fq.Threshold(0.0).choose(ROWS) == set()
    assert fq.Threshold(1.0).choose(ROWS) == NAMES


def test_threshold_high_is_the_complement():
    assert fq.Threshold(0.01, keep="high").choose(ROWS) == {"c", "d", "e"}


@settings(max_examples=examples(60), deadline=None)
@given(rows=rows_strategy, theta=st.floats(min_value=0.0, max_value=10.0))
def test_threshold_property(rows, theta):
    low = fq.Threshold(theta).choose(rows)
    high = fq.Threshold(theta, keep="high").choose(rows)
    assert low == {r.name for r in rows if r.isolated.mse < theta}
    assert low | high == {r.name for r in rows}
    assert not low & high


def test_threshold_default_is_ptqat_001_mse_isolated_low():
    t = fq.Threshold()
    assert (t.theta, t.metric, t.mode, t.keep) == (0.01, "mse", "isolated", "low")


def test_threshold_cosine_uses_cosine_distance():
    rows = [row("x", cosine=0.999), row("y", cosine=0.95), row("z", cosine=0.5)]
    # distances: 0.001, 0.05, 0.5
    assert fq.Threshold(0.01, metric="cosine").choose(rows) == {"x"}
    assert fq.Threshold(0.1, metric="cosine").choose(rows) == {"x", "y"}
    assert fq.Threshold(0.1, metric="cosine", keep="high").choose(rows) == {"z"}


def test_threshold_sqnr_keeps_rows_above_theta_db():
    rows = [row("x", sqnr_db=40.0), row("y", sqnr_db=20.0), row("z", sqnr_db=5.0)]
    assert fq.Threshold(25.0, metric="sqnr_db").choose(rows) == {"x"}
    assert fq.Threshold(10.0, metric="sqnr_db").choose(rows) == {"x", "y"}
    assert fq.Threshold(10.0, metric="sqnr_db", keep="high").choose(rows) == {"z"}
    # dB may be negative: a negative theta is meaningful for sqnr_db only
    neg = [row("p", sqnr_db=-1.0), row("q", sqnr_db=-10.0)]
    assert fq.Threshold(-5.0, metric="sqnr_db").choose(neg) == {"p"}


def test_threshold_sqnr_inf_counts_as_lowest_error():
    rows = [row("exact", sqnr_db=math.inf), row("bad", sqnr_db=-math.inf)]
    assert fq.Threshold(100.0, metric="sqnr_db").choose(rows) == {"exact"}


def test_threshold_propagated_mode_reads_propagated_stats():
    rows = [row("x", 1e-4, propagated=stats(0.5)), row("y", 0.5, propagated=stats(1e-4))]
    assert fq.Threshold(0.01).choose(rows) == {"x"}
    assert fq.Threshold(0.01, mode="propagated").choose(rows) == {"y"}
    assert fq.Threshold(0.01, mode="propagated", keep="high").choose(rows) == {"x"}


@pytest.mark.parametrize("metric", ["mse", "cosine"])
@pytest.mark.parametrize("theta", [-0.1, float("nan"), float("inf"), -float("inf")])
def test_threshold_rejects_negative_and_non_finite_theta(metric, theta):
    with pytest.raises(fq.ConfigError, match="theta"):
        fq.Threshold(theta, metric=metric)


@pytest.mark.parametrize("theta", [float("nan"), float("inf")])
def test_threshold_sqnr_rejects_non_finite_theta(theta):
    with pytest.raises(fq.ConfigError, match="theta must be finite"):
        fq.Threshold(theta, metric="sqnr_db")


@pytest.mark.parametrize("theta", ["0.1", True, None])
def test_threshold_rejects_non_numbers(theta):
    with pytest.raises(fq.ConfigError, match="theta must be a number"):
        fq.Threshold(theta)


def test_threshold_misspelt_kwargs():
    with pytest.raises(fq.ConfigError, match=r"Did you mean 'metric'\?"):
        fq.Threshold(0.1, metirc="mse")
    with pytest.raises(fq.ConfigError, match=r"Did you mean 'theta'\?"):
        fq.Threshold(thetta=0.1)


def test_threshold_bad_choice_values_suggest():
    with pytest.raises(fq.ConfigError, match=r"metric='mes'.*Did you mean 'mse'\?"):
        fq.Threshold(0.1, metric="mes")
    with pytest.raises(fq.ConfigError, match=r"mode='propagate'.*Did you mean 'propagated'\?"):
        fq.Threshold(0.1, mode="propagate")
    with pytest.raises(fq.ConfigError, match=r"keep='lo'.*Did you mean 'low'\?"):
        fq.Threshold(0.1, keep="lo")


def test_threshold_theta_stored_as_float():
    t = fq.Threshold(1)
    assert isinstance(t.theta, float) and t.theta == 1.0


# -- Fraction -------------------------------------------------------------------------------------------
def test_fraction_takes_lowest_error_until_fraction_of_params():
    rows = [row("a", 0.3, params=50), row("b", 0.1, params=30), row("c", 0.2, params=20)]
    # lowest-error first: b (30), c (20), a (50)
    assert fq.Fraction(0.3).choose(rows) == {"b"}
    assert fq.Fraction(0.31).choose(rows) == {"b", "c"}
    assert fq.Fraction(0.5).choose(rows) == {"b", "c"}
    assert fq.Fraction(0.51).choose(rows) == {"a", "b", "c"}
    assert fq.Fraction(1.0).choose(rows) == {"a", "b", "c"}
    # highest-error first: a (50), c (20), b (30)
    assert fq.Fraction(0.5, keep="high").choose(rows) == {"a"}
    assert fq.Fraction(0.6, keep="high").choose(rows) == {"a", "c"}


distinct_rows_strategy = st.lists(
    st.tuples(finite_mse, st.integers(min_value=1, max_value=1000)), min_size=1, max_size=8,
    unique_by=lambda t: t[0],
).map(lambda vals: [row(f"n{i}", m, params=p) for i, (m, p) in enumerate(vals)])


@settings(max_examples=examples(60), deadline=None)
@given(rows=distinct_rows_strategy, fraction=st.floats(min_value=1e-3, max_value=1.0),
       keep=st.sampled_from(["low", "high"]))
def test_fraction_property_minimal_prefix_reaching_fraction(rows, fraction, keep):
    chosen = fq.Fraction(fraction, keep=keep).choose(rows)
    order = sorted(rows, key=lambda r: r.isolated.mse, reverse=keep == "high")
    k = len(chosen)
    assert chosen == {r.name for r in order[:k]}  # a prefix of the lowest- (highest-) error-first order
    target = fraction * sum(r.params for r in rows)
    assert sum(r.params for r in order[:k]) >= target * (1 - 1e-12)  # reaches the fraction
    assert k >= 1
    assert sum(r.params for r in order[: k - 1]) < target * (1 + 1e-12)  # and stops there


@pytest.mark.parametrize("fraction", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), "0.5", True])
def test_fraction_rejects_out_of_range(fraction):
    with pytest.raises(fq.ConfigError, match="fraction"):
        fq.Fraction(fraction)


def test_fraction_misspelt_kwarg():
    with pytest.raises(fq.ConfigError, match=r"Did you mean 'fraction'\?"):
        fq.Fraction(fractoin=0.5)


# -- Count ------------------------------------------------------------------------------------------------
def test_count_k():
    assert fq.Count(2).choose(ROWS) == {"a", "b"}
    assert fq.Count(2, keep="high").choose(ROWS) == {"d", "e"}
    assert fq.Count(0).choose(ROWS) == set()
    assert fq.Count(99).choose(ROWS) == NAMES


def test_count_by_propagated_sqnr():
    rows = [row("x", propagated=stats(sqnr_db=10.0)), row("y", propagated=stats(sqnr_db=40.0)),
            row("z", propagated=stats(sqnr_db=25.0))]
    assert fq.Count(1, metric="sqnr_db", mode="propagated").choose(rows) == {"y"}
    assert fq.Count(1, metric="sqnr_db", mode="propagated", keep="high").choose(rows) == {"x"}


@pytest.mark.parametrize("k", [-1, 1.5, True, "2", None])
def test_count_rejects_bad_k(k):
    with pytest.raises(fq.ConfigError, match="k must be a non-negative int"):
        fq.Count(k)


# -- Random ------------------------------------------------------------------------------------------------
MANY = [row(f"n{i:02d}", i * 1e-3) for i in range(20)]


def test_random_is_deterministic_per_seed_and_order_independent():
    first = fq.Random(5, seed=3).choose(MANY)
    assert len(first) == 5
    assert first <= {r.name for r in MANY}
    assert fq.Random(5, seed=3).choose(MANY) == first
    assert fq.Random(5, seed=3).choose(list(reversed(MANY))) == first


def test_random_different_seeds_can_differ():
    base = fq.Random(5, seed=0).choose(MANY)
    assert any(fq.Random(5, seed=s).choose(MANY) != base for s in range(1, 10))


def test_random_k_capped_at_rows():
    assert fq.Random(50, seed=1).choose(ROWS) == NAMES
    assert fq.Random(0).choose(ROWS) == set()
    assert fq.Random(3).choose([]) == set()


@pytest.mark.parametrize("k", [-1, 2.0, False])
def test_random_rejects_bad_k(k):
    with pytest.raises(fq.ConfigError, match="k must be"):
        fq.Random(k)


def test_random_misspelt_kwarg():
    with pytest.raises(fq.ConfigError, match=r"Did you mean 'seed'\?"):
        fq.Random(3, sed=1)


# -- All / None --------------------------------------------------------------------------------------------
def test_all_and_no_layers():
    assert fq.AllLayers().choose(ROWS) == NAMES
    assert fq.NoLayers().choose(ROWS) == set()
    assert fq.AllLayers().choose([]) == set()


# -- Adaptive ----------------------------------------------------------------------------------------------
CLUSTERS = [row("l1", 1e-5), row("h1", 1e-1), row("l2", 2e-5), row("h2", 2e-1), row("l3", 3e-5)]


def test_adaptive_splits_two_log_clusters():
    policy = fq.Adaptive()
    assert policy.choose(CLUSTERS) == {"l1", "l2", "l3"}
    theta = policy.theta(CLUSTERS)
    assert 3e-5 < theta < 1e-1
    assert theta == pytest.approx(math.sqrt(3e-5 * 1e-1), rel=1e-9)  # geometric mean at the cut


def test_adaptive_sqnr_splits_db_clusters():
    rows = [row("a", sqnr_db=40.0), row("b", sqnr_db=41.0), row("c", sqnr_db=42.0),
            row("d", sqnr_db=10.0), row("e", sqnr_db=11.0)]
    policy = fq.Adaptive(metric="sqnr_db")
    assert policy.choose(rows) == {"a", "b", "c"}
    assert 11.0 < policy.theta(rows) < 40.0


def test_adaptive_propagated_mode():
    # isolated errors put the "h" rows low; propagated errors put the "l" rows low
    flipped = {"l1": 0.5, "l2": 0.4, "l3": 0.3, "h1": 1e-6, "h2": 2e-6}
    rows = [fq.ErrorRow(r.name, r.source, r.module_type, r.params, stats(flipped[r.name]), r.isolated)
            for r in CLUSTERS]
    assert fq.Adaptive(mode="propagated").choose(rows) == {"l1", "l2", "l3"}
    assert fq.Adaptive().choose(rows) == {"h1", "h2"}


def test_adaptive_equal_errors_do_not_depend_on_rounding():
    def names(v):
        return fq.Adaptive().choose([row("a", v), row("b", v), row("c", v)])

    assert names(0.3) == names(0.02)


def test_adaptive_one_row_trains_it():
    assert fq.Adaptive().theta([row("only", 0.3)]) is None
    assert fq.Adaptive().choose([row("only", 0.3)]) == {"only"}
    assert fq.Adaptive().choose([]) == set()


def test_adaptive_equals_threshold_at_its_theta():
    theta = fq.Adaptive().theta(CLUSTERS)
    assert fq.Threshold(theta).choose(CLUSTERS) == fq.Adaptive().choose(CLUSTERS)


def test_adaptive_rejects_bad_options():
    with pytest.raises(fq.ConfigError, match=r"Did you mean 'metric'\?"):
        fq.Adaptive(metrc="mse")
    with pytest.raises(fq.ConfigError, match="metric="):
        fq.Adaptive(metric="l1")


# -- badness orientation ------------------------------------------------------------------------------------
def test_badness_orientation_larger_is_worse():
    good, bad = row("g", 1e-4, sqnr_db=40.0, cosine=0.999), row("b", 1e-1, sqnr_db=10.0, cosine=0.9)
    for metric in ("mse", "cosine", "sqnr_db"):
        assert badness(good, metric, "isolated") < badness(bad, metric, "isolated")


# -- Selection ----------------------------------------------------------------------------------------------
def make_selection(**changes) -> fq.Selection:
    values = dict(trainable=("conv", "fc1"), frozen=("fc2",), trainable_params=120, total_params=300,
                  policy="Threshold(theta=0.01)", graph_id="abc123", sources={"conv": "features.0",
                  "fc1": "head.fc1", "fc2": "head.fc2"}, theta=None)
    values.update(changes)
    return fq.Selection(**values)


@pytest.mark.parametrize("theta", [None, 0.00123])
def test_selection_json_round_trip(theta):
    sel = make_selection(theta=theta)
    back = fq.Selection.from_json(sel.to_json())
    assert back == sel
    assert isinstance(back.trainable, tuple) and isinstance(back.frozen, tuple)
    assert back.trainable_fraction == pytest.approx(0.4)


def test_selection_trainable_fraction_with_no_params():
    assert make_selection(trainable_params=0, total_params=0).trainable_fraction == 0.0


@pytest.mark.parametrize("text", ["not json", "[]", "{}", "null", "42", '"sel"',
                                  '{"trainable": [], "frozen": []}',
                                  '{"trainable": 5, "frozen": [], "trainable_params": 0, "total_params": 0,'
                                  ' "policy": "", "graph_id": "", "sources": {}}'])
def test_selection_from_json_garbage_raises_input_error(text):
    with pytest.raises(fq.InputError, match="not a Selection document"):
        fq.Selection.from_json(text)


def test_selection_from_json_unknown_field_raises_input_error():
    import json

    data = json.loads(make_selection().to_json())
    data["extra"] = 1
    with pytest.raises(fq.InputError):
        fq.Selection.from_json(json.dumps(data))
