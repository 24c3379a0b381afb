"""A study file: a base config, variants (each a list of override configs), learning rates, seeds and claims.

The claims are data: each compares two variants on a metric, in a direction, at each variant's
best learning rate or at every learning rate; ``report.py`` turns them into verdicts. The
fields, with the seed's study as the example, are described in docs/guide.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import UserError
from .checks import did_you_mean, show

REQUIRED = ("name", "base", "variants", "learning_rates", "seeds")
FIELDS = (*REQUIRED, "args", "claims", "margin", "extend_grid", "max_seeds", "also")
# A claim compares variant a with variant b: d = metric(a) - metric(b), with a 95% interval.
METRICS = ("val", "gap", "lr_spread")  # best val loss; final val - train; val at worst lr - val at best lr
AT = ("best_lr", "every_lr", "across_lr")  # each at its best lr; at each lr; d at each lr minus d at a's best lr
EXPECT = ("lower", "higher", "equal", "not_lower", "not_higher")
CLAIM_FIELDS = ("id", "claim", "compare", "metric", "at", "expect", "all")
PART_FIELDS = ("compare", "metric", "at", "expect")
EXAMPLE = "configs/ablations/seed_study.yaml"
# A study name and a variant name each name a folder: no separators, no "." or ".." or "-x" (a flag).
FOLDER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
FOLDER_RULE = "letters, digits, '_', '-' and '.', starting with a letter, digit or '_'"
# What the study sets for each run (``run_args``): the same flag in ``args`` would be silently overridden.
RESERVED = {
    "--model.learning_rate": "each run's comes from learning_rates",
    "--seed_everything": "each run's comes from seeds",
    "--trainer.logger": "the study logs each run under --logs",
    "--checkpoint.save_top_k": "the study keeps numbers, not checkpoints",
    "--checkpoint.save_last": "the study keeps numbers, not checkpoints",
}


@dataclass(frozen=True)
class Comparison:
    """One test of a claim: ``metric(a) - metric(b)`` is expected to be ``expect`` (see ``report.judge``)."""

    a: str
    b: str
    metric: str = "val"
    at: str = "best_lr"
    expect: str = "lower"


@dataclass(frozen=True)
class Claim:
    """A claim of the study, supported only when all of its comparisons are."""

    id: str
    text: str
    parts: tuple[Comparison, ...]


@dataclass
class Study:
    """A parsed study file; paths of configs are resolved against the file's folder."""

    name: str
    base: Path
    variants: dict[str, list[Path]]
    learning_rates: list[float]
    seeds: list[int]
    args: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    margin: float | None = None  # equivalence margin, in nats, for claims of no effect
    extend_grid: int = 0  # learning rates a variant's grid may grow by at each end
    max_seeds: int = 0  # seeds a point may get where a verdict's interval straddles its threshold
    also: list[Path] = field(default_factory=list)  # other study files whose verdicts join the report

    @classmethod
    def load(cls, path: str | Path, _seen: frozenset[Path] = frozenset()) -> Study:
        """Read and check a study file: a one-line ``UserError`` names the file, the field and the value."""
        path = Path(path)
        raw = _read(path)
        where = f"study file {path}"
        for key in raw:
            if key not in FIELDS:
                raise UserError(
                    f"{where}: unknown field {show(key)}{did_you_mean(str(key), FIELDS)}; "
                    f"the fields are {', '.join(FIELDS)}"
                )
        missing = [f for f in REQUIRED if f not in raw]
        if missing:
            raise UserError(f"{where} lacks {', '.join(missing)}: see {EXAMPLE}")
        here = path.parent
        variants = _variants(where, raw["variants"], here)
        seeds = _seeds(where, raw["seeds"])
        claims = _claims(where, raw.get("claims"), variants)
        margin = raw.get("margin")
        if margin is not None and not _positive(margin):
            raise UserError(f"{where}: margin {show(margin)}: give a positive number of nats, e.g. margin: 0.02")
        if margin is None and any(p.expect not in ("lower", "higher") for c in claims for p in c.parts):
            raise UserError(
                f"{where}: a claim of no effect (expect: equal, not_lower or not_higher) needs an equivalence "
                "margin: add e.g. margin: 0.02 (in nats of val loss)"
            )
        learning_rates = _learning_rates(where, raw["learning_rates"])
        extend_grid = _count(where, "extend_grid", raw.get("extend_grid", 0), 0, "extend_grid: 2")
        if extend_grid and len(learning_rates) < 2:
            raise UserError(
                f"{where}: extend_grid {extend_grid} needs two learning rates or more (the grid's ratio at "
                "each end gives the next one): list more, or drop extend_grid"
            )
        also = _also(where, raw.get("also"), here)
        for other in also:  # checked now, not after hours of runs when the report is written
            if other.resolve() not in _seen:
                Study.load(other, _seen | {path.resolve()})
        return cls(
            name=_folder_name(where, "name", raw["name"], "name: seed_study"),
            base=_config(where, "base", raw["base"], here),
            variants=variants,
            learning_rates=learning_rates,
            seeds=seeds,
            args=_args(where, raw.get("args")),
            claims=claims,
            margin=None if margin is None else float(margin),
            extend_grid=extend_grid,
            max_seeds=_count(where, "max_seeds", raw.get("max_seeds", len(seeds)), len(seeds), "max_seeds: 6"),
            also=also,
        )

    def runs(self) -> list[Run]:
        """The grid the file gives; ``report.plan`` adds the rounds that follow from the results."""
        return [Run(v, lr, s) for v in self.variants for lr in self.learning_rates for s in self.seeds]

    def run_args(self, run: Run, study_dir: Path) -> list[str]:
        """The arguments of one run for ``cli.build``: the study's configs and this point's values."""
        configs = [f"--config={c}" for c in [self.base, *self.variants[run.variant]]]
        return [
            *configs,
            *self.args,
            f"--model.learning_rate={run.lr}",
            f"--seed_everything={run.seed}",
            f"--trainer.logger.init_args.save_dir={study_dir}",
            f"--trainer.logger.init_args.name={run.variant}",
            f"--trainer.logger.init_args.version={run.version}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--checkpoint.save_top_k=0",  # the study keeps numbers, not weights
            "--checkpoint.save_last=false",
        ]

    def settings(self, run: Run) -> str:
        """Fingerprint of what a run computes: the settings in its config files, the study's args, lr and seed.

        Paths and comments are left out: a study folder and its checkout can move, and a config's
        comments change, without invalidating its runs.
        """
        configs = [yaml.safe_load(c.read_text(encoding="utf-8")) for c in [self.base, *self.variants[run.variant]]]
        text = json.dumps([configs, self.args, run.lr, run.seed], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Run:
    """One point of a study: a variant at a learning rate with a seed."""

    variant: str
    lr: float
    seed: int

    @property
    def version(self) -> str:
        return f"lr{self.lr:g}_seed{self.seed}"

    def folder(self, study_dir: Path) -> Path:
        return study_dir / self.variant / self.version


def _read(path: Path) -> dict:
    """The study file's top-level mapping, or a one-line ``UserError`` naming what is wrong with the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"study file {path} does not exist: give the path of a study YAML, e.g. {EXAMPLE}") from None
    except IsADirectoryError:
        raise UserError(f"study file {path} is a folder: give the path of a study YAML, e.g. {EXAMPLE}") from None
    except OSError as e:
        raise UserError(f"cannot read study file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"study file {path} is not UTF-8 text: give a study YAML, e.g. {EXAMPLE}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"study file {path} is not valid YAML{at}: {problem}; see {EXAMPLE}") from None
    if raw is None:
        raise UserError(
            f"study file {path} is empty: a study needs name, base, variants, learning_rates and seeds; see {EXAMPLE}"
        )
    if not isinstance(raw, dict):
        raise UserError(
            f"study file {path} holds {show(raw)}, not a mapping of fields "
            f"(name: ..., base: ..., variants: ..., learning_rates: ..., seeds: ...); see {EXAMPLE}"
        )
    return raw


def _folder_name(where: str, field: str, value: object, example: str) -> str:
    if isinstance(value, str) and FOLDER_NAME.fullmatch(value):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        quoted = f'{field}: "{value}"' if field == "name" else f'"{value}": [...]'
        raise UserError(f"{where}: {field} {show(value)}: write it as text in quotes, e.g. {quoted}")
    raise UserError(f"{where}: {field} {show(value)} is not usable as a folder name: use {FOLDER_RULE}, e.g. {example}")


def _config(where: str, field: str, value: object, here: Path) -> Path:
    """A config file named in the study, resolved against the study file's folder; it must exist."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(
            f"{where}: {field} {show(value)}: give a config file's path (relative to the study file's folder), "
            "e.g. seed_scale.yaml"
        )
    config = here / value
    if not config.exists():
        raise UserError(
            f"{where}: {field} {show(value)}: {config} does not exist; "
            f"give a config file's path relative to the study file's folder ({here})"
        )
    if not config.is_file():
        raise UserError(f"{where}: {field} {show(value)}: {config} is a folder; give a config file's path")
    return config


