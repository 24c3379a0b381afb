"""The ablation report: every run as a CSV, tables, plots, and a verdict on each claim of the study file.

Everything here reads the per-run results (``result.json`` files, or the CSV they are collected
into), so ``ablate --report-only`` re-derives every verdict from a committed CSV.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .study import Claim, Comparison, Run, Study

LEVEL = 0.95
RULE = (
    "Each comparison is a difference d = metric(a) - metric(b) between two variants, estimated from the "
    "seeds' means, with a 95% interval from Welch's t (standard error from each point's seed-to-seed "
    "variance, degrees of freedom by Welch-Satterthwaite; a difference of several points' means, as in "
    "lr_spread and across_lr, uses the same formula over all of them). The interval decides: a claim that "
    "a is lower (higher) is supported when the interval lies below (above) zero, contradicted when it lies "
    "above (below) zero, inconclusive when it contains zero. A claim of no effect (equal) is supported "
    "when the interval lies inside +-margin, contradicted when it lies wholly outside it, inconclusive "
    "otherwise; not_lower (not_higher) is supported when the interval lies above -margin (below +margin) "
    "and contradicted when it lies wholly below -margin (above +margin). A claim tested at every learning "
    "rate, or made of several comparisons, is supported when every test is, contradicted when any test is, "
    "inconclusive otherwise. A point with one seed, or with no spread between its seeds, gives no interval "
    "and so no verdict; a comparison with no learning rate both variants ran is not testable. "
    "A variant's best learning rate is the one with the lowest mean best val loss (and its worst, in "
    "lr_spread, the highest); across_lr compares each rate with the grid's middle rate. What the intervals "
    "do not allow for: the best and worst rates are chosen on the same runs; a claim tested at several "
    "rates or by several comparisons is contradicted by any one of them, with no correction for "
    "multiplicity; points whose intervals straddled got more seeds and were looked at again (two looks); "
    "an equivalence supported by a 95% interval is a two one-sided test at 2.5% each side, stricter than "
    "the common 90% interval."
)
COLUMNS = (
    "variant",
    "lr",
    "seed",
    "diverged",
    "steps",
    "best_val_loss",
    "final_val_loss",
    "best_train_loss",
    "final_train_loss",
    "final_gap",
    "unigram_val_loss",
    "seconds",
    "commit",
    "machine",
    "settings",
)


@dataclass
class Point:
    """The runs of one variant at one learning rate."""

    vals: list[float]  # best val loss of each seed
    gaps: list[float]  # final val - final train of each seed
    diverged: int  # seeds whose loss became NaN or infinite (reported from their validations before)
    final_val: float
    best_train: float
    final_train: float
    unigram: float

    @property
    def n(self) -> int:
        return len(self.vals)

    @property
    def val(self) -> float:
        return statistics.mean(self.vals)

    @property
    def val_sd(self) -> float:
        return statistics.stdev(self.vals) if self.n > 1 else math.nan

    @property
    def gap(self) -> float:
        return statistics.mean(self.gaps)

    @property
    def gap_sd(self) -> float:
        return statistics.stdev(self.gaps) if self.n > 1 else math.nan

    def samples(self, metric: str) -> list[float]:
        return self.vals if metric == "val" else self.gaps


Table = dict[str, dict[float, Point]]


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
    """The study's test of "fails to train": at no learning rate is its mean best val loss below the
    unigram loss (the val loss of predicting each character by its frequency in the training text)."""
    return all(p.val >= p.unigram for p in points.values())


# --- intervals and verdicts ---


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


def judge(expect: str, est: Estimate, margin: float | None) -> str:
    """supported / contradicted / inconclusive, by the rule in ``RULE``."""
    lo, hi = est.lo, est.hi
    if math.isnan(lo):
        return "inconclusive"
    m = margin or 0.0
    rules = {  # (supported when, contradicted when)
        "lower": (hi < 0, lo > 0),
        "higher": (lo > 0, hi < 0),
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
    """One interval behind a verdict: what it compares, its estimate, its verdict, the points it used."""

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


def _point_text(table: Table, v: str, lr: float, metric: str) -> str:
    p = table[v][lr]
    mean, sd = (p.val, p.val_sd) if metric != "gap" else (p.gap, p.gap_sd)
    return f"{v} {mean:.4f} (sd {sd:.4f}, n={p.n}) at lr {lr:g}"


def compare(table: Table, part: Comparison, margin: float | None) -> list[Test]:
    """The tests of one comparison (one, or one per learning rate)."""
    a, b, metric = table[part.a], table[part.b], "gap" if part.metric == "gap" else "val"
    shared = sorted(set(a) & set(b))
    tests = []

    def test(label: str, terms: list[tuple[float, str, float]]) -> None:
        est = contrast([(c, table[v][lr].samples(metric)) for c, v, lr in terms])
        points = [(v, lr) for _, v, lr in terms]
        tests.append(Test(label, est, judge(part.expect, est, margin), points))

    if part.metric == "lr_spread":
        if len(shared) < 2:
            return []
        worst = {v: max(shared, key=lambda lr, v=v: table[v][lr].val) for v in (part.a, part.b)}
        best = {v: best_lr(table[v], shared) for v in (part.a, part.b)}
        label = ", ".join(f"{v}: lr {worst[v]:g} minus lr {best[v]:g}" for v in (part.a, part.b))
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
                terms = [(1, part.a, lr), (-1, part.b, lr), (-1, part.a, ref), (1, part.b, ref)]
                test(f"lr {lr:g} vs {ref:g}", terms)
    return tests


def evaluate(study: Study, table: Table) -> list[Verdict]:
    out = []
    for claim in study.claims:
        missing = sorted({v for p in claim.parts for v in (p.a, p.b) if v not in table})
        if missing:
            out.append(Verdict(claim, "not run", note=f"needs variants: {', '.join(missing)}"))
            continue
        tests, verdicts = [], []
        for part in claim.parts:
            part_tests = compare(table, part, study.margin)
            tests += part_tests
            verdicts.append(combine([t.verdict for t in part_tests]))
        out.append(Verdict(claim, combine(verdicts), tests))
    return out


# --- the rounds of a study ---


def _beyond(edge: float, inner: float) -> float:
    """The next learning rate past ``edge``, at the grid's ratio there, to 2 significant digits
    (more where 2 would not take it past the edge)."""
    exact = edge * edge / inner
    for digits in range(2, 17):
        rounded = float(f"{exact:.{digits}g}")
        if (rounded - edge) * (exact - edge) > 0 and rounded != edge:
            return rounded
    return exact


def plan(study: Study, results: list[dict]) -> tuple[list[Run], list[str]]:
    """Every run the study wants, given the results so far, and why it wants those beyond its grid.

    The grid of the file; each variant's grid grows past an end where its best learning rate
    lies (up to ``extend_grid`` rates per end, unless it fails to train); once every run of the
    grids has finished, the points behind a test whose interval straddles its threshold get
    seeds up to ``max_seeds``.
    """
    table = aggregate(results)
    notes: list[str] = []
    grids: dict[str, list[float]] = {}
    for v in study.variants:
        grid = sorted(study.learning_rates)
        points = table.get(v, {})
        down = up = 0
        while all(lr in points and points[lr].n >= len(study.seeds) for lr in grid) and study.extend_grid:
            if fails_to_train({lr: points[lr] for lr in grid}):
                notes.append(f"{v} fails to train (no lr beats the unigram loss): its grid is not extended")
                break
            best = best_lr(points, grid)
            if best == grid[0] and down < study.extend_grid:
                added = _beyond(grid[0], grid[1])
                grid.insert(0, added)
                down += 1
            elif best == grid[-1] and up < study.extend_grid:
                added = _beyond(grid[-1], grid[-2])
                grid.append(added)
                up += 1
            else:
                break
            notes.append(f"{v} is best at lr {best:g}, an end of its grid: lr {added:g} added")
        grids[v] = grid
    runs = {Run(v, lr, s) for v, grid in grids.items() for lr in grid for s in study.seeds}
    done = {(r["variant"], float(r["lr"]), r["seed"]) for r in results}
    # A finished run stays in the study even when the plan no longer asks for it (extra seeds that
    # settled a verdict, a grid point past an optimum that more seeds moved): dropping it would change
    # the verdicts it was run for.
    runs |= {Run(v, lr, seed) for v, lr, seed in done if v in study.variants}
    if study.max_seeds > len(study.seeds) and all((r.variant, r.lr, r.seed) in done for r in runs):
        more = list(study.seeds)
        while len(more) < study.max_seeds:
            more.append(max(more) + 1)
        straddling: set[tuple[str, float]] = set()
        for verdict in evaluate(study, table):
            for t in verdict.tests:
                if t.verdict == "inconclusive":
                    runs |= {Run(v, lr, s) for v, lr in t.points for s in more}
                    straddling |= set(t.points)
                    notes.append(
                        f"claim {verdict.claim.id}: the interval of {t.label} straddles its threshold: "
                        f"{len(more)} seeds for {', '.join(f'{v} lr {lr:g}' for v, lr in t.points)}"
                    )
        # Extra seeds a straddling interval asked for in an earlier round, which they then settled.
        settled = {(v, lr) for v, lr, seed in done if v in study.variants and seed not in study.seeds} - straddling
        if settled:
            points = ", ".join(f"{v} lr {lr:g}" for v, lr in sorted(settled))
            notes.append(
                f"more seeds for {points}: an interval behind them straddled its threshold in an earlier round; "
                "with those seeds it no longer does"
            )
    return sorted(runs, key=lambda r: (list(study.variants).index(r.variant), r.lr, r.seed)), notes


# --- the CSV ---


def _write_rows(f, results: list[dict], header: bool = True) -> None:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    if header:
        writer.writeheader()
    for r in sorted(results, key=lambda r: (r["variant"], r["lr"], r["seed"])):
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})


def write_csv(results: list[dict], path: Path) -> None:
    """Every run as a row, sorted; written whole to a side file first, so a cut-off write loses nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            _write_rows(f, results)
        os.replace(part, path)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise


