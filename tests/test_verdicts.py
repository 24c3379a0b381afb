"""The study's verdict rule and its rounds, on synthetic results with known answers (no training)."""

import math

import pytest
import yaml

from shakespeare_gpt.errors import UserError
from shakespeare_gpt.tools.report import aggregate, contrast, evaluate, plan, read_csv, write_csv
from shakespeare_gpt.tools.study import Run, Study


def results(spec: dict[tuple[str, float], list[float]], gaps: dict | None = None, unigram: float = 3.3) -> list[dict]:
    """Result rows with the given best val losses per (variant, lr), one row per seed."""
    rows = []
    for (variant, lr), vals in spec.items():
        for seed, v in enumerate(vals):
            gap = (gaps or {}).get((variant, lr), [0.0] * len(vals))[seed]
            rows.append(
                {
                    "variant": variant,
                    "lr": lr,
                    "seed": seed,
                    "diverged": False,
                    "steps": 100,
                    "best_val_loss": v,
                    "final_val_loss": v,
                    "best_train_loss": v - gap,
                    "final_train_loss": v - gap,
                    "final_gap": gap,
                    "unigram_val_loss": unigram,
                    "seconds": 1.0,
                }
            )
    return rows


def study(tmp_path, claims: list[dict], variants=("a", "b"), lrs=(1e-3, 3e-3, 1e-2), **extra) -> Study:
    (tmp_path / "base.yaml").write_text("model:\n  n_layer: 1\n")
    raw = {
        "name": "synthetic",
        "base": "base.yaml",
        "learning_rates": list(lrs),
        "seeds": [0, 1, 2],
        "margin": 0.02,
        "variants": {v: [] for v in variants},
        "claims": claims,
        **extra,
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    return Study.load(tmp_path / "study.yaml")


def verdict(tmp_path, claim: dict, spec, gaps=None) -> str:
    s = study(tmp_path, [{"id": 1, "claim": "c", **claim}])
    return evaluate(s, aggregate(results(spec, gaps)))[0].verdict


def test_welch_interval_matches_the_textbook_case():
    # [1, 2, 3] vs [4, 5, 6]: d = -3, se = sqrt(1/3 + 1/3), df = 4, t(0.975, 4) = 2.776445
    est = contrast([(1, [1.0, 2.0, 3.0]), (-1, [4.0, 5.0, 6.0])])
    half = 2.776445105 * math.sqrt(2 / 3)
    assert est.d == pytest.approx(-3)
    assert est.df == pytest.approx(4)
    assert (est.lo, est.hi) == pytest.approx((-3 - half, -3 + half), abs=1e-6)
    # Unequal variances and sizes: Welch-Satterthwaite's df
    est = contrast([(1, [0.0, 2.0]), (-1, [0.0, 0.0, 3.0])])
    va, vb = 2.0 / 2, 3.0 / 3
    assert est.df == pytest.approx((va + vb) ** 2 / (va**2 / 1 + vb**2 / 2))


LR = 1e-3
FLAT = {lr: [2.0, 2.005, 1.995] for lr in (1e-3, 3e-3, 1e-2)}  # sd 0.005: 95% half-width 0.011


MIDDLE = {1e-3: [2.1, 2.105, 2.095], 3e-3: [2.0, 2.005, 1.995], 1e-2: [2.1, 2.105, 2.095]}  # best inside the grid


def grid(a: dict, b: dict) -> dict:
    return {**{("a", lr): v for lr, v in a.items()}, **{("b", lr): v for lr, v in b.items()}}


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
        ("not_higher", 0.2, "contradicted"),
    ],
)
def test_verdicts_follow_the_interval_rule(tmp_path, expect, shift, answer):
    a = {lr: [x + shift for x in v] for lr, v in FLAT.items()}
    spec = grid(a, FLAT)
    assert verdict(tmp_path, {"compare": ["a", "b"], "expect": expect}, spec) == answer


def test_a_single_seed_gives_no_interval_and_no_verdict(tmp_path):
    spec = {("a", LR): [1.0], ("b", LR): [2.0]}
    s = study(tmp_path, [{"id": 1, "claim": "c", "compare": ["a", "b"]}], lrs=[LR])
    (v,) = evaluate(s, aggregate(results(spec)))
    assert v.verdict == "inconclusive"
    assert "no interval" in str(v.tests[0].estimate)


