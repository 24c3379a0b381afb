"""End to end through LightningCLI: fit a few steps, resume, predict from the checkpoint with no data."""

import io
import socket
import warnings
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from shakespeare_gpt.cli import build, cli_main
from shakespeare_gpt.pictures import char_kind, char_name

from ..conftest import TINY_TEXT, tiny_fit_args

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def trained(corpus_dir, tmp_path, monkeypatch):
    """A fitted tiny run in tmp_path/lightning_logs/version_0."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main(tiny_fit_args(corpus_dir))
    assert cli.trainer.global_step == 4
    return tmp_path / "lightning_logs" / "version_0"


def test_fit_keeps_best_and_last_checkpoints_and_logs_to_tensorboard(trained):
    ckpts = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts
    assert any(name.startswith("best-step") for name in ckpts)
    assert (trained / "config.yaml").exists()
    events = EventAccumulator(str(trained), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for tag in ["train/loss", "val/loss", "val/bpc", "train/lr/decayed", "perf/tokens_per_s"]:
        assert tag in scalars, scalars
    assert len(events.Scalars("val/loss")) == 2  # one full validation every 2 of the 4 steps
    assert "sample/text_summary" in events.Tags()["tensors"]


def test_fit_draws_every_layer_s_attention_at_each_validation_and_the_character_embeddings_at_its_end(
    corpus_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cli_main(tiny_fit_args(corpus_dir, 4, "--model.n_layer=2", "--attention_maps.prompt=All:\nSpeak"))
    run = tmp_path / "lightning_logs" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert events.Tags()["images"] == ["attention/layer_0", "attention/layer_1"]
    for tag in events.Tags()["images"]:
        assert [e.step for e in events.Images(tag)] == [2, 4]  # one per layer and validation
        image = Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string))
        assert image.size == (2 * (24 + 10 * 12 + 16), 16 + 24 + 10 * 12 + 16 + 14)  # two heads, 10 characters
    vocab = "".join(sorted(set(TINY_TEXT)))
    rows = (run / "00004" / "token_embeddings" / "metadata.tsv").read_text().splitlines()
    assert rows == ["character\tkind", *(f"{char_name(c)}\t{char_kind(c)}" for c in vocab)]
    assert {"newline\twhitespace", "space\twhitespace", "A\tcapital vowel"} <= set(rows)
    weights = torch.load(run / "checkpoints" / "last.ckpt")["state_dict"]["model.tok_emb.weight"]
    embeddings = numpy.loadtxt(run / "00004" / "token_embeddings" / "tensors.tsv", delimiter="\t")
    numpy.testing.assert_allclose(embeddings, weights.numpy(), rtol=1e-4)  # the run's last weights
    assert 'tensor_path: "00004/token_embeddings/tensors.tsv"' in (run / "projector_config.pbtxt").read_text()


def test_the_attention_maps_of_a_checkpoint_and_prompt_as_a_png_with_no_data_on_disk(
    trained, tmp_path, monkeypatch, capsys
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = ["predict", f"--ckpt_path={trained}", "--sample.prompt=Speak, speak.", "--attention_maps.png=maps.png"]
    cli_main([*args, "--sample.max_new_tokens=5", "--trainer.enable_progress_bar=false"])
    assert "wrote the attention maps to maps.png" in capsys.readouterr().out
    image = Image.open("maps.png").convert("RGB")
    assert image.size == (2 * (24 + 13 * 12 + 16), 16 + 24 + 13 * 12 + 16 + 14)  # 1 layer, 2 heads, 13 characters
    for head in range(2):  # query 0 sees key 0 alone: weight 1, navy; key 12 of query 0, masked: white
        x, y = head * (24 + 13 * 12 + 16) + 24 + 6, 16 + 14 + 24 + 6
        assert image.getpixel((x, y)) == (40, 85, 180) and image.getpixel((x + 12 * 12, y)) == (255, 255, 255)


def test_checkpoint_carries_the_vocabulary(trained, corpus_dir):
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    text = (corpus_dir / "input.txt").read_text()
    assert ckpt["hyper_parameters"]["vocab"] == "".join(sorted(set(text)))


def test_predict_from_checkpoint_with_no_data_on_disk(trained, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpt = next((trained / "checkpoints").glob("best-*.ckpt"))
    cli_main(
        [
            "predict",
            f"--config={ROOT / 'configs' / 'predict.yaml'}",
            f"--ckpt_path={ckpt}",
            "--sample.prompt=First",
            "--sample.num_samples=2",
            "--sample.max_new_tokens=30",  # and the config's top_k 40: more than the tiny corpus's characters, so all
        ]
    )
    out = capsys.readouterr().out
    samples = (trained / "samples.txt").read_text()  # beside the run sampled
    assert not (elsewhere / "lightning_logs").exists()
    assert out.count("----- sample") == 2 and samples.count("----- sample") == 2
    for line in ("----- sample 1 -----\nFirst", "----- sample 2 -----\nFirst"):
        assert line in out and line in samples
    assert not (elsewhere / "data").exists()  # nothing was downloaded or needed


def test_predict_settings_are_read_at_predict_time(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = trained / "checkpoints" / "last.ckpt"
    common = ["predict", f"--ckpt_path={ckpt}", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]

    def sample(*args: str) -> str:
        cli_main([*common, "--sample.prompt=All:", "--sample.max_new_tokens=25", *args])
        text = (trained / "samples.txt").read_text()  # beside the checkpoint's run
        return text.removeprefix("----- sample 1 -----\n").removesuffix("\n")

    # Drawn in batches, each said when done; the first samples are the same whatever their number.
    seeded = [*common, "--sample.prompt=All:", "--sample.max_new_tokens=25", "--sample.seed=7"]
    cli_main([*seeded, "--sample.num_samples=5", "--sample.batch_size=2"])
    assert "batch 3 of 3: 5 samples drawn" in capsys.readouterr().err
    five = (trained / "samples.txt").read_text()
    cli_main([*seeded, "--sample.num_samples=2"])
    assert five.count("----- sample") == 5 and five.startswith((trained / "samples.txt").read_text())
    greedy = [sample("--sample.top_k=1", f"--sample.seed={seed}") for seed in (1, 2)]
    assert greedy[0] == greedy[1]  # top_k=1 is greedy: the seed no longer matters
    hot = [sample("--sample.temperature=3.0", f"--sample.seed={seed}") for seed in (1, 1, 2)]
    assert hot[0] == hot[1] != hot[2]  # the seed makes sampling repeatable
    for text in greedy + hot:
        assert text.startswith("All:") and len(text) == len("All:") + 25


def test_fit_resumes_from_last(trained, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main([*tiny_fit_args(corpus_dir, max_steps=6), "--ckpt_path=last"])
    # The train loader's batches follow from the step, and it says so: no "not resumable" warning.
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert cli.trainer.global_step == 6
    assert cli.trainer.logger.log_dir == str(Path("lightning_logs") / "version_0")  # same run folder
    assert not (tmp_path / "lightning_logs" / "version_1").exists()


def test_validate_and_predict_take_a_run_folder_for_its_best_checkpoint(trained, corpus_dir, tmp_path, capsys):
    cli = cli_main(["validate", "--ckpt_path=lightning_logs", f"--data.corpus={corpus_dir / 'input.txt'}"])
    best = next((trained / "checkpoints").glob("best-*.ckpt"))
    assert f"checkpoint: {Path('lightning_logs') / 'version_0' / 'checkpoints' / best.name}" in capsys.readouterr().err
    assert cli.trainer.callback_metrics["val/loss"] > 0
    cli_main(["predict", f"--ckpt_path={trained}", "--sample.max_new_tokens=5", "--sample.prompt=All"])
    assert "----- sample 1 -----\nAll" in capsys.readouterr().out


def test_validate_takes_a_fit_config_and_writes_no_run_folder(trained, corpus_dir, tmp_path):
    config = tmp_path / "fit.yaml"  # like configs/cpu.yaml: it names its logger
    config.write_text("trainer:\n  logger:\n    init_args:\n      name: ''\n")
    before = sorted(p for p in (tmp_path / "lightning_logs").rglob("*"))
    cli = cli_main(
        ["validate", f"--config={config}", "--ckpt_path=lightning_logs", f"--data.corpus={corpus_dir / 'input.txt'}"]
    )
    assert cli.trainer.logger is None
    assert sorted(p for p in (tmp_path / "lightning_logs").rglob("*")) == before


def test_default_corpus_is_bundled_and_needs_no_network(tmp_path, monkeypatch):
    """``fit`` with no data option trains on the packaged tiny Shakespeare with every socket refused."""

    def no_network(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)
    args = [a for a in tiny_fit_args(tmp_path, 2) if not a.startswith("--data.corpus")]
    cli = cli_main(args)
    assert cli.datamodule.corpus == "tinyshakespeare" and len(cli.datamodule.vocab) == 65
    assert cli.trainer.global_step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning_logs"]  # nothing downloaded


def test_corpus_from_a_url_is_downloaded_once_then_used_offline(serve, closed_port_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = serve(TINY_TEXT.encode())
    args = [a for a in tiny_fit_args(tmp_path, 2) if not a.startswith("--data.corpus")]
    cli = cli_main([*args, f"--data.corpus={url}", "--data.cache_dir=cache"])
    assert cli.datamodule.vocab == "".join(sorted(set(TINY_TEXT)))
    (copy,) = (tmp_path / "cache").iterdir()
    assert copy.read_text() == TINY_TEXT
    served = copy.stat()
    cli_main([*args, f"--data.corpus={url}", "--data.cache_dir=cache"])  # the copy is used, not replaced
    assert (copy.stat().st_ino, copy.stat().st_mtime_ns) == (served.st_ino, served.st_mtime_ns)


def test_bad_model_shape_is_one_line_error(corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main([*tiny_fit_args(corpus_dir), "--model.n_head=3"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: --model.n_head 3 does not divide --model.n_embd 16: "
        "choose them so that every head gets n_embd // n_head dimensions"
    )


@pytest.mark.parametrize("config", ["shakespeare_char.yaml", "cpu.yaml"])
def test_shipped_configs_parse_and_build_their_model(config, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        f"--config={ROOT / 'configs' / config}",
        f"--data.corpus={corpus_dir / 'input.txt'}",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--print_config",
    ]
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 0


@pytest.mark.parametrize("config", ["shakespeare_char.yaml", "cpu.yaml", "one callback, not a list"])
def test_turning_the_progress_bar_off_overrides_a_configs_bar_settings(config, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = ROOT / "configs" / config
    if not config.endswith(".yaml"):  # jsonargparse also takes a single callback
        path = tmp_path / "bar.yaml"
        bar = "{class_path: lightning.pytorch.callbacks.TQDMProgressBar, init_args: {refresh_rate: 5}}"
        path.write_text(f"trainer:\n  callbacks: {bar}\n")
    # The tiny arguments come after the config and switch the bar off; the config sets a refresh rate.
    cli = build([f"--config={path}", *tiny_fit_args(corpus_dir)[1:], "--trainer.precision=32-true"])
    assert cli.trainer.progress_bar_callback is None


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "foreign"])
def test_bad_checkpoint_is_one_line_error(damage, trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = (trained / "checkpoints" / "last.ckpt").read_bytes()
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00not a checkpoint" * 100)
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(SystemExit) as exc:
        cli_main(["predict", f"--ckpt_path={bad}", "--sample.prompt=a"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {'checkpoint ' if damage != 'foreign' else ''}{bad}")
    assert "Traceback" not in err[0]


@pytest.mark.parametrize("subcommand,resume", [("validate", None), ("fit", "last"), ("fit", "file")])
def test_checkpoint_whose_vocabulary_lacks_characters_of_the_data(
    subcommand, resume, trained, corpus_dir, tmp_path, monkeypatch, capsys
):
    other = tmp_path / "other"
    other.mkdir()
    (other / "input.txt").write_text("Zounds! 42 quoth he.\n" * 300)
    monkeypatch.chdir(tmp_path)
    ckpt = "last" if resume == "last" else trained / "checkpoints" / "last.ckpt"
    args = tiny_fit_args(corpus_dir, 6)[1:] if subcommand == "fit" else []
    before = {p: p.read_bytes() for p in sorted(trained.rglob("*")) if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        cli_main([subcommand, *args, f"--ckpt_path={ckpt}", f"--data.corpus={other / 'input.txt'}"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: the corpus {other}/input.txt does not fit the ")  # the model (or checkpoint)
    assert "characters not in" in err
    assert "'!24Z" in err  # the offending characters, by name
    # Refused before anything is written: a resumed run's logs and checkpoints are as they were.
    assert {p: p.read_bytes() for p in sorted(trained.rglob("*")) if p.is_file()} == before


def test_help_lists_every_architecture_field_with_its_description(capsys):
    import dataclasses

    from shakespeare_gpt.model import GPTConfig

    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--model.help", "ShakespeareGPT"])  # as fit --help says
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # the help text wraps lines
    for field in dataclasses.fields(GPTConfig):
        if field.name != "vocab_size":  # the vocabulary decides it
            assert f"--model.{field.name} " in out, field.name
    assert "--model.vocab_size" not in out
    # GPTConfig's own descriptions, one of them for example:
    assert "include the linear projection after the concatenated heads" in out


def help_of(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main([*args, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # the help text wraps lines


def test_help_names_the_project_and_its_subcommands(capsys):
    out = help_of([], capsys)
    assert out.startswith("usage: shakespeare-gpt ")
    assert "Train a character-level GPT written from scratch" in out
    assert all(f" {name} " in out for name in ("fit", "validate", "test", "predict"))


def test_help_of_each_subcommand_shows_defaults_and_only_its_own_flags(capsys):
    fit = help_of(["fit"], capsys)
    assert fit.startswith("usage: shakespeare-gpt [options] fit ")
    assert "--data.batch_size BATCH_SIZE training windows per step. (type: PositiveInt, default: 64)" in fit
    assert "--data.corpus CORPUS ``tinyshakespeare`` (bundled with the package: no network)" in fit
    assert "--checkpoint.monitor" in fit and "--throughput.peak_flops" in fit
    assert "--sample." not in fit and "--writer." not in fit  # sampling is predict's
    predict = help_of(["predict"], capsys)
    assert "--sample.temperature TEMPERATURE > 0; below 1 is more conservative" in predict
    assert "default: 1.0" in predict and "--writer.path" in predict
    assert "--checkpoint." not in predict and "--throughput." not in predict


@pytest.mark.parametrize("model", ["ShakespeareGPT", "PretrainedLM"])
def test_the_training_recipe_is_declared_once_and_shown_for_both_models(model, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.help", model])
    out = " ".join(capsys.readouterr().out.split())
    for line in (
        "--model.learning_rate LEARNING_RATE peak AdamW learning rate. (type: LearningRate, default: 0.0003)",
        "--model.lr_schedule {constant,cosine} ``constant``, or ``cosine`` decay to ``min_lr`` after the warmup.",
        "--model.beta2 BETA2 AdamW beta2. (type: Fraction, default: 0.999)",
    ):
        assert line in out


def test_last_checkpoint_holds_the_final_step_when_it_was_not_a_validation_step(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(tiny_fit_args(corpus_dir, 5))  # validations at steps 2 and 4, the run ends at 5
    ckpt = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5
