"""The component kinds, declared once: the registry, the Hydra groups, the pipeline's parts, the contract
suites and `latentgen plugins` all read this table. Adding a kind is one entry here (plus its base class
and, if it has one, its contract check).

This module imports nothing heavy: base classes and checks are named as "module:attribute" strings and
imported only when asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Kind:
    """One kind of component: where its implementations register and what they promise."""

    name: str            # what `registry.build(kind, ...)` and the messages call it
    group: str           # the entry-point group its implementations register under
    base: str            # "module:Class": the abstract base class every implementation subclasses
    summary: str         # one line for `latentgen plugins --markdown` and CONTRIBUTING.md
    check: str | None = None        # "module:function": its contract check in latentgen.testing
    hydra_group: str | None = None  # the config group that selects one; None: not chosen through Hydra
    # "module": a part of the pipeline with weights (saved under "<name>."); "callable": a part without
    # weights; None: not held by the pipeline.
    slot: str | None = None
    default: str | None = None      # the component a pipeline uses when its config names none
    plural: str = ""

    @property
    def plural_name(self) -> str:
        return self.plural or f"{self.name}s"

    def base_class(self) -> type:
        return _attribute(self.base)

    def check_function(self) -> Callable[..., list[str]] | None:
        return _attribute(self.check) if self.check else None


def _attribute(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


KINDS: tuple[Kind, ...] = (
    Kind("codec", "latentgen.codecs", "latentgen.contracts.codec:Codec",
         "first stage: images <-> latents",
         check="latentgen.testing.codec_contract:check_codec", hydra_group="codec", slot="module"),
    Kind("denoiser", "latentgen.denoisers", "latentgen.contracts.denoiser:Denoiser",
         "the network trained in latent space",
         check="latentgen.testing.denoiser_contract:check_denoiser", hydra_group="denoiser", slot="module"),
    Kind("conditioner", "latentgen.conditioners", "latentgen.contracts.conditioner:Conditioner",
         "prompts, labels, images -> the cond tensors the denoiser reads",
         check="latentgen.testing.conditioner_contract:check_conditioner", hydra_group="conditioner",
         slot="module", default="null"),
    Kind("scheduler", "latentgen.schedulers", "latentgen.contracts.scheduler:Scheduler",
         "the sampling algorithm, in sigma space",
         check="latentgen.testing.scheduler_contract:check_scheduler", hydra_group="scheduler",
         slot="callable", default="ddim"),
    Kind("dataset", "latentgen.datasets", "torch.utils.data:Dataset",
         "training data: items {image, prompt, label, ...}", hydra_group="dataset"),
    Kind("format", "latentgen.formats", "latentgen.contracts.checkpoint_format:CheckpointFormat",
         "a file layout holding a whole pipeline: sniff, load, save",
         check="latentgen.testing.format_contract:check_format"),
    Kind("process", "latentgen.processes", "latentgen.contracts.process:Process",
         "how data is noised in training and what the network predicts (DDPM, EDM, rectified flow)",
         hydra_group="process", slot="callable"),
    Kind("adapter", "latentgen.adapters", "latentgen.contracts.adapter:Adapter",
         "attached to a pipeline, changes what it computes, reversibly (LoRA, ControlNet, embeddings)"),
)

# Readers look the table up when they run (through the functions below, or `kinds.KINDS`), never copy it at
# import: so a test can add a kind and see every reader pick it up.


def kind(name: str) -> Kind:
    """The kind called `name`; a LookupError listing the kinds for any other name."""
    for candidate in KINDS:
        if candidate.name == name:
            return candidate
    from latentgen.errors import ComponentNotFoundError

    raise ComponentNotFoundError(f"unknown component kind '{name}'; the kinds are: "
                                 f"{', '.join(k.name for k in KINDS)}")


def pipeline_parts() -> tuple[str, ...]:
    """The parts a pipeline holds, in the order it takes them."""
    return tuple(k.name for k in KINDS if k.slot is not None)


def module_parts() -> tuple[str, ...]:
    """The parts of a pipeline that hold weights (saved under "<kind>.")."""
    return tuple(k.name for k in KINDS if k.slot == "module")
