"""The report: each verdict with the numbers behind it, the rounds, an unfinished study said as such, the
studies under ``also``, and the plots (from synthetic results: no training)."""

import warnings
from datetime import datetime

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from shakespeare_gpt.tools.ablate.report import plot, write_report
from shakespeare_gpt.tools.ablate.runner import log_command, write_csv
from shakespeare_gpt.tools.ablate.study import Run
from shakespeare_gpt.tools.ablate.verdicts import aggregate
from shakespeare_gpt.utils import UserError

from .test_verdicts import FLAT, LR, MIDDLE, grid, results, shifted, study


def test_the_report_shows_each_verdict_with_its_numbers_and_the_plots(tmp_path):
    claim = {"id": 4, "claim": "a beats | b.", "compare": ["a", "b"]}
    s = study(tmp_path, [claim], max_seeds=4, about="Why a and b, in words.\n")
    rows = results(grid(shifted(FLAT, -0.1), FLAT))
    path = write_report(s, rows, tmp_path / "report", str(tmp_path / "study.yaml"), "abc123")
    text = path.read_text()
    assert text.startswith("# Ablation study: synthetic\n\nWhy a and b, in words.\n\nStudy file `")
    row = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    assert row.startswith(
        "| 4 | a beats \\| b. | **supported** | a vs b, val lower, at best lrs (0.001, 0.001): d = -0.1000 ["
    )
    assert "a 1.9000 (sd 0.0050, n=3) at lr 0.001 - b 2.0000 (sd 0.0050, n=3) at lr 0.001" in row
    assert "this report written at `abc123`" in text and "Study file sha256 `" in text and "Interim" not in text
    assert "## Rounds" not in text and "| a | 0.001 *edge* | 3 | 1.9000 +- 0.0050 |" in text
    for png in ("val_vs_lr.png", "best_val.png", "gap.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000 and f"]({png})" in text


