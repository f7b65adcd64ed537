"""Bad settings of the apps: each ends in one `error:` line naming the key and the value, exit status 1, before
any training step or weight read, and leaves an existing run directory exactly as it was.

The apps run in this process (their `main`, with the command line patched): a fraction of a second per case.
"""

from __future__ import annotations

import pytest
from run_snapshots import existing_run, snapshot

# (app, arguments, what the one error line must name). Train cases add experiment=smoke; sample cases a
# checkpoint and a prompt; eval cases a checkpoint.
CASES = [
    # latentgen-train: counts, rates, weights and choices of both stages
    ("train", ["train.denoiser.steps=abc"], "train.denoiser.steps='abc'"),
    ("train", ["train.denoiser.steps=-5"], "train.denoiser.steps=-5"),
    ("train", ["train.denoiser.steps=1.5"], "train.denoiser.steps=1.5"),
    ("train", ["train.codec.steps=-1"], "train.codec.steps=-1"),
    ("train", ["train.denoiser.lr=-1"], "train.denoiser.lr=-1"),
    ("train", ["train.denoiser.lr=inf"], "train.denoiser.lr=inf"),
    ("train", ["train.codec.lr=nan"], "train.codec.lr=nan"),
    ("train", ["train.codec.lr=0"], "train.codec.lr=0"),
    ("train", ["train.denoiser.batch_size=0"], "train.denoiser.batch_size=0"),
    ("train", ["train.codec.batch_size=abc"], "train.codec.batch_size='abc'"),
    ("train", ["train.codec.batch_size=0"], "train.codec.batch_size=0"),
    ("train", ["train.denoiser.grad_accumulation=0"], "train.denoiser.grad_accumulation=0"),
    ("train", ["train.denoiser.grad_accumulation=3"], "train.denoiser.grad_accumulation=3: must divide"),
    ("train", ["train.denoiser.grad_clip=-1"], "train.denoiser.grad_clip=-1"),
    ("train", ["train.denoiser.warmup_steps=-1"], "train.denoiser.warmup_steps=-1"),
    ("train", ["train.denoiser.ema_decay=1"], "train.denoiser.ema_decay=1"),
    ("train", ["train.denoiser.weight_decay=-0.1"], "train.denoiser.weight_decay=-0.1"),
    ("train", ["train.denoiser.loss_weighting=snr"], "train.denoiser.loss_weighting='snr'"),
    ("train", ["train.denoiser.snr_gamma=0"], "train.denoiser.snr_gamma=0"),
    ("train", ["train.denoiser.latent_cache=../../latents.safetensors"], "train.denoiser.latent_cache=../../"),
    ("train", ["train.codec.kl_weight=-1"], "train.codec.kl_weight=-1"),
    ("train", ["train.codec.disc_layers=0"], "train.codec.disc_layers=0"),
    ("train", ["train.codec.disc_lr=0"], "train.codec.disc_lr=0"),
    ("train", ["train.codec.scale_by_std=maybe"], "train.codec.scale_by_std='maybe'"),
    ("train", ["train.codec.crop_size=0"], "train.codec.crop_size=0"),
    ("train", ["train.codec.crop_size=7"], "crop_size=7 is not a multiple of the codec's downsampling factor 2"),
    ("train", ["train.codec.crop_size=24"], "crop_size=24 is larger than the dataset's 16x16 images"),
    ("train", ["train.grid_size=0"], "train.grid_size=0"),
    ("train", ["train.log_every=0"], "train.log_every=0"),
    ("train", ["train.checkpoint_every=0"], "train.checkpoint_every=0"),
    ("train", ["train.sample_count=0"], "train.sample_count=0"),
    ("train", ["train.stop_after_steps=0"], "train.stop_after_steps=0"),
    ("train", ["train.num_workers=-1"], "train.num_workers=-1"),
    ("train", ["train.precision=fp8"], "train.precision='fp8'"),
    ("train", ["train.tensorboard=maybe"], "train.tensorboard='maybe'"),
    ("train", ["train.denoiser.channels_last=nhwc"], "train.denoiser.channels_last='nhwc'"),
    ("train", ["train.codec.precision=fp8"], "train.codec.precision='fp8'"),
    ("train", ["+denoiser.attention_positions=maybe"], "attention_positions must be true or false; got 'maybe'"),
    ("train", ["conditioner.vector_dim=0"], "vector_dim must be a positive integer; got 0"),
    ("train", ["+denoiser.patch_size=0"], "patch_size must be a positive integer (1: no patches); got 0"),
    ("train", ["train.tensorboard=2"], "train.tensorboard=2: must be true or false"),
    ("train", ["threads=0"], "threads=0"),
    ("train", ["train.tiny_decoder={{steps: 5, batch_size: 4, lr: 0.001, channels: 8, compare_images: 4}}"],
     "train.tiny_decoder distils a decoder from a trained codec: pass base=<checkpoint>"),
    ("train", ["train.tiny_decoder={{steps: 0, batch_size: 4, lr: 0.001, channels: 8, compare_images: 4}}"],
     "train.tiny_decoder.steps=0: must be a positive integer"),
    ("train", ["train.tiny_decoder={{steps: 5}}"], "train.tiny_decoder.batch_size: not given"),
    ("sample", ["threads=-1"], "threads=-1"),
    ("eval", ["threads=two"], "threads='two'"),
    # the process and the sampling defaults the checkpoint will carry
    ("train", ["sampling.steps=0"], "sampling.steps=0"),
    ("train", ["sampling.steps=abc"], "sampling.steps='abc'"),
    ("train", ["sampling.guidance_scale=-1"], "sampling.guidance_scale=-1"),
    ("train", ["sampling.guidance_rescale=2"], "sampling.guidance_rescale=2"),
    ("train", ["sampling.grid=spiral"], "sampling.grid='spiral'"),
    ("train", ["sampling.height=30"], "sampling.height/width=30x16"),
    ("train", ["diffusion.prediction_type=epsilon"], "diffusion.prediction_type='epsilon'"),
    ("train", ["diffusion.noise_schedule=quadratic"], "diffusion.noise_schedule='quadratic'"),
    ("train", ["diffusion.num_timesteps=1"], "diffusion.num_timesteps=1"),
    ("train", ["diffusion.beta_start=0"], "diffusion.beta_start=0"),
    ("train", ["diffusion.beta_end=0.0001"], "diffusion.beta_end=0.0001: must be larger"),
    # the run itself
    ("train", ["seed=abc"], "seed='abc'"),
    ("train", ["seed=1.5"], "seed=1.5"),
    ("train", ["overwrite=maybe"], "overwrite='maybe'"),
    ("train", ["+train.denoiser.lrr=1"], "train.denoiser.lrr: no such setting; did you mean train.denoiser.lr?"),
    ("train", ["+bogus=1"], "bogus: no such setting"),
    ("train", ["train.bogus=1"], "Could not override 'train.bogus'"),
    ("train", ["resume=/nonexistent/run"], "resume=/nonexistent/run: nothing to resume there"),
    # components refuse their parameters (built before anything is trained)
    ("train", ["denoiser.model_channels=0"], "model_channels must be a positive integer; got 0"),
    ("train", ["denoiser=no_such_denoiser"], "Could not find 'denoiser/no_such_denoiser'"),
    ("train", ["codec=null"], "codec=null: the config group 'codec' takes the name of one of its options, not null: "
                              "identity, kl, kl_f2"),
    ("train", ["dataset.image_size=30"], "image_size must be a multiple of 8"),
    ("train", ["+dataset.two_objects=2"], "two_objects is the fraction of two-object items, a number in [0, 1]"),
    ("train", ["+dataset.held_out=maybe"], "held_out must be true or false"),
    ("train", ["+dataset.two_objects=0.5"], "two-object scenes need image_size of at least 32"),
    ("train", ["+dataset.relations=[beside]"], "relations must be a non-empty list of distinct relation names"),
    ("train", ["+dataset.background=wallpaper"], "unknown background 'wallpaper'; choose one of plain, textured"),
    ("train", ["+denoiser.no_such_option=1"], "has no parameter denoiser.no_such_option"),
    ("train", ["train.codec.batch_size=100000000"], "train.codec.batch_size=100000000 (micro-batches of 100000000) "
                                                    "at 16x16 needs at least"),
    ("train", ["train.denoiser.batch_size=400000000"], "lower train.denoiser.batch_size, or raise"),
    # latentgen-sample
    ("sample", ["num_images=0"], "num_images=0"),
    ("sample", ["num_images=1.5"], "num_images=1.5"),
    ("sample", ["num_images=abc"], "num_images='abc'"),
    ("sample", ["steps=-1"], "steps=-1"),
    ("sample", ["steps=0"], "steps=0"),
    ("sample", ["guidance_scale=nan"], "guidance_scale=nan"),
    ("sample", ["guidance_scale=inf"], "guidance_scale=inf"),
    ("sample", ["guidance_scale=-1"], "guidance_scale=-1"),
    ("sample", ["guidance_rescale=2"], "guidance_rescale=2"),
    ("sample", ["height=0"], "height=0"),
    ("sample", ["height=30"], "height=30, width=16: denoiser 'unet' needs latents divisible by 2"),
    ("sample", ["height=15"], "height=15, width=16: codec 'kl' downsamples by 2"),
    ("sample", ["width=18"], "height=16, width=18: denoiser 'unet' needs latents divisible by 2"),
    ("sample", ["num_images=200000000"], "num_images=200000000 for 1 prompt(s) or label(s) at 16x16 needs at least"),
    ("sample", ["width=-8"], "width=-8"),
    ("sample", ["seed=abc"], "seed='abc'"),
    ("sample", ["dtype=int8"], "dtype='int8'"),
    ("sample", ["grid=spiral"], "grid='spiral'"),
    ("sample", ["preview_every=-1"], "preview_every=-1"),
    ("sample", ["progress=maybe"], "progress='maybe'"),
    ("sample", ["compile=maybe"], "compile='maybe'"),
    ("sample", ["prompt=5"], "prompt=5"),
    ("sample", ["prompt=[a,5]"], "prompt=['a', 5]"),
    ("sample", ["negative_prompt=5"], "negative_prompt=5"),
    ("sample", ["label=abc"], "label='abc'"),
    ("sample", ["+label=1"], "prompt and label are both given"),
    ("sample", ["+foo=1"], "foo: no such setting"),
    ("sample", ["scheduler=no_such_sampler"], "Could not find 'scheduler/no_such_sampler'"),
    ("sample", ["scheduler=ddim", "+scheduler.foo=1"], "has no parameter scheduler.foo"),
    ("sample", ["format=nope"], "unknown format 'nope'. Available formats: latentgen (latentgen"),
    ("sample", ["format=stable_diffusion"], "is not a file of this format (it does not recognise it); format latentgen reads it"),
    ("sample", ["conditioning.low_res=/nonexistent/low.png"], "conditioning.low_res: no file"),
    ("sample", ["+conditioning.original_size=[tall,1]"], "conditioning.original_size=['tall', 1]: must be numbers"),
    ("sample", ["checkpoint=/nonexistent/last.safetensors"], "does not exist"),
    ("sample", ["checkpoint=null"], "checkpoint: not given"),
    ("sample", ["original_config=v1-inference.yaml"], "does not take the option original_config"),
    ("sample", ["image=/nonexistent/start.png"], "image: no file '/nonexistent/start.png'"),
    ("sample", ["mask=/nonexistent/mask.png"], "mask is given without an image"),
    ("sample", ["strength=0.5"], "strength is given without an image"),
    ("sample", ["image=/nonexistent/start.png", "strength=2"], "strength=2"),
    ("sample", ["refiner=/nonexistent/refiner.safetensors"], "refiner: no file '/nonexistent/refiner.safetensors'"),
    ("sample", ["refiner_switch=1.5"], "refiner_switch=1.5"),
    ("sample", ["refiner_original_config=refiner.yaml"], "refiner_original_config is given without a refiner"),
    # SDXL's base and refiner ({golden}: ../shared/golden), refused from the headers before any weight is read
    ("sample", ["{refiner}", "height=64", "width=64"], "cannot start from pure noise (sigma 11.5): use it as the "
     "refiner of a base model"),
    ("sample", ["{refiner}", "refiner={golden}/sdxl-tiny-weights.safetensors",
                "refiner_original_config={golden}/sdxl-tiny-config.yaml"], "it is a refiner; pass a base model"),
    ("sample", ["{base}", "{as_refiner}", "refiner_switch=0.3"], "raise refiner_switch to at least 0.77 (at 30 steps)"),
    ("sample", ["{base}", "{as_refiner}", "steps=3", "refiner_switch=0.9"], "leaves the refiner no step"),
    ("sample", ["{base}", "refiner={golden}/sd-tiny-weights.safetensors",
                "refiner_original_config={golden}/sd-tiny-config.yaml"],
     "the refiner works in another latent space than the base (scale_factor 0.13025 vs 0.18215)"),
    ("sample", ["checkpoint={golden}/sd-tiny-weights.safetensors", "original_config={golden}/sdxl-tiny-config.yaml"],
     "is an SDXL (sgm) inference YAML, but the checkpoint is a Stable Diffusion v1/v2 file"),
    # processes and format options: another process than the checkpoint's, SD3.5's text encoder files
    ("sample", ["checkpoint={golden}/sd-tiny-weights.safetensors", "original_config={golden}/sd-tiny-config.yaml",
                "+format_options.prediction_type=v", "+process.name=rectified_flow"],
     "was trained with the discrete (v prediction) process; process rectified_flow"),
    ("sample", ["+process.name=edm"], "trained with the discrete (eps prediction) process; process edm"),
    ("sample", ["+format_options.t5=false"], "does not take the option t5"),
    ("sample", ["+format_options.dtype=bfloat16"], "format_options: ['dtype'] are settings of their own"),
    ("sample", ["checkpoint={golden}/sd35-tiny-weights.safetensors"], "no T5 tokenizer was given or found beside it"),
    ("sample", ["checkpoint={golden}/sd35-tiny-weights.safetensors",
                "+format_options.t5_tokenizer={golden}/clip-tokenizer-cases.json"], "clip-tokenizer-cases.json"),
    # adapters: every file read and checked before the checkpoint's weights
    ("sample", ["lora=/nonexistent/style.safetensors"],
     "adapter 0 (lora): LoRA file '/nonexistent/style.safetensors' does not exist"),
    ("sample", ["lora={golden}/controlnet-tiny-weights.safetensors"], "is not a LoRA file"),
    ("sample", ["controlnet={golden}/lora-tiny-kohya.safetensors"], "adapter 0 (controlnet): "),
    ("sample", ["adapters=[{{name: nope}}]"], "unknown adapter 'nope'"),
    ("sample", ["adapters=[5]"], "adapters[0]=5: must be a mapping with a name"),
    ("sample", ["adapters=[{{name: lora, path: {golden}/lora-tiny-kohya.safetensors, scale: big}}]"],
     "scale must be a finite number"),
    ("sample", ["lora_scale=big"], "lora_scale='big'"),
    # latentgen-eval
    ("eval", ["num_samples=0"], "num_samples=0"),
    ("eval", ["steps=0"], "steps=0"),
    ("eval", ["scheduler=null"], "leave the override out to keep the default, or drop the group with ~scheduler"),
    ("eval", ["batch_size=0"], "batch_size=0"),
    ("eval", ["guidance_scale=-2"], "guidance_scale=-2"),
    ("eval", ["judge.min_accuracy=2"], "judge.min_accuracy=2"),
    ("eval", ["judge.steps=0"], "judge.steps=0"),
    ("eval", ["composition.seen=-1"], "composition.seen=-1"),
    ("eval", ["composition.min_judge_accuracy=2"], "composition.min_judge_accuracy=2"),
    ("eval", ["codec_fidelity.natural_size=4"], "codec_fidelity.natural_size=4"),
    ("eval", ["seed=abc"], "seed='abc'"),
    ("eval", ["adapters=[{{ratio: 0.5}}]"], "adapters[0]={'ratio': 0.5}: must be a mapping with a name"),
    ("eval", ["adapters=[{{name: token_merging, ratio: 2}}]"], "ratio must be a number in [0, 1)"),
    ("eval", ["adapters=[{{name: nope}}]"], "unknown adapter 'nope'"),
    ("eval", ["checkpoint=null"], "checkpoint: not given"),
]


