"""The pieces of an exact resume: the state file, the data order's position, the random generators."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from latentgen.errors import CheckpointError
from latentgen.checkpoint import save_tensors
from latentgen.datasets.transforms import Augmented
from latentgen.training import rng
from latentgen.training.data import DatasetBatches, ShuffledOrder
from latentgen.training.state_file import load_state, save_state


def test_nested_state_round_trips_through_one_safetensors_file(tmp_path):
    weight = torch.randn(3, 4)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.randn(5))], lr=1e-3)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(5)
    optimizer.step()
    state = {"step": 7, "stage": "denoiser", "ratio": float("inf"), "nothing": None, "flags": [True, False],
             "pair": (1, 2.5), "by_index": {0: {"exp_avg": torch.arange(3.0)}, 3: "three"},
             "tied": {"a": weight, "b": weight, "view": weight[1]}, "half": torch.ones(2, dtype=torch.bfloat16),
             "optimizer": optimizer.state_dict()}
    save_state(tmp_path / "state.safetensors", state, {"note": {"k": 1}})
    loaded, metadata = load_state(tmp_path / "state.safetensors")
    assert loaded["step"] == 7 and loaded["stage"] == "denoiser" and loaded["ratio"] == float("inf")
    assert loaded["nothing"] is None and loaded["flags"] == [True, False] and loaded["pair"] == (1, 2.5)
    assert set(loaded["by_index"]) == {0, 3} and torch.equal(loaded["by_index"][0]["exp_avg"], torch.arange(3.0))
    assert torch.equal(loaded["tied"]["b"], weight) and torch.equal(loaded["tied"]["view"], weight[1])
    assert loaded["half"].dtype == torch.bfloat16 and metadata["note"] == '{"k": 1}'
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.randn(5))], lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    with pytest.raises(TypeError, match="cannot be saved as data"):
        save_state(tmp_path / "bad.safetensors", {"function": print})
    save_tensors(tmp_path / "plain.safetensors", {"x": torch.ones(1)}, {})
    with pytest.raises(CheckpointError, match="not a latentgen training state"):
        load_state(tmp_path / "plain.safetensors")


def test_the_shuffled_order_continues_from_its_position():
    order = ShuffledOrder(10, 3, seed=5)
    batches = [order.next() for _ in range(7)]  # 3 batches per epoch, the last item of each epoch dropped
    assert sorted(torch.cat(batches[:3]).tolist()) == sorted(order.permutation(0)[:9].tolist())
    assert not torch.equal(order.permutation(0), order.permutation(1))
    again = ShuffledOrder(10, 3, seed=99)
    replay = ShuffledOrder(10, 3, seed=5)
    for _ in range(4):
        replay.next()
    again.load_state_dict(replay.state_dict())
    assert all(torch.equal(again.next(), expected) for expected in batches[4:])
    with pytest.raises(ValueError, match="same dataset and batch size"):
        ShuffledOrder(11, 3, seed=5).load_state_dict(replay.state_dict())
    with pytest.raises(ValueError, match="fewer than"):
        ShuffledOrder(2, 3, seed=5)


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return {"index": index, "caption": f"item {index}"}


def test_dataset_batches_with_worker_processes_resume_from_the_batches_handed_out():
    """Workers load ahead, but the position counts what was handed out; `rows` picks a process's share."""
    plain = DatasetBatches(Items(), 4, torch.Generator().manual_seed(0))
    expected = [next(plain)["index"].tolist() for _ in range(5)]
    loaded = DatasetBatches(Items(), 4, torch.Generator().manual_seed(0), num_workers=2)
    assert [next(loaded)["index"].tolist() for _ in range(2)] == expected[:2]
    resumed = DatasetBatches(Items(), 4, torch.Generator().manual_seed(7), num_workers=2)
    resumed.load_state_dict(loaded.state_dict())
    batches = [next(resumed) for _ in range(3)]
    assert [batch["index"].tolist() for batch in batches] == expected[2:]
    assert batches[0]["caption"] == [f"item {i}" for i in expected[2]]
    second_half = DatasetBatches(Items(), 4, torch.Generator().manual_seed(0), rows=slice(2, 4))
    assert [next(second_half)["index"].tolist() for _ in range(5)] == [batch[2:] for batch in expected]


class Draws(torch.utils.data.Dataset, Augmented):
    """Each item is a number drawn from its augmentation generator: a function of (seed, epoch, index)."""

    augments, augmentation_seed = True, 3

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"index": index, "draw": float(self.augmentation_rng(index).random())}


def test_worker_processes_redraw_augmentations_every_epoch_as_the_main_process_does():
    # Workers hold copies of the dataset; the epoch must reach them with each index.
    def batches(num_workers):
        source = DatasetBatches(Draws(), 4, torch.Generator().manual_seed(0), num_workers=num_workers)
        return [next(source) for _ in range(6)]  # three epochs of two batches

    in_process, in_workers = batches(0), batches(2)
    for expected, loaded in zip(in_process, in_workers):
        assert loaded["index"].tolist() == expected["index"].tolist()
        assert torch.equal(loaded["draw"], expected["draw"])
    first_epoch = {i: d for b in in_workers[:2] for i, d in zip(b["index"].tolist(), b["draw"].tolist())}
    second_epoch = {i: d for b in in_workers[2:4] for i, d in zip(b["index"].tolist(), b["draw"].tolist())}
    assert all(first_epoch[i] != second_epoch[i] for i in first_epoch)


def test_generators_are_restored_to_draw_the_same_numbers():
    generator = torch.Generator().manual_seed(3)
    captured = rng.capture(generator)
    expected = (torch.rand(3, generator=generator), torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5, generator=generator), torch.rand(5), np.random.rand(5), random.random()
    rng.restore(captured, generator)
    drawn = (torch.rand(3, generator=generator), torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], expected[0]) and torch.equal(drawn[1], expected[1])
    assert np.array_equal(drawn[2], expected[2]) and drawn[3] == expected[3]