def _rows(path: Path) -> list[tuple[int, dict]]:
    """The rows of a results.csv with their line numbers, typed; one-line errors for a broken file."""
    floats = ("lr", "best_val_loss", "final_val_loss", "best_train_loss", "final_train_loss", "final_gap")
    rows, seen = [], {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.DictReader(f), 2):
                try:
                    r = dict(row)
                    for k in (*floats, "unigram_val_loss", "seconds"):
                        r[k] = float(row[k])
                    r["seed"], r["steps"] = int(row["seed"]), int(row["steps"])
                    r["diverged"] = row["diverged"] == "True"
                except (KeyError, TypeError, ValueError) as e:
                    raise UserError(f"{path}, line {line}: not a row of an ablate results.csv ({e})") from None
                key = (r["variant"], r["lr"], r["seed"])
                if key in seen:
                    raise UserError(f"{path}, line {line}: the run {key} is also on line {seen[key]}: each run once")
                seen[key] = line
                rows.append((line, r))
    except (csv.Error, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: not an ablate results.csv ({e}): restore it (git checkout -- {path}) or move it away"
        ) from None
    return rows


def _current(study: Study, r: dict) -> bool:
    return r["variant"] in study.variants and r.get("settings") == study.settings(Run(r["variant"], r["lr"], r["seed"]))


