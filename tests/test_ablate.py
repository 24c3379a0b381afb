"""The ablation study: variant configs, the runner's resume, the report and its verdict rules."""

from pathlib import Path

import pytest
import yaml

from shakespeare_gpt.cli import cli_main
from shakespeare_gpt.errors import UserError
from shakespeare_gpt.tools.ablate import main
from shakespeare_gpt.tools.report import aggregate, verdicts
from shakespeare_gpt.tools.study import Study

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "ablations"
VARIANT_FILES = sorted(p for p in ABLATIONS.glob("*.yaml") if p.name not in ("seed_scale.yaml", "seed_study.yaml"))


@pytest.mark.parametrize("variant", VARIANT_FILES, ids=lambda p: p.stem)
def test_each_variant_config_works_on_its_own_on_top_of_a_fit_config(variant, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", f"--config={ROOT / 'configs' / 'cpu.yaml'}", f"--config={variant}", "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    for key, value in yaml.safe_load(variant.read_text())["model"].items():
        assert printed[key] == value


def test_the_seed_study_file_names_every_variant_config():
    study = Study.load(ABLATIONS / "seed_study.yaml")
    used = {f.resolve() for files in study.variants.values() for f in files}
    assert used == {p.resolve() for p in VARIANT_FILES}
    assert len(study.seeds) >= 3 and "bigram" in study.variants


@pytest.fixture
def smoke_study(corpus_dir, tmp_path):
    """A 2-variant, 1-lr, 1-seed study of a tiny model on the tiny corpus, a few steps per run."""
    base = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 4,
            "val_check_interval": 2,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "x"}},
        },
        "model": {"block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16, "sample_tokens": 0},
        "data": {"corpus": str(corpus_dir / "input.txt"), "batch_size": 4, "eval_train": True},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {
        "name": "smoke",
        "base": "base.yaml",
        "learning_rates": [1e-3],
        "seeds": [0],
        "variants": {"baseline": [], "post_norm": [str(ABLATIONS / "post_norm.yaml")]},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def run(study: Path, tmp_path: Path, capsys) -> str:
    main([str(study), "--jobs=1", f"--logs={tmp_path / 'logs'}", f"--report={tmp_path / 'report'}"])
    return capsys.readouterr().out


def test_smoke_study_writes_the_report(smoke_study, tmp_path, capsys):
    out = run(smoke_study, tmp_path, capsys)
    assert "2 runs, 0 already finished, 2 to go" in out
    report = (tmp_path / "report" / "README.md").read_text()
    for png in ("val_vs_lr.png", "best_val.png", "gap.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
        assert f"]({png})" in report
    assert "| 10 | Post-norm gives better numbers than pre-norm. |" in report
    assert "| 4 | Adding the feed-forward layer improves performance. | **not run** |" in report
    # Each run logged to TensorBoard with its hyperparameters, under one study folder.
    runs = sorted((tmp_path / "logs" / "smoke").glob("*/*/result.json"))
    assert [p.parent.parent.name for p in runs] == ["baseline", "post_norm"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for p in runs:
        events = EventAccumulator(str(p.parent)).Reload()
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HParams tab
        assert "hp/best_val_loss" in events.Tags()["scalars"]


def test_resumed_study_skips_finished_runs(smoke_study, tmp_path, capsys):
    run(smoke_study, tmp_path, capsys)
    results = sorted((tmp_path / "logs" / "smoke").glob("*/*/result.json"))
    stamps = {p: p.stat().st_mtime_ns for p in results}
    results[0].unlink()  # as if the study had been interrupted during this run
    out = run(smoke_study, tmp_path, capsys)
    assert "2 runs, 1 already finished, 1 to go" in out
    assert results[0].exists()
    assert results[1].stat().st_mtime_ns == stamps[results[1]]  # the finished run was not run again


def test_changed_variant_config_reruns_that_variant_only(smoke_study, tmp_path, capsys):
    run(smoke_study, tmp_path, capsys)
    variant = tmp_path / "post_norm_copy.yaml"
    variant.write_text("model:\n  norm: post\n")
    study = yaml.safe_load(smoke_study.read_text())
    study["variants"]["post_norm"] = [str(variant)]
    smoke_study.write_text(yaml.safe_dump(study))
    out = run(smoke_study, tmp_path, capsys)
    assert "2 runs, 1 already finished, 1 to go" in out  # same contents but another file: new command line
    variant.write_text("model:\n  norm: post\n  dropout: 0.1\n")
    out = run(smoke_study, tmp_path, capsys)
    assert "2 runs, 1 already finished, 1 to go" in out  # the file's contents changed
    assert "post_norm lr=0.001 seed=0" in out


def test_study_naming_a_missing_config_is_refused(tmp_path):
    (tmp_path / "study.yaml").write_text(
        yaml.safe_dump({"name": "s", "base": "nope.yaml", "variants": {}, "learning_rates": [1e-3], "seeds": [0]})
    )
    with pytest.raises(UserError, match=r"base nope.yaml: .*nope.yaml does not exist"):
        Study.load(tmp_path / "study.yaml")


def results(variant: str, lr: float, losses: list[float], gap: float = 0.05) -> list[dict]:
    return [
        {
            "variant": variant,
            "lr": lr,
            "seed": s,
            "best_val_loss": v,
            "final_val_loss": v,
            "best_train_loss": v - gap,
            "final_train_loss": v - gap,
            "final_gap": gap,
            "steps": 10,
            "seconds": 1.0,
        }
        for s, v in enumerate(losses)
    ]


def test_verdicts_follow_the_stated_noise_rule():
    data = (
        results("baseline", 1e-3, [2.00, 2.01, 2.02])
        + results("post_norm", 1e-3, [1.90, 1.91, 1.92])  # better by far more than the spread
        + results("no_ffwd", 1e-3, [2.00, 2.02, 2.04])  # within the spread
        + results("no_residual", 1e-3, [1.50, 1.51, 1.52])  # clearly better: contradicts observation 8
    )
    by_number = {v.number: v for v in verdicts(aggregate(data))}
    assert by_number[10].verdict == "supported"
    assert by_number[4].verdict == "inconclusive"
    assert by_number[8].verdict == "contradicted"
    assert by_number[1].verdict == "not run"


def test_dropout_effect_that_flips_sign_with_lr_contradicts_observation_1():
    data = []
    for lr, with_dropout, without in [(1e-3, 2.00, 2.10), (1e-2, 2.10, 2.00)]:
        data += results("baseline", lr, [with_dropout, with_dropout + 0.001])
        data += results("no_dropout", lr, [without, without + 0.001])
    by_number = {v.number: v for v in verdicts(aggregate(data))}
    assert by_number[1].verdict == "contradicted"
    same_sign = [r for r in data if not (r["variant"] == "no_dropout" and r["lr"] == 1e-2)]
    same_sign += results("no_dropout", 1e-2, [2.20, 2.201])
    assert {v.number: v for v in verdicts(aggregate(same_sign))}[1].verdict == "supported"


def test_lr_sensitivity_and_gap_verdicts():
    data = []
    for lr, multi, single in [(1e-3, 2.00, 2.30), (1e-2, 2.02, 2.00)]:
        data += results("baseline", lr, [multi, multi + 0.001, multi + 0.002], gap=0.02)
        data += results("single_head", lr, [single, single + 0.001, single + 0.002], gap=0.10)
    by_number = {v.number: v for v in verdicts(aggregate(data))}
    assert by_number[2].verdict == "supported"  # 4 heads vary 0.02 over the lr grid, 1 head 0.30
    assert by_number[3].verdict == "supported"  # gap 0.02 vs 0.10


def test_report_only_without_finished_runs_is_one_line(smoke_study, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(smoke_study), "--report-only", f"--logs={tmp_path / 'logs'}", f"--report={tmp_path / 'report'}"])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: no finished runs of smoke under {tmp_path / 'logs' / 'smoke'}: run the study first"
    ]
