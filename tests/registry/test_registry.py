"""The component registry: discovery over entry points, errors, runtime registration, plugin
isolation (broken, conflicting, blocked, wrong-type plugins) and laziness, plus `latentgen plugins`.

Third-party distributions are faked without pip: a `<name>-0.1.dist-info/` folder (METADATA and
entry_points.txt) and the module it points to, in a tmp dir prepended to sys.path.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import latentgen
from latentgen import registry
from latentgen.errors import (
    ComponentConflictError,
    ComponentNotFoundError,
    ConfigError,
    PluginLoadError,
)


def _declared_builtins() -> dict[str, list[str]]:
    """The entry points latentgen's own pyproject.toml declares, by kind: the source of truth."""
    import tomllib

    entry_points = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["entry-points"]
    return {kind: sorted(entry_points.get(group, {})) for kind, group in registry.GROUPS.items()}


BUILTINS = _declared_builtins()

_GOLDEN = Path(os.environ.get("LATENTGEN_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "golden"
# Small parameters so that building every built-in takes a fraction of a second on a CPU.
SMALL_PARAMS = {
    ("codec", "identity"): {},
    ("codec", "taesd"): dict(latent_channels=4, channels=8, downsamplings=2),
    ("codec", "kl"): dict(latent_channels=4, channels=32, channel_mult=[1, 1], num_res_blocks=1, resolution=16),
    ("codec", "vq"): dict(latent_channels=4, num_codes=16, channels=32, channel_mult=[1, 1], num_res_blocks=1,
                          resolution=16),
    ("denoiser", "unet"): dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1], num_res_blocks=1,
                               attention_resolutions=[], num_head_channels=16),
    ("denoiser", "mmdit"): dict(in_channels=4, out_channels=4, depth=2, context_dim=8, vector_dim=8,
                                pos_embed_max_size=8, dual_attention_layers=[0]),
    ("denoiser", "dit"): dict(in_channels=6, out_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                              context_dim=8, vector_dim=8, concat_channels=2),
    ("conditioner", "null"): {},
    ("conditioner", "class_label"): dict(num_classes=3, vector_dim=8),
    ("conditioner", "text"): dict(context_dim=16, num_layers=1, num_heads=2),
    ("conditioner", "clip_text"): dict(context_dim=32, layers=1, heads=2, vocab_size=1000),
    ("conditioner", "masked_image"): dict(latent_channels=4),
    ("conditioner", "concat_image"): dict(channels=3, input_key="image"),  # an input the contract suite fills
    ("conditioner", "fourier_numbers"): dict(input_key="aesthetic_score", count=1, dim=8, default=[6.0],
                                             unconditional=[2.5]),
    ("conditioner", "t5_text"): dict(d_model=16, layers=1, heads=2, d_kv=8, d_ff=32, vocab_size=128,
                                     tokenizer=str(Path(__file__).parents[1] / "data" / "t5" / "tokenizer.json")),
    ("conditioner", "zero_tokens"): dict(width=8, tokens=4),
    ("conditioner", "sequence_stack"): dict(conditioners=[{"name": "text", "context_dim": 6, "num_layers": 1, "num_heads": 2,
                                                           "max_length": 5},
                                                          {"name": "zero_tokens", "width": 8, "tokens": 3}]),
    ("conditioner", "stack"): dict(conditioners=[{"name": "class_label", "num_classes": 3, "vector_dim": 8},
                                                 {"name": "masked_image"}]),
    ("scheduler", "ddim"): {},
    ("scheduler", "ddpm"): {},
    ("scheduler", "dpm2"): {},
    ("scheduler", "dpmpp_2m"): {},
    ("scheduler", "dpmpp_2m_sde"): {},
    ("scheduler", "dpmpp_2s_ancestral"): {},
    ("scheduler", "dpmpp_3m_sde"): {},
    ("scheduler", "euler"): {},
    ("scheduler", "euler_ancestral"): {},
    ("scheduler", "heun"): {},
    ("scheduler", "lms"): {},
    ("scheduler", "plms"): {},
    ("scheduler", "unipc"): {},
    ("scheduler", "lcm"): {},
    ("scheduler", "tcd"): {},
    ("dataset", "shapes"): dict(image_size=16, size=8),
    ("dataset", "digits"): dict(image_size=16),
    ("dataset", "image_folder"): dict(path=str(Path(__file__).parents[1] / "data" / "image_folder"), image_size=16),
    ("format", "latentgen"): {},
    ("format", "stable_diffusion"): {},
    ("format", "sdxl"): {},
    ("format", "sd3"): {},
    ("process", "discrete"): {},
    ("process", "edm"): {},
    ("process", "rectified_flow"): dict(shift=3.0),
    ("adapter", "lora"): dict(path=str(_GOLDEN / "lora-tiny-kohya.safetensors"), scale=0.5),
    ("adapter", "controlnet"): dict(path=str(_GOLDEN / "controlnet-tiny-weights.safetensors")),
    ("adapter", "trainable_lora"): dict(rank=2),
    ("adapter", "token_merging"): dict(ratio=0.5),
    ("adapter", "int8_weights"): dict(),
    ("adapter", "deep_cache"): dict(interval=2),
    ("adapter", "tiny_decoder"): dict(path=str(Path(__file__).parents[1] / "data" / "taesd" / "decoder-8ch.pth")),
    ("adapter", "embedding"): dict(path=str(Path(__file__).parents[1] / "data" / "embeddings" / "tiny-style.pt")),
}

