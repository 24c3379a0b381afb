"""The verdict rule on synthetic results with known answers (no training)."""

import math
from pathlib import Path

import pytest
import yaml

from shakespeare_gpt.tools.ablate.study import Study
from shakespeare_gpt.tools.ablate.verdicts import aggregate, contrast, evaluate
from shakespeare_gpt.utils import UserError


def results(spec: dict[tuple[str, float], list[float]], gaps: dict | None = None, unigram: float = 3.3) -> list[dict]:
    """Result rows with the given best val losses per (variant, lr), one row per seed."""
    rows = []
    for (variant, lr), vals in spec.items():
        for seed, v in enumerate(vals):
            gap = (gaps or {}).get((variant, lr), [0.0] * len(vals))[seed]
            rows.append(
                {
                    **{"variant": variant, "lr": lr, "seed": seed, "diverged": False, "steps": 100},
                    **{"best_val_loss": v, "final_val_loss": v, "best_train_loss": v - gap},
                    **{"final_train_loss": v - gap, "final_gap": gap, "unigram_val_loss": unigram, "seconds": 1.0},
                }
            )
    return rows


def study(folder: Path, claims: list[dict], variants=("a", "b"), lrs=(1e-3, 3e-3, 1e-2), **extra) -> Study:
    """A study of empty variants on one base config, written to ``folder/study.yaml`` and loaded."""
    (folder / "base.yaml").write_text("model:\n  n_layer: 1\n")
    raw = {"name": "synthetic", "base": "base.yaml", "learning_rates": list(lrs), "seeds": [0, 1, 2]}
    raw |= {"margin": 0.02, "variants": {v: [] for v in variants}, "claims": claims, **extra}
    (folder / "study.yaml").write_text(yaml.safe_dump(raw))
    return Study.load(folder / "study.yaml")


def verdict(tmp_path, claim: dict, spec, gaps=None) -> str:
    s = study(tmp_path, [{"id": 1, "claim": "c", **claim}])
    return evaluate(s, aggregate(results(spec, gaps)))[0].verdict


LR = 1e-3
FLAT = {lr: [2.0, 2.005, 1.995] for lr in (1e-3, 3e-3, 1e-2)}  # sd 0.005: 95% half-width 0.011
MIDDLE = {1e-3: [2.1, 2.105, 2.095], 3e-3: [2.0, 2.005, 1.995], 1e-2: [2.1, 2.105, 2.095]}  # best inside the grid


def grid(a: dict, b: dict) -> dict:
    return {**{("a", lr): v for lr, v in a.items()}, **{("b", lr): v for lr, v in b.items()}}


def shifted(points: dict, by: float) -> dict:
    return {lr: [x + by for x in v] for lr, v in points.items()}


def test_welch_interval_matches_the_textbook_case():
    # [1, 2, 3] vs [4, 5, 6]: d = -3, se = sqrt(1/3 + 1/3), df = 4, t(0.975, 4) = 2.776445
    est = contrast([(1, [1.0, 2.0, 3.0]), (-1, [4.0, 5.0, 6.0])])
    half = 2.776445105 * math.sqrt(2 / 3)
    assert (est.d, est.df) == pytest.approx((-3, 4))
    assert (est.lo, est.hi) == pytest.approx((-3 - half, -3 + half), abs=1e-6)
    est = contrast([(1, [0.0, 2.0]), (-1, [0.0, 0.0, 3.0])])  # unequal variances and sizes
    va, vb = 2.0 / 2, 3.0 / 3
    assert est.df == pytest.approx((va + vb) ** 2 / (va**2 / 1 + vb**2 / 2))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([1.0, 2.5, 3.0], [4.0, 5.0, 6.5, 4.2]),
        ([2.01, 2.03, 1.99, 2.0, 2.02, 1.98], [2.1, 2.0]),
        ([0.0, 1.0], [5.0, 9.0]),
    ],
)
def test_two_sample_interval_is_scipys_welch_t_test(a, b):
    from scipy.stats import ttest_ind

    ci = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    est = contrast([(1, a), (-1, b)])
    assert (est.lo, est.hi) == pytest.approx((ci.low, ci.high), rel=1e-9)


