"""Splitting one dataset over federated clients, with controlled heterogeneity.

Federated fine-tuning is studied under non-IID data, so the partition kind is part of every
experiment's definition: ``iid``, ``dirichlet:ALPHA`` (label skew), ``quantity:ALPHA`` (size skew) or
``column:NAME`` (a natural split, e.g. by domain or speaker). All partitions are deterministic for a
given seed so that runs on different machines see the same clients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgemole.data.dataset import TextDataset
from edgemole.errors import ConfigError, DataError
from edgemole.rng import SplitMix64

PARTITION_FORMS = "iid, dirichlet:ALPHA, quantity:ALPHA or column:NAME (ALPHA a positive number)"
# Label-skew draws are retried this often before concluding the data cannot support the clients.
DIRICHLET_TRIES = 10_000


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition flag; ``str(spec)`` gives back the flag form (for logs and run configs)."""

    kind: str
    alpha: float | None = None
    column: str | None = None

    def __post_init__(self) -> None:
        if self.kind in ("dirichlet", "quantity"):
            if self.alpha is None or not math.isfinite(self.alpha) or self.alpha <= 0:
                raise ConfigError(f"partition {self.kind} needs a positive finite alpha, got {self.alpha!r}")
        elif self.kind == "column":
            if not self.column:
                raise ConfigError("partition column needs a column name, e.g. column:domain")
        elif self.kind != "iid":
            raise ConfigError(f"unknown partition kind {self.kind!r} (accepted: {PARTITION_FORMS})")

    def __str__(self) -> str:
        if self.kind == "column":
            return f"column:{self.column}"
        if self.kind == "iid":
            return "iid"
        return f"{self.kind}:{self.alpha:g}"


def parse_partition(spec: str) -> PartitionSpec:
    """Parse a ``--partition`` value; a malformed one is a :class:`ConfigError` listing the accepted forms."""
    text = spec.strip()
    kind, sep, arg = text.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind == "iid" and not sep:
        return PartitionSpec("iid")
    if kind in ("dirichlet", "quantity") and sep:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if not math.isfinite(alpha) or alpha <= 0:
            raise ConfigError(f"invalid partition {spec!r}: ALPHA must be a positive number, got {arg!r}")
        return PartitionSpec(kind, alpha=alpha)
    if kind == "column" and sep and arg:
        return PartitionSpec("column", column=arg)
    raise ConfigError(f"invalid partition {spec!r} (accepted: {PARTITION_FORMS})")


def _as_int_lists(parts: Sequence[np.ndarray | Sequence[int]]) -> list[list[int]]:
    return [sorted(int(i) for i in part) for part in parts]


def _check_sizes(n: int, n_clients: int, min_size: int) -> None:
    if n_clients < 1:
        raise ConfigError(f"number of clients must be at least 1, got {n_clients}")
    if min_size < 1:
        raise ConfigError(f"minimum client size must be at least 1, got {min_size}")
    if n < n_clients * min_size:
        raise DataError(
            f"dataset has {n} examples, too few for {n_clients} clients with at least {min_size} each"
        )


