"""The conditioner of an unconditional model: no inputs, no conditioning."""

from __future__ import annotations

from latentgen.contracts import Conditioner


class NullConditioner(Conditioner):
    """Produces an empty cond dict; the pipeline refuses prompts and labels for such a model."""

    input_keys = ()

    def __init__(self):  # explicit, so that unexpected parameters are refused by name
        super().__init__()

    @property
    def outputs(self) -> dict[str, int]:
        return {}

    def forward(self, batch):
        return {}

    def unconditional(self, batch):
        return {}