def test_every_lr_is_contradicted_by_one_rate_and_supported_only_by_all(tmp_path):
    a = {lr: [x - 0.1 for x in v] for lr, v in FLAT.items()}
    assert verdict(tmp_path, {"compare": ["a", "b"], "at": "every_lr"}, grid(a, FLAT)) == "supported"
    a[1e-2] = [x + 0.1 for x in FLAT[1e-2]]  # worse at one rate
    assert verdict(tmp_path, {"compare": ["a", "b"], "at": "every_lr"}, grid(a, FLAT)) == "contradicted"
    a[1e-2] = list(FLAT[1e-2])  # no difference at one rate
    assert verdict(tmp_path, {"compare": ["a", "b"], "at": "every_lr"}, grid(a, FLAT)) == "inconclusive"


def test_an_effect_that_changes_with_the_rate_contradicts_a_claim_of_no_dependence(tmp_path):
    claim = {"compare": ["a", "b"], "at": "across_lr", "expect": "equal"}
    same = {lr: [x - 0.1 for x in v] for lr, v in FLAT.items()}  # a helps by 0.1 at every rate
    assert verdict(tmp_path, claim, grid(same, FLAT)) == "supported"
    flips = dict(same)
    flips[1e-2] = [x + 0.1 for x in FLAT[1e-2]]  # helps at two rates, hurts at the third
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


def test_a_claim_of_several_comparisons_needs_all(tmp_path):
    s = study(
        tmp_path,
        [{"id": 5, "claim": "c", "all": [{"compare": ["a", "b"]}, {"compare": ["c", "b"]}]}],
        variants=("a", "b", "c"),
    )
    better = {lr: [x - 0.1 for x in v] for lr, v in FLAT.items()}
    spec = {**grid(better, FLAT), **{("c", lr): v for lr, v in better.items()}}
    assert evaluate(s, aggregate(results(spec)))[0].verdict == "supported"
    spec.update({("c", lr): v for lr, v in FLAT.items()})  # c no different from b
    assert evaluate(s, aggregate(results(spec)))[0].verdict == "inconclusive"


def test_a_claim_on_a_variant_without_results_is_not_run(tmp_path):
    s = study(tmp_path, [{"id": 1, "claim": "c", "compare": ["a", "b"]}])
    (v,) = evaluate(s, aggregate(results({("a", LR): [1.0, 1.1]})))
    assert (v.verdict, v.note) == ("not run", "needs variants: b")


# --- the rounds ---


def test_plan_extends_a_grid_at_the_end_where_the_variant_is_best(tmp_path):
    s = study(tmp_path, [], extend_grid=2)
    base = set(s.runs())
    assert set(plan(s, [])[0]) == base
    falling = {1e-3: [2.3] * 3, 3e-3: [2.2] * 3, 1e-2: [2.1] * 3}  # best at the top end
    runs, notes = plan(s, results(grid(falling, MIDDLE)))
    assert set(runs) - base == {Run("a", 0.033, seed) for seed in (0, 1, 2)}  # 1e-2 * (1e-2 / 3e-3)
    assert notes == ["a is best at lr 0.01, an end of its grid: lr 0.033 added"]
    # Still best at the new end: one more, then no further (extend_grid: 2)
    falling[0.033] = [2.0] * 3
    runs, _ = plan(s, results(grid(falling, MIDDLE)))
    assert {r.lr for r in runs if r.variant == "a"} == {1e-3, 3e-3, 1e-2, 0.033, 0.11}
    falling[0.11] = [1.9] * 3
    runs, _ = plan(s, results(grid(falling, MIDDLE)))
    assert {r.lr for r in runs if r.variant == "a"} == {1e-3, 3e-3, 1e-2, 0.033, 0.11}


def test_plan_leaves_a_variant_that_fails_to_train_alone(tmp_path):
    s = study(tmp_path, [], extend_grid=2)
    stuck = {1e-3: [3.5] * 3, 3e-3: [3.4] * 3, 1e-2: [3.35] * 3}  # never below the unigram loss 3.3
    runs, notes = plan(s, results(grid(stuck, MIDDLE)))
    assert set(runs) == set(s.runs())
    assert notes == ["a fails to train (no lr beats the unigram loss): its grid is not extended"]


def test_plan_adds_seeds_where_an_interval_straddles_its_threshold(tmp_path):
    claims = [{"id": 1, "claim": "c", "compare": ["a", "b"]}]
    s = study(tmp_path, claims, max_seeds=5)
    close = {lr: [x - 0.004 for x in v] for lr, v in FLAT.items()}  # within noise
    runs, notes = plan(s, results(grid(close, FLAT)))
    extra = set(runs) - set(s.runs())
    assert {(r.variant, r.seed) for r in extra} == {(v, seed) for v in "ab" for seed in (3, 4)}
    assert len({r.lr for r in extra}) == 1  # at the best learning rates only
    assert "straddles its threshold" in notes[0]
    clear = {lr: [x - 0.1 for x in v] for lr, v in FLAT.items()}
    assert set(plan(s, results(grid(clear, FLAT)))[0]) == set(s.runs())


