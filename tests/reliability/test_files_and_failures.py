"""Malformed files, failures of the machine (disk full, permissions) and broken plugins: each is one `error:`
line in the apps, naming the thing and the fix, and a LatentgenError in the Python API."""

from __future__ import annotations

import errno
import json
import struct
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest
import torch
from run_snapshots import existing_run, snapshot
from safetensors.torch import save_file

from latentgen import registry
from latentgen.errors import CheckpointError, PluginLoadError
from latentgen.pipeline import LatentDiffusionPipeline


def _safetensors(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# (what the file is, how to write it, what the error must say)
MALFORMED = [
    ("empty", lambda p: p.write_bytes(b""), "empty or truncated"),
    ("a text file", lambda p: p.write_text("not weights at all, just some words"), "not a safetensors file"),
    ("a pickle", lambda p: p.write_bytes(b"\x80\x02" + b"\0" * 64), "pickle/zip file"),
    ("header not JSON", lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"), "corrupt safetensors header"),
    ("header a list", lambda p: _safetensors(p, []), "not a JSON object"),
    ("entry without data_offsets", lambda p: _safetensors(p, {"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
     "the entry of tensor 'w' needs a dtype, a shape and two data_offsets"),
    ("offsets past the end", lambda p: _safetensors(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                                                    b"\0" * 4), "is truncated"),
    ("negative offsets", lambda p: _safetensors(p, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}),
     "negative or non-integer sizes"),
    ("size not matching its shape", lambda p: _safetensors(
        p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4), "spans 4 bytes, not 12"),
]


@pytest.mark.parametrize(("what", "write", "named"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_a_malformed_file_is_named_in_the_api_and_in_the_app(what, write, named, tmp_path, run_app, tripwires):
    path = tmp_path / "model.safetensors"
    write(path)
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace("[", r"\[")):
        LatentDiffusionPipeline.from_checkpoint(path)
    status, lines = run_app("sample", [f"checkpoint={path}", "prompt=a", f"hydra.run.dir={tmp_path / 'run'}"])
    assert status == 1 and len(lines) == 1 and named in lines[0], lines
    assert tripwires == []


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_weights_that_are_not_floating_point_are_refused(smoke_checkpoint, tmp_path, dtype):
    from safetensors.torch import load_file

    from latentgen.checkpoint import read_metadata

    tensors = load_file(smoke_checkpoint)
    name = next(key for key in tensors if key.startswith("denoiser.") and key.endswith("weight"))
    tensors[name] = tensors[name].to(dtype)
    broken = tmp_path / "ints.safetensors"
    save_file(tensors, broken, metadata=read_metadata(smoke_checkpoint))
    with pytest.raises(CheckpointError, match=rf"1 denoiser weights in .* are not floating point \(first: \['"
                                              rf"{name.removeprefix('denoiser.')}: {str(dtype)[6:]}'\]\)"):
        LatentDiffusionPipeline.from_checkpoint(broken)


@pytest.mark.parametrize(("failure", "said"), [
    (OSError(errno.ENOSPC, "No space left on device", "grid.png"), "cannot use 'grid.png': the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied", "images"), "cannot use 'images': permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "sample.json"), "cannot use 'sample.json': the file system is read-only"),
    (MemoryError(), "out of memory: ask for fewer or smaller images"),
])
def test_a_failure_of_the_machine_is_one_line_with_its_fix(failure, said, smoke_checkpoint, tmp_path, run_app,
                                                          monkeypatch):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr("latentgen.cli.sample.grid", fail, raising=False)
    monkeypatch.setattr("latentgen.imaging.grid", fail)
    status, lines = run_app("sample", [f"checkpoint={smoke_checkpoint}", "prompt=a", "num_images=1", "steps=1",
                                       "progress=false", f"hydra.run.dir={tmp_path / 'run'}"])
    assert status == 1 and len(lines) == 1 and lines[0].startswith(f"error: {said}"), lines


def test_debug_shows_the_traceback(tmp_path, run_app, monkeypatch):
    monkeypatch.setenv("LATENTGEN_DEBUG", "1")
    with pytest.raises(CheckpointError, match="does not exist"):
        run_app("sample", [f"checkpoint={tmp_path / 'none.safetensors'}", "prompt=a",
                           f"hydra.run.dir={tmp_path / 'run'}"])


def test_a_run_directory_that_cannot_be_written_is_refused_up_front(smoke_checkpoint, tmp_path, run_app, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, lines = run_app("sample", [f"checkpoint={smoke_checkpoint}", "prompt=a",
                                       f"hydra.run.dir={blocker / 'run'}"])
    assert status == 1 and "is a file, not a directory" in lines[0], lines
    read_only = existing_run(tmp_path / "read_only")
    before = snapshot(read_only)
    monkeypatch.setattr("os.access", lambda path, mode: False)  # what a read-only mount answers (root ignores modes)
    status, lines = run_app("sample", [f"checkpoint={smoke_checkpoint}", "prompt=a", f"hydra.run.dir={read_only}"])
    assert status == 1 and len(lines) == 1 and "is not writable (read-only, or another user's)" in lines[0], lines
    assert snapshot(read_only) == before


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """A module that exits at import, registered as a codec by a fake distribution (no pip install needed)."""
    (tmp_path / "exits_at_import.py").write_text(textwrap.dedent("""
        import sys
        sys.exit(3)
    """))
    (tmp_path / "raises_when_built.py").write_text(textwrap.dedent("""
        from latentgen.contracts import Codec

        class Broken(Codec):
            def __init__(self):
                raise RuntimeError("the plugin's own bug")

            encode = decode = None  # never reached: the constructor fails first
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    entries = {
        "exits": registry.Entry("codec", "exits", "exits_at_import:Codec", "broken-dist", "0.1",
                                entry_point=EntryPoint("exits", "exits_at_import:Codec", "latentgen.codecs")),
        "raises": registry.Entry("codec", "raises", "raises_when_built:Broken", "buggy-dist", "0.2",
                                 entry_point=EntryPoint("raises", "raises_when_built:Broken", "latentgen.codecs")),
    }
    found = registry._discover("codec")
    monkeypatch.setitem(registry._discovered, "codec", {**found, **{name: [entry] for name, entry in entries.items()}})
    yield entries
    sys.modules.pop("exits_at_import", None)
    sys.modules.pop("raises_when_built", None)


def test_a_plugin_that_exits_or_raises_is_named_and_the_others_still_work(broken_plugin, capsys):
    with pytest.raises(PluginLoadError, match=r"codec 'exits' from distribution 'broken-dist' .* failed to import: "
                                              r"SystemExit: 3.*LATENTGEN_BLOCK_PLUGINS=broken-dist"):
        registry.build("codec", "exits")
    with pytest.raises(PluginLoadError, match=r"codec 'raises' from distribution 'buggy-dist' .* failed to build: "
                                              r"RuntimeError: the plugin's own bug"):
        registry.build("codec", "raises")
    assert registry.build("codec", "identity").name == "identity"
    from latentgen.cli.main import plugins

    assert plugins(check=True) == 1  # the one that fails to import; every other component still listed
    listing = capsys.readouterr().out
    assert "exits" in listing and "FAILED: SystemExit(3)" in listing and "identity" in listing


def test_a_presets_package_that_exits_at_import_is_skipped_with_a_warning(tmp_path, monkeypatch):
    from latentgen.config import options

    (tmp_path / "exiting_presets").mkdir()
    (tmp_path / "exiting_presets" / "__init__.py").write_text("import sys\nsys.exit(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "config_packages", lambda: [("exiting_presets", "presets-dist")])
    with pytest.warns(UserWarning, match=r"presets of plugin distribution 'presets-dist' .* failed to import "
                                         r"\(SystemExit: 1\) and are left out"):
        assert options.plugin_config_paths() == []
    sys.modules.pop("exiting_presets", None)


@pytest.mark.parametrize(("value", "name"), [
    ("prompt='../../../tmp/x'", "prompt='.._.._.._tmp_x'"),
    ("..", "__"),
    ("a\\b/c", "a_b_c"),
    ("x" * 400, None),
])
def test_a_sweep_folder_name_is_never_a_path(value, name):
    from latentgen.config.options import safe_name

    safe = safe_name(value)
    assert "/" not in safe and "\\" not in safe and safe not in (".", "..") and len(safe.encode()) <= 180
    if name is not None:
        assert safe == name
    assert safe_name("x" * 400) != safe_name("x" * 399 + "y")  # long names keep a hash of the whole


def test_formats_tell_the_pipeline_config_from_the_header_alone(smoke_checkpoint, shared_dir, tmp_path, tripwires,
                                                                run_app):
    """What latentgen-sample checks a request against before any weight is read: the config the loaded
    pipeline has, for latentgen's own files and for the original SD layout."""
    from latentgen.formats.dispatch import build_format

    native = build_format("latentgen").config(smoke_checkpoint)
    weights, yaml = shared_dir / "golden" / "sd-tiny-weights.safetensors", shared_dir / "golden" / "sd-tiny-config.yaml"
    original = build_format("stable_diffusion").config(weights, original_config=yaml)
    assert tripwires == []  # headers only
    assert native == LatentDiffusionPipeline.from_checkpoint(smoke_checkpoint).config
    loaded = LatentDiffusionPipeline.from_checkpoint(weights, original_config=yaml)
    assert {kind: original[kind]["name"] for kind in ("codec", "denoiser", "conditioner")} == \
        {kind: loaded.config[kind]["name"] for kind in ("codec", "denoiser", "conditioner")}
    tripwires.clear()
    status, lines = run_app("sample", [f"checkpoint={weights}", f"original_config={yaml}", "prompt=a", "height=13",
                                       f"hydra.run.dir={tmp_path / 'run'}"])
    assert status == 1 and "height=13" in lines[0] and "multiple of" in lines[0], lines
    assert tripwires == []  # refused from the header
