"""The study runner as a user runs it, on Ray: a study to its report, a second runner refused, real
signals at random moments, an existing ``ray start`` cluster, and the committed configs on the CLI."""

import csv
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shakespeare_gpt.cli import cli_main, refusal
from shakespeare_gpt.tools.ablate.__main__ import main
from shakespeare_gpt.tools.ablate.study import Run, Study

from ..tools.test_study import ABLATIONS, SIZE_FILES, VARIANT_FILES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("variant", VARIANT_FILES + SIZE_FILES, ids=lambda p: p.stem)
def test_each_variant_config_works_on_its_own_on_top_of_a_fit_config(variant, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", f"--config={ROOT / 'configs' / 'cpu.yaml'}", f"--config={variant}", "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    for key, value in yaml.safe_load(variant.read_text())["model"].items():
        assert printed[key] == value


@pytest.mark.parametrize("name", ["full_scale_study.yaml", "capacity_full_scale.yaml"])
def test_the_full_scale_studies_run_the_lecture_model_on_a_gpu(name):
    """They cannot run here (no GPU); each of their runs is built by the CLI once moved to the CPU."""
    study = Study.load(ABLATIONS / name)
    cpu = [
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--model.compile=false",
        "--data.on_device=false",
    ]
    for variant in study.variants:
        args = study.run_args(Run(variant, study.learning_rates[0], 0), Path("unused"))
        assert refusal(args) is not None and refusal(args + cpu) is None


pytest.importorskip("ray")


def write_study(tmp_path: Path, corpus_dir: Path, seeds=(0,), steps=4, val=2, variants=2) -> Path:
    """A 1- or 2-variant, 1-lr study of a tiny model on the tiny corpus, a few steps per run."""
    base = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": steps,
            "val_check_interval": val,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "x"}},
        },
        "model": {"block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 16, "sample_tokens": 0},
        "data": {"corpus": str(corpus_dir / "input.txt"), "batch_size": 4, "val_batch_size": 512, "eval_train": True},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {"name": "smoke", "base": "base.yaml", "learning_rates": [1e-3], "seeds": list(seeds), "margin": 0.02}
    study["variants"] = {"baseline": [], "post_norm": [str(ABLATIONS / "post_norm.yaml")]}
    study["claims"] = [
        {"id": 10, "claim": "Post-norm gives better numbers than pre-norm.", "compare": ["post_norm", "baseline"]},
        {
            "id": "mine",
            "claim": "A claim of my own: the same.",
            "compare": ["post_norm", "baseline"],
            "expect": "equal",
        },
    ]
    if variants == 1:
        study["variants"].pop("post_norm")
        study.pop("claims")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    return tmp_path / "study.yaml"


def test_a_study_on_ray_writes_its_report_csv_and_tensorboard_runs(corpus_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    study = write_study(tmp_path, corpus_dir)
    report = tmp_path / "report"
    main([str(study), "--jobs=1", f"--logs={tmp_path / 'logs'}", f"--report={report}"])
    assert "smoke, round 1: 2 runs planned, 0 finished, 2 to go" in capsys.readouterr().out
    text = (report / "README.md").read_text()
    # The claims come from the study file, one of them the user's own: no code knows them.
    assert "| 10 | Post-norm gives better numbers than pre-norm. | **inconclusive** |" in text
    assert "| mine | A claim of my own: the same. | **inconclusive** |" in text
    assert "no interval: a point has 1 seed" in text and "Machine(s): " in text
    assert len((report / "results.csv").read_text().splitlines()) == 3
    (command,) = csv.DictReader((report / "commands.csv").open())  # this command: its wall time, how it ended
    assert command["ended"] == "finished" and float(command["minutes"]) > 0
    assert f"; {float(command['minutes']):.1f} min of runner wall time over 1 command(s)" in text
    runs = sorted((tmp_path / "logs" / "smoke").glob("*/*/result.json"))
    assert [p.parent.parent.name for p in runs] == ["baseline", "post_norm"]
    for p in runs:  # each run logged to TensorBoard with its hyperparameters, under one study folder
        events = EventAccumulator(str(p.parent)).Reload()
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HParams tab
        assert "hp/best_val_loss" in events.Tags()["scalars"]
    # --report-only writes the same report from the CSV alone: the logs can be gone.
    (report / "README.md").unlink()
    os.rename(tmp_path / "logs", tmp_path / "logs_gone")
    main([str(study), "--report-only", f"--logs={tmp_path / 'logs'}", f"--report={report}"])
    assert (report / "README.md").read_text() == text


# --- the runner as a process ---


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_runner(study: Path, tmp_path: Path, *extra: str, logs: str = "logs", env=None) -> subprocess.Popen:
    args = [sys.executable, "-m", "shakespeare_gpt.tools.ablate", str(study), f"--logs={tmp_path / logs}"]
    args += [f"--report={tmp_path / 'report'}", *extra]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(args, **pipes, start_new_session=True, env=env)


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_bad_input_to_the_module_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "study.yaml").write_text("name: s\n")
    for argv, expected in [
        (["study.yaml", "--jobs", "0"], 'error: Parser key "jobs": Not of type PositiveInt: 0 does not conform'),
        (["study.yaml"], "error: study file study.yaml: the following arguments are required: base, variants"),
    ]:
        args = [sys.executable, "-m", "shakespeare_gpt.tools.ablate", *argv]
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stdout == ""
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(expected), done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["study.yaml"]


def test_a_second_runner_on_the_same_study_or_report_is_refused_while_the_first_is_alive(corpus_dir, tmp_path):
    # Runs far longer than the checks take, so the first runner is surely still running them.
    study = write_study(tmp_path, corpus_dir, seeds=(0, 1), steps=200_000, val=200, variants=1)
    runner = start_runner(study, tmp_path, "--jobs=2")
    try:
        folders = tmp_path / "logs" / "smoke"
        wait_for(lambda: len(list(folders.glob("*/*/events.out.tfevents*"))) >= 2, 180, "two runs to log")
        second = start_runner(study, tmp_path, "--jobs=1")
        third = start_runner(study, tmp_path, logs="other")  # other logs, the same report's CSV
        for other, folder in ((second, folders), (third, tmp_path / "report")):
            _, err = other.communicate(timeout=120)
            assert other.returncode == 1 and err.startswith("error: study smoke is being run: wait for it"), err
            assert f"(pid {runner.pid} on {socket.gethostname()} holds {folder / '.runner.lock'})" in err
        assert not (tmp_path / "other" / "smoke" / "baseline").exists()
        assert runner.poll() is None and not list(folders.glob("*/*/result.json"))
        runner.send_signal(signal.SIGTERM)
        runner.communicate(timeout=120)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert runner.returncode == 143


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_runner_stops_every_worker_and_resumes(corpus_dir, tmp_path, how):
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
    commands = list(csv.DictReader((tmp_path / "report" / "commands.csv").open()))
    assert [c["ended"] for c in commands] == [("Ctrl-C" if how == "ctrl-c" else "SIGTERM"), "finished"]
    assert "over 2 command(s)" in (tmp_path / "report" / "README.md").read_text()


@pytest.fixture
def ray_cluster():
    """A Ray cluster started with `ray start --head`, as on a cluster's head node: (address, environment).

    Started with --block in a session of its own and stopped by signalling that session: `ray stop`
    would stop every Ray instance of the machine, a study running beside the tests included.
    Token authentication on, as a shared cluster would have it: its clients need the same token.
    """
    ray_cli = Path(sys.executable).with_name("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": os.urandom(16).hex(),
    }
    args = [str(ray_cli), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
    head = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    status = [str(ray_cli), "status", f"--address={address}"]
    try:
        wait_for(lambda: subprocess.run(status, capture_output=True, env=env, timeout=60).returncode == 0, 180, "ray")
        yield address, env, status
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def test_a_study_runs_on_an_existing_ray_cluster_and_leaves_it_running(corpus_dir, tmp_path, ray_cluster):
    address, env, status = ray_cluster
    runner = start_runner(write_study(tmp_path, corpus_dir, seeds=(0, 1)), tmp_path, f"--address={address}", env=env)
    out, err = runner.communicate(timeout=600)
    assert runner.returncode == 0, err
    assert "4 runs planned, 0 finished, 4 to go" in out
    assert len(list((tmp_path / "logs" / "smoke").glob("*/*/result.json"))) == 4
    assert subprocess.run(status, capture_output=True, env=env, timeout=120).returncode == 0  # only disconnected
