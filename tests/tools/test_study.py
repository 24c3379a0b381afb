"""The study file: parsed into typed dataclasses, every bad key or value refused in one line naming the
file and the field; the committed studies load and their committed runs count as finished."""

from pathlib import Path

import pytest
import torch
import yaml

from shakespeare_gpt.cli import build, refusal
from shakespeare_gpt.tools.ablate.runner import finished_rows
from shakespeare_gpt.tools.ablate.study import Run, Study
from shakespeare_gpt.utils import UserError

ROOT = Path(__file__).resolve().parents[2]
ABLATIONS = ROOT / "configs" / "ablations"
STUDY_FILES = ("seed_scale.yaml", "seed_study.yaml", "full_scale_study.yaml", "tour.yaml")
STUDY_FILES += ("capacity_scale.yaml", "capacity_study.yaml", "capacity_full_scale.yaml")
VARIANT_FILES = sorted(p for p in ABLATIONS.glob("*.yaml") if p.name not in STUDY_FILES)
SIZE_FILES = sorted((ABLATIONS / "sizes").glob("*.yaml"))  # the capacity studies' variants

GOOD_STUDY = """\
name: s
base: base.yaml
variants: {baseline: [], nd: [v.yaml]}
learning_rates: [1e-3]
seeds: [0]
"""
CLAIM = "seeds: [0]\nmargin: 0.02\nclaims: [{claim: c, %s}]\n"


@pytest.fixture
def place(tmp_path: Path) -> Path:
    """A folder with a base config, a variant config and a good study file."""
    (tmp_path / "base.yaml").write_text("model:\n  n_layer: 1\n")
    (tmp_path / "v.yaml").write_text("model:\n  dropout: 0.0\n")
    (tmp_path / "study.yaml").write_text(GOOD_STUDY)
    return tmp_path


def test_the_good_study_file_loads_with_paths_resolved_against_its_folder(place, monkeypatch):
    monkeypatch.chdir(place.parent)
    study = Study.load(Path(place.name) / "study.yaml")
    assert study.learning_rates == [1e-3] and study.seeds == [0] and study.args == [] and study.max_seeds == 1
    assert study.base == place / "base.yaml" and study.variants == {"baseline": [], "nd": [place / "v.yaml"]}
    assert study.runs() == [Run("baseline", 1e-3, 0), Run("nd", 1e-3, 0)]


