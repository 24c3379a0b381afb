"""The study's report: ``README.md`` with a verdict on each claim and tables, and its PNG plots.

It reads only the per-run results (the CSV they are collected into), so ``--report-only`` writes it
again from a committed results.csv.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import statistics
from pathlib import Path

from ...utils import UserError, atomic_open
from .runner import plan, read_csv
from .study import Run, Study
from .verdicts import LEVEL, Table, Verdict, aggregate, best_lr, evaluate, t_quantile

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


def missing_runs(wanted: list[Run], results: list[dict]) -> int:
    """How many of the runs ``plan`` wants have no result yet."""
    done = {(r["variant"], float(r["lr"]), r["seed"]) for r in results}
    return sum((r.variant, r.lr, r.seed) not in done for r in wanted)


def half_width(samples: list[float]) -> float:
    """Half the 95% t interval of a mean; 0 for one sample."""
    if len(samples) < 2:
        return 0.0
    return t_quantile(0.5 + LEVEL / 2, len(samples) - 1) * statistics.stdev(samples) / math.sqrt(len(samples))


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError('the report\'s plots need matplotlib: pip install -e ".[report]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panel_grid(plt, n: int, cols: int = 4):
    """A figure of ``n`` panels, ``cols`` to a row, sharing their axes."""
    rows = -(-n // cols)
    return plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), sharex=True, sharey=True, squeeze=False)


def save_grid(plt, fig, axes, n: int, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Label a ``panel_grid`` of ``n`` used panels, blank the others, and write it to ``path``."""
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(table: Table, out: Path) -> list[str]:
    """val_vs_lr.png (a panel per variant), best_val.png and gap.png (a bar per variant at its best lr)."""
    plt = pyplot()
    variants = sorted(table, key=lambda v: table[v][best_lr(table[v])].val)
    fig, axes = panel_grid(plt, len(variants))
    ref = table.get("baseline")
    for ax, v in zip(axes.flat, variants, strict=False):
        lrs = sorted(table[v])
        if ref is not None and v != "baseline":
            ax.plot(sorted(ref), [ref[lr].val for lr in sorted(ref)], ".--", color="grey")  # a point at one lr
        vals, errors = [table[v][lr].val for lr in lrs], [half_width(table[v][lr].vals) for lr in lrs]
        ax.errorbar(lrs, vals, yerr=errors, marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_title(v, fontsize=10)
        ax.grid(alpha=0.3)
    every_lr = [lr for points in table.values() for lr in points]
    axes[0, 0].set_xlim(min(every_lr) / 2, max(every_lr) * 2)  # shared; autoscaled, one lr leaves it no width
    title = "Best val loss against learning rate (mean over seeds, 95% t interval)"
    save_grid(plt, fig, axes, len(variants), "learning rate", "best val loss", title, out / "val_vs_lr.png")

    for name, metric, label in [
        ("best_val.png", "val", "best val loss at the variant's best learning rate (95% t interval)"),
        ("gap.png", "gap", "final val loss - train loss at the variant's best learning rate (95% t interval)"),
    ]:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(variants) + 1))
        points = [table[v][best_lr(table[v])] for v in variants]
        means = [p.val if metric == "val" else p.gap for p in points]
        errors = [half_width(p.samples(metric)) for p in points]
        ax.barh(variants, means, xerr=errors, capsize=3)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        if metric == "val":
            ax.set_xlim(min(means) - 0.1, max(m + e for m, e in zip(means, errors, strict=True)) + 0.05)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
    return ["val_vs_lr.png", "best_val.png", "gap.png"]


def by_size(table: Table, results: list[dict]) -> list[tuple[str, float, list[dict]]]:
    """Each variant with a curve, smallest first: its name, best lr, and the runs there (one per seed)."""
    rows = []
    for v in table:
        lr = best_lr(table[v])
        runs = [r for r in results if r["variant"] == v and float(r["lr"]) == lr and r.get("curve")]
        if runs and all(r.get("parameters") for r in runs):
            rows.append((v, lr, runs))
    return sorted(rows, key=lambda row: row[2][0]["parameters"])


