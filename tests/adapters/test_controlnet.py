"""ControlNet: the golden residuals and controlled UNet outputs (scale 1.0 and 0.5) to 1e-4, through the adapter
and through a pipeline call; start/end, guess mode, several nets, control maps of every kind, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from latentgen import LatentDiffusionPipeline, registry
from latentgen.adapters.control_maps import active_steps, canny, control_batch
from latentgen.errors import AdapterError


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def controlnet(golden, **options):
    return registry.build("adapter", "controlnet", path=golden / "controlnet-tiny-weights.safetensors", **options)


def controlled(pipe, io, **extra):
    with torch.no_grad():
        return pipe.denoiser(io["unet.x"], io["unet.t"], {"crossattn": io["unet.context"], **extra})


def test_golden_residuals(sd_tiny, golden, control_io):
    net = sd_tiny.attach(controlnet(golden))
    with torch.no_grad():
        residuals = net.model(control_io["unet.x"], control_io["control.hint"], control_io["unet.t"].float(),
                              {"crossattn": control_io["unet.context"]})
    assert len(residuals) == 5
    for index, residual in enumerate(residuals):
        assert rel_err(residual, control_io[f"control.residuals.{index}"]) < 1e-4


@pytest.mark.parametrize(("scale", "key"), [(1.0, "unet.out_controlled"), (0.5, "unet.out_scaled")])
def test_golden_controlled_unet(sd_tiny, golden, control_io, scale, key):
    plain = controlled(sd_tiny, control_io)
    assert rel_err(plain, control_io["unet.out_plain"]) < 1e-4
    net = sd_tiny.attach(controlnet(golden, scale=scale))
    assert rel_err(controlled(sd_tiny, control_io, control=control_io["control.hint"]), control_io[key]) < 1e-4
    assert torch.equal(controlled(sd_tiny, control_io), plain)  # no control map: the plain UNet
    sd_tiny.detach(net)
    assert torch.equal(controlled(sd_tiny, control_io, control=control_io["control.hint"]), plain)


def test_two_controlnets_at_half_scale_equal_one_at_full(sd_tiny, golden, control_io):
    sd_tiny.attach(controlnet(golden, scale=0.5))
    sd_tiny.attach(controlnet(golden, scale=0.5))
    assert rel_err(controlled(sd_tiny, control_io, control=control_io["control.hint"]),
                   control_io["unet.out_controlled"]) < 1e-4


def test_guess_mode_weights_the_levels_and_leaves_the_unconditional_side_alone(sd_tiny, golden, control_io):
    net = sd_tiny.attach(controlnet(golden, guess_mode=True))
    hint = control_io["control.hint"]
    cond, uncond = net.conditioning({"control": hint}, batch_size=2, image_size=(32, 32),  # latent 16x16
                                    sigmas=sd_tiny.schedule.sigma_grid(4), device=torch.device("cpu"))
    x, t = control_io["unet.x"], control_io["unet.t"].float()
    with torch.no_grad():
        plain = net.model(x, hint, t, {"crossattn": control_io["unet.context"]})
        weighted = net._residuals(x, t, {"crossattn": control_io["unet.context"], **cond})
        assert net._residuals(x, t, {"crossattn": control_io["unet.context"], **uncond}) is None
    for index, (ours, theirs) in enumerate(zip(weighted, plain)):
        assert torch.allclose(ours, theirs * 0.825 ** (4 - index), rtol=1e-6, atol=1e-7)


def test_start_and_end_are_fractions_of_the_sampling_steps(sd_tiny_sampler, golden):
    pipe = sd_tiny_sampler
    assert active_steps(10, 0.0, 1.0) == list(range(10))
    assert active_steps(10, 0.2, 0.5) == [2, 3, 4]
    hint = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))  # 8x sd-tiny's 32x32 latents

    def run(**options):
        seen = []
        pipe(["x"], steps=6, height=64, width=64, seed=0, guidance_scale=3, output_type="latent",
             conditioning={"control": hint} if options.get("net") else None,
             callback=lambda state: seen.append(state["denoised"].clone()))
        return seen

    plain = run()
    net = pipe.attach(controlnet(golden, start=0.5, end=1.0))
    late = run(net=True)
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], late[:3]))  # steps 0-2: no control
    assert not torch.allclose(plain[3], late[3])
    pipe.detach(net)
    pipe.attach(controlnet(golden, start=0.0, end=0.5))
    early = run(net=True)
    assert not torch.allclose(plain[0], early[0])
    pipe.detach(pipe.adapters[0])
    pipe.attach(controlnet(golden, scale=0.0))
    assert all(torch.equal(a, b) for a, b in zip(plain, run(net=True)))  # scale 0: exactly the plain run


def test_control_maps_of_every_kind(tmp_path):
    pixels = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)
    path = tmp_path / "map.png"
    Image.fromarray(pixels).save(path)
    expected = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    for value in (path, str(path), Image.open(path), pixels, expected[0], expected):
        assert torch.allclose(control_batch(value, 2, (16, 16)), expected.expand(2, -1, -1, -1), atol=1e-6)
    with pytest.warns(UserWarning, match="the map is 16x16, resized to the 32x24 the ControlNet reads"):
        assert control_batch(expected, 1, (24, 32)).shape == (1, 3, 24, 32)
    with pytest.raises(TypeError, match="must be an image"):
        control_batch(42, 1, (16, 16))
    with pytest.raises(ValueError, match=r"in \[0, 1\].*\(x \+ 1\) / 2"):
        control_batch(expected * 2 - 1, 1, (16, 16))
    with pytest.raises(FileNotFoundError, match="no image file"):
        control_batch(tmp_path / "missing.png", 1, (16, 16))
    with pytest.raises(ValueError, match="3 maps for 2 images"):
        control_batch([expected] * 3, 2, (16, 16))


def test_canny_finds_the_edges_of_a_square():
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, 16:48, 16:48] = 1.0
    edges = canny(image)
    assert edges.shape == (1, 3, 64, 64) and set(edges.unique().tolist()) == {0.0, 1.0}
    ys, xs = torch.nonzero(edges[0, 0], as_tuple=True)
    assert ys.min() >= 14 and ys.max() <= 49 and xs.min() >= 14 and xs.max() <= 49  # on the square's border
    assert edges[0, 0, 30:34, 30:34].sum() == 0 and edges[0, 0, :8].sum() == 0  # nothing inside or far outside
    assert control_batch(image, 1, (64, 64), preprocess="canny").sum() == edges.sum()


def test_pipeline_call_needs_the_map_and_refuses_bad_nets(sd_tiny, sd_tiny_sampler, golden, tmp_path):
    pipe = sd_tiny_sampler
    pipe.attach(controlnet(golden))
    with pytest.raises(ValueError, match=r"reads conditioning\['control'\]: pass conditioning=\{'control': \.\.\.\}"):
        pipe(["x"], steps=1, height=128, width=128)
    with pytest.raises(TypeError, match="controlnet-tiny-weights.safetensors'.*must be an image"):
        pipe(["x"], steps=1, height=128, width=128, conditioning={"control": 3.5})
    # a ControlNet for another UNet width: every weight shape differs
    other = LatentDiffusionPipeline.from_config({
        "codec": {"name": "identity"}, "conditioner": {"name": "null"},
        "denoiser": {"name": "unet", "in_channels": 3, "out_channels": 3, "model_channels": 64, "channel_mult": [1, 2],
                     "num_res_blocks": 1, "attention_resolutions": [], "num_head_channels": 32}})
    with pytest.raises(AdapterError, match=r"is for another UNet: .*the pipeline's UNet \(model_channels 64"):
        other.attach(controlnet(golden))
    assert other.adapters == [] and other.denoiser.residual_sources == []
    patched = LatentDiffusionPipeline.from_config({
        "codec": {"name": "identity"}, "conditioner": {"name": "null"},
        "denoiser": {"name": "unet", "in_channels": 3, "out_channels": 3, "model_channels": 32, "channel_mult": [1, 2],
                     "num_res_blocks": 1, "attention_resolutions": [], "num_head_channels": 32, "patch_size": 2}})
    with pytest.raises(AdapterError, match=r"folds 2x2 patches \(patch_size=2\), which no ControlNet is made for"):
        patched.attach(controlnet(golden))
    assert patched.adapters == [] and patched.denoiser.residual_sources == []
    dit = LatentDiffusionPipeline.from_config({
        "codec": {"name": "identity"}, "conditioner": {"name": "null"},
        "denoiser": {"name": "dit", "in_channels": 3, "out_channels": 3, "patch_size": 2, "hidden_size": 32,
                     "depth": 1, "num_heads": 2}})
    with pytest.raises(AdapterError, match="steers an LDM UNet; this pipeline's denoiser is 'dit'"):
        dit.attach(controlnet(golden))
    not_a_net = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(not_a_net))
    with pytest.raises(AdapterError, match="holds no ControlNet"):
        registry.build("adapter", "controlnet", path=not_a_net)
    with pytest.raises(Exception, match="start and end are fractions"):
        controlnet(golden, start=0.8, end=0.2)


def test_a_whole_model_file_with_the_sd_weights_too(sd_tiny, golden, control_io, tmp_path):
    tensors = {**safetensors.torch.load_file(str(golden / "sd-tiny-weights.safetensors")),
               **safetensors.torch.load_file(str(golden / "controlnet-tiny-weights.safetensors"))}
    path = tmp_path / "control_sd15_whole.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    sd_tiny.attach(registry.build("adapter", "controlnet", path=path))
    assert rel_err(controlled(sd_tiny, control_io, control=control_io["control.hint"]),
                   control_io["unet.out_controlled"]) < 1e-4


def test_an_sdxl_controlnet_copies_the_encoder_with_its_vector_input(sdxl_tiny, tmp_path):
    """A control_model.* ControlNet for an SDXL UNet (label_emb for the vector). With the UNet's own encoder
    weights, identity zero convs and a hint block whose last conv is zero, its residuals are exactly the
    UNet's skip activations and middle output: the structure, the time and vector embeddings all line up."""
    from latentgen.adapters.controlnet_model import ControlNetModel

    unet = sdxl_tiny.denoiser
    net = ControlNetModel(unet.build_params)
    state = net.state_dict()
    for key, value in unet.state_dict().items():
        if key in state:
            state[key] = value.clone()
    for key, value in state.items():
        if key.startswith(("zero_convs.", "middle_block_out.")):
            state[key] = (torch.eye(value.shape[0])[:, :, None, None] if key.endswith("weight")
                          else torch.zeros_like(value))
        elif key.startswith("input_hint_block.14."):
            state[key] = torch.zeros_like(value)
    path = tmp_path / "control_sdxl.safetensors"
    safetensors.torch.save_file({f"control_model.{k}": v.contiguous() for k, v in state.items()}, str(path))
    adapter = sdxl_tiny.attach(registry.build("adapter", "controlnet", path=path))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([300.0])
    cond = {"crossattn": torch.randn(1, 77, 24), "vector": torch.randn(1, 1560)}
    skips = []
    hooks = [block.register_forward_hook(lambda m, i, o: skips.append(o)) for block in [*unet.input_blocks,
                                                                                         unet.middle_block]]
    with torch.no_grad():
        plain = unet(x, t, cond)
        for hook in hooks:
            hook.remove()
        residuals = adapter.model(x, torch.rand(1, 3, 128, 128), t, cond)
        controlled = unet(x, t, {**cond, "control": torch.rand(1, 3, 128, 128)})
    assert len(residuals) == len(skips) == len(unet.input_blocks) + 1
    for ours, theirs in zip(residuals, skips):
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(controlled, plain)  # every skip doubled