def _variants(where: str, value: object, here: Path) -> dict[str, list[Path]]:
    example = "variants: {baseline: [], no_dropout: [no_dropout.yaml]}"
    if not isinstance(value, dict):
        raise UserError(
            f"{where}: variants {show(value)}: give a mapping of variant names to lists of override configs, "
            f"e.g. {example}"
        )
    if not value:
        raise UserError(f"{where}: variants {{}} is empty: give at least one variant, e.g. {example}")
    variants = {}
    for name, files in value.items():
        name = _folder_name(where, "variant name", name, "no_dropout")
        field = f"variants.{name}"
        if isinstance(files, str):
            raise UserError(f"{where}: {field} {show(files)} is a single value: write a list, e.g. {name}: [{files}]")
        if files is None:
            files = []  # the base config alone
        if not isinstance(files, list):
            raise UserError(
                f"{where}: {field} {show(files)}: give a list of override configs, e.g. {name}: [{name}.yaml], "
                "or [] for the base config alone"
            )
        variants[name] = [_config(where, field, f, here) for f in files]
    return variants


def _learning_rates(where: str, value: object) -> list[float]:
    example = "learning_rates: [1e-3, 3e-3]"
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        raise UserError(
            f"{where}: learning_rates {show(value)} is a single value: write a list, "
            f"e.g. learning_rates: [{show(value)}]"
        )
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: learning_rates {show(value)}: give a list of positive numbers, e.g. {example}")
    rates, seen = [], {}
    for item in value:
        try:  # PyYAML reads 1e-3 (no dot) as text: that is a number too
            lr = float(item) if isinstance(item, (str, int, float)) and not isinstance(item, bool) else math.nan
        except ValueError:
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"{where}: learning_rates item {show(item)}: give a positive finite number, e.g. {example}")
        if f"{lr:g}" in seen:  # runs are told apart by the lr's 6 significant digits (Run.version)
            raise UserError(
                f"{where}: learning_rates {show(value)} lists {show(seen[f'{lr:g}'])} and {show(item)}, "
                f"which are the same run (lr{lr:g}): list each learning rate once"
            )
        seen[f"{lr:g}"] = item
        rates.append(lr)
    return rates


