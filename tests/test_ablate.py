"""The ablation study on its engine (Ray): variant configs, the runner's rounds, resume, lock and interrupts,
the cluster path, the report and the CSV it can be written again from. The verdict rules: test_verdicts.py."""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shakespeare_gpt.cli import cli_main
from shakespeare_gpt.errors import UserError
from shakespeare_gpt.tools.ablate import main
from shakespeare_gpt.tools.study import Study

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "ablations"
STUDY_FILES = ("seed_scale.yaml", "seed_study.yaml", "full_scale_study.yaml")
VARIANT_FILES = sorted(p for p in ABLATIONS.glob("*.yaml") if p.name not in STUDY_FILES)


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
    assert len(study.seeds) >= 3 and "bigram" in study.variants and "tied_embeddings" in study.variants
    # The original protocol: 10,000 steps, learning rates from 1e-4 to 1e-2 (5 points or more).
    assert "--trainer.max_steps" not in " ".join(study.args)
    assert yaml.safe_load(study.base.read_text())["trainer"]["max_steps"] == 10000
    assert min(study.learning_rates) <= 1e-4 and max(study.learning_rates) >= 1e-2 and len(study.learning_rates) >= 5
    assert len(study.claims) >= 11 and study.margin and study.extend_grid and study.max_seeds > len(study.seeds)


def test_the_full_scale_study_runs_the_lecture_model_on_a_gpu():
    """It cannot run here (no GPU); each of its runs is built by the CLI once moved to the CPU."""
    from shakespeare_gpt.tools.checks import cli_refusal
    from shakespeare_gpt.tools.study import Run

    study = Study.load(ABLATIONS / "full_scale_study.yaml")
    assert set(study.variants) == {"baseline", "post_norm", "tied_embeddings"} and len(study.seeds) >= 3
    assert {c.id for c in study.claims} == {"10", "11"}
    cpu = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--model.compile=false"]
    cpu += ["--data.on_device=false"]
    for variant in study.variants:
        args = study.run_args(Run(variant, study.learning_rates[0], 0), Path("unused"))
        assert "asks for a CUDA GPU" in cli_refusal(args)
        assert cli_refusal(args + cpu) is None


pytest.importorskip("ray")


def write_study(tmp_path: Path, corpus_dir: Path, seeds=(0,), steps=4, val=2, variants=2, **extra) -> Path:
    """A 2-variant, 1-lr study of a tiny model on the tiny corpus, a few steps per run."""
    base = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": steps,
            "val_check_interval": val,
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
        "seeds": list(seeds),
        "margin": 0.02,
        "variants": {"baseline": [], "post_norm": [str(ABLATIONS / "post_norm.yaml")]},
        "claims": [
            {"id": 10, "claim": "Post-norm gives better numbers than pre-norm.", "compare": ["post_norm", "baseline"]},
            {
                "id": "mine",
                "claim": "A claim of my own: they are the same.",
                "compare": ["post_norm", "baseline"],
                "expect": "equal",
            },
        ],
        **extra,
    }
    if variants == 1:
        study["variants"].pop("post_norm")
        study.pop("claims")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture
def smoke_study(corpus_dir, tmp_path):
    return write_study(tmp_path, corpus_dir)


def run(study: Path, tmp_path: Path, capsys, *extra: str, jobs: str = "--jobs=1") -> str:
    main([str(study), jobs, f"--logs={tmp_path / 'logs'}", f"--report={tmp_path / 'report'}", *extra])
    return capsys.readouterr().out