@pytest.mark.parametrize(
    ("expect", "shift", "answer"),
    [
        ("lower", -0.1, "supported"),  # a clearly lower
        ("lower", +0.1, "contradicted"),  # a clearly higher
        ("lower", -0.005, "inconclusive"),  # within the seeds' noise
        ("higher", +0.1, "supported"),
        ("higher", -0.1, "contradicted"),
        ("equal", 0.0, "supported"),  # interval inside +-0.02
        ("equal", 0.2, "contradicted"),  # interval wholly beyond the margin
        ("equal", 0.025, "inconclusive"),  # interval across the margin
        ("not_lower", 0.0, "supported"),
        ("not_lower", -0.2, "contradicted"),
        ("not_lower", -0.025, "inconclusive"),
        ("not_higher", 0.0, "supported"),
        ("not_higher", 0.2, "contradicted"),
        ("not_higher", 0.025, "inconclusive"),
    ],
)
def test_verdicts_follow_the_interval_rule(tmp_path, expect, shift, answer):
    assert verdict(tmp_path, {"compare": ["a", "b"], "expect": expect}, grid(shifted(FLAT, shift), FLAT)) == answer


def test_one_seed_or_seeds_that_agree_exactly_give_no_interval_and_no_verdict(tmp_path):
    s = study(tmp_path, [{"id": 1, "claim": "c", "compare": ["a", "b"]}], lrs=[LR])
    (v,) = evaluate(s, aggregate(results({("a", LR): [1.0], ("b", LR): [2.0]})))
    assert v.verdict == "inconclusive" and "no interval" in str(v.tests[0].estimate)
    same = {lr: [2.0, 2.0, 2.0] for lr in FLAT}
    assert verdict(tmp_path, {"compare": ["a", "b"]}, grid(shifted(same, -0.1), same)) == "inconclusive"


def test_every_lr_is_contradicted_by_one_rate_and_supported_only_by_all(tmp_path):
    a = shifted(FLAT, -0.1)
    assert verdict(tmp_path, {"compare": ["a", "b"], "at": "every_lr"}, grid(a, FLAT)) == "supported"
    a[1e-2] = [x + 0.1 for x in FLAT[1e-2]]  # worse at one rate
    assert verdict(tmp_path, {"compare": ["a", "b"], "at": "every_lr"}, grid(a, FLAT)) == "contradicted"
    a[1e-2] = list(FLAT[1e-2])  # no difference at one rate
    assert verdict(tmp_path, {"compare": ["a", "b"], "at": "every_lr"}, grid(a, FLAT)) == "inconclusive"


def test_an_effect_that_changes_with_the_rate_contradicts_a_claim_of_no_dependence(tmp_path):
    claim = {"compare": ["a", "b"], "at": "across_lr", "expect": "equal"}
    same = shifted(FLAT, -0.1)  # a helps by 0.1 at every rate
    assert verdict(tmp_path, claim, grid(same, FLAT)) == "supported"
    flips = {**same, 1e-2: [x + 0.1 for x in FLAT[1e-2]]}  # helps at two rates, hurts at the third
    assert verdict(tmp_path, claim, grid(flips, FLAT)) == "contradicted"


def test_lr_spread_compares_worst_minus_best(tmp_path):
    steady = {1e-3: [2.0, 2.01, 1.99], 3e-3: [2.02, 2.03, 2.01], 1e-2: [2.05, 2.06, 2.04]}
    fragile = {1e-3: [2.0, 2.01, 1.99], 3e-3: [2.2, 2.21, 2.19], 1e-2: [2.5, 2.51, 2.49]}
    claim = {"compare": ["a", "b"], "metric": "lr_spread", "expect": "lower"}
    assert verdict(tmp_path, claim, grid(steady, fragile)) == "supported"
    assert verdict(tmp_path, claim, grid(fragile, steady)) == "contradicted"


