"""The statistics behind the verdicts: each claim's comparisons as differences of means with 95% Welch
intervals, judged by the rule the report states (``report.RULE``)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from ...utils import UserError
from .study import Claim, Comparison, Study

LEVEL = 0.95


@dataclass
class Point:
    """The runs of one variant at one learning rate."""

    vals: list[float]  # best val loss of each seed
    gaps: list[float]  # final val - final train of each seed
    overfits: list[float]  # final val - best val of each seed: how far val loss rose after its lowest point
    diverged: int  # seeds whose loss became NaN or infinite (reported from their validations before)
    final_val: float
    best_train: float
    final_train: float
    unigram: float

    def __post_init__(self) -> None:
        self.n, self.val, self.gap = len(self.vals), statistics.mean(self.vals), statistics.mean(self.gaps)
        self.val_sd, self.gap_sd = (statistics.stdev(x) if self.n > 1 else math.nan for x in (self.vals, self.gaps))

    def samples(self, metric: str) -> list[float]:
        return {"gap": self.gaps, "overfit": self.overfits}.get(metric, self.vals)


Table = dict[str, dict[float, Point]]  # variant -> lr -> point


def aggregate(results: list[dict]) -> Table:
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["variant"], float(r["lr"]))].append(r)
    table: Table = defaultdict(dict)
    for (variant, lr), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        table[variant][lr] = Point(
            vals=[r["best_val_loss"] for r in rs],
            gaps=[r["final_gap"] for r in rs],
            overfits=[r["final_val_loss"] - r["best_val_loss"] for r in rs],
            diverged=sum(bool(r.get("diverged")) for r in rs),
            final_val=statistics.mean(r["final_val_loss"] for r in rs),
            best_train=statistics.mean(r["best_train_loss"] for r in rs),
            final_train=statistics.mean(r["final_train_loss"] for r in rs),
            unigram=statistics.mean(r["unigram_val_loss"] for r in rs),
        )
    return dict(table)


def best_lr(points: dict[float, Point], grid: list[float] | None = None) -> float:
    return min(grid if grid is not None else points, key=lambda lr: points[lr].val)


def fails_to_train(points: dict[float, Point]) -> bool:
    """At no learning rate is the mean best val loss below the unigram loss (predicting each character by
    its frequency in the training text)."""
    return all(p.val >= p.unigram for p in points.values())


@dataclass
class Estimate:
    """A difference of means with its 95% Welch interval (``lo``/``hi`` are NaN without seed variance)."""

    d: float
    lo: float
    hi: float
    df: float

    def __str__(self) -> str:
        if math.isnan(self.lo):
            return f"{self.d:+.4f} (no interval: a point has 1 seed, or seeds that agree exactly)"
        return f"{self.d:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}]"


def t_quantile(p: float, df: float) -> float:
    try:
        from scipy.stats import t
    except ImportError:
        raise UserError('the report\'s intervals need scipy: pip install -e ".[report]"') from None
    return float(t.ppf(p, df))


def contrast(terms: list[tuple[float, list[float]]]) -> Estimate:
    """sum(c * mean(x)) over independent samples x, with a Welch-Satterthwaite 95% interval."""
    d = sum(c * statistics.mean(xs) for c, xs in terms)
    if any(len(xs) < 2 for _, xs in terms):
        return Estimate(d, math.nan, math.nan, math.nan)
    parts = [c * c * statistics.variance(xs) / len(xs) for c, xs in terms]
    var = sum(parts)
    if var == 0:  # seeds that agree exactly say nothing about the noise
        return Estimate(d, math.nan, math.nan, math.nan)
    df = var * var / sum(v * v / (len(xs) - 1) for v, (_, xs) in zip(parts, terms, strict=True))
    half = t_quantile(0.5 + LEVEL / 2, df) * math.sqrt(var)
    return Estimate(d, d - half, d + half, df)


def judge(expect: str, est: Estimate, margin: float | None, by: float) -> str:
    """supported / contradicted / inconclusive, by the rule in ``report.RULE``."""
    lo, hi = est.lo, est.hi
    if math.isnan(lo):
        return "inconclusive"
    m = margin or 0.0
    rules = {  # (supported when, contradicted when)
        "lower": (hi < -by, lo > -by),
        "higher": (lo > by, hi < by),
        "equal": (-m < lo and hi < m, lo > m or hi < -m),
        "not_lower": (lo > -m, hi < -m),
        "not_higher": (hi < m, lo > m),
    }
    supported, contradicted = rules[expect]
    return "supported" if supported else "contradicted" if contradicted else "inconclusive"


def combine(verdicts: list[str]) -> str:
    if not verdicts or "not testable" in verdicts:
        return "not testable"
    if "contradicted" in verdicts:
        return "contradicted"
    return "supported" if all(v == "supported" for v in verdicts) else "inconclusive"


@dataclass
class Test:
    """One interval behind a verdict: its comparison, what it compares, its estimate and verdict, its points."""

    part: Comparison
    label: str
    estimate: Estimate
    verdict: str
    points: list[tuple[str, float]]


@dataclass
class Verdict:
    claim: Claim
    verdict: str  # supported / contradicted / inconclusive / not testable / not run
    tests: list[Test] = field(default_factory=list)
    note: str = ""


def compare(table: Table, part: Comparison, margin: float | None) -> list[Test]:
    """The tests of one comparison: one, or one per learning rate."""
    a, b, metric = table[part.a], table[part.b or part.a], part.metric
    shared = sorted(set(a) & set(b))
    tests = []

    def test(label: str, terms: list[tuple[float, str, float]]) -> None:
        est = contrast([(c, table[v][lr].samples(metric)) for c, v, lr in terms])
        verdict = judge(part.expect, est, margin, part.by)
        tests.append(Test(part, label, est, verdict, [(v, lr) for _, v, lr in terms]))

    if part.b is None:  # one variant's metric against the threshold ``by``
        la = best_lr(a)
        test(f"at its best lr ({la:g})", [(1, part.a, la)])
    elif part.metric == "lr_spread":
        if len(shared) < 2:
            return []
        worst = {v: max(shared, key=lambda lr, v=v: table[v][lr].val) for v in part.compare}
        best = {v: best_lr(table[v], shared) for v in part.compare}
        label = ", ".join(f"{v}: lr {worst[v]:g} minus lr {best[v]:g}" for v in part.compare)
        a_terms = [(1, part.a, worst[part.a]), (-1, part.a, best[part.a])]
        test(f"spread {label}", [*a_terms, (-1, part.b, worst[part.b]), (1, part.b, best[part.b])])
    elif part.at == "best_lr":
        la, lb = best_lr(a), best_lr(b)
        test(f"at best lrs ({la:g}, {lb:g})", [(1, part.a, la), (-1, part.b, lb)])
    elif part.at == "every_lr":
        for lr in shared:
            test(f"lr {lr:g}", [(1, part.a, lr), (-1, part.b, lr)])
    else:  # across_lr: the effect at each rate against the effect at the grid's middle rate (fixed, not chosen)
        if len(shared) < 2:
            return []
        ref = shared[(len(shared) - 1) // 2]
        for lr in shared:
            if lr != ref:
                test(f"lr {lr:g} vs {ref:g}", [(1, part.a, lr), (-1, part.b, lr), (-1, part.a, ref), (1, part.b, ref)])
    return tests


def evaluate(study: Study, table: Table) -> list[Verdict]:
    """A verdict on each claim of ``study`` from the points in ``table``."""
    out = []
    for claim in study.claims:
        missing = sorted({v for p in claim.parts for v in p.compare if v not in table})
        if missing:
            out.append(Verdict(claim, "not run", note=f"needs variants: {', '.join(missing)}"))
            continue
        tests = [compare(table, part, study.margin) for part in claim.parts]
        verdict = combine([combine([t.verdict for t in part_tests]) for part_tests in tests])
        out.append(Verdict(claim, verdict, [t for part_tests in tests for t in part_tests]))
    return out
