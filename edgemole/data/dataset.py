"""The in-memory labelled text dataset shared by loaders, partitioners and trainers.

Everything is kept as plain strings: label ids depend on the label set of a whole federation, so the
mapping to integers happens where that set is known, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class TextDataset:
    """Texts, their string labels and any other per-example columns (all of the same length).

    ``columns`` keeps the extra columns of the source file (e.g. ``domain``) so that a natural
    partition can split by them and a client's share can be written back without losing anything.
    """

    texts: list[str]
    labels: list[str]
    columns: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A length mismatch is a programming error (loaders never produce one), hence ValueError.
        if len(self.texts) != len(self.labels):
            raise ValueError(f"TextDataset has {len(self.texts)} texts but {len(self.labels)} labels")
        for name, values in self.columns.items():
            if len(values) != len(self.texts):
                raise ValueError(
                    f"TextDataset column {name!r} has {len(values)} values for {len(self.texts)} texts"
                )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        """The examples at ``indices``, in that order (a client's share of a partition)."""
        idx = [int(i) for i in indices]
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            columns={name: [values[i] for i in idx] for name, values in self.columns.items()},
        )

    def without_columns(self, names: Sequence[str]) -> TextDataset:
        """The same examples without the extra columns in ``names`` (e.g. a source column named ``label`` that is
        not the chosen label column, which a file in the fleet's own text/label format cannot hold)."""
        keep = {name: values for name, values in self.columns.items() if name not in names}
        return TextDataset(texts=self.texts, labels=self.labels, columns=keep)

    def label_names(self) -> list[str]:
        """Sorted unique labels, so every party derives the same label order from the same data."""
        return sorted(set(self.labels))

    @staticmethod
    def concat(parts: Sequence[TextDataset]) -> TextDataset:
        """Join datasets end to end; they must have the same extra columns (checked by the caller)."""
        names = list(parts[0].columns) if parts else []
        return TextDataset(
            texts=[t for p in parts for t in p.texts],
            labels=[lab for p in parts for lab in p.labels],
            columns={name: [v for p in parts for v in p.columns[name]] for name in names},
        )
