"""The study file: a base config, variants (each a list of override configs), learning rates, seeds and claims.

jsonargparse parses it into the dataclasses below, so a bad key or value names itself; each
``__post_init__`` holds only the checks no type can express. The fields: docs/guide.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import (
    NonNegativeFloat,
    NonNegativeInt,
    Path_fr,
    PositiveFloat,
    restricted_number_type,
    restricted_string_type,
)

from ...utils import LearningRate, UserError, one_line

EXAMPLE = "configs/ablations/seed_study.yaml"
# A study name and a variant name each name a folder: no separators, no "." or "..", no "-x" (a flag).
FOLDER_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
FolderName = restricted_string_type("FolderName", rf"^{FOLDER_NAME}\Z")
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<", 2**32)])
# best val loss; final val - final train; val at worst lr - val at best lr; final val - best val (the rise after
# the lowest point: overfitting)
Metric = Literal["val", "gap", "lr_spread", "overfit"]
At = Literal["best_lr", "every_lr", "across_lr"]  # each at its best lr; at each lr; d at each lr - d at the middle lr
Expect = Literal["lower", "higher", "equal", "not_lower", "not_higher"]
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
    """One test of a claim: ``metric(a) - metric(b)`` (``metric(a)`` for ``compare: [a]``) is expected to be
    ``expect``: lower or higher by more than ``by``. In a claim's ``all`` list, a field left out is the claim's."""

    compare: tuple[str, str] | tuple[str]  # [a, b], or [a]
    metric: Metric | None = None
    at: At | None = None
    expect: Expect | None = None
    by: float | None = None

    @property
    def a(self) -> str:
        return self.compare[0]

    @property
    def b(self) -> str | None:
        return self.compare[1] if len(self.compare) > 1 else None


@dataclass
class Claim:
    """A claim of the study: one comparison (``compare``) or several (``all``), supported only when all are."""

    claim: str  # its words, as the report shows them
    id: int | str | None = None  # default: its place in the list
    compare: tuple[str, str] | tuple[str] | None = None
    metric: Metric = "val"
    at: At = "best_lr"
    expect: Expect = "lower"
    by: NonNegativeFloat = 0.0  # lower or higher by more than this (nats): a declared threshold, e.g. for "sharp"
    all: list[Comparison] | None = None

    def __post_init__(self) -> None:
        if bool(self.compare) == bool(self.all):
            raise UserError(f"claim {self.claim!r}: give either compare: [a, b] or all: [comparisons]")
        given = [Comparison(self.compare)] if self.compare else self.all
        self.parts = tuple(
            Comparison(p.compare, p.metric or self.metric, p.at or self.at, p.expect or self.expect, p.by or self.by)
            for p in given
        )
        if same := next((p.a for p in self.parts if p.a == p.b), None):
            raise UserError(f"claim {self.claim!r}: compare [{same}, {same}] compares a variant with itself")
        if alone := next((p for p in self.parts if p.b is None and (p.metric != "overfit" or p.at != "best_lr")), None):
            raise UserError(
                f"claim {self.claim!r}: compare [{alone.a}] (one variant) takes metric overfit at best_lr: "
                "name a second variant to compare with"
            )


@dataclass
class Study:
    """A study file's fields; config paths are relative to the file's folder and must exist."""

    name: FolderName  # the folder of its runs' logs and of its report
    base: Path_fr  # the config every run starts from
    variants: dict[str, list[Path_fr] | None]  # name: override configs on top of base ([]: base alone)
    learning_rates: list[LearningRate]
    seeds: list[Seed]
    args: list[str] = field(default_factory=list)  # extra command-line arguments of every run
    claims: list[Claim] = field(default_factory=list)
    margin: PositiveFloat | None = None  # equivalence margin, in nats, for claims of no effect
    extend_grid: NonNegativeInt = 0  # learning rates a variant's grid may grow by at each end
    max_seeds: NonNegativeInt | None = None  # seeds a point may get where an interval straddles (default: seeds)
    also: list[Path_fr] = field(default_factory=list)  # other study files whose verdicts join the report
    about: str = ""  # the design in words (why these sizes, steps, rates), the report's opening paragraph

    def __post_init__(self) -> None:
        self.base = Path(os.fspath(self.base))
        self.variants = {v: [Path(os.fspath(f)) for f in files or []] for v, files in self.variants.items()}
        self.also = [Path(os.fspath(p)) for p in self.also]
        self.max_seeds = len(self.seeds) if self.max_seeds is None else self.max_seeds
        for n, claim in enumerate(self.claims, 1):
            claim.id = str(n if claim.id is None else claim.id)
        if not (self.variants and self.learning_rates and self.seeds):
            raise UserError("variants, learning_rates and seeds each need one item or more")
        if bad := [v for v in self.variants if not re.fullmatch(FOLDER_NAME, v)]:
            raise UserError(f"variant name {bad[0]!r} is not a folder name: use letters, digits, '_', '-' and '.'")
        rates = [f"{lr:g}" for lr in self.learning_rates]  # 6 significant digits tell runs apart (Run.version)
        if twice := next((r for r in rates if rates.count(r) > 1), None):
            raise UserError(f"learning_rates lists {twice} twice (to 6 significant digits): list it once")
        if twice := next((s for s in self.seeds if self.seeds.count(s) > 1), None):
            raise UserError(f"seeds lists {twice} twice: list each seed once")
        if self.max_seeds < len(self.seeds):
            raise UserError(f"max_seeds {self.max_seeds} is below the {len(self.seeds)} seeds: raise it or drop it")
        if self.extend_grid and len(self.learning_rates) < 2:
            raise UserError(f"extend_grid {self.extend_grid} needs two learning rates or more: add one or drop it")
        for arg in self.args:
            for flag, why in RESERVED.items():
                if arg.split("=", 1)[0] == flag or arg.startswith(flag + "."):
                    raise UserError(f"args item {arg} sets {flag}, which the study sets ({why}): drop it")
        ids = [c.id for c in self.claims]
        if twice := next((i for i in ids if ids.count(i) > 1), None):
            raise UserError(f"claim id {twice} is used twice: give each claim its own")
        for c in self.claims:
            if unknown := [v for p in c.parts for v in p.compare if v not in self.variants]:
                raise UserError(
                    f"claim {c.id} names {unknown[0]}, not a variant of the study: use one of {[*self.variants]}"
                )
        if self.margin is None and any(p.expect not in ("lower", "higher") for c in self.claims for p in c.parts):
            raise UserError("a claim of no effect (equal, not_lower, not_higher) needs a margin: add e.g. margin: 0.02")

    @classmethod
    def load(cls, path: str | Path, _seen: frozenset[Path] = frozenset()) -> Study:
        """Parse and check a study file, and those under its ``also``; a one-line ``UserError`` names the file."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"study file {path} does not exist or is not a file: give a study YAML, e.g. {EXAMPLE}")
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls)
        try:
            fields = vars(parser.instantiate(parser.parse_path(path)))
            study = cls(**{k: v for k, v in fields.items() if not k.startswith("__")})
        except (ArgumentError, UnicodeDecodeError) as e:
            raise UserError(f"study file {path}: {one_line(e)}; see {EXAMPLE}") from None
        except UserError as e:
            raise UserError(f"study file {path}: {e}") from None
        for other in study.also:  # checked now, not after hours of runs when the report is written
            if other.resolve() not in _seen:
                cls.load(other, _seen | {path.resolve()})
        return study

    def runs(self) -> list[Run]:
        """The grid the file gives; ``runner.plan`` adds the rounds that follow from the results."""
        return [Run(v, lr, s) for v in self.variants for lr in self.learning_rates for s in self.seeds]

    def run_args(self, run: Run, study_dir: Path) -> list[str]:
        """The arguments of one run for ``cli.build``: the study's configs and this point's values."""
        return [
            "--trainer.precision=32-true",  # unless its configs name one: the same runs on every machine
            *(f"--config={c}" for c in [self.base, *self.variants[run.variant]]),
            *self.args,
            f"--model.learning_rate={run.lr}",
            f"--seed_everything={run.seed}",
            f"--trainer.logger.init_args.save_dir={study_dir}",
            f"--trainer.logger.init_args.name={run.variant}",
            f"--trainer.logger.init_args.version={run.version}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--attention_maps.enabled=false",  # numbers, not pictures
            "--projector.enabled=false",
            "--checkpoint.save_top_k=0",  # the study keeps numbers, not weights
            "--checkpoint.save_last=false",
        ]

    def settings(self, run: Run) -> str:
        """Fingerprint of what a run computes: its config files' settings, the study's args, lr and seed.

        Paths and comments are left out: a study folder can move, and a config's comments change,
        without invalidating its runs. Committed results.csv files hold it: never change its recipe.
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
