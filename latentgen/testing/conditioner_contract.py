"""The contract every conditioner must honour, as a function a plugin author calls in a test."""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch

from latentgen.contracts import Conditioner
from latentgen.contracts.cond_keys import COND_KEYS
from latentgen.contracts.input_keys import INPUT_KEYS
from latentgen.testing.shared_rules import Subject, check_rebuilds, close, describe_difference, same

BFLOAT16_RELATIVE_ERROR = 0.1
IMAGE_SIZE = 16


def _latent_channels(conditioner: Conditioner) -> int:
    # The masked-image latents' channels are the codec's; a conditioner reading them declares them.
    return int(getattr(conditioner, "latent_channels", 4))


# Two different values of each kind of input (`latentgen.contracts.input_keys.VALUES`), batch of 2.
EXAMPLE_VALUES: dict[str, Callable[[Conditioner, torch.Generator], Any]] = {
    "text": lambda conditioner, g: ["a red circle", "a blue star on grass"],
    "label": lambda conditioner, g: torch.tensor([0, 1]),
    "image": lambda conditioner, g: torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1,
    "mask": lambda conditioner, g: (torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g) > 0.5).float(),
    "latents": lambda conditioner, g: torch.randn(2, _latent_channels(conditioner), IMAGE_SIZE // 8,
                                                  IMAGE_SIZE // 8, generator=g),
    "size": lambda conditioner, g: (IMAGE_SIZE // 8, IMAGE_SIZE // 8),
    "pixels": lambda conditioner, g: (IMAGE_SIZE, IMAGE_SIZE),
    # A conditioner of numbers declares how many it reads per item as `count`; integers below 256 stay exact
    # when the suite casts inputs to bfloat16.
    "numbers": lambda conditioner, g: torch.randint(1, 256, (2, int(getattr(conditioner, "count", 2))),
                                                    generator=g).float(),
}


def example_batch(conditioner: Conditioner, seed: int = 0) -> dict[str, Any]:
    """A batch of 2 different samples for every input key the conditioner reads, by what the key holds
    (the table `latentgen.contracts.input_keys`)."""
    generator = torch.Generator().manual_seed(seed)
    unknown = [key for key in conditioner.input_keys if key not in INPUT_KEYS]
    if unknown:
        raise AssertionError(f"conditioner '{conditioner.name}' reads {unknown}, which latentgen.contracts.input_keys "
                             f"does not list, so latentgen.testing has no example values; pass batch={{...}} to "
                             f"check_conditioner")
    return {key: EXAMPLE_VALUES[INPUT_KEYS[key].value](conditioner, generator) for key in conditioner.input_keys}


def _to(batch: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {key: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
            for key, value in batch.items()}


def _declared(conditioner: Conditioner) -> tuple:
    return tuple(conditioner.input_keys), dict(conditioner.outputs)


def check_conditioner(conditioner: Conditioner | Callable[[], Conditioner],
                      batch: Mapping[str, Any] | None = None) -> list[str]:
    """Raise AssertionError, naming the conditioner and the broken rule, unless it:

    declares `input_keys` (a tuple of str), `outputs` ({key of latentgen.contracts.cond_keys: positive width})
    and a `dropout` in [0, 1]; returns from `forward` and `unconditional` exactly the declared keys, each of
    its key's rank with the declared width (e.g. "crossattn" (B, L, D)), finite, in float32 and bfloat16 (close to
    float32); gives different conditioning for different samples; is deterministic, and `for_training`
    reproducible with a seeded generator whatever the global RNG; refuses a batch missing one of its
    input keys with a ValueError naming that key; survives a safetensors state-dict round trip and, if built
    by the registry, rebuilds identically through the registry and its Hydra option.

    `conditioner` is an instance (copied, never changed) or a factory of fresh instances; `batch` gives
    two different samples for input keys that `EXAMPLE_INPUTS` does not know. Returns the rules checked.
    """
    subject = Subject("conditioner", conditioner)
    first = subject.first
    checked: list[str] = []

    rule = "declared capabilities"
    keys = first.input_keys
    subject.require(isinstance(keys, tuple) and all(isinstance(key, str) for key in keys), rule,
                    f"`input_keys` must be a tuple of str; got {keys!r}")
    outputs = subject.run(rule, lambda: first.outputs)
    subject.require(isinstance(outputs, dict) and set(outputs) <= set(COND_KEYS), rule,
                    f"`outputs` must be a dict keyed by some of {sorted(COND_KEYS)}; got {outputs!r}")
    subject.require(all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in outputs.values()), rule,
                    f"`outputs` widths must be positive ints; got {outputs!r}")
    subject.require(isinstance(first.dropout, (int, float)) and 0 <= first.dropout <= 1, rule,
                    f"`dropout` must be in [0, 1]; got {first.dropout!r}")
    checked.append(rule)

    if batch is None:
        batch = example_batch(first)
    missing = [key for key in keys if key not in batch]
    subject.require(not missing, "example batch", f"the batch given has no {missing}")
    batch_size = 2

    def check_shapes(cond: Any, call: str, dtype: torch.dtype) -> None:
        rule = "shapes"
        subject.require(isinstance(cond, dict) and set(cond) == set(outputs), rule,
                        lambda: f"{call} returns keys {sorted(cond) if isinstance(cond, dict) else type(cond).__name__}, "
                                f"declared outputs {sorted(outputs)}")
        for key, value in cond.items():
            spec = COND_KEYS[key]
            subject.require(torch.is_tensor(value) and value.ndim == spec.rank and value.shape[0] == batch_size
                            and value.shape[spec.width_dim] == outputs[key], rule,
                            lambda: f"{call}['{key}'] has shape {tuple(value.shape)}; expected {spec.described()} "
                                    f"with batch {batch_size} and width {outputs[key]}")
            subject.require(value.dtype == dtype, f"dtype {str(dtype).replace('torch.', '')}",
                            f"{call}['{key}'] is {value.dtype}")
            subject.require(bool(torch.isfinite(value).all()), rule, f"{call}['{key}'] is not finite")

    with torch.no_grad():
        cond = subject.run("shapes", lambda: first(batch))
        check_shapes(cond, "forward", torch.float32)
        uncond = subject.run("shapes", lambda: first.unconditional(batch))
        check_shapes(uncond, "unconditional", torch.float32)
        for key in cond:
            subject.require(uncond[key].shape == cond[key].shape, "shapes",
                            f"unconditional['{key}'] {tuple(uncond[key].shape)} differs from forward's {tuple(cond[key].shape)}")
    checked += ["shapes", "dtype float32"]

    rule = "dtype bfloat16"
    low = copy.deepcopy(first).to(torch.bfloat16)
    with torch.no_grad():
        low_cond = subject.run(rule, lambda: low(_to(batch, torch.bfloat16)))
        check_shapes(low_cond, "forward (bfloat16)", torch.bfloat16)
    for key in cond:
        subject.require(close(low_cond[key], cond[key], BFLOAT16_RELATIVE_ERROR), rule,
                        lambda: f"bfloat16 '{key}' far from float32: {describe_difference(low_cond[key], cond[key])}")
    checked.append(rule)

    rule = "distinguishes samples"
    if outputs and not first.constant:
        subject.require(any(not torch.equal(value[0], value[1]) for value in cond.values()), rule,
                        "two different samples get the same conditioning")
        checked.append(rule)

    rule = "determinism"
    with torch.no_grad():
        subject.require(same(first(batch), cond), rule, "forward differs between calls (in eval mode)")
        subject.require(same(first.unconditional(batch), uncond), rule, "unconditional differs between calls")
        torch.manual_seed(1)
        trained = first.for_training(batch, torch.Generator().manual_seed(0))
        torch.manual_seed(2)
        again = first.for_training(batch, torch.Generator().manual_seed(0))
    subject.require(same(trained, again), rule,
                    "for_training with the same seeded generator differs (does it draw from the global RNG?)")
    check_shapes(trained, "for_training", torch.float32)
    checked.append(rule)

    rule = "bad inputs are refused"
    for key in keys:
        if key in INPUT_KEYS and INPUT_KEYS[key].optional:  # a default stands in for an optional input
            continue
        try:
            with torch.no_grad():
                first({k: v for k, v in batch.items() if k != key})
        except ValueError as exc:
            # A stack's error names the member that reads the key; the key itself must be named.
            subject.require(repr(key) in str(exc), rule, f"the error for a batch without '{key}' does not name "
                                                         f"that key: {exc}")
            continue
        except Exception as exc:
            subject.fail(rule, f"a batch without '{key}' raises {type(exc).__name__} ({exc}), not a ValueError "
                               f"naming the missing key")
        subject.fail(rule, f"a batch without '{key}' is accepted")
    checked.append(rule)

    def results(conditioner: Conditioner) -> dict[str, Any]:
        with torch.no_grad():
            return {"forward": conditioner(batch), "unconditional": conditioner.unconditional(batch)}

    check_rebuilds(subject, first, results, checked, declared=_declared)
    return checked