def read_csv(path: Path, study: Study) -> list[dict]:
    """The results a report was written from, as ``write_csv`` wrote them; one-line errors otherwise."""
    if not path.is_file():
        raise UserError(f"no {path.name} in {path.parent}: run the study first, or give --report of a folder with one")
    results = []
    for line, r in _rows(path):
        if r["variant"] not in study.variants:
            raise UserError(f"{path}, line {line}: variant {r['variant']} is not in study {study.name}")
        if r.get("settings") and not _current(study, r):
            raise UserError(
                f"{path}, line {line}: {r['variant']} at lr {r['lr']:g}, seed {r['seed']} was computed with "
                f"other settings than {study.name}'s configs now give: run the study again, or restore them"
            )
        results.append(r)
    if not results:
        raise UserError(f"{path} has no runs: run the study first")
    return results


def finished_rows(path: Path, study: Study) -> tuple[list[dict], list[dict]]:
    """The runs of a results.csv that the study, as its files are now, would compute again (finished
    runs), and the others (stale: variants no longer in the study, or other settings).

    This is how a study resumes on another machine or in a fresh clone: from the committed CSV.
    A stale row's run is run again; a missing file is a study with nothing finished.
    """
    if not path.is_file():
        return [], []
    finished, stale = [], []
    for _, r in _rows(path):  # one fingerprint a row: each reads the run's config files
        (finished if _current(study, r) else stale).append(r)
    return finished, stale


def keep_stale(rows: list[dict], path: Path) -> Path:
    """Append ``rows`` to ``path``'s ``.stale`` file beside it, so rows a runner drops are never lost."""
    stale = path.with_name(path.name + ".stale")
    new = not stale.exists()
    with open(stale, "a", newline="", encoding="utf-8") as f:
        _write_rows(f, rows, header=new)
    return stale


def missing_runs(wanted: list[Run], results: list[dict]) -> int:
    """How many of the runs ``plan`` wants have no result yet."""
    done = {(r["variant"], float(r["lr"]), r["seed"]) for r in results}
    return sum((r.variant, r.lr, r.seed) not in done for r in wanted)