STUDY_CASES = [
    # (replace this, with this) in GOOD_STUDY, or ("", whole text); what the one line must hold
    (("", ""), "Unexpected config"),
    (("", "name: s\nbase: [unclosed\n"), "Problems parsing config: while parsing a flow sequence"),
    (("", "- a\n- b\n"), "Unexpected config: - a - b"),
    (("seeds: [0]\n", "seeds: [0]\nsedes: [1]\n"), "Option 'sedes' is not accepted"),
    (("seeds: [0]\n", ""), "the following arguments are required: seeds"),
    (("name: s", "name: a/b"), 'Parser key "name": Not of type FolderName: a/b does not match'),
    (("name: s", "name: .."), 'Parser key "name": Not of type FolderName: .. does not match'),
    (("base: base.yaml", "base: nope.yaml"), 'Parser key "base": Not of type Path_fr: File does not exist'),
    (("base: base.yaml", "base: ."), 'Parser key "base": Not of type Path_fr: Path is not a file'),
    (("{baseline: [], nd: [v.yaml]}", "{nd: [w.yaml]}"), "File does not exist: '{place}/w.yaml'"),
    (("{baseline: [], nd: [v.yaml]}", "{nd: v.yaml}"), 'Parser key "variants": Does not validate'),
    (("{baseline: [], nd: [v.yaml]}", "{}"), "variants, learning_rates and seeds each need one item or more"),
    (("{baseline: [], nd: [v.yaml]}", "{nd: [], ../x: []}"), "variant name '../x' is not a folder name"),
    (("[1e-3]", "1e-3"), "Parser key \"learning_rates\": Expected a <class 'list'>. Got value: 0.001"),
    (("[1e-3]", "[1e-3, -1]"), "Not of type LearningRate: -1 does not conform to restriction v>0 and v<inf"),
    (("[1e-3]", "[.inf]"), "Not of type LearningRate: inf does not conform"),
    (("[1e-3]", "[.nan]"), "Not of type LearningRate: nan does not conform"),
    (("[1e-3]", "[fast]"), "Not of type LearningRate: could not convert string to float: 'fast'"),
    (("[1e-3]", "[1e-3, 0.001]"), "learning_rates lists 0.001 twice (to 6 significant digits)"),
    (("[1e-3]", "[1e-3, 0.0010000001]"), "learning_rates lists 0.001 twice"),
    (("seeds: [0]", "seeds: [0, 1.5]"), 'Parser key "seeds": Not of type Seed: 1.5 not an integer'),
    (("seeds: [0]", "seeds: [4294967296]"), "Not of type Seed: 4294967296 does not conform"),
    (("seeds: [0]", "seeds: [1, 0, 1]"), "seeds lists 1 twice"),
    (("seeds: [0]", "seeds: [0, 1]\nmax_seeds: 1"), "max_seeds 1 is below the 2 seeds"),
    (("seeds: [0]", "seeds: [0]\nextend_grid: 1"), "extend_grid 1 needs two learning rates or more"),
    (("seeds: [0]", "seeds: [0]\nmargin: 0"), 'Parser key "margin"'),
    (("seeds: [0]", "seeds: [0]\nargs: --trainer.max_steps=5"), "Parser key \"args\": Expected a <class 'list'>"),
    (
        ("seeds: [0]", "seeds: [0]\nargs: ['--seed_everything=3']"),
        "args item --seed_everything=3 sets --seed_everything",
    ),
    (("seeds: [0]", "seeds: [0]\nargs: ['--trainer.logger.init_args.name=x']"), "sets --trainer.logger, which"),
    (("seeds: [0]", "seeds: [0]\nalso: [nope.yaml]"), 'Parser key "also": Not of type Path_fr: File does not exist'),
    (("seeds: [0]\n", CLAIM % "compare: [nd, bb]"), "claim 1 names bb, not a variant of the study"),
    (("seeds: [0]\n", CLAIM % "compare: [nd]"), "compare [nd] (one variant) takes metric overfit at best_lr"),
    (("seeds: [0]\n", CLAIM % "compare: [nd, baseline, nd]"), 'Parser key "compare": Does not validate'),
    (("seeds: [0]\n", CLAIM % "compare: [nd, nd]"), "claim 'c': compare [nd, nd] compares a variant with itself"),
    (("seeds: [0]\n", CLAIM % "compare: [nd, baseline], expect: smaller"), 'Parser key "expect": Expected a'),
    (("seeds: [0]\n", CLAIM % "compare: [nd, baseline], metric: loss"), 'Parser key "metric": Expected a'),
    (("seeds: [0]\n", CLAIM % "compare: [nd, baseline], direction: up"), "Option 'direction' is not accepted"),
    (("seeds: [0]\n", CLAIM % "id: 2"), "claim 'c': give either compare: [a, b] or all: [comparisons]"),
    (("seeds: [0]\n", CLAIM % "compare: [nd, baseline], all: [{compare: [nd, baseline]}]"), "give either compare"),
    (("seeds: [0]\n", CLAIM % "all: [{compare: [nd, baseline], at: here}]"), 'Parser key "all": Does not validate'),
    (("margin: 0.02\n", ""), "a claim of no effect (equal, not_lower, not_higher) needs a margin"),
]


@pytest.mark.parametrize(("change", "expected"), STUDY_CASES, ids=[c[1][:50] for c in STUDY_CASES])
def test_a_bad_study_file_is_one_line_naming_the_file_and_the_field(place, change, expected):
    old, new = change
    text = GOOD_STUDY.replace(old, new) if old else new
    if "margin" in old:  # a claim of no effect, without the margin it needs
        text = GOOD_STUDY.replace("seeds: [0]\n", CLAIM % "compare: [nd, baseline], expect: equal").replace(old, new)
    assert text != GOOD_STUDY
    (place / "study.yaml").write_text(text)
    with pytest.raises(UserError) as e:
        Study.load(place / "study.yaml")
    message = str(e.value)
    assert message.startswith(f"study file {place / 'study.yaml'}: ") and "\n" not in message
    assert expected.format(place=place) in message


def test_a_study_path_that_is_not_a_file_and_a_broken_study_under_also_are_one_line(place):
    for path in (place / "nope.yaml", place):
        with pytest.raises(UserError, match=f"study file {path} does not exist or is not a file"):
            Study.load(path)
    (place / "other.yaml").write_text(GOOD_STUDY.replace("name: s", "name: a/b"))
    (place / "study.yaml").write_text(GOOD_STUDY + "also: [other.yaml]\n")
    with pytest.raises(UserError, match=r"study file .*other.yaml: Parser key \"name\""):
        Study.load(place / "study.yaml")
    (place / "other.yaml").write_text(GOOD_STUDY + "also: [study.yaml]\n")  # each names the other: loads once each
    assert Study.load(place / "study.yaml").also == [place / "other.yaml"]


