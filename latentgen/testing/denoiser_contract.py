"""The contract every denoiser must honour, as a function a plugin author calls in a test."""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch

from latentgen.contracts import Denoiser
from latentgen.contracts.cond_keys import COND_KEYS
from latentgen.testing.shared_rules import Subject, check_rebuilds, close, describe_difference, same
from latentgen.testing.weights import fill_zero_parameters

BFLOAT16_RELATIVE_ERROR = 0.1
CONTEXT_TOKENS = 5  # a token count no denoiser should assume


def example_inputs(denoiser: Denoiser, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """x (batch, latent_channels, h, w) with h = w the smallest multiple of `latent_size_multiple` >= 4,
    timesteps spread over 0..999, and random tensors for every cond key the denoiser declares (shapes from
    `latentgen.contracts.cond_keys`)."""
    generator = torch.Generator().manual_seed(seed)
    multiple = int(denoiser.latent_size_multiple)
    size = multiple * max(1, math.ceil(4 / multiple))
    x = torch.randn(batch, denoiser.latent_channels, size, size, generator=generator)
    t = torch.linspace(10.0, 900.0, batch)
    cond = {key: torch.randn(COND_KEYS[key].example_shape(batch, width, (size, size), CONTEXT_TOKENS), generator=generator)
            for key, width in denoiser.required_cond.items()}
    return x, t, cond


def _declared(denoiser: Denoiser) -> tuple:
    return denoiser.in_channels, denoiser.out_channels, denoiser.required_cond, denoiser.latent_size_multiple


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_denoiser(denoiser: Denoiser | Callable[[], Denoiser]) -> list[str]:
    """Raise AssertionError, naming the denoiser and the broken rule, unless it:

    declares positive `in_channels` and `out_channels`, each conditioning key's width attribute
    (`context_dim`, `vector_dim`, `concat_channels`, ...: latentgen.contracts.cond_keys) as "not read" or a
    positive int, fewer concatenated channels than `in_channels`, and a positive `latent_size_multiple`; maps x (B, C, h, w), t (B,)
    and the declared cond keys to (B, out_channels, h, w) in float32 and bfloat16 (close to float32);
    depends on x, t and every declared cond key (after `fill_zero_parameters`, which undoes zero-initialized
    output layers), and on no other sample of the batch; is deterministic; refuses a missing cond key and
    wrong x channels with a ValueError naming itself; survives a safetensors state-dict round trip and, if
    built by the registry, rebuilds identically through the registry and its Hydra option.

    `denoiser` is an instance (copied, never changed) or a factory of fresh instances. Returns the rules
    checked.
    """
    subject = Subject("denoiser", denoiser)
    first = fill_zero_parameters(subject.first)
    checked: list[str] = []

    rule = "declared capabilities"
    for attribute in ("in_channels", "out_channels", "latent_size_multiple"):
        value = getattr(first, attribute, None)
        subject.require(_positive_int(value), rule, f"`{attribute}` must be a positive int; got {value!r}")
    for key in COND_KEYS.values():
        value = getattr(first, key.width_attribute, key.off)
        subject.require(value == key.off or _positive_int(value), rule,
                        f"`{key.width_attribute}` must be {key.off!r} (not reading '{key.name}') or a positive int; "
                        f"got {value!r}")
    subject.require(first.latent_channels > 0, rule,
                    f"concatenated conditioning takes all {first.in_channels} input channels; none is left for x")
    checked.append(rule)

    x, t, cond = example_inputs(first)
    batch, _, height, width = x.shape
    expected_shape = (batch, first.out_channels, height, width)

    rule = "shapes"
    with torch.no_grad():
        out = subject.run(rule, lambda: first(x, t, cond))
    subject.require(torch.is_tensor(out) and tuple(out.shape) == expected_shape, rule,
                    lambda: f"forward(x {tuple(x.shape)}, t {tuple(t.shape)}, {sorted(cond)}) gives "
                            f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}, expected {expected_shape}")
    checked.append(rule)

    rule = "dtype float32"
    subject.require(out.dtype == torch.float32, rule, f"float32 inputs give {out.dtype}")
    subject.require(bool(torch.isfinite(out).all()), rule, "non-finite output")
    checked.append(rule)

    rule = "dtype bfloat16"
    low = copy.deepcopy(first).to(torch.bfloat16)
    low_cond = {key: value.to(torch.bfloat16) for key, value in cond.items()}
    with torch.no_grad():
        low_out = subject.run(rule, lambda: low(x.to(torch.bfloat16), t, low_cond))
    subject.require(low_out.dtype == torch.bfloat16, rule, f"a bfloat16 denoiser gives {low_out.dtype} for bfloat16 inputs")
    subject.require(close(low_out, out, BFLOAT16_RELATIVE_ERROR), rule,
                    lambda: f"bfloat16 output far from float32: {describe_difference(low_out, out)}")
    checked.append(rule)

    rule = "determinism"
    with torch.no_grad():
        subject.require(same(first(x, t, cond), out), rule, "two calls with the same inputs differ (in eval mode)")
    checked.append(rule)

    rule = "uses its inputs"
    generator = torch.Generator().manual_seed(7)
    changes = {"x": (x + torch.randn(x.shape, generator=generator), t, cond),
               "t": (x, t.flip(0) + 37.0, cond)}
    for key in cond:
        changes[f"cond['{key}']"] = (x, t, {**cond, key: torch.randn(cond[key].shape, generator=generator)})
    with torch.no_grad():
        for what, inputs in changes.items():
            subject.require(not torch.allclose(first(*inputs), out), rule,
                            f"changing {what} does not change the output; a declared input must be used")
    checked.append(rule)

    rule = "samples are independent"
    # The second sample's inputs replaced: the first sample's output must not move.
    other_x = x.clone()
    other_x[1:] = torch.randn(other_x[1:].shape, generator=generator)
    other_cond = {key: value.clone() for key, value in cond.items()}
    for value in other_cond.values():
        value[1:] = torch.randn(value[1:].shape, generator=generator)
    with torch.no_grad():
        moved = first(other_x, t, other_cond)
    subject.require(torch.allclose(moved[:1], out[:1], rtol=1e-4, atol=1e-5), rule,
                    lambda: f"sample 0's output depends on sample 1's inputs: {describe_difference(moved[:1], out[:1])}")
    checked.append(rule)

    rule = "bad inputs are refused"
    wrong = {f"x with {first.latent_channels + 1} channels":
             lambda: first(torch.zeros(batch, first.latent_channels + 1, height, width), t, cond)}
    for key in cond:
        wrong[f"a missing cond['{key}']"] = lambda key=key: first(x, t, {k: v for k, v in cond.items() if k != key})
    for what, call in wrong.items():
        try:
            with torch.no_grad():
                call()
        except ValueError as exc:
            subject.require(first.name in str(exc), rule, f"the error for {what} does not name the denoiser: {exc}")
            continue
        except Exception as exc:
            subject.fail(rule, f"{what} raises {type(exc).__name__} ({exc}), not a ValueError naming the denoiser")
        subject.fail(rule, f"{what} is accepted")
    checked.append(rule)

    def outputs(denoiser: Denoiser) -> torch.Tensor:
        with torch.no_grad():
            return denoiser(x, t, cond)

    check_rebuilds(subject, first, outputs, checked, declared=_declared)
    return checked
