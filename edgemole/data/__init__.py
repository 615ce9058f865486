"""Labelled text data: loading user files, the built-in synthetic task and federated partitions.

Everything here is plain Python plus numpy, so data can be prepared (and checked) without loading a
model; errors a user can cause are :class:`~edgemole.errors.DataError` or
:class:`~edgemole.errors.ConfigError` with a one-line message.
"""

from edgemole.data.dataset import TextDataset
from edgemole.data.loaders import (
    JSONL_KEYS,
    LABEL_COLUMNS,
    SUPPORTED_EXTENSIONS,
    TEXT_COLUMNS,
    load_dataset,
    load_table,
    write_jsonl,
)
from edgemole.data.partition import (
    PartitionSpec,
    label_histogram,
    parse_partition,
    partition,
    split_train_test,
)
from edgemole.data.synthetic import SYNTHETIC_DOMAINS, make_synthetic

__all__ = [
    "JSONL_KEYS",
    "LABEL_COLUMNS",
    "SUPPORTED_EXTENSIONS",
    "SYNTHETIC_DOMAINS",
    "TEXT_COLUMNS",
    "PartitionSpec",
    "TextDataset",
    "label_histogram",
    "load_dataset",
    "load_table",
    "make_synthetic",
    "parse_partition",
    "partition",
    "split_train_test",
    "write_jsonl",
]