# --- plots and the Markdown ---


def plot(table: Table, out: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        raise UserError('the report\'s plots need matplotlib: pip install -e ".[report]"') from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted(table, key=lambda v: table[v][best_lr(table[v])].val)
    files = []

    def ci(samples: list[float]) -> float:
        if len(samples) < 2:
            return 0.0
        return t_quantile(0.5 + LEVEL / 2, len(samples) - 1) * statistics.stdev(samples) / math.sqrt(len(samples))

    cols = 4
    rows = -(-len(variants) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), sharex=True, sharey=True, squeeze=False)
    ref = table.get("baseline")
    for ax, v in zip(axes.flat, variants, strict=False):
        lrs = sorted(table[v])
        if ref is not None and v != "baseline":
            rl = sorted(ref)
            ax.plot(rl, [ref[lr].val for lr in rl], "--", color="grey", label="baseline")
        ax.errorbar(
            lrs, [table[v][lr].val for lr in lrs], yerr=[ci(table[v][lr].vals) for lr in lrs], marker="o", capsize=3
        )
        ax.set_xscale("log")
        ax.set_title(v, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(variants) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("learning rate")
    for ax in axes[:, 0]:
        ax.set_ylabel("best val loss")
    fig.suptitle("Best val loss against learning rate (mean over seeds, 95% t interval)")
    fig.tight_layout()
    fig.savefig(out / "val_vs_lr.png", dpi=100)
    plt.close(fig)
    files.append("val_vs_lr.png")

    for name, metric, label in [
        ("best_val.png", "val", "best val loss at the variant's best learning rate (95% t interval)"),
        ("gap.png", "gap", "final val loss - train loss at the variant's best learning rate (95% t interval)"),
    ]:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(variants) + 1))
        pts = [table[v][best_lr(table[v])] for v in variants]
        means = [p.val if metric == "val" else p.gap for p in pts]
        errors = [ci(p.samples(metric)) for p in pts]
        ax.barh(variants, means, xerr=errors, capsize=3)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        if metric == "val":
            ax.set_xlim(min(means) - 0.1, max(m + e for m, e in zip(means, errors, strict=True)) + 0.05)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def verdict_rows(study: Study, table: Table, verdicts: list[Verdict]) -> list[str]:
    """The verdict table: one row per claim, with every test behind it."""
    lines = ["| # | claim | verdict | numbers (d = a - b, 95% interval) |", "|---|---|---|---|"]
    for v in verdicts:
        if v.note:
            evidence = v.note
        else:
            rows = []
            for part, t in ((p, t) for p in v.claim.parts for t in compare(table, p, study.margin)):
                shown = " - ".join(_point_text(table, pv, lr, part.metric) for pv, lr in t.points[:2])
                rows.append(
                    f"{part.a} vs {part.b}, {part.metric} {part.expect}, {t.label}: d = {t.estimate} "
                    f"-> {t.verdict}" + (f" ({shown})" if len(t.points) == 2 else "")
                )
            evidence = "; ".join(rows)
        lines.append(f"| {v.claim.id} | {_cell(v.claim.text)} | **{v.verdict}** | {_cell(evidence)} |")
    return lines


def companion(path: Path, reports: Path) -> list[str]:
    """The section of a study named under ``also``: its verdicts from its report folder's CSV, if it has one."""
    other = Study.load(path)
    csv_path = reports / other.name / "results.csv"
    lines = [f"## Also: {other.name} (`{path.name}`)", ""]
    if not csv_path.is_file():
        return [*lines, f"Not yet measured: there is no `{other.name}/results.csv` beside this report."]
    results = read_csv(csv_path, other)
    table = aggregate(results)
    machines = sorted({r.get("machine", "") for r in results} - {""})
    wanted, _ = plan(other, results)
    missing = missing_runs(wanted, results)
    lines += [
        f"{len(results)} runs; machine(s): {'; '.join(machines) or 'not recorded'}; "
        f"report: [{other.name}/README.md](../{other.name}/README.md).",
        "",
    ]
    if missing:
        lines += [
            f"**Not finished:** {missing} of the {len(wanted)} runs it plans so far have not run; verdicts may change.",
            "",
        ]
    return lines + verdict_rows(other, table, evaluate(other, table))


