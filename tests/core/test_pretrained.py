"""The pretrained-model path, offline: a tiny GPT-2 and a BPE tokenizer made here, loaded by path.

``make_tiny_gpt2`` saves them with ``save_pretrained``; every test then loads the folder through
``--model.pretrained``, the same ``from_pretrained`` calls a Hub download goes through.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from shakespeare_gpt.cli import cli_main  # noqa: E402
from shakespeare_gpt.pretrained import PretrainedLM  # noqa: E402
from shakespeare_gpt.tools.tiny_gpt2 import make_tiny_gpt2  # noqa: E402
from shakespeare_gpt.utils import UserError  # noqa: E402

from ..conftest import TINY_TEXT, tiny_fit_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "gpt2_finetune.yaml"


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (random weights) and a byte-level BPE tokenizer trained on the test corpus."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-gpt2"
    corpus = folder.parent / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    return make_tiny_gpt2(folder, str(corpus), vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=64)


def gpt2_args(subcommand: str, model: Path, corpus_dir: Path, *extra: str) -> list[str]:
    """``subcommand`` with the GPT-2 config, on the CPU, the tiny model and corpus, small windows."""
    return [
        subcommand,
        f"--config={CONFIG}",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        f"--model.pretrained={model}",
        "--model.block_size=16",
        "--model.warmup_steps=2",
        "--model.sample_tokens=5",
        f"--data.corpus={corpus_dir / 'input.txt'}",
        "--data.batch_size=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def test_fine_tune_resume_validate_and_predict_through_the_cli(
    tiny_gpt2, corpus_dir, tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    steps = ["--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1"]
    cli = cli_main(gpt2_args("fit", tiny_gpt2, corpus_dir, "--trainer.max_steps=4", *steps))
    assert type(cli.model).__name__ == "PretrainedLM" and cli.trainer.global_step == 4
    run = tmp_path / "lightning_logs" / "gpt2" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and list(run.glob("events.out.tfevents.*"))
    # Its attention runs in a fused kernel: no maps, said once for the two validations; no projector.
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention maps:")]
    assert said == ["attention maps: none drawn, this PretrainedLM has no attention weights to show"]
    assert not (run / "projector_config.pbtxt").exists()
    first = {k: v.clone() for k, v in cli.model.state_dict().items()}
    assert math.isfinite(cli.trainer.callback_metrics["val/bpc"])

    # Resumed: the same run goes on to step 6, from the weights it stopped with.
    cli = cli_main(gpt2_args("fit", tiny_gpt2, corpus_dir, "--trainer.max_steps=6", "--ckpt_path=last", *steps))
    assert cli.trainer.global_step == 6 and Path(cli.trainer.logger.log_dir).resolve() == run
    assert any(not torch.equal(first[k], v) for k, v in cli.model.state_dict().items())

    # validate and predict from the run: the checkpoint decides the model, no config needed.
    cli = cli_main(["validate", f"--ckpt_path={run}", f"--data.corpus={corpus_dir / 'input.txt'}"])
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(metrics["val/bpc"]) and type(cli.model).__name__ == "PretrainedLM"
    samples = tmp_path / "samples.txt"
    args = ["--sample.prompt=All:", "--sample.max_new_tokens=12", "--sample.num_samples=2", f"--writer.path={samples}"]
    cli_main(["predict", f"--ckpt_path={run}", *args])
    text = samples.read_text()
    assert text.count("----- sample") == 2 and "\nAll:" in text
    # The same seed, the same samples.
    first_text = text
    cli_main(["predict", f"--ckpt_path={run}", *args])
    assert samples.read_text() == first_text


def test_zero_shot_validate_and_predict_need_no_fit(tiny_gpt2, corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(gpt2_args("validate", tiny_gpt2, corpus_dir))
    bpc = float(cli.trainer.callback_metrics["val/bpc"])
    # An untrained model with a 300-token vocabulary: about log2(300) bits a token, spread over
    # the characters of each token.
    assert 1.0 < bpc < 8.2 and not (tmp_path / "lightning_logs").exists()
    samples = tmp_path / "zero.txt"
    cli_main([*gpt2_args("predict", tiny_gpt2, corpus_dir), "--sample.max_new_tokens=70", f"--writer.path={samples}"])
    # 70 new tokens: past the model's 64 positions, where generation reads the last 64.
    assert samples.read_text().startswith("----- sample 1 -----\n\n")
    with pytest.raises(SystemExit):  # its attention weights are not read here: no PNG of them, said at once
        cli_main([*gpt2_args("predict", tiny_gpt2, corpus_dir), "--attention_maps.png=maps.png"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "error: --attention_maps.png: this PretrainedLM has no attention maps to draw"
    assert not (tmp_path / "maps.png").exists()


def test_generation_with_the_cache_equals_generation_without_it(tiny_gpt2):
    from shakespeare_gpt.pretrained import PretrainedLM

    model = PretrainedLM(str(tiny_gpt2), block_size=32)
    idx = torch.tensor([model.tokenizer.encode("All:\nSpeak")])
    cached = model.generate(idx, 80, top_k=1)  # greedy, past the 64 positions
    # By hand: the whole text (its last 64 tokens) through the model for every token.
    by_hand = idx
    model.eval()  # generate does the same for its duration
    with torch.no_grad():
        for _ in range(80):
            logits = model.model(input_ids=by_hand[:, -64:]).logits[:, -1]
            by_hand = torch.cat([by_hand, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, by_hand)


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_each_token_counts_the_characters_it_ends_with(tiny_gpt2, trim_offsets):
    from tokenizers import processors

    from shakespeare_gpt.pretrained import HFTokenizer

    tokenizer = HFTokenizer(str(tiny_gpt2))
    # Offsets as a tokenizer that trims spaces from its tokens' spans reports them.
    tokenizer.tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    text = "Speak,   speak.\n\nÉtienne — café, naïve 🎭 Resolved.  \n"  # bytes split the multi-byte characters
    ids, chars = tokenizer.encode_with_chars(text)
    assert tokenizer.decode(ids.tolist()) == text
    assert chars.sum() == len(text) and (chars >= 0).all()
    assert (chars == 0).any() and (chars > 1).any()  # tokens inside a character, and tokens of several
    # Wherever a prefix of the tokens decodes to whole characters, they count exactly those characters.
    whole = 0
    for k in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:k].tolist())
        if "\ufffd" not in prefix:
            assert chars[:k].sum() == len(prefix), (k, prefix)
            whole += 1
    assert whole > len(ids) // 2


def test_bpc_of_the_tiny_gpt2_equals_the_sum_done_by_hand(tiny_gpt2, corpus_dir):
    import lightning as L

    from shakespeare_gpt.data import ShakespeareDataModule, ValWindows
    from shakespeare_gpt.pretrained import PretrainedLM

    model = PretrainedLM(str(tiny_gpt2), block_size=16)
    dm = ShakespeareDataModule(str(corpus_dir / "input.txt"), block_size=16, batch_size=4, val_batch_size=3)
    dm.tokenizer = model.tokenizer  # as the CLI does
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(model, dm, verbose=False)

    # By hand: the val text's tokens, each but the first scored once from its window's context,
    # over the characters of the text minus those of the first token.
    val_text = TINY_TEXT[int(0.9 * len(TINY_TEXT)) :]
    ids, chars = model.tokenizer.encode_with_chars(val_text)
    windows = ValWindows(ids, 16)
    nats, scored = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y, _ in zip(*windows.__getitems__(list(range(len(windows)))), strict=True):
            for j in (y != -1).nonzero().flatten().tolist():
                logits = model.model(input_ids=x[None, : j + 1]).logits[0, -1]
                nats -= torch.log_softmax(logits.double(), -1)[y[j]].item()
                scored += 1
    assert scored == len(ids) - 1
    assert metrics["val/loss"] == pytest.approx(nats / scored, rel=1e-5)
    assert metrics["val/bpc"] == pytest.approx(nats / math.log(2) / (len(val_text) - chars[0].item()), rel=1e-5)


def test_the_loaded_model_trains_with_its_dropout(tiny_gpt2):
    from shakespeare_gpt.pretrained import PretrainedLM

    model = PretrainedLM(str(tiny_gpt2), block_size=16)
    assert all(m.training for m in model.modules())  # from_pretrained alone leaves it in eval mode


def test_a_checkpoint_of_one_model_class_is_refused_for_another(tiny_gpt2, corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli_main(tiny_fit_args(corpus_dir, 2))
    with pytest.raises(SystemExit):
        cli_main(gpt2_args("validate", tiny_gpt2, corpus_dir, f"--ckpt_path={tmp_path / 'lightning_logs'}"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "holds a ShakespeareGPT, not the PretrainedLM" in err


def test_a_pretrained_checkpoint_refuses_settings_it_contradicts_or_lacks(
    tiny_gpt2, corpus_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    cli_main(gpt2_args("fit", tiny_gpt2, corpus_dir, "--trainer.max_steps=2", "--trainer.val_check_interval=2"))
    run = tmp_path / "lightning_logs" / "gpt2"
    data = f"--data.corpus={corpus_dir / 'input.txt'}"
    for flag, message in [
        ("--model.block_size=32", "was trained with block_size=16 (asked: 32)"),
        ("--model.n_layer=3", "holds a PretrainedLM, which has no setting --model.n_layer: drop it"),
    ]:
        with pytest.raises(SystemExit):
            cli_main(["validate", f"--ckpt_path={run}", data, flag])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and message in err, err
    # A setting it agrees with, or one about how to run, is taken.
    cli = cli_main(["validate", f"--ckpt_path={run}", data, "--model.block_size=16", "--model.sample_tokens=0"])
    assert cli.model.hparams.block_size == 16


def test_a_checkpoint_from_before_model_classes_still_loads(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(tiny_fit_args(corpus_dir, 2))
    path = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    for key in ("_class_path", "_instantiator"):  # what checkpoints written before this version lack
        ckpt["hyper_parameters"].pop(key, None)
    torch.save(ckpt, path)
    cli = cli_main(["validate", f"--ckpt_path={path}", f"--data.corpus={corpus_dir / 'input.txt'}"])
    assert type(cli.model).__name__ == "ShakespeareGPT" and math.isfinite(cli.trainer.callback_metrics["val/bpc"])


def test_a_model_too_big_for_this_machine_is_refused_before_its_weights_are_read(
    tiny_gpt2, corpus_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    # A machine with 64 KiB of memory: the tiny model's fp32 weights do not fit.
    monkeypatch.setattr("shakespeare_gpt.pretrained.os.sysconf", lambda name: 16 if name == "SC_PHYS_PAGES" else 4096)
    with pytest.raises(SystemExit) as exc:
        cli_main(gpt2_args("validate", tiny_gpt2, corpus_dir))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: {re.escape(str(tiny_gpt2))} has 0\.\dM parameters, 0\.\d GiB in fp32, more than the 0\.0 GiB "
        r"of memory of this machine: use a machine with more, or a smaller model",
        err,
    ), err


def test_offline_without_a_local_copy_is_one_line_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # in-process; tests/e2e asks a Hub that cannot be reached
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli_main(["validate", f"--config={CONFIG}", "--model.pretrained=no-such-org/no-such-model"])
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(
            "error: cannot load 'no-such-org/no-such-model': it is not a folder here, and the Hugging Face Hub cannot"
        )
    )


@pytest.mark.parametrize(
    "given,message",
    [
        ("", "--model.pretrained is empty: give a Hugging Face model name (e.g. gpt2) or a local folder"),
        ("./models/nope", "--model.pretrained ./models/nope: there is no such folder here"),
        ("notes.txt", "--model.pretrained notes.txt is a file, not a model folder: give the folder that holds it"),
        ("run.ckpt", "--model.pretrained run.ckpt is a file, not a model folder: give it as --ckpt_path run.ckpt"),
        ("runs", "--model.pretrained runs holds this project's runs: give it as --ckpt_path runs"),
        ("no_tokenizer", "the tokenizer of 'no_tokenizer' turns text into no tokens: the folder lacks its tokenizer"),
    ],
)
def test_a_wrong_model_place_is_one_line_that_names_it(
    given, message, tiny_gpt2, corpus_dir, tmp_path, monkeypatch, capsys
):
    import shutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("notes")
    (tmp_path / "run.ckpt").write_bytes(b"")
    (tmp_path / "runs" / "version_0").mkdir(parents=True)
    (tmp_path / "no_tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt2 / name, tmp_path / "no_tokenizer" / name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main([*gpt2_args("validate", tiny_gpt2, corpus_dir), f"--model.pretrained={given}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_a_fine_tuned_checkpoint_finds_its_base_model_from_anywhere_and_where_it_moved(
    tiny_gpt2, corpus_dir, tmp_path, monkeypatch, capsys
):
    import shutil

    base = tmp_path / "work" / "models" / "tiny"
    shutil.copytree(tiny_gpt2, base)
    monkeypatch.chdir(tmp_path / "work")
    cli_main(
        gpt2_args("fit", Path("models/tiny"), corpus_dir, "--trainer.max_steps=2", "--trainer.val_check_interval=2")
    )
    run = tmp_path / "work" / "lightning_logs" / "gpt2"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the relative path the run was given means nothing here
    data = f"--data.corpus={corpus_dir / 'input.txt'}"
    cli = cli_main(["validate", f"--ckpt_path={run}", data])
    first = float(cli.trainer.callback_metrics["val/bpc"])
    moved = tmp_path / "moved"
    base.rename(moved)
    with pytest.raises(SystemExit):
        cli_main(["validate", f"--ckpt_path={run}", data])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: --model.pretrained {base}: there is no such folder here (a fine-tuned checkpoint remembers where its "
        "base model was: if the folder moved, give its new place with --model PretrainedLM --model.pretrained)"
    )
    cli = cli_main(["validate", f"--ckpt_path={run}", data, "--model=PretrainedLM", f"--model.pretrained={moved}"])
    assert float(cli.trainer.callback_metrics["val/bpc"]) == first
    # Another model's folder: its weights do not fit, said in one line before any is loaded.
    other = make_tiny_gpt2(tmp_path / "other", str(corpus_dir / "input.txt"), 300, 1, 2, 16, 64)
    with pytest.raises(SystemExit):
        cli_main(["validate", f"--ckpt_path={run}", data, "--model=PretrainedLM", f"--model.pretrained={other}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: the checkpoint's weights do not fit {other}: give --model.pretrained the model")


def test_without_transformers_the_error_says_how_to_install_it(corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails, as when not installed
    with pytest.raises(SystemExit) as exc:
        cli_main(["validate", f"--config={CONFIG}", "--trainer.accelerator=cpu"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        'error: pretrained models need the transformers package: pip install "shakespeare-gpt[pretrained]" '
        "(transformers and tokenizers)"
    )


def test_a_model_that_does_not_generate_text_is_refused_by_its_config_class(tiny_gpt2, tmp_path):
    import transformers

    folder = tmp_path / "not-causal"
    shutil.copytree(tiny_gpt2, folder)  # the tokenizer files stay; the model becomes an encoder
    transformers.DistilBertConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(folder)
    with pytest.raises(UserError, match="is not a causal language model: give one that generates text"):
        PretrainedLM(pretrained=str(folder), block_size=16)
