"""A device's private data: read once, tokenised once, served as batches; never leaves the device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from edge_client.engines import Batch
from edgemole.data import TextDataset, load_table, split_train_test
from edgemole.errors import DataError
from edgemole.rng import SplitMix64


def _take(full: Batch, idx: torch.Tensor) -> Batch:
    """Rows ``idx``, cut after the batch's longest real sequence: trailing padding is masked out everywhere, so
    dropping it changes no result and saves the time of attending over it (short intents at max_length 32)."""
    mask = full.attention_mask[idx]
    length = max(1, int(mask.sum(1).max())) if len(idx) else mask.shape[1]
    return Batch(full.input_ids[idx, :length], mask[:, :length], full.labels[idx])


class LocalData:
    """Train and test splits of one client; :meth:`prepare` turns them into tensors for a task."""

    def __init__(
        self,
        data_path: str | Path,
        *,
        test_path: str | Path | None = None,
        test_fraction: float = 0.2,
        text_column: str | None = None,
        label_column: str | None = None,
        seed: int = 0,
        val_fraction: float = 0.0,
    ) -> None:
        """``val_fraction`` of the training rows (stratified, seeded with ``seed + 1``) are held out as a validation
        split that no round trains on: what a device uses to choose which model it deploys."""
        self.source = str(data_path)
        data = load_table(data_path, text_column, label_column)
        if test_path is not None:
            self.train_text, self.test_text = data, load_table(test_path, text_column, label_column)
        else:
            tr, te = split_train_test(list(range(len(data))), data.labels, test_fraction, seed)
            self.train_text, self.test_text = data.subset(tr), data.subset(te)
        self.val_text = self.train_text.subset([])
        if val_fraction > 0 and len(self.train_text) >= 10:
            tr, va = split_train_test(list(range(len(self.train_text))), self.train_text.labels, val_fraction,
                                      seed + 1)
            self.train_text, self.val_text = self.train_text.subset(tr), self.train_text.subset(va)
        if len(self.train_text) == 0:
            raise DataError(f"data file '{data_path}' leaves no training examples")
        self.train: Batch | None = None
        self.test: Batch | None = None
        self.val: Batch | None = None

    def prepare(self, labels: list[str], tokenizer, max_length: int) -> None:  # noqa: ANN001
        """Tokenise both splits for the fleet's label order; unknown labels are an error, not a skip."""
        label_ids = {name: i for i, name in enumerate(labels)}
        self.train = self._encode(self.train_text, label_ids, tokenizer, max_length)
        self.test = self._encode(self.test_text, label_ids, tokenizer, max_length)
        self.val = self._encode(self.val_text, label_ids, tokenizer, max_length) if self.num_val else None

    def _encode(self, data: TextDataset, label_ids: dict[str, int], tokenizer, max_length: int) -> Batch:  # noqa: ANN001
        unknown = sorted({lab for lab in data.labels if lab not in label_ids})
        if unknown:
            raise DataError(
                f"data of '{self.source}' has {len(unknown)} label(s) outside the fleet's label set, "
                f"e.g. {unknown[:3]}"
            )
        enc = tokenizer(
            data.texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        labels = torch.tensor([label_ids[lab] for lab in data.labels], dtype=torch.long)
        return Batch(enc["input_ids"], enc["attention_mask"], labels)

    @property
    def num_train(self) -> int:
        return len(self.train_text)

    @property
    def num_test(self) -> int:
        return len(self.test_text)

    def batch_indices(self, batch_size: int, seed: int) -> Iterator[list[int]]:
        """The training rows of each batch of :meth:`train_batches`, endlessly: one :class:`SplitMix64` seeded
        with ``seed``, each epoch its next permutation of the training rows cut into ``batch_size`` rows (the
        last batch of an epoch may be smaller); docs/protocol.md section 10."""
        if batch_size < 1 or self.num_train < 1:
            raise ValueError(f"batches need a positive batch size and training rows, got {batch_size} and "
                             f"{self.num_train}")
        rng = SplitMix64(seed)
        while True:
            order = rng.permutation(self.num_train)
            for start in range(0, self.num_train, batch_size):
                yield order[start : start + batch_size]

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """Endless batches from seeded shuffled epochs (a round's steps may cross epoch boundaries)."""
        assert self.train is not None, "prepare() first"
        for rows in self.batch_indices(batch_size, seed):
            yield _take(self.train, torch.tensor(rows, dtype=torch.long))

    def aux_indices(self, fraction: float, max_examples: int) -> list[int]:
        """The rows of :meth:`aux_batches`: ``fraction`` of the training rows (Python's ``round``), at least 1, at
        most ``max_examples``, the first ones of the permutation of a :class:`SplitMix64` seeded with the number
        of training rows."""
        n = max(1, min(max_examples, round(fraction * self.num_train), self.num_train))
        return SplitMix64(self.num_train).permutation(self.num_train)[:n]

    def aux_batches(self, fraction: float, max_examples: int, batch_size: int) -> Iterator[Batch]:
        """A fixed sample of the training data (see :meth:`aux_indices`) for statistics such as FedAMoLE's RSEA
        embeddings."""
        assert self.train is not None, "prepare() first"
        order = torch.tensor(self.aux_indices(fraction, max_examples), dtype=torch.long)
        for start in range(0, len(order), batch_size):
            yield _take(self.train, order[start : start + batch_size])

    @property
    def num_val(self) -> int:
        return len(self.val_text)

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        assert self.test is not None, "prepare() first"
        return _in_order(self.test, self.num_test, batch_size)

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """The validation split in order (nothing when the device holds none)."""
        return _in_order(self.val, self.num_val, batch_size) if self.val is not None else iter(())


def _in_order(full: Batch, n: int, batch_size: int) -> Iterator[Batch]:
    for start in range(0, n, batch_size):
        yield _take(full, torch.arange(start, min(start + batch_size, n)))