def write_report(study: Study, results: list[dict], out: Path, study_file: str, commit: str = "") -> Path:
    """Write ``out/README.md`` and its PNG plots from ``results``; return the Markdown file's path."""
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(results)
    plots = plot(table, out)
    seeds = sorted({r["seed"] for r in results})
    steps = sorted({r["steps"] for r in results})
    lrs = sorted({float(r["lr"]) for r in results})
    commits = sorted({r.get("commit", "") for r in results} - {""})
    machines = sorted({r.get("machine", "") for r in results} - {""})
    hours = sum(r["seconds"] for r in results) / 3600
    verdicts = evaluate(study, table)
    wanted, notes = plan(study, results)
    missing = missing_runs(wanted, results)
    lines = [f"# Ablation study: {study.name}", ""]
    if missing:
        lines += [
            f"**Interim report: the study is not finished.** {missing} of the {len(wanted)} runs it plans so far "
            "have not run (and finishing them may add rounds). The verdicts below are from the runs so far and "
            f"may change: run `python -m shakespeare_gpt.tools.ablate {study_file}` to go on.",
            "",
        ]
    lines += [
        f"Study file `{study_file}`; {len(results)} runs of {len(table)} variants at learning rates "
        f"{', '.join(f'{lr:g}' for lr in lrs)} with seeds {', '.join(map(str, seeds))} "
        f"({'/'.join(map(str, steps))} steps each), base config `{study.base.name}`"
        + (f", extra arguments `{' '.join(study.args)}`" if study.args else "")
        + f". {hours:.1f} hours of run time in all (the sum over runs, each timed in its worker).",
        "",
        f"- Runs computed by the code at commit(s) {', '.join(f'`{c}`' for c in commits) or 'not recorded'}"
        + (f"; this report written at `{commit}`" if commit else "")
        + ".",
        f"- Machine(s): {'; '.join(machines) or 'not recorded'}.",
        f"- Study file sha256 `{hashlib.sha256(Path(study_file).read_bytes()).hexdigest()[:16]}`"
        " (the claims, margin and grids as judged here).",
        "- Every run is a row of [results.csv](results.csv); "
        f"`python -m shakespeare_gpt.tools.ablate {study_file} --report-only` writes this report again from it.",
        "",
        "Losses are full passes: `val` over the whole val split, `train` over a train stretch of the "
        "same length, both in eval mode (no dropout). `best` is the lowest over the run's validations, "
        "`final` the last; the gap is final val - final train.",
        "",
        "## Verdicts",
        "",
        f"Rule: {RULE}" + (f" The equivalence margin is {study.margin:g} nats." if study.margin else ""),
        "",
    ]
    lines += verdict_rows(study, table, verdicts)
    if notes:
        lines += ["", "## Rounds", "", "Runs the study added to its first grid, and why (see `plan` in report.py):", ""]
        lines += [f"- {note}" for note in notes]
    for other in study.also:
        lines += ["", *companion(other, out.parent)]
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += [
        "",
        "## Each variant at its best learning rate",
        "",
        "A best lr marked *edge* lies at an end of the variant's grid: it might do better beyond it. "
        "Mean +- standard deviation over seeds (the plots' bars are 95% t intervals of the mean).",
        "",
        "| variant | best lr | seeds | best val loss | final val | best train | final train | gap | unigram loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in sorted(table, key=lambda v: table[v][best_lr(table[v])].val):
        lr = best_lr(table[v])
        p = table[v][lr]
        edge = " *edge*" if lr in (min(table[v]), max(table[v])) and len(table[v]) > 1 else ""
        lines.append(
            f"| {v} | {lr:g}{edge} | {p.n} | {p.val:.4f} +- {p.val_sd:.4f} | {p.final_val:.4f} | "
            f"{p.best_train:.4f} | {p.final_train:.4f} | {p.gap:+.4f} +- {p.gap_sd:.4f} | {p.unigram:.4f} |"
        )
    lines += [
        "",
        "## Every point",
        "",
        "Mean +- standard deviation over seeds. Seeds whose loss became NaN or infinite are counted under "
        "*diverged* and enter the means with their validations before that.",
        "",
        "| variant | lr | seeds | diverged | best val loss | final val | best train | final train | gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in sorted(table):
        for lr in sorted(table[v]):
            p = table[v][lr]
            lines.append(
                f"| {v} | {lr:g} | {p.n} | {p.diverged} | {p.val:.4f} +- {p.val_sd:.4f} | {p.final_val:.4f} | "
                f"{p.best_train:.4f} | {p.final_train:.4f} | {p.gap:+.4f} +- {p.gap_sd:.4f} |"
            )
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