def test_csv_round_trip_keeps_every_number(tmp_path):
    s = study(tmp_path, [])
    rows = results(grid(FLAT, FLAT))
    for r in rows:
        r["best_val_loss"] += 1e-13  # full precision
    write_csv(rows, tmp_path / "results.csv")
    back = read_csv(tmp_path / "results.csv", s)
    key = ("variant", "lr", "seed", "best_val_loss", "final_gap", "diverged", "steps")
    assert [{k: r[k] for k in key} for r in back] == [{k: r[k] for k in key} for r in rows]


# --- claims in the study file ---


@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        ({"compare": ["a", "bb"]}, "compare names bb, which is not a variant of the study (did you mean b?)"),
        ({"compare": ["a"]}, "compare [a]: give two variants"),
        ({"compare": [["a"], "b"]}, "give two variants, e.g. compare: [baseline, no_ffwd]"),
        ({"compare": ["a", "a"]}, "compare [a, a] compares a variant with itself"),
        ({"compare": ["a", "b"], "expect": "smaller"}, "expect smaller: give one of lower, higher, equal, not_lower"),
        ({"compare": ["a", "b"], "metric": "loss"}, "metric loss: give one of val, gap, lr_spread"),
        ({"compare": ["a", "b"], "direction": "lower"}, "unknown field direction; a claim has id, claim, compare"),
    ],
)
def test_a_bad_claim_is_one_line(tmp_path, claim, expected):
    with pytest.raises(UserError, match="claim 1") as e:
        study(tmp_path, [{"id": 1, "claim": "c", **claim}])
    assert expected in str(e.value)


def test_extend_grid_with_one_learning_rate_is_one_line(tmp_path):
    with pytest.raises(UserError, match="extend_grid 1 needs two learning rates or more"):
        study(tmp_path, [], lrs=[1e-3], extend_grid=1)