CORE_VERSION = importlib.metadata.version("latentgen")
ENV_VARS = (registry.AUTOLOAD_ENV, registry.BLOCK_ENV)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(extra)
    return env


def _assert_builtins_available() -> None:
    for kind, names in BUILTINS.items():
        assert set(names) <= set(registry.available(kind)), (kind, registry.available(kind))


def _build_every_builtin() -> None:
    for (kind, name), params in SMALL_PARAMS.items():
        component = registry.build(kind, name, **params)
        assert isinstance(component, registry.base_class(kind)), (kind, name)
        assert component.registry_distribution == "latentgen"


# ---- fake third-party distributions ------------------------------------------------------------

VALID_SCHEDULER = """
import latentgen

class Sampler(latentgen.Scheduler):
    def sample(self, denoise, x, sigmas, generator, callback):
        return x
"""

VALID_CODEC = """
import torch
import latentgen

class Codec(latentgen.Codec):
    def __init__(self):
        super().__init__()
        self.latent_channels = 3
        self.downsampling_factor = 1

    def encode(self, images, generator=None):
        return images

    def decode(self, latents):
        return latents
"""


class FakePlugins:
    """Writes fake installed distributions into a directory that is on sys.path."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = root
        self.monkeypatch = monkeypatch
        self.modules: list[str] = []

    def add(self, dist: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str] | None = None) -> None:
        info = self.root / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = []
        for group, eps in entry_points.items():
            lines.append(f"[{group}]")
            lines += [f"{name} = {value}" for name, value in eps.items()]
            lines.append("")
        (info / "entry_points.txt").write_text("\n".join(lines))
        for module, source in (modules or {}).items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        registry.refresh()

    def setenv(self, name: str, value: str) -> None:
        self.monkeypatch.setenv(name, value)
        registry.refresh()

    def delenv(self, name: str) -> None:
        self.monkeypatch.delenv(name, raising=False)
        registry.refresh()


@pytest.fixture
def fake_plugins(tmp_path):
    # Own MonkeyPatch context (not the `monkeypatch` fixture) so that sys.path and the environment
    # are restored *before* the registry is refreshed in the teardown.
    before = available_everywhere()
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV_VARS:
            mp.delenv(name, raising=False)
        mp.syspath_prepend(str(tmp_path))
        registry.refresh()
        plugins = FakePlugins(tmp_path, mp)
        try:
            yield plugins
        finally:
            for module in plugins.modules:
                sys.modules.pop(module, None)
    registry.refresh()
    # Nothing of the fake distributions survives the test.
    assert available_everywhere() == before


@pytest.fixture(autouse=True)
def _fresh_registry():
    registry.refresh()
    yield
    registry.refresh()


def available_everywhere() -> dict[str, list[str]]:
    return {kind: registry.available(kind) for kind in BUILTINS}


BROKEN = {
    "dist": "fake-broken",
    "entry_points": {"latentgen.schedulers": {"broken_sampler": "fake_broken_plugin:Sampler"}},
    "modules": {"fake_broken_plugin": "raise RuntimeError('boom from the fake plugin')\n"},
}


# ---- built-ins ---------------------------------------------------------------------------------

def test_available_lists_the_builtins():
    assert set(registry.GROUPS) == set(BUILTINS)
    for kind, names in BUILTINS.items():
        listed = registry.available(kind)
        assert listed == sorted(listed)
        assert set(names) <= set(listed), (kind, listed)


@pytest.mark.parametrize(("kind", "name"), list(SMALL_PARAMS))
def test_build_returns_base_class_instance_with_provenance(kind, name):
    params = SMALL_PARAMS[(kind, name)]
    component = registry.build(kind, name, **params)
    assert isinstance(component, registry.base_class(kind))
    assert component.registry_name == name
    assert component.registry_distribution == "latentgen"
    assert component.registry_version == CORE_VERSION
    assert component.build_params == params


def test_base_classes_are_the_public_contracts():
    assert registry.base_class("codec") is latentgen.Codec
    assert registry.base_class("denoiser") is latentgen.Denoiser
    assert registry.base_class("conditioner") is latentgen.Conditioner
    assert registry.base_class("scheduler") is latentgen.Scheduler


def test_build_params_are_plain_containers():
    channel_mult = OmegaConf.create([1, 1])
    codec = registry.build("codec", "kl", channels=32, channel_mult=channel_mult, num_res_blocks=1, resolution=16)
    assert codec.build_params["channel_mult"] == [1, 1]
    assert type(codec.build_params["channel_mult"]) is list
    scheduler = registry.build("scheduler", "ddim", eta=0.5)
    assert scheduler.build_params == {"eta": 0.5}
    assert scheduler.eta == 0.5


def test_entries_record_distribution_and_target():
    (entry,) = registry.entries("scheduler")["ddim"]
    assert entry.distribution == "latentgen"
    assert entry.version == CORE_VERSION
    assert entry.target == "latentgen.schedulers.ddim:DDIMScheduler"
    assert "ddim (latentgen 0.1.0)" in registry.describe("scheduler")


# ---- errors ------------------------------------------------------------------------------------

def test_unknown_name_lists_available_and_suggests_close_match():
    with pytest.raises(ComponentNotFoundError) as info:
        registry.build("scheduler", "ddin")
    message = str(info.value)
    assert "'ddin'" in message
    assert "Did you mean 'ddim'?" in message
    assert f"ddim (latentgen {CORE_VERSION})" in message
    assert f"ddpm (latentgen {CORE_VERSION})" in message
    assert "latentgen.schedulers" in message  # where a plugin would register more
    assert isinstance(info.value, LookupError)


def test_transposition_typo_suggests_the_intended_name():
    with pytest.raises(ComponentNotFoundError) as info:
        registry.build("scheduler", "ddmi")
    assert "Did you mean 'ddim'?" in str(info.value)


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(ComponentNotFoundError) as info:
        registry.build("codec", "zzzzzz")
    message = str(info.value)
    assert "'zzzzzz'" in message and "Did you mean" not in message
    assert f"identity (latentgen {CORE_VERSION})" in message and f"kl (latentgen {CORE_VERSION})" in message


@pytest.mark.parametrize("call", [lambda: registry.available("sampler"), lambda: registry.build("sampler", "ddim"),
                                  lambda: registry.register("sampler", "x", object), lambda: registry.entries("sampler")])
def test_unknown_kind_errors(call):
    with pytest.raises(ComponentNotFoundError) as info:
        call()
    message = str(info.value)
    assert "'sampler'" in message
    for kind in BUILTINS:
        assert kind in message


def test_bad_parameter_names_component_and_accepted_parameters():
    with pytest.raises(ConfigError) as info:
        registry.build("scheduler", "ddim", bogus=1)
    message = str(info.value)
    assert "scheduler 'ddim'" in message and "bogus" in message and "eta" in message

    with pytest.raises(ConfigError) as info:
        registry.build("codec", "identity", latent_chanels=3)
    message = str(info.value)
    assert "codec 'identity'" in message and "latent_chanels" in message
    assert "latent_channels" in message and "scale_factor" in message


def test_missing_required_parameter_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        registry.build("conditioner", "class_label")
    message = str(info.value)
    assert "conditioner 'class_label'" in message and "num_classes" in message


def test_bad_parameter_for_component_without_own_init_is_a_config_error():
    with pytest.raises(ConfigError, match="conditioner 'null'"):
        registry.build("conditioner", "null", dropout=0.1)


# ---- runtime registration ----------------------------------------------------------------------

class _RuntimeScheduler(latentgen.Scheduler):
    def __init__(self, gain: float = 1.0):
        self.gain = gain

    def sample(self, denoise, x, sigmas, generator, callback):
        return x * self.gain


def test_register_and_unregister_at_runtime():
    assert "runtime_sampler" not in registry.available("scheduler")
    registry.register("scheduler", "runtime_sampler", _RuntimeScheduler)
    try:
        assert "runtime_sampler" in registry.available("scheduler")
        scheduler = registry.build("scheduler", "runtime_sampler", gain=2.0)
        assert isinstance(scheduler, _RuntimeScheduler) and scheduler.gain == 2.0
        assert scheduler.registry_name == "runtime_sampler"
        assert scheduler.registry_distribution == "<runtime>"
        assert scheduler.build_params == {"gain": 2.0}
        with pytest.raises(ConfigError, match="gain"):
            registry.build("scheduler", "runtime_sampler", gian=2.0)
    finally:
        registry.unregister("scheduler", "runtime_sampler")
    assert "runtime_sampler" not in registry.available("scheduler")
    with pytest.raises(ComponentNotFoundError):
        registry.build("scheduler", "runtime_sampler")
    registry.unregister("scheduler", "runtime_sampler")  # unregistering twice is harmless


def test_runtime_registration_of_taken_name_conflicts_instead_of_overwriting():
    registry.register("scheduler", "ddim", _RuntimeScheduler, distribution="my-notebook")
    try:
        with pytest.warns(UserWarning, match="ddim"):
            registry.available("scheduler")
        with pytest.raises(ComponentConflictError) as info:
            registry.build("scheduler", "ddim")
        assert "latentgen" in str(info.value) and "my-notebook" in str(info.value)
    finally:
        registry.unregister("scheduler", "ddim")
    assert type(registry.build("scheduler", "ddim")).__name__ == "DDIMScheduler"


def test_runtime_factory_returning_wrong_type_is_refused():
    registry.register("codec", "not_a_codec", lambda: object())
    try:
        with pytest.raises(PluginLoadError, match="not_a_codec"):
            registry.build("codec", "not_a_codec")
    finally:
        registry.unregister("codec", "not_a_codec")


# ---- fake third-party distributions ------------------------------------------------------------

def test_fake_plugin_is_discovered_with_its_distribution(fake_plugins):
    fake_plugins.add("fake-extra", {"latentgen.schedulers": {"extra_sampler": "fake_extra_plugin:Sampler"}},
                     {"fake_extra_plugin": VALID_SCHEDULER})
    assert "extra_sampler" in registry.available("scheduler")
    (entry,) = registry.entries("scheduler")["extra_sampler"]
    assert (entry.distribution, entry.version) == ("fake-extra", "0.1")
    scheduler = registry.build("scheduler", "extra_sampler")
    assert isinstance(scheduler, latentgen.Scheduler)
    assert (scheduler.registry_distribution, scheduler.registry_version) == ("fake-extra", "0.1")
    with pytest.raises(ComponentNotFoundError, match=re.escape("extra_sampler (fake-extra 0.1)")):
        registry.build("scheduler", "extra_samplr")


def test_plugin_failing_on_import_is_reported_and_isolated(fake_plugins):
    fake_plugins.add(BROKEN["dist"], BROKEN["entry_points"], BROKEN["modules"])
    assert "broken_sampler" in registry.available("scheduler")  # discovery imports nothing
    with pytest.raises(PluginLoadError) as info:
        registry.build("scheduler", "broken_sampler")
    message = str(info.value)
    assert "broken_sampler" in message
    assert "fake-broken" in message
    assert "RuntimeError" in message and "boom from the fake plugin" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert isinstance(info.value, ImportError)
    # Everything else is untouched.
    assert "broken_sampler" in registry.available("scheduler")
    _assert_builtins_available()
    _build_every_builtin()
    with pytest.raises(PluginLoadError):  # and it keeps failing clearly, not with a stale half-import
        registry.build("scheduler", "broken_sampler")


def test_same_name_from_two_distributions_warns_and_conflicts(fake_plugins):
    fake_plugins.add("fake-rival", {"latentgen.schedulers": {"ddim": "fake_rival_plugin:Sampler"}},
                     {"fake_rival_plugin": VALID_SCHEDULER})
    with pytest.warns(UserWarning) as record:
        names = registry.available("scheduler")
    assert "ddim" in names
    messages = [str(w.message) for w in record]
    assert any("'ddim'" in m and f"latentgen {CORE_VERSION}" in m and "fake-rival 0.1" in m for m in messages), messages
    with pytest.raises(ComponentConflictError) as info:
        registry.build("scheduler", "ddim")
    message = str(info.value)
    assert "ddim" in message and "latentgen" in message and "fake-rival" in message
    assert registry.BLOCK_ENV in message  # says how to resolve it
    assert "fake_rival_plugin" not in sys.modules  # neither side was loaded: no silent overwrite
    assert len(registry.entries("scheduler")["ddim"]) == 2
    # The other scheduler is unaffected.
    assert type(registry.build("scheduler", "ddpm")).__name__ == "DDPMScheduler"


def test_disable_autoload_hides_third_party_but_keeps_builtins(fake_plugins):
    fake_plugins.add("fake-extra", {"latentgen.schedulers": {"extra_sampler": "fake_extra_plugin:Sampler"},
                                    "latentgen.codecs": {"extra_codec": "fake_extra_plugin:Codec"}},
                     {"fake_extra_plugin": VALID_SCHEDULER + VALID_CODEC})
    fake_plugins.add("fake-rival", {"latentgen.schedulers": {"ddim": "fake_rival_plugin:Sampler"}},
                     {"fake_rival_plugin": VALID_SCHEDULER})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "extra_sampler" in registry.available("scheduler")
    assert "extra_codec" in registry.available("codec")

    fake_plugins.setenv(registry.AUTOLOAD_ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rival is hidden: no conflict warning either
        assert available_everywhere() == BUILTINS
    assert type(registry.build("scheduler", "ddim")).__name__ == "DDIMScheduler"
    _build_every_builtin()
    with pytest.raises(ComponentNotFoundError):
        registry.build("scheduler", "extra_sampler")

    fake_plugins.delenv(registry.AUTOLOAD_ENV)
    assert "extra_codec" in registry.available("codec")


def test_block_plugins_hides_just_that_distribution(fake_plugins):
    fake_plugins.add("fake-one", {"latentgen.schedulers": {"one_sampler": "fake_one_plugin:Sampler"}},
                     {"fake_one_plugin": VALID_SCHEDULER})
    fake_plugins.add("fake-two", {"latentgen.schedulers": {"two_sampler": "fake_two_plugin:Sampler"}},
                     {"fake_two_plugin": VALID_SCHEDULER})
    fake_plugins.add("fake-rival", {"latentgen.schedulers": {"ddim": "fake_rival_plugin:Sampler"}},
                     {"fake_rival_plugin": VALID_SCHEDULER})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert {"one_sampler", "two_sampler"} <= set(registry.available("scheduler"))

    fake_plugins.setenv(registry.BLOCK_ENV, "fake-one")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = registry.available("scheduler")
    assert "one_sampler" not in names and "two_sampler" in names and "ddim" in names

    # Blocking the rival resolves the conflict in favour of the built-in; a list is comma-separated.
    fake_plugins.setenv(registry.BLOCK_ENV, "fake-one, FAKE-RIVAL")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = registry.available("scheduler")
    assert "one_sampler" not in names and "two_sampler" in names
    assert type(registry.build("scheduler", "ddim")).__name__ == "DDIMScheduler"
    assert registry.build("scheduler", "two_sampler").registry_distribution == "fake-two"

    # latentgen itself cannot be blocked.
    fake_plugins.setenv(registry.BLOCK_ENV, "latentgen")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rival is visible again
        _assert_builtins_available()


def test_entry_point_of_wrong_type_is_a_plugin_load_error(fake_plugins):
    source = """
    import torch

    class NotAScheduler:
        pass

    class NotACodec(torch.nn.Module):
        latent_channels = 3
        downsampling_factor = 1

    def make_thing():
        return 42
    """
    fake_plugins.add("fake-wrongtype", {
        "latentgen.schedulers": {"impostor": "fake_wrongtype_plugin:NotAScheduler",
                                 "factory_impostor": "fake_wrongtype_plugin:make_thing"},
        "latentgen.codecs": {"module_impostor": "fake_wrongtype_plugin:NotACodec"},
    }, {"fake_wrongtype_plugin": source})
    for kind, name, base in [("scheduler", "impostor", "Scheduler"), ("scheduler", "factory_impostor", "Scheduler"),
                             ("codec", "module_impostor", "Codec")]:
        with pytest.raises(PluginLoadError) as info:
            registry.build(kind, name)
        message = str(info.value)
        assert f"'{name}'" in message and "fake-wrongtype" in message and base in message, message
    _build_every_builtin()


def test_entry_point_naming_missing_attribute_is_a_plugin_load_error(fake_plugins):
    fake_plugins.add("fake-typo", {"latentgen.schedulers": {"typo_sampler": "fake_typo_plugin:Smapler"}},
                     {"fake_typo_plugin": VALID_SCHEDULER})
    with pytest.raises(PluginLoadError) as info:
        registry.build("scheduler", "typo_sampler")
    message = str(info.value)
    assert "typo_sampler" in message and "fake-typo" in message and "Smapler" in message


# ---- laziness ----------------------------------------------------------------------------------

def test_discovery_and_building_import_only_what_is_asked_for():
    code = textwrap.dedent("""
        import sys
        import latentgen
        names = latentgen.registry.available("codec")
        assert names, names
        latentgen.registry.build("scheduler", "ddim")
        heavy = ["latentgen.codecs.kl", "latentgen.denoisers.unet", "latentgen.conditioners.text"]
        print("LOADED", [m for m in heavy if m in sys.modules])
        print("DDIM", "latentgen.schedulers.ddim" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=_clean_env())
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout
    assert "DDIM True" in result.stdout


