"""The ablation report: tables, plots and a verdict on each of the seed's ten observations."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .study import Study

RULE = (
    "A difference between two numbers counts when it is larger than the sum of their standard "
    "deviations over seeds; a difference within that is noise. A claim that something is better "
    "(or worse) is supported by a difference that counts in its favour, contradicted by one that "
    "counts against it, and inconclusive otherwise. A claim that something does not help, or does "
    "not depend on the learning rate, is contradicted only by a difference that counts against it. "
    "Variants are compared at their own best learning rate (lowest mean best-val loss), except where "
    "an observation is about the learning rate or the gap: those compare the variants at each "
    "learning rate of the grid."
)


@dataclass
class Point:
    """Seed statistics of one variant at one learning rate."""

    n: int
    diverged: int  # seeds whose loss became NaN or infinite (reported from their validations before)
    val: float  # mean best val loss
    val_sd: float
    final_val: float
    best_train: float
    final_train: float
    gap: float  # mean final val - final train
    gap_sd: float


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(results: list[dict]) -> dict[str, dict[float, Point]]:
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["variant"], r["lr"])].append(r)
    table: dict[str, dict[float, Point]] = defaultdict(dict)
    for (variant, lr), rs in groups.items():
        best = [r["best_val_loss"] for r in rs]
        gaps = [r["final_gap"] for r in rs]
        table[variant][lr] = Point(
            n=len(rs),
            diverged=sum(bool(r.get("diverged")) for r in rs),
            val=statistics.mean(best),
            val_sd=_sd(best),
            final_val=statistics.mean(r["final_val_loss"] for r in rs),
            best_train=statistics.mean(r["best_train_loss"] for r in rs),
            final_train=statistics.mean(r["final_train_loss"] for r in rs),
            gap=statistics.mean(gaps),
            gap_sd=_sd(gaps),
        )
    return table


def best_lr(points: dict[float, Point]) -> float:
    return min(points, key=lambda lr: points[lr].val)


@dataclass
class Verdict:
    number: int
    claim: str
    verdict: str  # supported / contradicted / inconclusive / not run
    evidence: str


def _at_best(table, v: str) -> Point:
    return table[v][best_lr(table[v])]


def _fmt(table, v: str) -> str:
    p = _at_best(table, v)
    return f"{v} {p.val:.4f} +- {p.val_sd:.4f} (lr {best_lr(table[v]):g})"


def _better(table, a: str, b: str) -> tuple[float, bool]:
    """(loss of a - loss of b at their best lrs, whether that difference counts)."""
    pa, pb = _at_best(table, a), _at_best(table, b)
    d = pa.val - pb.val
    return d, abs(d) > pa.val_sd + pb.val_sd


def _pairwise(table, a: str, b: str, claim_a_better: bool) -> tuple[str, str]:
    d, counts = _better(table, a, b)
    evidence = f"{_fmt(table, a)} vs {_fmt(table, b)}: difference {d:+.4f}" + (" (counts)" if counts else " (noise)")
    if not counts:
        return "inconclusive", evidence
    return ("supported" if (d < 0) == claim_a_better else "contradicted"), evidence


def verdicts(table: dict[str, dict[float, Point]]) -> list[Verdict]:
    out = []

    def need(*names: str) -> bool:
        return all(n in table for n in names)

    def add(number: int, claim: str, names: tuple[str, ...], judge) -> None:
        if not need(*names):
            missing = ", ".join(n for n in names if n not in table)
            out.append(Verdict(number, claim, "not run", f"needs variants: {missing}"))
        else:
            out.append(Verdict(number, claim, *judge()))

    def per_lr(a: str, b: str, attr: str, sd: str) -> tuple[list[float], list[bool], list[str]]:
        """At each lr both variants ran: a - b, whether it counts, and a line of evidence."""
        diffs, counts, lines = [], [], []
        for lr in sorted(set(table[a]) & set(table[b])):
            pa, pb = table[a][lr], table[b][lr]
            d = getattr(pa, attr) - getattr(pb, attr)
            c = abs(d) > getattr(pa, sd) + getattr(pb, sd)
            diffs.append(d)
            counts.append(c)
            lines.append(f"lr {lr:g}: {d:+.4f}{' (counts)' if c else ''}")
        return diffs, counts, lines

    def obs1():
        # The effect of dropout at each lr: its loss minus the loss without it.
        diffs, counts, lines = per_lr("baseline", "no_dropout", "val", "val_sd")
        helps = {d < 0 for d, c in zip(diffs, counts, strict=True) if c}
        evidence = "with dropout minus without, best val loss: " + "; ".join(lines)
        return ("contradicted" if len(helps) == 2 else "supported"), evidence

    def obs2():
        def spread(v):
            pts = table[v]
            hi, lo = max(pts, key=lambda lr: pts[lr].val), min(pts, key=lambda lr: pts[lr].val)
            return pts[hi].val - pts[lo].val, pts[hi].val_sd + pts[lo].val_sd

        s_multi, n_multi = spread("baseline")
        s_single, n_single = spread("single_head")
        d = s_multi - s_single
        counts = abs(d) > n_multi + n_single
        evidence = (
            f"range of val loss over the lr grid: 4 heads {s_multi:.4f}, 1 head {s_single:.4f} "
            f"(difference {d:+.4f}, noise {n_multi + n_single:.4f})"
        )
        if not counts:
            return "inconclusive", evidence
        return ("supported" if d < 0 else "contradicted"), evidence

    def obs3():
        diffs, counts, lines = per_lr("baseline", "single_head", "gap", "gap_sd")
        evidence = "final val - train gap, 4 heads minus 1 head: " + "; ".join(lines)
        favour = [d < 0 for d, c in zip(diffs, counts, strict=True) if c]
        if favour and all(favour):
            return "supported", evidence
        if favour and not any(favour):
            return "contradicted", evidence
        return "inconclusive", evidence

    def obs5():
        v1, e1 = _pairwise(table, "baseline", "no_proj", claim_a_better=True)
        v2, e2 = _pairwise(table, "no_residual", "no_residual_no_proj", claim_a_better=True)
        evidence = f"with residuals: {e1}; without residuals: {e2}"
        if "contradicted" in (v1, v2):
            return "contradicted", evidence
        return ("supported" if v1 == v2 == "supported" else "inconclusive"), evidence

    def obs6():
        d, counts = _better(table, "no_residual_no_norm", "no_residual_no_norm_1layer")
        evidence = (
            f"{_fmt(table, 'no_residual_no_norm')} (4 blocks) vs {_fmt(table, 'no_residual_no_norm_1layer')} "
            f"(1 block): difference {d:+.4f}{' (counts)' if counts else ' (noise)'}"
        )
        return ("contradicted" if counts and d < 0 else "supported"), evidence

    def obs7():
        # Observation 5 already covers blocks with a feed-forward layer, where the seed found the
        # projection helps; this study reads 7 as being about blocks without one.
        verdict, evidence = _pairwise(table, "no_ffwd_no_residual", "no_ffwd_no_residual_no_proj", False)
        return verdict, evidence + "; tested on blocks without feed-forward (observation 5 covers those with one)"

    def obs9():
        base = _at_best(table, "no_proj")
        res, norm = _at_best(table, "no_residual_no_proj"), _at_best(table, "no_proj_no_norm")
        d_res, d_norm = res.val - base.val, norm.val - base.val
        counts = abs(d_res - d_norm) > res.val_sd + norm.val_sd
        evidence = (
            f"without the projection, removing residuals costs {d_res:+.4f}, removing layer norm "
            f"{d_norm:+.4f} (from {_fmt(table, 'no_proj')})"
        )
        if not counts:
            return "inconclusive", evidence
        return ("supported" if d_res > d_norm else "contradicted"), evidence

    add(1, "Whether dropout helps does not depend on the learning rate.", ("baseline", "no_dropout"), obs1)
    add(2, "Multiple heads make the model less sensitive to the learning rate.", ("baseline", "single_head"), obs2)
    add(3, "Multiple heads reduce overfitting (val - train gap).", ("baseline", "single_head"), obs3)
    add(
        4,
        "Adding the feed-forward layer improves performance.",
        ("baseline", "no_ffwd"),
        lambda: _pairwise(table, "baseline", "no_ffwd", True),
    )
    add(
        5,
        "The attention output projection helps when there is a feed-forward layer, even without residuals.",
        ("baseline", "no_proj", "no_residual", "no_residual_no_proj"),
        obs5,
    )
    add(
        6,
        "Stacking blocks without residuals or layer norm does not help.",
        ("no_residual_no_norm", "no_residual_no_norm_1layer"),
        obs6,
    )
    add(
        7,
        "The attention projection hurts without residual connections.",
        ("no_ffwd_no_residual", "no_ffwd_no_residual_no_proj"),
        obs7,
    )
    add(
        8,
        "Residual connections are very useful.",
        ("baseline", "no_residual"),
        lambda: _pairwise(table, "baseline", "no_residual", True),
    )
    add(
        9,
        "Residual connections matter more than layer norm (with the attention projection removed).",
        ("no_proj", "no_residual_no_proj", "no_proj_no_norm"),
        obs9,
    )
    add(
        10,
        "Post-norm gives better numbers than pre-norm.",
        ("post_norm", "baseline"),
        lambda: _pairwise(table, "post_norm", "baseline", True),
    )
    return out


def plot(table: dict[str, dict[float, Point]], out: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        raise UserError('the report\'s plots need matplotlib: pip install -e ".[report]"') from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted(table, key=lambda v: _at_best(table, v).val)
    files = []

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
            lrs, [table[v][lr].val for lr in lrs], yerr=[table[v][lr].val_sd for lr in lrs], marker="o", capsize=3
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
    fig.suptitle("Best val loss against learning rate (mean and standard deviation over seeds)")
    fig.tight_layout()
    fig.savefig(out / "val_vs_lr.png", dpi=100)
    plt.close(fig)
    files.append("val_vs_lr.png")

    for name, attr, sd, label in [
        ("best_val.png", "val", "val_sd", "best val loss at the variant's best learning rate"),
        ("gap.png", "gap", "gap_sd", "final val loss - train loss at the variant's best learning rate"),
    ]:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(variants) + 1))
        pts = [_at_best(table, v) for v in variants]
        ax.barh(variants, [getattr(p, attr) for p in pts], xerr=[getattr(p, sd) for p in pts], capsize=3)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        if attr == "val":
            lo = min(p.val for p in pts)
            ax.set_xlim(lo - 0.1, max(p.val for p in pts) + 0.05)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def write_report(study: Study, results: list[dict], out: Path) -> Path:
    """Write ``out/README.md`` and its PNG plots; return the Markdown file's path."""
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(results)
    plots = plot(table, out)
    seeds = sorted({r["seed"] for r in results})
    steps = sorted({r["steps"] for r in results})
    minutes = sum(r["seconds"] for r in results) / 60
    lines = [
        f"# Ablation study: {study.name}",
        "",
        f"{len(results)} runs: {len(table)} variants x {len(study.learning_rates)} learning rates "
        f"({', '.join(f'{lr:g}' for lr in study.learning_rates)}) x {len(seeds)} seeds, "
        f"{'/'.join(map(str, steps))} steps each, base config `{study.base.name}`"
        + (f", extra arguments `{' '.join(study.args)}`" if study.args else "")
        + f". {minutes:.0f} CPU-job minutes in all.",
        "",
        "Written by `python -m shakespeare_gpt.tools.ablate` from the runs' `result.json` files; the runs' "
        "TensorBoard logs (HParams tab) are in the study's log folder.",
        "",
        "Losses are full passes: `val` over the whole val split, `train` over a train stretch of the "
        "same length, both in eval mode (no dropout). `best` is the lowest over the run's validations, "
        "`final` the last; the gap is final val - final train.",
        "",
        "## Verdicts",
        "",
        f"Rule: {RULE}",
        "",
        "| # | observation (the seed's) | verdict | numbers |",
        "|---|---|---|---|",
    ]
    for v in verdicts(table):
        lines.append(f"| {v.number} | {v.claim} | **{v.verdict}** | {v.evidence} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += [
        "",
        "## Each variant at its best learning rate",
        "",
        "A best lr marked *edge* lies at the end of the grid: the variant might do better beyond it.",
        "",
        "| variant | best lr | best val loss | final val | best train | final train | gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in sorted(table, key=lambda v: _at_best(table, v).val):
        p, lr = _at_best(table, v), best_lr(table[v])
        edge = " *edge*" if lr in (min(table[v]), max(table[v])) and len(table[v]) > 1 else ""
        lines.append(
            f"| {v} | {lr:g}{edge} | {p.val:.4f} +- {p.val_sd:.4f} | {p.final_val:.4f} | {p.best_train:.4f} "
            f"| {p.final_train:.4f} | {p.gap:+.4f} +- {p.gap_sd:.4f} |"
        )
    lines += [
        "",
        "## Every point",
        "",
        "Seeds whose loss became NaN or infinite are counted under *diverged* and enter the means with "
        "their validations before that.",
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