def _iid(n: int, n_clients: int, rng: np.random.Generator) -> list[list[int]]:
    return _as_int_lists(np.array_split(rng.permutation(n), n_clients))


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights`` (Hamilton's method)."""
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def _quantity(n: int, n_clients: int, alpha: float, min_size: int,
              rng: np.random.Generator) -> list[list[int]]:
    # Every client first gets min_size, the rest is shared by Dirichlet proportions: this always
    # succeeds, where resampling sizes until all reach min_size may not for small alpha.
    shares = rng.dirichlet(np.full(n_clients, alpha))
    sizes = min_size + _largest_remainder(shares + 1e-300, n - n_clients * min_size)
    cuts = np.cumsum(sizes)[:-1]
    return _as_int_lists(np.split(rng.permutation(n), cuts))


def _dirichlet(labels: Sequence[str], n_clients: int, alpha: float, min_size: int,
               rng: np.random.Generator, spec: PartitionSpec) -> list[list[int]]:
    label_arr = np.asarray(labels, dtype=object)
    classes = sorted(set(labels))
    by_class = [np.flatnonzero(label_arr == c) for c in classes]
    class_sizes = np.array([len(m) for m in by_class], dtype=np.int64)
    for _ in range(DIRICHLET_TRIES):
        # One (labels x clients) draw per try; index lists are built only once a draw is accepted.
        proportions = rng.dirichlet(np.full(n_clients, alpha), size=len(by_class))
        bounds = (np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
        bounds = np.minimum(bounds, class_sizes[:, None])
        bounds[:, -1] = class_sizes  # float rounding must not drop the last examples of a label
        if np.diff(bounds, axis=1, prepend=0).sum(axis=0).min() >= min_size:
            clients: list[list[int]] = [[] for _ in range(n_clients)]
            for members, cut in zip(by_class, bounds[:, :-1], strict=True):
                for client, chunk in zip(clients, np.split(rng.permutation(members), cut), strict=True):
                    client.extend(int(i) for i in chunk)
            return [sorted(c) for c in clients]
    raise DataError(
        f"partition {spec} left some client with fewer than {min_size} examples in {DIRICHLET_TRIES} draws: "
        f"{len(labels)} examples in {len(classes)} labels are too few for {n_clients} clients at this "
        f"alpha; use a larger alpha or fewer clients"
    )


def _column(dataset: TextDataset, n_clients: int, column: str, min_size: int,
            rng: np.random.Generator) -> list[list[int]]:
    if column in dataset.columns:
        values = dataset.columns[column]
    elif column == "label":
        values = dataset.labels
    else:
        available = ", ".join(["label", *dataset.columns])
        raise DataError(f"dataset has no column {column!r} to partition by (columns: {available})")
    groups: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v, []).append(i)
    keys = sorted(groups)
    # Shuffle before the stable size sort so that ties are broken by the seed, not by value order.
    keys = [keys[i] for i in rng.permutation(len(keys))]
    keys.sort(key=lambda k: -len(groups[k]))

    if len(keys) >= n_clients:
        # Greedy: largest remaining group to the currently smallest client; groups stay whole.
        clients: list[list[int]] = [[] for _ in range(n_clients)]
        for key in keys:
            target = min(range(n_clients), key=lambda c: (len(clients[c]), c))
            clients[target].extend(groups[key])
        smallest = min(clients, key=len)
        if len(smallest) < min_size:
            names = ", ".join(repr(k) for k in keys if groups[k][0] in smallest)
            raise DataError(
                f"partition column:{column} gives a client only {len(smallest)} examples (from group "
                f"{names}; minimum {min_size}); use fewer clients"
            )
        return [sorted(c) for c in clients]

    # Fewer groups than clients: spread clients evenly (extra ones to the largest groups), never
    # giving a group more clients than it can fill with min_size examples each.
    counts = {k: n_clients // len(keys) for k in keys}
    for k in keys[: n_clients % len(keys)]:
        counts[k] += 1
    capacity = {k: len(groups[k]) // min_size for k in keys}
    excess = sum(max(0, counts[k] - capacity[k]) for k in keys)
    for k in keys:
        counts[k] = min(counts[k], capacity[k])
    while excess:
        roomy = [k for k in keys if counts[k] < capacity[k]]
        if not roomy:
            raise DataError(
                f"partition column:{column}: its {len(keys)} groups cannot fill {n_clients} clients with at "
                f"least {min_size} examples each without mixing groups; use fewer clients"
            )
        # Fewest clients per example first, so the extra client goes where it dilutes least.
        k = min(roomy, key=lambda g: (counts[g] / len(groups[g]), keys.index(g)))
        counts[k] += 1
        excess -= 1
    out: list[list[int]] = []
    for k in keys:
        if counts[k] == 0:
            raise DataError(
                f"partition column:{column}: group {k!r} has only {len(groups[k])} examples (minimum "
                f"{min_size}) and would be left out"
            )
        members = rng.permutation(np.asarray(groups[k]))
        out.extend(_as_int_lists(np.array_split(members, counts[k])))
    return out


def partition(dataset: TextDataset, n_clients: int, spec: PartitionSpec | str, seed: int,
              min_size: int = 2) -> list[list[int]]:
    """Disjoint, sorted index lists (one per client) covering every example of ``dataset``.

    Each client gets at least ``min_size`` examples, or a :class:`DataError` explains why that is
    impossible. ``column:NAME`` keeps every client within one value of the column (``column:label``
    uses the labels). The result depends only on the arguments, never on global random state.
    """
    if isinstance(spec, str):
        spec = parse_partition(spec)
    n = len(dataset)
    _check_sizes(n, n_clients, min_size)
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        return _iid(n, n_clients, rng)
    if spec.kind == "quantity":
        assert spec.alpha is not None
        return _quantity(n, n_clients, spec.alpha, min_size, rng)
    if spec.kind == "dirichlet":
        assert spec.alpha is not None
        return _dirichlet(dataset.labels, n_clients, spec.alpha, min_size, rng, spec)
    assert spec.column is not None
    return _column(dataset, n_clients, spec.column, min_size, rng)


def split_train_test(indices: Sequence[int], labels: Sequence[str], test_fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """Hold out ``test_fraction`` of one client's ``indices`` for local evaluation, stratified by label.

    ``labels`` is the whole dataset's label list (indexed by the entries of ``indices``). With at least
    two examples and a positive fraction there is at least one test example and one training example.
    The draws come from :class:`~edgemole.rng.SplitMix64` in an order fixed by docs/protocol.md section 10,
    so that the native client holds out exactly the same examples for the same seed.
    """
    if not (0 <= test_fraction < 1) or not math.isfinite(test_fraction):
        raise ConfigError(f"test fraction must be in [0, 1), got {test_fraction}")
    idx = [int(i) for i in indices]
    n = len(idx)
    if n < 2 or test_fraction == 0:
        return sorted(idx), []
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    rng = SplitMix64(seed)
    by_label: dict[str, list[int]] = {}
    for i in idx:  # members of each label in the order of ``indices``
        by_label.setdefault(labels[i], []).append(i)
    names = sorted(by_label)
    sizes = np.array([len(by_label[k]) for k in names], dtype=np.float64)
    # Random tie-breaking for which labels get the rounding remainder: draws 1..(labels - 1).
    order = rng.permutation(len(names))
    quota = _largest_remainder(sizes[order], n_test)
    train: list[int] = []
    test: list[int] = []
    for pos, q in zip(order, quota, strict=True):
        # Then one shuffle per label, in that random label order: the first ``q`` members are held out.
        members = by_label[names[pos]]
        rng.shuffle(members)
        test.extend(members[:q])
        train.extend(members[q:])
    return sorted(train), sorted(test)


def label_histogram(labels: Sequence[str], indices: Sequence[int], label_names: Sequence[str]) -> list[int]:
    """Counts of each of ``label_names`` among ``labels[i]`` for ``i`` in ``indices`` (for reports)."""
    position = {name: k for k, name in enumerate(label_names)}
    counts = [0] * len(label_names)
    for i in indices:
        label = labels[i]
        if label not in position:
            raise DataError(
                f"label {label!r} of example {i} is not among the {len(label_names)} known labels"
            )
        counts[position[label]] += 1
    return counts