def seed_curves(runs: list[dict], column: int) -> tuple[list[int], list[list[float]]]:
    """The steps where every seed has a finite loss, and each seed's loss there (column 1: val, 2: train)."""
    curves = [{p[0]: p[column] for p in r["curve"] if math.isfinite(p[column])} for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [[c[s] for s in steps] for c in curves]


def plot_curves(table: Table, results: list[dict], out: Path) -> list[str]:
    """curves.png: val and train loss against step, a panel per variant (the mean over seeds, their range
    shaded); params.png: best val loss against parameters. None without curves."""
    sizes = by_size(table, results)
    if not sizes:
        return []
    plt = pyplot()
    fig, axes = panel_grid(plt, len(sizes), cols=min(4, len(sizes)))
    for ax, (v, _, runs) in zip(axes.flat, sizes, strict=False):
        for column, (name, style) in enumerate([("val", "-"), ("train", "--")], 1):
            steps, losses = seed_curves(runs, column)
            lo, hi = (list(map(f, zip(*losses, strict=True))) for f in (min, max))
            ax.plot(steps, [statistics.mean(x) for x in zip(*losses, strict=True)], style, label=name)
            ax.fill_between(steps, lo, hi, alpha=0.3)
        ax.set_title(f"{v} ({runs[0]['parameters'] / 1e6:.2f}M parameters)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    title = "Val and train loss against step (mean over seeds; shaded: their range)"
    save_grid(plt, fig, axes, len(sizes), "step", "loss (nats per character)", title, out / "curves.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    params = [runs[0]["parameters"] for _, _, runs in sizes]
    points = [table[v][lr] for v, lr, _ in sizes]
    ax.errorbar(params, [p.val for p in points], yerr=[half_width(p.vals) for p in points], marker="o", capsize=3)
    for x, p, (v, _, _) in zip(params, points, sizes, strict=True):
        ax.annotate(v, (x, p.val), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("best val loss (95% t interval)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "params.png", dpi=100)
    plt.close(fig)
    return ["curves.png", "params.png"]


def what_to_expect(table: Table, results: list[dict]) -> list[str]:
    """In plain words and these runs' numbers: what a bigger model or a longer run gives. None without curves."""
    sizes = by_size(table, results)
    lines, kinds = [], {"end": [], "fell": [], "rose": []}  # where each size's mean val curve was lowest, ended
    for v, lr, runs in sizes:
        steps, vals = seed_curves(runs, 1)
        if len(steps) < 2:
            continue
        mean = [statistics.mean(x) for x in zip(*vals, strict=True)]
        q = min(next(i for i, s in enumerate(steps) if s >= steps[-1] * 3 / 4), len(steps) - 2)  # a quarter before
        low = mean.index(min(mean))
        kind = "end" if low == len(mean) - 1 else "fell" if mean[-1] < mean[q] else "rose"
        kinds[kind].append(
            f"{v} ({mean[-1] - mean[q]:+.3f} since step {steps[q]:,}"
            + (f", {mean[-1] - mean[low]:.3f} above its lowest at step {steps[low]:,})" if kind != "end" else ")")
        )
        lines.append(
            f"- {v}, {runs[0]['parameters']:,} parameters: val loss {mean[q]:.3f} at step {steps[q]:,}, "
            f"{mean[low]:.3f} at its lowest (step {steps[low]:,}), {mean[-1]:.3f} at step {steps[-1]:,}. Each run's "
            f"own lowest came at step {statistics.mean(r['best_step'] for r in runs):,.0f} on average, and its val "
            f"loss rose by {statistics.mean(table[v][lr].overfits):.3f} after it (overfit)."
        )
    if not lines:
        return []
    best = min(sizes, key=lambda row: table[row[0]][row[1]].val)[0]
    bigger = [v for v, _, _ in sizes[[v for v, _, _ in sizes].index(best) + 1 :]]
    text = "Each size trained at one learning rate; the numbers are the mean val loss over seeds at each validation. "
    text += f"The lowest val loss was {best}'s ({table[best][best_lr(table[best])].val:.3f})"
    text += f"; the bigger {', '.join(bigger)} did not go lower." if bigger else ", the biggest size's."
    for kind, said in [
        ("end", "was at its lowest at the last validation, still falling: a longer run may help"),
        ("fell", "was lower at the end than a quarter of the run before, but above its lowest point"),
        (
            "rose",
            "was higher at the end than a quarter of the run before: a run longer than its lowest point gains nothing",
        ),
    ]:
        if kinds[kind]:
            text += f" For {', '.join(kinds[kind])}, the val loss {said}."
    text += " Whatever comes after the lowest point, `fit` keeps that checkpoint (`best-*.ckpt`)."
    return ["## What to expect from a bigger model or a longer run", "", text, "", *lines]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _point(table: Table, v: str, lr: float, metric: str) -> str:
    samples = table[v][lr].samples(metric)
    sd = statistics.stdev(samples) if len(samples) > 1 else math.nan
    return f"{v} {statistics.mean(samples):.4f} (sd {sd:.4f}, n={len(samples)}) at lr {lr:g}"


def verdict_rows(table: Table, verdicts: list[Verdict]) -> list[str]:
    """The verdict table: one row per claim, with every test behind it."""
    lines = ["| # | claim | verdict | numbers (d = a - b, 95% interval) |", "|---|---|---|---|"]
    for v in verdicts:
        evidence = v.note or "; ".join(
            " vs ".join(t.part.compare)
            + f", {t.part.metric} {t.part.expect}{f' by {t.part.by:g}' if t.part.by else ''}, {t.label}: "
            + f"d = {t.estimate} -> {t.verdict}"
            + (f" ({' - '.join(_point(table, *p, t.part.metric) for p in t.points)})" if len(t.points) <= 2 else "")
            for t in v.tests
        )
        lines.append(f"| {v.claim.id} | {_cell(v.claim.claim)} | **{v.verdict}** | {_cell(evidence)} |")
    return lines


def companion(path: Path, reports: Path) -> list[str]:
    """The section of a study named under ``also``: its verdicts from its report folder's CSV, if it has one."""
    other = Study.load(path)
    csv_path = reports / other.name / "results.csv"
    lines = [f"## Also: {other.name} (`{path.name}`)", ""]
    if not csv_path.is_file():
        command = f"python -m shakespeare_gpt.tools.ablate {os.path.relpath(path)}"
        return [*lines, f"Not yet measured: there is no `{other.name}/results.csv` beside this report: `{command}`."]
    results = read_csv(csv_path, other)
    table = aggregate(results)
    machines = sorted({r.get("machine", "") for r in results} - {""})
    wanted, _ = plan(other, results)
    lines += [
        f"{len(results)} runs; machine(s): {'; '.join(machines) or 'not recorded'}; "
        f"report: [{other.name}/README.md](../{other.name}/README.md).",
        "",
    ]
    if missing := missing_runs(wanted, results):
        lines += [
            f"**Not finished:** {missing} of the {len(wanted)} runs it plans so far have not run; verdicts may change.",
            "",
        ]
    return lines + verdict_rows(table, evaluate(other, table))


def wall_time(path: Path) -> str:
    """The runner's wall time, over every command that ran the study into this folder (its commands.csv)."""
    if not path.exists():
        return ""
    with path.open(newline="") as f:
        try:
            minutes = [float(row["minutes"]) for row in csv.DictReader(f)]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: not a commands.csv ({e!r}): restore it (git checkout) or move it away") from None
    return (
        f"; {sum(minutes):.1f} min of runner wall time over {len(minutes)} command(s), each a row of "
        "[commands.csv](commands.csv) (its start and how it ended)"
    )


def write_report(study: Study, results: list[dict], out: Path, study_file: str, commit: str = "") -> Path:
    """Write ``out/README.md`` and its PNG plots from ``results``; return the Markdown file's path."""
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(results)
    plots = plot(table, out) + plot_curves(table, results, out)
    seeds = sorted({r["seed"] for r in results})
    steps = sorted({r["steps"] for r in results})
    lrs = sorted({float(r["lr"]) for r in results})
    commits = sorted({r.get("commit", "") for r in results} - {""})
    machines = sorted({r.get("machine", "") for r in results} - {""})
    hours = sum(r["seconds"] for r in results) / 3600
    command = f"python -m shakespeare_gpt.tools.ablate {study_file}"
    command += "" if out == Path("reports", study.name) else f" --report {out}"  # not the default folder
    wanted, notes = plan(study, results)
    lines = [f"# Ablation study: {study.name}", "", *([study.about.strip(), ""] if study.about else [])]
    if missing := missing_runs(wanted, results):
        lines += [
            f"**Interim report: the study is not finished.** {missing} of the {len(wanted)} runs it plans so far "
            "have not run (and finishing them may add rounds). The verdicts below are from the runs so far and "
            f"may change: run `{command}` to go on.",
            "",
        ]
    lines += [
        f"Study file `{study_file}`; {len(results)} runs of {len(table)} variants at learning rates "
        f"{', '.join(f'{lr:g}' for lr in lrs)} with seeds {', '.join(map(str, seeds))} "
        f"({'/'.join(map(str, steps))} steps each), base config `{study.base.name}`"
        + (f", extra arguments `{' '.join(study.args)}`" if study.args else "")
        + f". {hours:.1f} hours of run time in all (the sum over runs, each timed in its worker)"
        + wall_time(out / "commands.csv")
        + ".",
        "",
        f"- Runs computed by the code at commit(s) {', '.join(f'`{c}`' for c in commits) or 'not recorded'}"
        + (f"; this report written at `{commit}`" if commit else "")
        + ".",
        f"- Machine(s): {'; '.join(machines) or 'not recorded'}.",
        f"- Study file sha256 `{hashlib.sha256(Path(study_file).read_bytes()).hexdigest()[:16]}`"
        " (the claims, margin and grids as judged here).",
        "- Every run is a row of [results.csv](results.csv); "
        f"`{command} --report-only` writes this report again from it.",
        "",
        "Losses are full passes: `val` over the whole val split, `train` over a train stretch of the "
        "same length, both in eval mode (no dropout). `best` is the lowest over the run's validations, "
        "`final` the last; the gap is final val - final train; overfit is final val - best val, how far the "
        "val loss rose after its lowest point (0 when the last validation is the lowest)"
        + (", and every validation of every run is a row of [curves.csv](curves.csv)" if "curves.png" in plots else "")
        + ".",
        "",
        "## Verdicts",
        "",
        f"Rule: {RULE}" + (f" The equivalence margin is {study.margin:g} nats." if study.margin else ""),
        "",
        *verdict_rows(table, evaluate(study, table)),
    ]
    if notes:
        lines += ["", "## Rounds", "", "Runs the study added to its first grid, and why (see `plan` in runner.py):", ""]
        lines += [f"- {note}" for note in notes]
    for other in study.also:
        lines += ["", *companion(other, out.parent)]
    if expect := what_to_expect(table, results):
        lines += ["", *expect]
    lines += ["", "## Plots", "", *(f"![{p}]({p})" for p in plots)]
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
    with atomic_open(path) as f:
        f.write("\n".join(lines) + "\n")
    return path
