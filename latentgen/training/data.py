"""Batches for training: endless shuffled epochs whose position (epoch, batch) is their whole state."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from latentgen.datasets.transforms import Augmented

_STREAM_STRIDE = 0x9E3779B97F4A7C15  # spreads (seed, index) pairs over the generator's seed space


class ShuffledOrder:
    """Index batches (batch_size,) from endless shuffled epochs of 0..size-1, the last partial batch of
    each epoch dropped. Epoch e's permutation is a pure function of (seed, e), so a run that stopped
    can continue from (epoch, batch) exactly, and every process of a data-parallel run sees the same
    global batches."""

    def __init__(self, size: int, batch_size: int, seed: int, what: str = "train.*.batch_size"):
        if batch_size < 1 or size < batch_size:
            raise ValueError(f"the dataset has {size} items, fewer than {what} {batch_size}; lower the batch size "
                             f"or use a larger dataset")
        self.size, self.batch_size, self.seed = size, batch_size, int(seed)
        self.epoch, self.batch = 0, 0
        self._permutation: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)))

    def next(self) -> torch.Tensor:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch, self._permutation = self.epoch + 1, 0, None
        if self._permutation is None:
            self._permutation = self.permutation(self.epoch)
        start = self.batch * self.batch_size
        self.batch += 1
        return self._permutation[start:start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "batch": self.batch, "size": self.size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["size"], state["batch_size"]) != (self.size, self.batch_size):
            raise ValueError(f"the training state's data order is over {state['size']} items in batches of "
                             f"{state['batch_size']}, this run has {self.size} and {self.batch_size}; resume with "
                             f"the same dataset and batch size")
        self.seed, self.epoch, self.batch = int(state["seed"]), int(state["epoch"]), int(state["batch"])
        self._permutation = None


def seed_from(generator: torch.Generator) -> int:
    """A seed for a derived stream, drawn from `generator`."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def derived_seed(seed: int, index: int) -> int:
    """The seed of stream `index` (an epoch, a chunk of a batch) of a family seeded with `seed`."""
    return (int(seed) * _STREAM_STRIDE + int(index)) % 2**63


class DatasetBatches:
    """Endless shuffled batches of dataset items (dicts collated by torch's default_collate).

    `rows` picks this process's part of every global batch in data-parallel training. With
    `num_workers` > 0 a DataLoader loads ahead in worker processes; the position still counts the
    batches handed out, so `state_dict` is exact.
    """

    def __init__(self, dataset: Dataset, batch_size: int, generator: torch.Generator, num_workers: int = 0,
                 rows: slice = slice(None), what: str = "train.*.batch_size"):
        self.dataset, self.num_workers, self.rows = dataset, int(num_workers), rows
        self.order = ShuffledOrder(len(dataset), batch_size, seed_from(generator), what)
        self._loaded: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> "DatasetBatches":
        return self

    def __next__(self) -> dict[str, Any]:
        if self.num_workers == 0:
            indices = self.order.next()[self.rows].tolist()
            if isinstance(self.dataset, Augmented):
                self.dataset.set_epoch(self.order.epoch)  # new random crops/flips each epoch, a function of it
            return default_collate([self.dataset[i] for i in indices])
        if self._loaded is None:
            ahead = ShuffledOrder(self.order.size, self.order.batch_size, self.order.seed)
            ahead.load_state_dict(self.order.state_dict())
            augmented = isinstance(self.dataset, Augmented)
            sampler = _BatchSampler(ahead, self.rows, with_epoch=augmented)
            # Each worker holds its own copy of the dataset, which set_epoch here would never reach:
            # the epoch travels with every index instead.
            dataset = _EpochItems(self.dataset) if augmented else self.dataset
            # A private generator: the loader's own seed draw must not move the global torch generator.
            self._loaded = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                           generator=torch.Generator().manual_seed(self.order.seed)))
        self.order.next()
        return next(self._loaded)

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state)
        self._loaded = None


class _BatchSampler:
    """Endless index lists for a DataLoader, from a ShuffledOrder; with `with_epoch`, (epoch, index) pairs."""

    def __init__(self, order: ShuffledOrder, rows: slice, with_epoch: bool = False):
        self.order, self.rows, self.with_epoch = order, rows, with_epoch

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        while True:
            indices = self.order.next()[self.rows].tolist()
            yield [(self.order.epoch, i) for i in indices] if self.with_epoch else indices


class _EpochItems(Dataset):
    """An Augmented dataset indexed by (epoch, index): the item as it is in that epoch, in any process."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


def epochs(dataset: Dataset, batch_size: int, generator: torch.Generator, num_workers: int = 0,
           rows: slice = slice(None)) -> DatasetBatches:
    """Endless shuffled batches of `dataset` (see DatasetBatches)."""
    return DatasetBatches(dataset, batch_size, generator, num_workers, rows)
