"""The apps' settings as typed schemas (conf/train.yaml, conf/sample.yaml and conf/eval.yaml document them).

Each field names its allowed values, so a wrong type, a negative count or an impossible choice fails
at start-up as one `error:` line naming the key (`latentgen.config.typed.parse`). Components' own
parameters are checked by the components when they are built.
"""

# No `from __future__ import annotations`: OmegaConf reads these annotations as types.
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Type, TypeVar

from latentgen.config.typed import parse, setting
from latentgen.errors import ConfigError

T = TypeVar("T")

NOISE_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("eps", "v", "x0")
GRIDS = ("discrete", "karras", "exponential", "lcm")
SPACINGS = ("leading", "trailing", "linspace")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DiffusionSettings:
    """The discrete process the denoiser is trained on (DDPM, Ho et al. 2020; Stable Diffusion's by default)."""

    noise_schedule: str = setting("scaled_linear", choices=NOISE_SCHEDULES)
    num_timesteps: int = setting(1000, ge=2)
    beta_start: float = setting(0.00085, gt=0, lt=1)
    beta_end: float = setting(0.012, gt=0, lt=1)
    prediction_type: str = setting("eps", choices=PREDICTION_TYPES)
    zero_terminal_snr: bool = setting(False, help="rescale so the last timestep is pure noise (Lin et al. 2023)")
    trained_timesteps: Optional[int] = setting(None, ge=1, help="train (and sample) on the least noisy N timesteps "
                                               "only, as a refiner does (SDXL's: 200); null: all")

    def validate(self, prefix: str) -> None:
        if self.beta_end <= self.beta_start:
            raise ConfigError(f"{prefix}.beta_end={self.beta_end}: must be larger than {prefix}.beta_start="
                              f"{self.beta_start}")
        if self.trained_timesteps is not None and self.trained_timesteps > self.num_timesteps:
            raise ConfigError(f"{prefix}.trained_timesteps={self.trained_timesteps}: must be at most "
                              f"{prefix}.num_timesteps={self.num_timesteps} (null: all of them)")


@dataclass
class SamplingDefaults:
    """A pipeline's sampling defaults (stored in its checkpoint); each call may override them."""

    height: Optional[int] = setting(None, ge=1)
    width: Optional[int] = setting(None, ge=1)
    steps: int = setting(20, ge=1)
    guidance_scale: float = setting(5.0, ge=0)
    guidance_rescale: float = setting(0.0, ge=0, le=1)
    grid: str = setting("discrete", choices=GRIDS)
    spacing: str = setting("leading", choices=SPACINGS)
    rho: float = setting(7.0, gt=0)


@dataclass
class StageSettings:
    """What both training stages take: how long, on what batches, at what learning rate."""

    steps: int = setting(1000, ge=0)
    batch_size: int = setting(64, ge=1)
    lr: float = setting(1.0e-3, gt=0)
    grad_accumulation: int = setting(1, ge=1, help="micro-batches per optimizer step")
    precision: Optional[str] = setting(None, choices=PRECISIONS, help="this stage's precision; null: train.precision")
    channels_last: bool = setting(False, help="the stage's network keeps its conv weights channels-last (NHWC): "
                                  "oneDNN's own layout, faster for some conv networks on a CPU")

    def validate(self, prefix: str) -> None:
        if self.batch_size % self.grad_accumulation:
            raise ConfigError(f"{prefix}.grad_accumulation={self.grad_accumulation}: must divide "
                              f"{prefix}.batch_size={self.batch_size} (each optimizer step is that many equal "
                              f"micro-batches)")


@dataclass
class CodecStageSettings(StageSettings):
    """Stage 1: fitting the codec on images (conf/train.yaml `train.codec`)."""

    l1_weight: float = setting(1.0, ge=0)
    l2_weight: float = setting(1.0, ge=0)
    kl_weight: float = setting(1.0e-6, ge=0)
    codebook_weight: float = setting(1.0, ge=0)
    commitment_weight: float = setting(1.0, ge=0)
    perceptual_weight: float = setting(0.0, ge=0)
    perceptual_weights: Optional[str] = setting(None)
    disc_weight: float = setting(0.0, ge=0)
    disc_start: int = setting(0, ge=0)
    disc_layers: int = setting(3, ge=1)
    disc_channels: int = setting(64, ge=1)
    disc_lr: Optional[float] = setting(None, gt=0)
    scale_by_std: bool = setting(True)
    crop_size: Optional[int] = setting(None, ge=1, help="fit the codec on random square crops this many pixels wide "
                                       "(a multiple of its downsampling factor): cheaper steps; null: whole images")