def _seeds(where: str, value: object) -> list[int]:
    example = "seeds: [0, 1, 2]"
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        raise UserError(f"{where}: seeds {show(value)} is a single value: write a list, e.g. seeds: [{show(value)}]")
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: seeds {show(value)}: give a list of whole numbers, e.g. {example}")
    for seed in value:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
            raise UserError(
                f"{where}: seeds item {show(seed)}: give a whole number from 0 to {2**32 - 1}, e.g. {example}"
            )
    if len(set(value)) < len(value):
        repeated = next(s for s in value if value.count(s) > 1)
        raise UserError(f"{where}: seeds {show(value)} lists {repeated} twice: list each seed once")
    return list(value)


def _args(where: str, value: object) -> list[str]:
    example = 'args: ["--trainer.max_steps=5000"]'
    if value is None:
        return []
    if isinstance(value, str):
        raise UserError(f"{where}: args {show(value)} is a single value: write a list, e.g. args: [{show(value)}]")
    if not isinstance(value, list):
        raise UserError(f"{where}: args {show(value)}: give a list of command-line arguments, e.g. {example}")
    for arg in value:
        if not isinstance(arg, str):
            raise UserError(f"{where}: args item {show(arg)}: write each argument as text in quotes, e.g. {example}")
        flag = arg.split("=", 1)[0]
        for reserved, why in RESERVED.items():
            if flag == reserved or flag.startswith(reserved + "."):
                raise UserError(
                    f"{where}: args item {show(arg)} sets {reserved}, which the study sets ({why}): drop it"
                )
    return list(value)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _count(where: str, field: str, value: object, least: int, example: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise UserError(f"{where}: {field} {show(value)}: give a whole number >= {least}, e.g. {example}")
    return value


def _choice(where: str, field: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        hint = did_you_mean(str(value), choices)
        raise UserError(f"{where}: {field} {show(value)}{hint}: give one of {', '.join(choices)}")
    return str(value)


def _known_fields(where: str, raw: dict, fields: tuple[str, ...], what: str) -> None:
    for key in raw:
        if key not in fields:
            raise UserError(
                f"{where}: unknown field {show(key)}{did_you_mean(str(key), fields)}; {what} has {', '.join(fields)}"
            )


def _comparison(where: str, raw: object, variants: dict, defaults: dict) -> Comparison:
    example = "{compare: [baseline, no_ffwd], metric: val, at: best_lr, expect: lower}"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: {show(raw)}: give a comparison, e.g. {example}")
    _known_fields(where, raw, PART_FIELDS, "a comparison")
    pair = raw.get("compare")
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
        raise UserError(f"{where}: compare {show(pair)}: give two variants, e.g. compare: [baseline, no_ffwd]")
    if pair[0] == pair[1]:
        raise UserError(f"{where}: compare {show(pair)} compares a variant with itself: give two different ones")
    for name in pair:
        if name not in variants:
            raise UserError(
                f"{where}: compare names {show(name)}, which is not a variant of the study"
                f"{did_you_mean(str(name), variants)}; the variants are {', '.join(variants)}"
            )
    merged = {**defaults, **raw}
    return Comparison(
        a=pair[0],
        b=pair[1],
        metric=_choice(where, "metric", merged.get("metric", "val"), METRICS),
        at=_choice(where, "at", merged.get("at", "best_lr"), AT),
        expect=_choice(where, "expect", merged.get("expect", "lower"), EXPECT),
    )


def _claims(where: str, value: object, variants: dict) -> list[Claim]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}: claims {show(value)}: give a list of claims; see {EXAMPLE}")
    claims, ids = [], set()
    for n, raw in enumerate(value, 1):
        at = f"{where}: claim {n}"
        if not isinstance(raw, dict):
            raise UserError(f"{at}: {show(raw)}: give a mapping with id, claim, compare and expect; see {EXAMPLE}")
        _known_fields(at, raw, CLAIM_FIELDS, "a claim")
        claim_id = str(raw.get("id", n))
        if claim_id in ids:
            raise UserError(f"{at}: id {claim_id} is used twice: give each claim its own id")
        ids.add(claim_id)
        text = raw.get("claim")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{at}: give the claim's words, e.g. claim: Adding the feed-forward layer helps.")
        if "all" in raw:
            if "compare" in raw or not isinstance(raw["all"], list) or not raw["all"]:
                raise UserError(f"{at}: all: give a list of comparisons (and no compare beside it); see {EXAMPLE}")
            defaults = {k: raw[k] for k in ("metric", "at", "expect") if k in raw}
            parts = tuple(_comparison(at, part, variants, defaults) for part in raw["all"])
        else:
            parts = (_comparison(at, {k: v for k, v in raw.items() if k in PART_FIELDS}, variants, {}),)
        claims.append(Claim(claim_id, text.strip(), parts))
    return claims


def _also(where: str, value: object, here: Path) -> list[Path]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}: also {show(value)}: give a list of study files, e.g. also: [full_scale_study.yaml]")
    return [_config(where, "also", item, here) for item in value]