@pytest.mark.parametrize("variants", [("a",), ("baseline", "a"), ("baseline", "a", "b")])
def test_a_study_at_one_learning_rate_is_plotted_as_a_point_per_panel_without_warnings(variants, tmp_path):
    table = aggregate(results({(v, 1e-3): [2.0 + i / 10, 2.01 + i / 10] for i, v in enumerate(variants)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot(table, tmp_path)
    image = plt.imread(tmp_path / "val_vs_lr.png")[..., :3]
    marker = np.isclose(image, to_rgb("C0"), atol=0.1).all(axis=-1)  # the colour of each variant's points
    assert [panel.any() for panel in np.array_split(marker, 4, axis=1)] == [i < len(variants) for i in range(4)]


def test_an_unfinished_study_says_so_and_lists_the_rounds(tmp_path):
    s = study(tmp_path, [{"id": 1, "claim": "c", "compare": ["a", "b"]}], max_seeds=4)
    text = write_report(s, results(grid(shifted(FLAT, -0.004), FLAT)), tmp_path, str(tmp_path / "study.yaml"))
    text = text.read_text()
    assert "**Interim report: the study is not finished.** 2 of the 20 runs it plans so far have not run" in text
    assert "## Rounds\n\nRuns the study added to its first grid, and why (see `plan` in runner.py):" in text
    assert "- claim 1: the interval of at best lrs (0.001, 0.001) straddles its threshold: 4 seeds" in text


def test_a_study_named_under_also_joins_the_report_and_says_when_it_is_not_finished(tmp_path):
    (tmp_path / "big").mkdir()
    big = study(tmp_path / "big", [{"id": 10, "claim": "a beats b at full scale.", "compare": ["a", "b"]}], name="big")
    s = study(tmp_path, [{"id": 4, "claim": "a beats b.", "compare": ["a", "b"]}], also=["big/study.yaml"])
    better = shifted(FLAT, -0.1)
    reports = tmp_path / "reports"

    def report() -> str:
        rows = results(grid(better, FLAT))
        return write_report(s, rows, reports / "synthetic", str(tmp_path / "study.yaml")).read_text()

    assert "## Also: big (`study.yaml`)\n\nNot yet measured: there is no `big/results.csv`" in report()
    rows = results(grid(better, MIDDLE))
    for r in rows:
        r["settings"] = big.settings(Run(r["variant"], r["lr"], r["seed"]))
    write_csv(rows[:-1], reports / "big" / "results.csv")  # one run of 18 to go
    text = report()
    assert "17 runs; machine(s): not recorded" in text and "| 10 | a beats b at full scale. | **" in text
    assert "**Not finished:** 1 of the 18 runs it plans so far have not run; verdicts may change." in text
    write_csv(rows, reports / "big" / "results.csv")
    text = report()
    assert "18 runs; machine(s)" in text and "Not finished" not in text
    assert "| 10 | a beats b at full scale. | **supported** |" in text


def test_what_to_expect_says_in_numbers_which_size_still_improved_and_which_rose(tmp_path):
    s = study(tmp_path, [{"id": 1, "claim": "c", "compare": ["a", "b"]}], variants=("a", "b", "c"), lrs=[LR])
    # Val loss at steps 100-400 (seed s adds 0.01 s): b still falls at the end; c is lowest at step 200 and
    # ends below step 300; the big a is lowest at step 200 and ends above step 300.
    curves = {"a": [2.0, 1.5, 1.6, 1.65], "b": [2.2, 2.0, 1.9, 1.8], "c": [2.1, 1.7, 1.75, 1.72]}
    params = {"a": 1000, "b": 100, "c": 500}
    rows = results({(v, LR): [min(c)] * 3 for v, c in curves.items()})
    for r in rows:
        vals = [x + 0.01 * r["seed"] for x in curves[r["variant"]]]
        r |= {"curve": [[100 * (i + 1), x, x - 0.2] for i, x in enumerate(vals)], "parameters": params[r["variant"]]}
        r |= {"best_val_loss": min(vals), "final_val_loss": vals[-1], "best_step": 100 * (vals.index(min(vals)) + 1)}
    text = write_report(s, rows, tmp_path / "report", str(tmp_path / "study.yaml")).read_text()
    assert (
        "The lowest val loss was a's (1.510), the biggest size's. For b (-0.100 since step 300), the val loss was "
        "at its lowest at the last validation, still falling: a longer run may help. For c (-0.030 since step 300, "
        "0.020 above its lowest at step 200), the val loss was lower at the end than a quarter of the run before, "
        "but above its lowest point. For a (+0.050 since step 300, 0.150 above its lowest at step 200), the val "
        "loss was higher at the end than a quarter of the run before: a run longer than its lowest point gains "
        "nothing." in text
    )
    assert (
        "- a, 1,000 parameters: val loss 1.610 at step 300, 1.510 at its lowest (step 200), 1.660 at step 400. "
        "Each run's own lowest came at step 200 on average, and its val loss rose by 0.150 after it (overfit)."
    ) in text


def test_the_runners_wall_time_is_summed_over_the_commands_that_ran_the_study(tmp_path):
    s = study(tmp_path, [{"id": 1, "claim": "c", "compare": ["a", "b"]}])
    rows = results(grid(FLAT, FLAT))
    assert "wall time" not in write_report(s, rows, tmp_path / "r", str(tmp_path / "study.yaml")).read_text()
    log_command(tmp_path / "r" / "commands.csv", datetime(2026, 1, 2, 3, 4, 5), 63.66, "SIGTERM")
    log_command(tmp_path / "r" / "commands.csv", datetime(2026, 1, 2, 5, 0), 53.7, "finished")
    assert (tmp_path / "r" / "commands.csv").read_text().splitlines() == [
        "started_utc,minutes,ended",
        "2026-01-02 03:04,63.7,SIGTERM",
        "2026-01-02 05:00,53.7,finished",
    ]
    text = write_report(s, rows, tmp_path / "r", str(tmp_path / "study.yaml")).read_text()
    assert "each timed in its worker); 117.4 min of runner wall time over 2 command(s), each a row of " in text
    with (tmp_path / "r" / "commands.csv").open("a") as f:
        f.write("2026-01-03 00:00,,finished\n")  # a row edited by hand
    with pytest.raises(UserError, match=r"commands.csv: not a commands.csv \(ValueError.*restore it \(git checkout\)"):
        write_report(s, rows, tmp_path / "r", str(tmp_path / "study.yaml"))
