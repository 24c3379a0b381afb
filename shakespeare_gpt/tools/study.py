"""A study file: a base config, variants (each a list of override configs), learning rates and seeds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import UserError


@dataclass
class Study:
    """A parsed study file; paths of configs are resolved against the file's folder."""

    name: str
    base: Path
    variants: dict[str, list[Path]]
    learning_rates: list[float]
    seeds: list[int]
    args: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> Study:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as e:
            raise UserError(f"cannot read study file {path}: {e.strerror}") from None
        missing = {"name", "base", "variants", "learning_rates", "seeds"} - set(raw or {})
        if missing:
            raise UserError(
                f"study file {path} lacks {', '.join(sorted(missing))}: see configs/ablations/seed_study.yaml"
            )
        here = path.parent
        variants = {name: [here / f for f in (files or [])] for name, files in raw["variants"].items()}
        study = cls(
            name=raw["name"],
            base=here / raw["base"],
            variants=variants,
            learning_rates=[float(lr) for lr in raw["learning_rates"]],
            seeds=[int(s) for s in raw["seeds"]],
            args=[str(a) for a in raw.get("args", [])],
        )
        for config in [study.base, *(f for files in variants.values() for f in files)]:
            if not config.is_file():
                raise UserError(f"study file {path} names {config}, which does not exist")
        return study

    def runs(self) -> list[Run]:
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

    def settings(self, run: Run, study_dir: Path) -> str:
        """Fingerprint of what a run computes: its arguments and the contents of its config files."""
        digest = hashlib.sha256("\0".join(self.run_args(run, study_dir)).encode())
        for config in [self.base, *self.variants[run.variant]]:
            digest.update(config.read_bytes())
        return digest.hexdigest()


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