def test_a_claim_of_no_effect_needs_a_margin(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  n_layer: 1\n")
    raw = {
        "name": "s",
        "base": "base.yaml",
        "learning_rates": [1e-3],
        "seeds": [0],
        "variants": {"a": [], "b": []},
        "claims": [{"id": 1, "claim": "c", "compare": ["a", "b"], "expect": "equal"}],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="needs an equivalence margin: add e.g. margin: 0.02"):
        Study.load(tmp_path / "study.yaml")


@pytest.mark.parametrize(
    ("expect", "shift", "answer"),
    [("not_higher", 0.0, "supported"), ("not_lower", -0.025, "inconclusive"), ("not_higher", 0.025, "inconclusive")],
)
def test_one_sided_claims_of_no_effect(tmp_path, expect, shift, answer):
    a = {lr: [x + shift for x in v] for lr, v in FLAT.items()}
    assert verdict(tmp_path, {"compare": ["a", "b"], "expect": expect}, grid(a, FLAT)) == answer


def test_seeds_that_agree_exactly_give_no_interval(tmp_path):
    same = {lr: [2.0, 2.0, 2.0] for lr in FLAT}
    lower = {lr: [1.9, 1.9, 1.9] for lr in FLAT}
    assert verdict(tmp_path, {"compare": ["a", "b"]}, grid(lower, same)) == "inconclusive"


def test_a_comparison_with_no_shared_rate_is_not_testable(tmp_path):
    spec = {("a", 1e-3): [2.0, 2.1], ("b", 1e-2): [2.0, 2.1]}
    assert verdict(tmp_path, {"compare": ["a", "b"], "at": "every_lr"}, spec) == "not testable"


def test_plan_extends_at_the_low_end_too(tmp_path):
    s = study(tmp_path, [], extend_grid=1)
    rising = {1e-3: [2.0] * 3, 3e-3: [2.1] * 3, 1e-2: [2.2] * 3}  # best at the bottom end
    runs, notes = plan(s, results(grid(rising, MIDDLE)))
    assert {r.lr for r in runs if r.variant == "a"} == {0.00033, 1e-3, 3e-3, 1e-2}
    assert notes == ["a is best at lr 0.001, an end of its grid: lr 0.00033 added"]


def test_planning_to_the_end_never_drops_a_finished_run(tmp_path):
    """The runner's loop on a synthetic study: extra seeds that settle a verdict stay in it."""
    claims = [{"id": 1, "claim": "c", "compare": ["a", "b"]}]
    s = study(tmp_path, claims, extend_grid=2, max_seeds=8)

    def loss(r: Run) -> float:  # a slightly better than b at its best lr, noisy seeds; best inside the grids
        noise = [0.0, 0.012, -0.012, 0.006, -0.006, 0.003, -0.003, 0.0][r.seed]
        return 2.0 + abs(math.log10(r.lr / 3e-3)) * 0.1 + noise - (0.008 if r.variant == "a" else 0)

    done: dict[Run, dict] = {}
    for _ in range(10):
        wanted, _ = plan(s, list(done.values()))
        todo = [r for r in wanted if r not in done]
        if not todo:
            break
        for r in todo:
            (row,) = results({(r.variant, r.lr): [loss(r)]})
            done[r] = {**row, "seed": r.seed}
    final, notes = plan(s, list(done.values()))
    assert set(done) <= set(final)  # nothing finished is dropped
    assert max(r.seed for r in done) >= 3  # the straddling interval did get more seeds
    assert set(final) == set(done)  # and the plan came to rest
    # The report still says why those seeds were run, though their interval no longer straddles.
    assert not any("straddles" in n for n in notes)
    assert notes[-1] == (
        "more seeds for a lr 0.003, b lr 0.003: an interval behind them straddled its threshold in an earlier "
        "round; with those seeds it no longer does"
    )


def test_the_report_shows_each_verdict_with_its_numbers(tmp_path):
    from shakespeare_gpt.tools.report import write_report

    claims = [{"id": 4, "claim": "a beats b.", "compare": ["a", "b"]}]
    s = study(tmp_path, claims)
    better = {lr: [x - 0.1 for x in v] for lr, v in FLAT.items()}
    path = write_report(s, results(grid(better, FLAT)), tmp_path / "report", str(tmp_path / "study.yaml"), "abc123")
    text = path.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    assert row.startswith(
        "| 4 | a beats b. | **supported** | a vs b, val lower, at best lrs (0.001, 0.001): d = -0.1000 ["
    )
    assert "a 1.9000 (sd 0.0050, n=3) at lr 0.001 - b 2.0000 (sd 0.0050, n=3) at lr 0.001" in row
    assert "this report written at `abc123`" in text and "Study file sha256 `" in text


def test_report_only_refuses_a_csv_computed_with_other_settings(tmp_path):
    s = study(tmp_path, [])
    rows = results(grid(FLAT, FLAT))
    for r in rows:
        r["settings"] = s.settings(Run(r["variant"], r["lr"], r["seed"]))
    write_csv(rows, tmp_path / "results.csv")
    assert len(read_csv(tmp_path / "results.csv", s)) == len(rows)
    (tmp_path / "base.yaml").write_text("model:\n  n_layer: 2\n")  # the base config changed since
    with pytest.raises(UserError, match=r"line 2: a at lr 0.001, seed 0 was computed with other settings"):
        read_csv(tmp_path / "results.csv", s)
    write_csv(rows + rows[:1], tmp_path / "results.csv")
    (tmp_path / "base.yaml").write_text("model:\n  n_layer: 1\n")
    with pytest.raises(UserError, match=r"line \d+: the run \('a', 0.001, 0\) is also on line 2: each run once"):
        read_csv(tmp_path / "results.csv", s)


def test_a_study_named_under_also_joins_the_report_and_says_when_it_is_not_finished(tmp_path):
    from shakespeare_gpt.tools.report import write_report

    (tmp_path / "big").mkdir()
    claims = [{"id": 10, "claim": "a beats b at full scale.", "compare": ["a", "b"]}]
    big = study(tmp_path / "big", claims, name="big")
    s = study(tmp_path, [{"id": 4, "claim": "a beats b.", "compare": ["a", "b"]}], also=["big/study.yaml"])
    better = {lr: [x - 0.1 for x in v] for lr, v in FLAT.items()}
    reports = tmp_path / "reports"

    def report() -> str:
        return write_report(
            s, results(grid(better, FLAT)), reports / "synthetic", str(tmp_path / "study.yaml")
        ).read_text()

    assert "## Also: big (`study.yaml`)\n\nNot yet measured: there is no `big/results.csv`" in report()
    rows = results(grid(better, MIDDLE))
    for r in rows:
        r["settings"] = big.settings(Run(r["variant"], r["lr"], r["seed"]))
    write_csv(rows[:-1], reports / "big" / "results.csv")  # one run of 18 to go
    text = report()
    assert "17 runs; machine(s): not recorded" in text
    assert "**Not finished:** 1 of the 18 runs it plans so far have not run; verdicts may change." in text
    assert "| 10 | a beats b at full scale. | **" in text
    write_csv(rows, reports / "big" / "results.csv")
    text = report()
    assert "18 runs; machine(s)" in text and "Not finished" not in text
    assert "| 10 | a beats b at full scale. | **supported** |" in text
