"""compare and tiny_gpt2, in-process: a tiny GPT-2 saved as a Hub download is, a report on it and a
character model whose commands reproduce its figures and samples, and one-line refusals of bad input."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from shakespeare_gpt.cli import cli_main  # noqa: E402
from shakespeare_gpt.tools import compare, tiny_gpt2  # noqa: E402

from ..conftest import fit_tiny_run  # noqa: E402

GPT2_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A corpus (data/input.txt), a character run of 2 steps (lightning_logs/) and a tiny GPT-2 (gpt2/)."""
    root = tmp_path_factory.mktemp("models")
    fit_tiny_run(root, 2)
    sizes = ["--vocab-size=300", "--n-layer=1", "--n-head=2", "--n-embd=16", "--n-positions=64"]
    tiny_gpt2.main([str(root / "gpt2"), f"--corpus={root / 'data' / 'input.txt'}", *sizes])
    return root


def test_tiny_gpt2_saves_a_model_folder_as_a_download_is(models):
    assert sorted(p.name for p in (models / "gpt2").iterdir()) == GPT2_FILES
    config = json.loads((models / "gpt2" / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"]) == (1, 2, 16, 64)
    assert config["vocab_size"] <= 300


def test_compare_reports_every_model_and_its_commands_reproduce_it(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [
        f"char={models / 'lightning_logs'}",
        f"tiny GPT-2={models / 'gpt2'}",
        f"--corpus={models / 'data' / 'input.txt'}",
        "--block-size=32",
        "--max-new-tokens=20",
        "--prompt=All:",
        "--out=reports/compare.md",
        "--accelerator=cpu",
        "--note",
        "First note.",
        "--note=Second: 'quoted' [and bracketed].",
    ]
    compare.main(argv)
    assert capsys.readouterr().out.splitlines()[-1] == "wrote reports/compare.md"
    lines = (tmp_path / "reports" / "compare.md").read_text().splitlines()
    assert lines[:2] == ["# Models compared on tiny Shakespeare's val split", ""]
    assert lines[2].startswith("Written at commit `") and lines[2].endswith(
        ", by the command at the end of this report."
    )
    assert lines[4:8] == ["First note.", "", "Second: 'quoted' [and bracketed].", ""]
    assert lines[8].startswith(f"Corpus: `{models / 'data' / 'input.txt'}`; val split: its last 10% of characters.")
    head = "| model | what | parameters | block | val loss (nats/token) | val bpc | tokens/s | chars/s |"
    assert lines[10:12] == [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    rows = {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in (line.split("|") for line in lines[12:14])}
    assert [r[0] for r in rows.values()] == ["ShakespeareGPT", "PretrainedLM, zero-shot"]
    assert rows["char"][2] == "16" and rows["tiny GPT-2"][2] == "32"  # a checkpoint keeps its block; --block-size
    assert lines[14:17] == [
        "",
        "## Samples (prompt='All:', max_new_tokens=20, temperature=0.8, top_k=None, top_p=1.0, seed=1337)",
        "",
    ]
    assert lines[-4:] == [
        "This report:",
        "```bash",
        shlex.join(["python", "-m", "shakespeare_gpt.tools.compare", *argv]),
        "```",
    ]
    text = "\n".join(lines)
    assert text.count("<pre>All:") == 2 and "## Commands" in text

    # Each model's commands, run as written: validate gives the report's size and val bpc, predict its sample.
    for label in rows:
        validate = next(x for x in lines[lines.index(f"**{label}**") :] if x.startswith("shakespeare-gpt validate"))
        cli = cli_main(shlex.split(validate)[1:])
        assert f"{sum(p.numel() for p in cli.model.model.parameters()):,}" == rows[label][1]
        assert f"{float(cli.trainer.callback_metrics['val/bpc']):.4f}" == rows[label][4]
        predict = next(x for x in lines[lines.index(f"**{label}**") :] if x.startswith("shakespeare-gpt predict"))
        cli_main([*shlex.split(predict)[1:], f"--writer.path={tmp_path / 'drawn.txt'}"])
        sample = (tmp_path / "drawn.txt").read_text().removeprefix("----- sample 1 -----\n")[:-1]
        assert f"<pre>{compare.escape(sample)}</pre>" in text


BAD_INPUT = [
    # (tool, arguments, what the one line must hold); RUN stands for the character run, a good model
    (compare, [], ["the following arguments are required: models"]),
    (compare, ["m=RUN", "--max-new-tokens=0"], ["max_new_tokens", "PositiveInt", "--help"]),
    (compare, ["m=RUN", "--block-size=1"], ["block_size", "WindowLength", ">=2"]),
    (compare, ["m=RUN", "--temperature=0"], ["temperature", "PositiveFloat"]),
    (compare, ["m=RUN", "--top-k=0"], ["top_k", "PositiveInt"]),
    (compare, ["m=RUN", "--top-p=1.5"], ["top_p", "TopP", "v>0 and v<=1"]),
    (compare, ["m=RUN", "--outt=a.md"], ["unrecognized arguments: --outt=a.md"]),
    (compare, ["m=RUN", "--prompt="], ["prompt", "Text"]),
    (compare, ["foo="], ["foo=: give a model after the '=' (a checkpoint, a run folder, a Hugging Face name"]),
    (compare, ["m=RUN", "gone=./models/gone"], ["gone: there is no file or folder ./models/gone: give a checkpoint"]),
    (compare, ["lightning_logs/nope.ckpt"], ["error: there is no file or folder lightning_logs/nope.ckpt: give a"]),
    (compare, ["RUN/nope"], ["error: there is no file or folder /", "/nope: give a checkpoint, a folder of runs, or"]),
    (compare, ["~/nope"], ["error: there is no file or folder ~/nope: give a checkpoint"]),
    (compare, ["m=RUN", "--out=/proc/x.md"], ["--out /proc/x.md: cannot write in /proc"]),
    (tiny_gpt2, [], ["the following arguments are required: folder"]),
    (tiny_gpt2, ["g", "--n-embd=30", "--n-head=4"], ["--n-embd 30 is not a multiple of --n-head 4"]),
    (tiny_gpt2, ["g", "--vocab-size=299"], ["vocab_size", "VocabSize", ">=300"]),
    (tiny_gpt2, ["g", "--n-layer=0"], ["n_layer", "PositiveInt"]),
    (tiny_gpt2, ["g", "--n-positions=1"], ["n_positions", "WindowLength", ">=2"]),
    (tiny_gpt2, ["notes.txt/g"], ["folder notes.txt/g: notes.txt is a file, not a folder"]),
]


@pytest.mark.parametrize(
    ("tool", "argv", "expected"),
    BAD_INPUT,
    ids=[f"{tool.__name__.rsplit('.')[-1]} {' '.join(argv)}" for tool, argv, _ in BAD_INPUT],
)
def test_bad_input_is_one_line_before_any_work(tool, argv, expected, models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("notes")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        tool.main([a.replace("RUN", str(models / "lightning_logs")) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    for part in expected:
        assert part in err[0]
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("tool", [compare, tiny_gpt2], ids=["compare", "tiny_gpt2"])
def test_help_says_what_the_tool_does(tool, capsys):
    with pytest.raises(SystemExit) as exc:
        tool.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0 and tool.__doc__.split("\n\n")[0].split("\n")[0] in text and "(default: " in text