def test_smoke_study_writes_the_report_and_its_csv(smoke_study, tmp_path, capsys, monkeypatch):
    from shakespeare_gpt.tools import ablate

    written = []  # the runs in results.csv each time the runner rewrites it

    def write_csv(results, path):
        real_write_csv(results, path)
        written.append(len(path.read_text().splitlines()) - 1)

    real_write_csv = ablate.write_csv
    monkeypatch.setattr(ablate, "write_csv", write_csv)
    out = run(smoke_study, tmp_path, capsys)
    assert written[:3] == [0, 1, 2]  # rewritten after each run, not only at the end
    assert "smoke, round 1: 2 runs planned, 0 finished, 2 to go" in out
    report = (tmp_path / "report" / "README.md").read_text()
    for png in ("val_vs_lr.png", "best_val.png", "gap.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000
        assert f"]({png})" in report
    # The claims come from the study file, one of them the user's own: no code knows them.
    assert "| 10 | Post-norm gives better numbers than pre-norm. | **inconclusive** |" in report
    assert "| mine | A claim of my own: they are the same. | **inconclusive** |" in report
    assert "no interval: a point has 1 seed" in report  # one seed: no verdict, not "supported +- 0"
    assert "Runs computed by the code at commit(s) `" in report and "Machine(s): " in report
    rows = (tmp_path / "report" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("variant,lr,seed,diverged,steps,best_val_loss") and len(rows) == 3
    # Each run logged to TensorBoard with its hyperparameters, under one study folder.
    runs = sorted((tmp_path / "logs" / "smoke").glob("*/*/result.json"))
    assert [p.parent.parent.name for p in runs] == ["baseline", "post_norm"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for p in runs:
        events = EventAccumulator(str(p.parent)).Reload()
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HParams tab
        assert "hp/best_val_loss" in events.Tags()["scalars"]
    # --report-only writes the same report from the CSV alone: the logs can be gone.
    (tmp_path / "report" / "README.md").unlink()
    os.rename(tmp_path / "logs", tmp_path / "logs_gone")
    main([str(smoke_study), "--report-only", f"--logs={tmp_path / 'logs'}", f"--report={tmp_path / 'report'}"])
    assert (tmp_path / "report" / "README.md").read_text() == report


def test_resumed_study_skips_finished_runs_and_redoes_a_cut_off_one(smoke_study, tmp_path, capsys):
    run(smoke_study, tmp_path, capsys)
    results = sorted((tmp_path / "logs" / "smoke").glob("*/*/result.json"))
    stamps = {p: p.stat().st_mtime_ns for p in results}
    # As if the study had been cut off during this run, which left files behind (and no row in the CSV).
    results[0].unlink()
    (results[0].parent / "half_written.ckpt").write_text("x")
    csv_file = tmp_path / "report" / "results.csv"
    rows = csv_file.read_text().splitlines()
    csv_file.write_text("\n".join(r for r in rows if not r.startswith(results[0].parent.parent.name + ",")) + "\n")
    out = run(smoke_study, tmp_path, capsys)
    assert "2 runs planned, 1 finished, 1 to go" in out
    assert results[0].exists() and not (results[0].parent / "half_written.ckpt").exists()  # started over
    assert results[1].stat().st_mtime_ns == stamps[results[1]]  # the finished run was not run again
    assert "2 runs planned" not in run(smoke_study, tmp_path, capsys)  # all done: nothing runs


def test_study_resumes_from_its_committed_csv_alone(smoke_study, tmp_path, capsys):
    """A fresh clone has the committed results.csv and no logs: its finished runs are not run again."""
    run(smoke_study, tmp_path, capsys)
    csv_file = tmp_path / "report" / "results.csv"
    rows = csv_file.read_text().splitlines()
    shutil.rmtree(tmp_path / "logs")
    out = run(smoke_study, tmp_path, capsys)
    assert "smoke: 2 finished runs read from" in out and "runs planned" not in out
    assert csv_file.read_text().splitlines() == rows and not (tmp_path / "logs" / "smoke" / "baseline").exists()
    # One row gone (a run the committed CSV did not have yet): only that run is run.
    csv_file.write_text("\n".join(r for r in rows if not r.startswith("post_norm,")) + "\n")
    out = run(smoke_study, tmp_path, capsys)
    assert "smoke: 1 finished runs read from" in out and "2 runs planned, 1 finished, 1 to go" in out
    assert "post_norm lr=0.001 seed=0" in out and len(csv_file.read_text().splitlines()) == 3


def test_an_unfinished_study_reports_so_and_rows_of_other_settings_are_not_finished(smoke_study, tmp_path, capsys):
    from shakespeare_gpt.tools.report import finished_rows, write_report

    study = Study.load(smoke_study)
    run(smoke_study, tmp_path, capsys)
    results, stale = finished_rows(tmp_path / "report" / "results.csv", study)
    assert len(results) == 2 and stale == []
    report = write_report(study, results[:1], tmp_path / "interim", study_file=str(smoke_study)).read_text()
    assert "**Interim report: the study is not finished.** 1 of the 2 runs it plans so far have not run" in report
    assert "Interim report" not in (tmp_path / "report" / "README.md").read_text()
    # A row computed with other settings is not a finished run of the study as it is now.
    variant = tmp_path / "post_norm_copy.yaml"
    variant.write_text("model:\n  norm: post\n  dropout: 0.1\n")
    changed = yaml.safe_load(smoke_study.read_text())
    changed["variants"]["post_norm"] = [str(variant)]
    smoke_study.write_text(yaml.safe_dump(changed))
    finished, stale = finished_rows(tmp_path / "report" / "results.csv", Study.load(smoke_study))
    assert [r["variant"] for r in finished] == ["baseline"] and [r["variant"] for r in stale] == ["post_norm"]
    assert finished_rows(tmp_path / "nowhere.csv", study) == ([], [])


def test_changed_variant_config_reruns_that_variant_only(smoke_study, tmp_path, capsys):
    run(smoke_study, tmp_path, capsys)
    variant = tmp_path / "post_norm_copy.yaml"
    variant.write_text("model:\n  norm: post\n")
    study = yaml.safe_load(smoke_study.read_text())
    study["variants"]["post_norm"] = [str(variant)]
    smoke_study.write_text(yaml.safe_dump(study))
    out = run(smoke_study, tmp_path, capsys)
    assert "2 runs planned" not in out  # the same contents in another file: the same runs
    variant.write_text("model:\n  norm: post\n  dropout: 0.1\n")
    out = run(smoke_study, tmp_path, capsys)
    assert "2 runs planned, 1 finished, 1 to go" in out  # the file's contents changed
    assert "post_norm lr=0.001 seed=0" in out
    # The old run's row left results.csv for results.csv.stale, which keeps it: nothing is lost.
    assert "1 rows of" in out and "moved to" in out
    stale = (tmp_path / "report" / "results.csv.stale").read_text().splitlines()
    assert len(stale) == 2 and stale[1].startswith("post_norm,0.001,0,")
    assert len((tmp_path / "report" / "results.csv").read_text().splitlines()) == 3


def test_a_broken_csv_at_start_is_one_line_and_is_left_as_it_was(smoke_study, tmp_path, capsys):
    report = tmp_path / "report"
    report.mkdir()
    broken = [
        b"variant,lr,seed,diverged,steps\nbaseline,0.001,zero,False,4\n",  # a value of the wrong type
        b"variant,lr\n" + b"x" * 200_000 + b",0.001\n",  # no CSV the runner writes: csv.Error
        b"variant,lr\n\xff\xfe,0.001\n",  # not UTF-8
    ]
    for content in broken:
        (report / "results.csv").write_bytes(content)
        with pytest.raises(SystemExit) as exc:
            run(smoke_study, tmp_path, capsys)
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {report / 'results.csv'}")
        assert (report / "results.csv").read_bytes() == content
        assert not (tmp_path / "logs" / "smoke" / "baseline").exists()


def test_a_run_that_diverges_before_its_first_validation_is_recorded_as_diverged(corpus_dir, tmp_path, monkeypatch):
    """Its loss turns NaN at step 2 of 6, before the one validation: a result, not a failed study."""
    import math

    import torch

    from shakespeare_gpt.lightning_module import ShakespeareGPT
    from shakespeare_gpt.tools.ablate import execute
    from shakespeare_gpt.tools.study import Run

    study = Study.load(write_study(tmp_path, corpus_dir, steps=6, val=6))
    loss = ShakespeareGPT.loss

    def breaking(self, batch):
        value = loss(self, batch)
        return value * torch.nan if self.trainer.global_step >= 2 else value

    monkeypatch.setattr(ShakespeareGPT, "loss", breaking)
    monkeypatch.chdir(tmp_path)
    result = execute(study, Run("baseline", 1e-3, 0), tmp_path / "logs", "abc")
    vocab = len(set((corpus_dir / "input.txt").read_text()))
    assert result["diverged"] and result["best_val_loss"] == pytest.approx(math.log(vocab))  # uniform
    assert (tmp_path / "logs" / "baseline" / "lr0.001_seed0" / "result.json").exists()


def test_study_naming_a_missing_config_is_refused(tmp_path):
    (tmp_path / "study.yaml").write_text(
        yaml.safe_dump(
            {"name": "s", "base": "nope.yaml", "variants": {"a": []}, "learning_rates": [1e-3], "seeds": [0]}
        )
    )
    with pytest.raises(UserError, match=r"base nope.yaml: .*nope.yaml does not exist"):
        Study.load(tmp_path / "study.yaml")


def test_report_only_without_a_csv_is_one_line(smoke_study, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(smoke_study), "--report-only", f"--logs={tmp_path / 'logs'}", f"--report={tmp_path / 'report'}"])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: no results.csv in {tmp_path / 'report'}: run the study first, or give --report of a folder with one"
    ]


# --- the runner as a process: a second runner, interrupts, what is left behind ---


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_runner(study: Path, tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "shakespeare_gpt.tools.ablate", str(study), f"--logs={tmp_path / 'logs'}"]
    args += [f"--report={tmp_path / 'report'}", *extra]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(args, **pipes, start_new_session=True, env=env)


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_second_runner_on_the_same_study_or_report_is_refused_while_the_first_is_alive(corpus_dir, tmp_path):
    # Runs far longer than the checks take, so the first runner is surely still running them.
    study = write_study(tmp_path, corpus_dir, seeds=(0, 1), steps=200_000, val=200, variants=1)
    runner = start_runner(study, tmp_path, "--jobs=2")
    try:
        folders = tmp_path / "logs" / "smoke"
        wait_for(lambda: len(list(folders.glob("*/*/events.out.tfevents*"))) >= 2, 180, "two runs to log")
        second = start_runner(study, tmp_path, "--jobs=1")
        # One with other logs that would rewrite the same report's CSV, started beside it.
        args = [sys.executable, "-m", "shakespeare_gpt.tools.ablate", str(study), f"--logs={tmp_path / 'other'}"]
        third = subprocess.Popen(
            [*args, f"--report={tmp_path / 'report'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1, err
        assert err.strip().splitlines() == [
            f"error: study smoke in {folders} is being run by runner pid {runner.pid} on {socket.gethostname()}: "
            "wait for it to end, or stop it (Ctrl-C in its terminal, or kill its pid) and run this again to resume"
        ]
        _, err = third.communicate(timeout=120)
        assert third.returncode == 1, err
        assert f"error: study smoke in {tmp_path / 'report'} is being run by runner pid {runner.pid}" in err
        assert not (tmp_path / "other" / "smoke" / "baseline").exists()
        assert runner.poll() is None
        assert not list(folders.glob("*/*/result.json"))
        runner.send_signal(signal.SIGTERM)
        runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert runner.returncode == 143


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_runner_stops_every_worker_and_resumes(corpus_dir, tmp_path, how):
    """Real signals to a real runner, at a random moment of its runs (training or validation)."""
    # 2 runs at once, long enough (4000 steps) to be stopped, with a validation every 200 steps.
    study = write_study(tmp_path, corpus_dir, seeds=(0, 1), steps=4000, val=200, variants=1)
    runner = start_runner(study, tmp_path, "--jobs=2")
    try:
        folders = tmp_path / "logs" / "smoke"
        wait_for(lambda: len(list(folders.glob("*/*/events.out.tfevents*"))) >= 2, 180, "two runs to log")
        workers = descendants(runner.pid)
        assert len(workers) >= 3  # Ray's own processes and the workers running the fits
        time.sleep(random.uniform(0, 3))
        workers |= descendants(runner.pid)
        # Both runs still going: a signal during the runner's clean-up after its last run proves nothing.
        assert runner.poll() is None and not list(folders.glob("*/*/result.json")), "make the runs longer"
        if how == "ctrl-c":  # the terminal sends SIGINT to the whole foreground process group
            os.killpg(runner.pid, signal.SIGINT)
        else:
            runner.send_signal(signal.SIGTERM)
        out, err = runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert runner.returncode == (130 if how == "ctrl-c" else 143), out + err
    assert "the study stopped; every run it started was stopped" in err
    wait_for(lambda: not any(alive(p) for p in workers), 30, "the runner's processes to end")
    # Run again: finished runs are kept (none here), the cut-off ones are run from their start.
    again = start_runner(study, tmp_path, "--jobs=2")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "2 runs planned, 0 finished, 2 to go" in out
    assert len(list(folders.glob("*/*/result.json"))) == 2
    assert len((tmp_path / "report" / "results.csv").read_text().splitlines()) == 3  # both runs, one row each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A Ray cluster started with `ray start --head`, as on a cluster's head node: (address, environment).

    Started with --block in a session of its own and stopped by signalling that session: `ray stop`
    would stop every Ray instance of the machine, a study running beside the tests included.
    Token authentication on, as a shared cluster would have it: its clients need the same token.
    """
    ray_cli = Path(sys.executable).with_name("ray")
    port = free_port()
    token = os.urandom(16).hex()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    args = [str(ray_cli), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
    head = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    status = [str(ray_cli), "status", f"--address={address}"]
    try:
        up = lambda: subprocess.run(status, capture_output=True, env=env, timeout=60).returncode == 0  # noqa: E731
        wait_for(up, 180, "ray start")
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def test_study_runs_on_an_existing_ray_cluster(corpus_dir, tmp_path, ray_cluster):
    address, env = ray_cluster
    study = write_study(tmp_path, corpus_dir, seeds=(0, 1))
    runner = start_runner(study, tmp_path, f"--address={address}", env=env)
    out, err = runner.communicate(timeout=600)
    assert runner.returncode == 0, err
    assert "4 runs planned, 0 finished, 4 to go" in out
    assert len(list((tmp_path / "logs" / "smoke").glob("*/*/result.json"))) == 4
    # The cluster outlives the study: the runner only disconnected from it.
    ray_cli = Path(sys.executable).with_name("ray")
    status = subprocess.run([str(ray_cli), "status", f"--address={address}"], capture_output=True, env=env, timeout=120)
    assert status.returncode == 0


def test_jobs_with_a_cluster_address_is_one_line(smoke_study, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(smoke_study, tmp_path, capsys, "--address=127.0.0.1:1")
    assert capsys.readouterr().err.strip() == (
        "error: --jobs is for this machine; with --address the cluster's size decides: drop --jobs"
    )