# ---- `latentgen plugins` -----------------------------------------------------------------------

def _run_plugins(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latentgen.cli.main", "plugins"], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=_clean_env(**env))


def _line_for(output: str, name: str) -> str:
    lines = [line for line in output.splitlines() if re.match(rf"\s+{re.escape(name)}\s", line)]
    assert len(lines) == 1, (name, output)
    return lines[0]


def test_plugins_command_lists_every_builtin(tmp_path):
    result = _run_plugins(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for kind, group in registry.GROUPS.items():
        assert f"{kind}s ({group}):" in out
    for names in BUILTINS.values():
        for name in names:
            line = _line_for(out, name)
            assert re.match(rf"\s+{name}\s+latentgen\s+{re.escape(CORE_VERSION)}\s", line), line
            assert "FAILED" not in line and line.rstrip().endswith("ok"), line
    assert "FAILED" not in out


def test_plugins_command_reports_failing_plugin_and_lists_the_others(tmp_path):
    plugin_dir = tmp_path / "site"
    plugin_dir.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # only to reuse the writer; nothing is put on sys.path here
        FakePlugins(plugin_dir, mp).add(BROKEN["dist"], BROKEN["entry_points"], BROKEN["modules"])
    registry.refresh()
    result = _run_plugins(tmp_path, PYTHONPATH=str(plugin_dir))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    broken = _line_for(out, "broken_sampler")
    assert "fake-broken" in broken and "0.1" in broken
    assert "FAILED" in broken and "RuntimeError" in broken and "boom from the fake plugin" in broken
    assert out.count("FAILED") == 1
    for names in BUILTINS.values():
        for name in names:
            line = _line_for(out, name)
            assert "latentgen" in line and line.rstrip().endswith("ok"), line


def test_plugins_command_shows_conflicts(tmp_path):
    plugin_dir = tmp_path / "site"
    plugin_dir.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        FakePlugins(plugin_dir, mp).add("fake-rival", {"latentgen.schedulers": {"ddim": "fake_rival_plugin:Sampler"}},
                                        {"fake_rival_plugin": VALID_SCHEDULER})
    registry.refresh()
    result = _run_plugins(tmp_path, PYTHONPATH=str(plugin_dir))
    ddim_lines = [line for line in result.stdout.splitlines() if re.match(r"\s+ddim\s", line)]
    assert len(ddim_lines) == 2, result.stdout
    assert {line.split()[1] for line in ddim_lines} == {"latentgen", "fake-rival"}
    assert all("CONFLICT" in line for line in ddim_lines)


def test_every_declared_builtin_is_built_by_these_tests():
    assert set(SMALL_PARAMS) == {(kind, name) for kind, names in BUILTINS.items() for name in names}
