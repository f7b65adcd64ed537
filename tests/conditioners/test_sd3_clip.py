"""SD3's two CLIP towers in transformers' layout, as the clip_text conditioner builds them: the penultimate
hidden state without the final norm, and the pooled vector (CLIP-L unprojected, CLIP-G through its
text_projection), against Stability AI's reference on sd35-tiny."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from latentgen import registry

TOWERS = {  # name -> the conditioner's options (sizes and activations from sd35-tiny-config.json)
    "clip_l": dict(context_dim=8, layers=3, heads=2, intermediate_size=32, hidden_act="quick_gelu"),
    "clip_g": dict(context_dim=12, layers=3, heads=3, intermediate_size=48, hidden_act="gelu", projection_dim=12),
}


@pytest.fixture(scope="module")
def golden(shared_dir):
    weights = safetensors.torch.load_file(str(shared_dir / "golden" / "sd35-tiny-weights.safetensors"))
    io = safetensors.torch.load_file(str(shared_dir / "golden" / "sd35-tiny-io.safetensors"))
    return weights, io


@pytest.mark.parametrize("name", TOWERS)
def test_hidden_and_pooled_match_the_reference(golden, name):
    weights, io = golden
    conditioner = registry.build("conditioner", "clip_text", layout="clip", layer="penultimate", final_norm=False,
                                 pooled=True, **TOWERS[name])
    prefix = f"text_encoders.{name}.transformer."
    state = {"transformer." + key[len(prefix + "text_model."):]: value for key, value in weights.items()
             if key.startswith(prefix + "text_model.")}
    if "projection_dim" in TOWERS[name]:
        state["text_projection.weight"] = weights[prefix + "text_projection.weight"]
    conditioner.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = conditioner.encode(io[f"tokens.{name}"])
    for ours, theirs in ((out["crossattn"], io[f"{name}.hidden"]), (out["vector"], io[f"{name}.pooled"])):
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    assert conditioner.outputs == {"crossattn": TOWERS[name]["context_dim"], "vector": TOWERS[name]["context_dim"]}


def test_projection_needs_pooled_for_the_clip_layout():
    with pytest.raises(Exception, match="projection_dim projects the pooled vector: pass pooled=true"):
        registry.build("conditioner", "clip_text", layout="clip", context_dim=8, layers=1, heads=2, projection_dim=8)