@dataclass
class DenoiserStageSettings(StageSettings):
    """Stage 2: fitting the denoiser on the frozen codec's latents (conf/train.yaml `train.denoiser`)."""

    steps: int = setting(3000, ge=0)
    weight_decay: float = setting(0.0, ge=0)
    warmup_steps: int = setting(100, ge=0)
    ema_decay: float = setting(0.999, ge=0, lt=1)
    grad_clip: float = setting(1.0, ge=0, help="max global gradient norm; 0: off")
    loss_weighting: str = setting("none", choices=("none", "min_snr"))
    snr_gamma: float = setting(5.0, gt=0)
    latent_cache: Optional[str] = setting(None, help="a file: relative paths are inside the run directory")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.latent_cache is not None:
            inside_run_dir(f"{prefix}.latent_cache", self.latent_cache)


@dataclass
class TrainSettings:
    """How latentgen-train trains (conf/train.yaml `train`)."""

    precision: str = setting("fp32", choices=PRECISIONS)
    stop_after_steps: Optional[int] = setting(None, ge=1)
    num_workers: int = setting(0, ge=0)
    log_every: int = setting(25, ge=1)
    tensorboard: bool = setting(True)
    sample_every: int = setting(1000, ge=0)
    sample_count: int = setting(8, ge=1)
    sample_steps: int = setting(10, ge=1)
    checkpoint_every: int = setting(500, ge=1)
    grid_size: int = setting(48, ge=1)
    gradient_checkpointing: bool = setting(False, help="recompute the denoiser's blocks in the backward pass: less "
                                           "memory, about a third more time")
    adapter: Any = setting(None, help="train only this new adapter on the loaded model, e.g. {name: trainable_lora, "
                           "rank: 8}")
    tiny_decoder: Any = setting(None, help="distil a tiny TAESD decoder from the base's codec instead of training "
                                "both stages: {steps, batch_size, lr, channels, compare_images} "
                                "(experiment=tiny_decoder)")
    codec: CodecStageSettings = setting(default_factory=CodecStageSettings)
    denoiser: DenoiserStageSettings = setting(default_factory=DenoiserStageSettings)

    def validate(self, prefix: str) -> None:
        if self.tiny_decoder is not None:
            _check_tiny_decoder(self.tiny_decoder, f"{prefix}.tiny_decoder")
            if self.adapter is not None:
                raise ConfigError(f"{prefix}.tiny_decoder and {prefix}.adapter are both set; a run trains one of them")
        if self.adapter is None:
            return
        if not isinstance(self.adapter, dict) or "name" not in self.adapter:
            raise ConfigError(f"{prefix}.adapter={self.adapter!r}: must be a mapping with a name, e.g. "
                              f"{{name: trainable_lora, rank: 8}}")
        if self.denoiser.ema_decay > 0:
            raise ConfigError(f"{prefix}.denoiser.ema_decay={self.denoiser.ema_decay}: must be 0 when training an "
                              f"adapter (an average would copy the whole denoiser for a few low-rank weights)")


_TINY_DECODER = {"steps": int, "batch_size": int, "lr": float, "channels": int, "compare_images": int}