def test_gap_metric_reads_the_gaps(tmp_path):
    gaps = {("a", lr): [0.01, 0.011, 0.009] for lr in FLAT} | {("b", lr): [0.1, 0.11, 0.09] for lr in FLAT}
    claim = {"compare": ["a", "b"], "metric": "gap", "at": "every_lr"}
    assert verdict(tmp_path, claim, grid(FLAT, FLAT), gaps) == "supported"
    assert verdict(tmp_path, {**claim, "metric": "val"}, grid(FLAT, FLAT), gaps) == "inconclusive"


def test_a_claim_of_several_comparisons_needs_all_and_takes_the_claims_fields(tmp_path):
    claim = {"id": 5, "claim": "c", "expect": "higher", "all": [{"compare": ["b", "a"]}, {"compare": ["b", "c"]}]}
    s = study(tmp_path, [claim], variants=("a", "b", "c"))
    better = shifted(FLAT, -0.1)
    spec = {**grid(better, FLAT), **{("c", lr): v for lr, v in better.items()}}
    assert evaluate(s, aggregate(results(spec)))[0].verdict == "supported"
    spec.update({("c", lr): v for lr, v in FLAT.items()})  # c no different from b
    assert evaluate(s, aggregate(results(spec)))[0].verdict == "inconclusive"


def test_a_claim_on_a_variant_without_results_is_not_run_and_no_shared_rate_is_not_testable(tmp_path):
    s = study(tmp_path, [{"id": 1, "claim": "c", "compare": ["a", "b"]}])
    (v,) = evaluate(s, aggregate(results({("a", LR): [1.0, 1.1]})))
    assert (v.verdict, v.note) == ("not run", "needs variants: b")
    spec = {("a", 1e-3): [2.0, 2.1], ("b", 1e-2): [2.0, 2.1]}
    assert verdict(tmp_path, {"compare": ["a", "b"], "at": "every_lr"}, spec) == "not testable"


def rising(variant: str, best: list[float], rises: list[float], lr: float = LR) -> list[dict]:
    """Rows of runs whose val loss fell to ``best`` and then rose by ``rises`` (final = best + rise)."""
    rows = results({(variant, lr): best})
    for r, rise in zip(rows, rises, strict=True):
        r["final_val_loss"] = r["best_val_loss"] + rise
    return rows


def test_overfit_is_final_val_minus_best_val_judged_against_the_declared_threshold(tmp_path):
    rows = rising("a", [1.6, 1.62, 1.61], [0.10, 0.12, 0.11]) + rising("b", [1.7, 1.71, 1.69], [0.0, 0.01, 0.005])
    table = aggregate(rows)
    assert table["a"][LR].overfits == pytest.approx([0.10, 0.12, 0.11])
    sharp = {"metric": "overfit", "expect": "higher", "by": 0.05}
    s = study(tmp_path, [{"claim": "c", "compare": ["a"], **sharp}, {"claim": "d", "compare": ["b"], **sharp}])
    rises, flat = evaluate(s, table)
    # By hand: mean 0.11, sd 0.01, n 3: 0.11 +- t(0.975, 2) 4.3027 * 0.01 / sqrt(3) = [0.0852, 0.1348], above 0.05.
    (t,) = rises.tests
    assert (t.estimate.d, t.estimate.lo, t.estimate.hi) == pytest.approx((0.11, 0.08516, 0.13484), abs=1e-4)
    assert rises.verdict == "supported"  # a rise past the threshold: sharp overfitting
    assert flat.verdict == "contradicted"  # [-0.0074, 0.0174]: below 0.05, whether or not it rose at all
    bigger = {"claim": "e", "compare": ["a", "b"], **sharp}  # a's rise minus b's: 0.105 [0.077, 0.133]
    assert evaluate(study(tmp_path, [bigger]), table)[0].verdict == "supported"
    assert evaluate(study(tmp_path, [{**bigger, "compare": ["b", "a"]}]), table)[0].verdict == "contradicted"


def test_a_claim_on_one_variant_takes_the_overfit_metric_only(tmp_path):
    with pytest.raises(UserError, match=r"compare \[a\] \(one variant\) takes metric overfit at best_lr"):
        study(tmp_path, [{"claim": "c", "compare": ["a"], "expect": "higher"}])
