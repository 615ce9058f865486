"""The fleet's data source as configured: the built-in synthetic task or a user's data set."""

from __future__ import annotations

from edgemole.config import DataConfig
from edgemole.data.dataset import TextDataset
from edgemole.data.loaders import load_dataset
from edgemole.data.synthetic import make_synthetic

SYNTHETIC = "synthetic"


def load_source(cfg: DataConfig, seed: int) -> tuple[TextDataset, TextDataset | None]:
    """``(train, test or None)`` for ``cfg.dataset``; the synthetic task is generated from ``seed``."""
    if cfg.dataset == SYNTHETIC:
        return make_synthetic(cfg.samples_per_domain, seed), None
    return load_dataset(cfg.dataset, cfg.text_column or None, cfg.label_column or None)


def task_labels(cfg: DataConfig, seed: int) -> list[str]:
    """The fleet's label set: the configured list, else every label found in the data, sorted."""
    if cfg.labels:
        return list(cfg.labels)
    train, test = load_source(cfg, seed)
    return sorted(set(train.labels) | set(test.labels if test is not None else []))


def default_partition(cfg: DataConfig) -> str:
    """Natural split by domain for the synthetic task, moderate label skew otherwise."""
    return cfg.partition or ("column:domain" if cfg.dataset == SYNTHETIC else "dirichlet:0.5")