# The golden SDXL files with their sgm YAMLs, as the cases above name them.
_PAIRS = {
    "{base}": ["checkpoint={golden}/sdxl-tiny-weights.safetensors", "original_config={golden}/sdxl-tiny-config.yaml"],
    "{refiner}": ["checkpoint={golden}/sdxl-refiner-tiny-weights.safetensors",
                  "original_config={golden}/sdxl-refiner-tiny-config.yaml"],
    "{as_refiner}": ["refiner={golden}/sdxl-refiner-tiny-weights.safetensors",
                     "refiner_original_config={golden}/sdxl-refiner-tiny-config.yaml"],
}


@pytest.mark.parametrize(("app", "args", "named"), CASES, ids=[f"{case[0]} {' '.join(case[1])}" for case in CASES])
def test_a_bad_setting_is_one_error_line_before_any_work(app, args, named, smoke_checkpoint, tmp_path, run_app,
                                                         tripwires, shared_dir):
    run_dir = existing_run(tmp_path / "run")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.safetensors").write_bytes(b"a finished run's checkpoint")
    before = snapshot(run_dir)
    given = {"train": ["experiment=smoke"], "sample": [f"checkpoint={smoke_checkpoint}", "prompt=a red circle"],
             "eval": [f"checkpoint={smoke_checkpoint}"]}[app]
    args = [part.format(golden=shared_dir / "golden") for arg in args for part in _PAIRS.get(arg, [arg])]
    given = [arg for arg in given if not any(arg.split("=")[0] == other.split("=")[0] for other in args)]
    status, lines = run_app(app, [*given, *args, f"hydra.run.dir={run_dir}"])
    assert status == 1, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert named in lines[0], lines[0]
    assert tripwires == [], f"{tripwires} happened before the refusal"
    assert snapshot(run_dir) == before  # the earlier run, its .hydra/ record included, is untouched


def test_the_cases_cover_every_setting_kind():
    """Counted in the issue's note: how many bad settings the apps are tested with, per app."""
    counts = {app: sum(1 for case in CASES if case[0] == app) for app in ("train", "sample", "eval")}
    assert counts["train"] >= 50 and counts["sample"] >= 30 and counts["eval"] >= 9, counts