def _check_tiny_decoder(node: Any, key: str) -> None:
    if not isinstance(node, dict):
        raise ConfigError(f"{key}={node!r}: must be a mapping of {', '.join(_TINY_DECODER)}")
    unknown = sorted(set(node) - set(_TINY_DECODER))
    if unknown:
        raise ConfigError(f"{key}: unknown setting(s) {unknown}; it takes {', '.join(_TINY_DECODER)}")
    for name, kind in _TINY_DECODER.items():
        value = node.get(name)
        if value is None:
            raise ConfigError(f"{key}.{name}: not given; it takes {', '.join(_TINY_DECODER)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 \
                or (kind is int and value != int(value)):
            raise ConfigError(f"{key}.{name}={value!r}: must be a positive {'integer' if kind is int else 'number'}")


@dataclass
class TrainRunSettings:
    """latentgen-train's own settings: everything in conf/train.yaml but the component groups."""

    seed: int = setting(0)
    device: str = setting("auto")
    threads: Optional[int] = setting(None, ge=1, help="torch CPU threads; null: the cores other work leaves free "
                                     "when the app starts")
    resume: Any = setting(False)
    overwrite: bool = setting(False, help="start afresh in a run directory that holds a run")
    base: Optional[str] = setting(None, help="a checkpoint (any registered format) whose components replace the "
                                  "config's: the model an adapter is trained on")
    base_options: Dict[str, Any] = setting(default_factory=dict, help="the base format's load options, e.g. "
                                           "{original_config: v1-inference.yaml}")
    diffusion: DiffusionSettings = setting(default_factory=DiffusionSettings)
    sampling: SamplingDefaults = setting(default_factory=SamplingDefaults)
    train: TrainSettings = setting(default_factory=TrainSettings)

    def validate(self, prefix: str) -> None:
        if self.train.tiny_decoder is not None and not self.base:
            raise ConfigError("train.tiny_decoder distils a decoder from a trained codec: pass base=<checkpoint> (e.g. "
                              "the shapes demo's outputs/train/<run>/checkpoints/last.safetensors)")


@dataclass
class SampleAppSettings:
    """latentgen-sample's settings (conf/sample.yaml), but the scheduler group."""

    checkpoint: Optional[str] = setting(None)
    format: Optional[str] = setting(None)
    original_config: Optional[str] = setting(None)
    format_options: Dict[str, Any] = setting(default_factory=dict, help="the checkpoint format's other load options, "
                                             "e.g. {t5_tokenizer: spiece.model, t5: false} for SD3.5")
    process: Dict[str, Any] = setting(default_factory=dict, help="options of the checkpoint's own process, e.g. "
                                      "+process.shift=4.0 (another process is refused); set by latentgen-sample "
                                      "from the `process` group, which app_settings leaves out")
    dtype: Optional[str] = setting(None, choices=DTYPES)
    compile: bool = setting(False)
    prompt: Any = setting(None)
    negative_prompt: Any = setting(None)
    label: Any = setting(None)
    conditioning: Dict[str, Any] = setting(default_factory=dict)
    num_images: int = setting(4, ge=1)
    steps: Optional[int] = setting(None, ge=1)
    guidance_scale: Optional[float] = setting(None, ge=0)
    height: Optional[int] = setting(None, ge=1)
    width: Optional[int] = setting(None, ge=1)
    seed: int = setting(0)
    device: str = setting("auto")
    threads: Optional[int] = setting(None, ge=1, help="torch CPU threads; null: the cores other work leaves free "
                                     "when the app starts")
    grid: Optional[str] = setting(None, choices=GRIDS)
    guidance_rescale: Optional[float] = setting(None, ge=0, le=1)
    progress: bool = setting(True)
    preview_every: int = setting(0, ge=0)
    overwrite: bool = setting(False, help="replace the images of an earlier run in the same directory")
    image: Optional[str] = setting(None, help="an image file to start from (img2img; with mask: inpainting)")
    mask: Optional[str] = setting(None, help="an image file, white where the image is repainted")
    strength: Optional[float] = setting(None, gt=0, le=1, help="the fraction of the sampling path img2img redoes "
                                        "(null: 0.8, or 1 with a mask)")
    refiner: Optional[str] = setting(None, help="a second checkpoint in the same latent space that denoises the last "
                                     "part of the sigma grid (SDXL's refiner)")
    refiner_switch: float = setting(0.8, gt=0, lt=1, help="fraction of the sigma grid after which the refiner "
                                    "takes over")
    refiner_original_config: Optional[str] = setting(None, help="the refiner's original inference YAML, if not standard")
    adapters: Any = setting(default_factory=list, help="adapters to attach, in order: [{name: lora, path: ..., "
                            "scale: 0.8}, {name: controlnet, path: ...}, {name: embedding, path: ...}]")
    lora: Any = setting(None, help="shorthand: a LoRA file (or a list), each at lora_scale")
    lora_scale: float = setting(1.0, help="the multiplier of the lora= files")
    controlnet: Optional[str] = setting(None, help="shorthand: a ControlNet file, fed conditioning.control")

    def validate(self, prefix: str) -> None:
        if self.checkpoint in (None, "", "???"):
            raise ConfigError("checkpoint: not given; pass checkpoint=<path> (a latentgen checkpoint such as "
                              "outputs/train/<run>/checkpoints/last.safetensors, or another format's file)")
        for key in ("prompt", "negative_prompt"):
            _check_strings(key, getattr(self, key))
        if self.label is not None:
            labels = self.label if isinstance(self.label, list) else [self.label]
            if not labels or not all(isinstance(label, int) and not isinstance(label, bool) for label in labels):
                raise ConfigError(f"label={self.label!r}: must be an integer or a list of integers")
        if self.prompt is not None and self.label is not None:
            raise ConfigError("prompt and label are both given; a model reads one of them: drop the other")
        if self.image is None and (self.mask is not None or self.strength is not None):
            raise ConfigError(f"{'mask' if self.mask is not None else 'strength'} is given without an image: pass "
                              f"image=<file> as well (img2img / inpainting), or drop it")
        if self.refiner_original_config is not None and self.refiner is None:
            raise ConfigError("refiner_original_config is given without a refiner: pass refiner=<checkpoint> as well, "
                              "or drop it")


@dataclass
class JudgeSettings:
    """The shapes judge latentgen-eval trains and caches (conf/eval.yaml `judge`)."""

    min_accuracy: float = setting(0.98, ge=0, le=1)
    train_images: int = setting(4000, ge=1)
    steps: int = setting(300, ge=1)
    batch_size: int = setting(32, ge=1)
    learning_rate: float = setting(5.0e-3, gt=0)
    weight_decay: float = setting(1.0e-4, ge=0)
    seed: int = setting(0)
    held_out_images: int = setting(1000, ge=1)


@dataclass
class CompositionSettings:
    """latentgen-eval's `composition` metric: samples per part and the two-object judge's bar (conf/eval.yaml)."""

    seen: int = setting(96, ge=0)
    unseen: int = setting(48, ge=0)
    two_objects: int = setting(120, ge=0)
    min_judge_accuracy: float = setting(0.99, ge=0, le=1)


@dataclass
class CodecFidelitySettings:
    images: int = setting(256, ge=1)
    natural_size: int = setting(256, ge=8)


@dataclass
class EvalAppSettings:
    """latentgen-eval's settings (conf/eval.yaml), but the dataset and scheduler groups."""

    checkpoint: Optional[str] = setting(None)
    metrics: Any = setting(None)
    num_samples: Optional[int] = setting(None, ge=1)
    steps: Optional[int] = setting(None, ge=1)
    guidance_scale: Optional[float] = setting(None, ge=0)
    seed: int = setting(0)
    batch_size: int = setting(36, ge=1)
    device: str = setting("auto")
    threads: Optional[int] = setting(None, ge=1, help="torch CPU threads; null: the cores other work leaves free "
                                     "when the app starts")
    out: Optional[str] = setting(None)
    progress: bool = setting(True)
    cache_dir: Optional[str] = setting(None)
    overwrite: bool = setting(False, help="replace the report of an earlier run in the same directory")
    adapters: Any = setting(default_factory=list, help="adapters attached before sampling, in order: [{name: "
                            "token_merging, ratio: 0.5}, ...]: what an accelerator or a LoRA changes in the scores")
    judge: JudgeSettings = setting(default_factory=JudgeSettings)
    composition: CompositionSettings = setting(default_factory=CompositionSettings)
    codec_fidelity: CodecFidelitySettings = setting(default_factory=CodecFidelitySettings)

    def validate(self, prefix: str) -> None:
        if self.checkpoint in (None, "", "???"):
            raise ConfigError("checkpoint: not given; pass checkpoint=<path>, e.g. "
                              "outputs/train/<run>/checkpoints/last.safetensors")


def app_settings(schema: Type[T], config: Mapping[str, Any]) -> T:
    """An app's own settings in its composed (plain) config: every key but the component groups (the kinds'
    Hydra groups, which their components check when built), checked against `schema`."""
    from latentgen import kinds

    groups = {kind.hydra_group for kind in kinds.KINDS if kind.hydra_group}
    return parse(schema, {key: value for key, value in config.items() if key not in groups})


def inside_run_dir(key: str, path: str) -> None:
    """Refuse a relative path that climbs out of the run directory: only an absolute path, which the user
    names on purpose, may point elsewhere."""
    from pathlib import PurePath

    if not PurePath(path).is_absolute() and ".." in PurePath(path).parts:
        raise ConfigError(f"{key}={path}: a relative path is inside the run directory and may not climb out of it "
                          f"with '..'; give an absolute path to write elsewhere")


def _check_strings(key: str, value: Any) -> None:
    values = value if isinstance(value, list) else [value]
    if value is not None and (not values or not all(isinstance(item, str) for item in values)):
        raise ConfigError(f"{key}={value!r}: must be a string or a list of strings (quote a number: "
                          f"{key}='\"{values[0] if values else ''}\"')")