def test_claim_fields_left_out_of_an_all_list_are_the_claims(place):
    claims = "claims:\n  - {id: 5, claim: c, expect: higher, all: [{compare: [nd, baseline], metric: gap}]}\n"
    claims += "  - {claim: d, compare: [baseline, nd]}\n"
    (place / "study.yaml").write_text(GOOD_STUDY + claims)
    first, second = Study.load(place / "study.yaml").claims
    assert [(p.a, p.b, p.metric, p.at, p.expect) for p in first.parts] == [
        ("nd", "baseline", "gap", "best_lr", "higher")
    ]
    assert (first.id, second.id) == ("5", "2") and second.parts[0].expect == "lower"


def test_the_fingerprint_leaves_out_paths_and_comments_but_not_settings(place):
    study = Study.load(place / "study.yaml")
    run = Run("nd", 1e-3, 0)
    before = study.settings(run)
    (place / "v.yaml").write_text("# a comment\nmodel: {dropout: 0.0}\n")
    assert study.settings(run) == before
    (place / "v.yaml").write_text("model: {dropout: 0.1}\n")
    assert study.settings(run) != before
    assert study.settings(Run("nd", 1e-3, 1)) != before and study.settings(Run("nd", 3e-3, 0)) != before


def test_every_committed_run_of_the_seed_study_counts_as_finished():
    """The README's study command must not run again the 273 runs (4 hours) of the committed results.csv."""
    study = Study.load(ABLATIONS / "seed_study.yaml")
    csv_path = ROOT / "reports" / study.name / "results.csv"
    finished, stale = finished_rows(csv_path, study)
    assert stale == [] and len(finished) == len(csv_path.read_text().splitlines()) - 1 == 273


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
    full = Study.load(ABLATIONS / "full_scale_study.yaml")
    assert set(full.variants) == {"baseline", "post_norm", "tied_embeddings"} and len(full.seeds) >= 3
    assert {c.id for c in full.claims} == {"10", "11"}
    assert study.also == [ABLATIONS / "full_scale_study.yaml", ABLATIONS / "capacity_study.yaml"]


def test_the_tour_is_a_short_study_of_the_seed_studys_variants_and_claims():
    tour, seed = Study.load(ABLATIONS / "tour.yaml"), Study.load(ABLATIONS / "seed_study.yaml")
    assert tour.base == seed.base and {v: seed.variants[v] for v in tour.variants} == tour.variants
    assert {(c.id, c.claim) for c in tour.claims} <= {(c.id, c.claim) for c in seed.claims}
    steps = next(int(a.split("=")[1]) for a in tour.args if a.startswith("--trainer.max_steps="))
    assert len(tour.learning_rates) == 1 and len(tour.seeds) == tour.max_seeds == 2 and steps <= 1000
    assert tour.extend_grid == 0 and tour.also == []  # one round


def test_a_study_runs_in_fp32_on_every_machine_unless_its_configs_name_a_precision(place, corpus_dir, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})  # bf16 by default here
    monkeypatch.chdir(place)
    (place / "base.yaml").write_text(
        f"model:\n  n_layer: 1\n  block_size: 16\ndata:\n  corpus: {corpus_dir / 'input.txt'}\n"
    )
    (place / "v.yaml").write_text("trainer:\n  precision: bf16-mixed\n")
    study = Study.load(place / "study.yaml")
    for run, expected in ((Run("baseline", 1e-3, 0), "32-true"), (Run("nd", 1e-3, 0), "bf16-mixed")):
        assert build(study.run_args(run, place / "logs"), save_config=False).trainer.precision == expected


def test_the_capacity_studies_test_both_halves_of_the_claim_at_sizes_around_their_recipes():
    cpu, gpu = Study.load(ABLATIONS / "capacity_study.yaml"), Study.load(ABLATIONS / "capacity_full_scale.yaml")
    assert cpu.also == [ABLATIONS / "capacity_full_scale.yaml"]
    for study, recipe in ((cpu, "l4_d128"), (gpu, "l6_d384")):
        assert study.variants[recipe] == [] and len(study.variants) == 3  # the recipe, one size down and one up
        assert len(study.learning_rates) == 1 and len(study.seeds) >= 3
        steps, bigger = study.claims
        assert [p.compare for p in steps.parts] == [(v,) for v in study.variants]  # every size on its own
        assert [p.compare for p in bigger.parts] == list(zip(study.variants, list(study.variants)[1:], strict=False))
        parts = [p for c in study.claims for p in c.parts]
        assert all(p.metric == "overfit" and p.expect == "higher" and p.by == 0.05 for p in parts)
    config = yaml.safe_load(cpu.base.read_text())
    assert config["model"].get("lr_schedule", "constant") == "constant"  # val at step s: an s-step run's
    assert "--trainer.max_steps=10000" in gpu.args
    for variant in cpu.variants:  # each run as the runner builds it
        assert refusal(cpu.run_args(Run(variant, cpu.learning_rates[0], 0), Path("unused"))) is None
