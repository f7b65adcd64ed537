"""Uninstalling either plugin of plugins/ leaves everything else working.

Each case runs in a virtual environment that sees this one's site-packages except the files that
`pip uninstall <plugin>` would remove (those its RECORD lists): the state right after an uninstall,
without touching the environment other tests run in. There: `latentgen plugins` succeeds without the
plugin, the other plugin and the built-ins still build and sample, a Hydra override naming the removed
option fails with Hydra's list of the available ones, and a checkpoint that needs the removed plugin
says which distribution to install.

Both plugins must be installed here (`make install` installs every package under plugins/).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from latentgen import registry

pytestmark = pytest.mark.slow  # starts the apps, torchrun or pip in subprocesses

# distribution -> the (kind, name) it registers, and what selects it on the command line
PLUGINS = {
    "latentgen-example": {"kind": "scheduler", "name": "rk4", "app": "sample", "override": "scheduler=rk4"},
    "latentgen-minilm": {"kind": "conditioner", "name": "minilm", "app": "train", "override": "conditioner=minilm"},
}
ENV_VARS = (registry.AUTOLOAD_ENV, registry.BLOCK_ENV)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ENV_VARS}


@pytest.fixture(scope="module")
def installed() -> dict[str, str]:
    versions = {}
    for dist in PLUGINS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"the plugin distribution '{dist}' is not installed in {sys.prefix}; these tests need both "
                        f"plugins: run `make install`, or `pip install -e plugins/{dist}`")
    return versions


def _mirror(source: Path, target: Path, hidden: set[str]) -> bool:
    """Symlink every entry of `source` into `target` except the `hidden` paths; a folder holding hidden
    paths is rebuilt entry by entry, and left out if nothing in it remains. Returns whether anything was made."""
    made = False
    for entry in sorted(source.iterdir()):
        path = os.path.normpath(entry)
        if path in hidden:
            continue
        if entry.is_dir() and not entry.is_symlink() and any(h.startswith(path + os.sep) for h in hidden):
            made |= _mirror(entry, target / entry.name, hidden)
            continue
        target.mkdir(parents=True, exist_ok=True)
        (target / entry.name).symlink_to(entry)
        made = True
    return made


def environment_without(dist: str, root: Path) -> Path:
    """A virtual environment under `root` whose site-packages is this one's minus `dist`'s files; its python."""
    files = importlib.metadata.distribution(dist).files
    hidden = {os.path.normpath(file.locate()) for file in files}
    env = root / f"without-{dist}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    for site_packages in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        _mirror(Path(site_packages), target, hidden)
    return python


# Runs inside the environment without the plugin (one process: torch and latentgen load once); prints
# what the test asserts on as JSON. The console apps run in-process, exactly as their scripts call them.
PROBE = textwrap.dedent("""
    import contextlib, importlib, importlib.metadata, io, json, sys
    spec = json.loads(sys.argv[1])
    facts = {"versions": {}}
    for dist in spec["distributions"]:
        try:
            facts["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            facts["versions"][dist] = None
    from latentgen import registry
    component = registry.build(spec["kept"]["kind"], spec["kept"]["name"], **spec["kept"]["params"])
    facts["kept_built"] = component.registry_distribution
    from latentgen.config import compose
    try:
        compose(spec["gone"]["app"], spec["gone"]["overrides"])
        facts["override_error"] = None
    except Exception as exc:
        facts["override_error"] = f"{type(exc).__name__}: {exc}"

    def run(module, args):
        from hydra.core.global_hydra import GlobalHydra
        GlobalHydra.instance().clear()
        sys.argv = [module, *args]
        out, err, code = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = importlib.import_module(module).main(*(["plugins"],) * (module == "latentgen.cli.main"))
            except SystemExit as exc:
                code = exc.code
        return {"exit": code or 0, "stdout": out.getvalue(), "stderr": err.getvalue()}

    facts["runs"] = {label: run(module, args) for label, (module, args) in spec["runs"].items()}
    print("FACTS" + json.dumps(facts))
""")


@pytest.fixture(scope="module")
def checkpoints(installed, tmp_path_factory) -> dict[str, Path]:
    """Tiny untrained checkpoints: the smoke model (built-ins only), and one with the MiniLM conditioner."""
    from latentgen.config import compose
    from latentgen.pipeline import LatentDiffusionPipeline

    root = tmp_path_factory.mktemp("checkpoints")
    smoke = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke"])).save(root / "smoke.safetensors")
    minilm = LatentDiffusionPipeline.from_config(compose("train", ["experiment=smoke", "conditioner=minilm",
                                                                   "conditioner.max_length=8"]))
    return {"smoke": smoke, "minilm": minilm.save(root / "minilm.safetensors")}


SMALL = {"rk4": {}, "minilm": {"max_length": 8}}


@pytest.mark.parametrize("gone", list(PLUGINS))
def test_uninstalling_one_plugin_leaves_the_rest_working(gone, installed, checkpoints, tmp_path):
    (kept,) = [dist for dist in PLUGINS if dist != gone]
    python = environment_without(gone, tmp_path)
    sample = lambda checkpoint, *args: ("latentgen.cli.sample", [  # noqa: E731
        f"checkpoint={checkpoints[checkpoint]}", "prompt=a red circle", *args, "steps=2", "num_images=1", "seed=0",
        "progress=false", f"hydra.run.dir={tmp_path / ('run-' + checkpoint)}"])
    if gone == "latentgen-example":
        # The MiniLM model samples with a built-in scheduler; the smoke model cannot ask for rk4 any more.
        runs = {"kept": sample("minilm", "scheduler=ddim"), "needs_gone": sample("smoke", "scheduler=rk4")}
    else:
        # The built-in smoke model samples with rk4; the MiniLM model cannot be loaded any more.
        runs = {"kept": sample("smoke", "scheduler=rk4"), "needs_gone": sample("minilm")}
    runs["plugins"] = ("latentgen.cli.main", [])
    spec = {"distributions": [gone, kept],
            "kept": {**PLUGINS[kept], "params": SMALL[PLUGINS[kept]["name"]]},
            "gone": {"app": PLUGINS[gone]["app"],
                     "overrides": ["checkpoint=unused"] * (PLUGINS[gone]["app"] == "sample") + [PLUGINS[gone]["override"]]},
            "runs": runs}
    probe = subprocess.run([str(python), "-c", PROBE, json.dumps(spec)], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path, env=_clean_env())
    assert probe.returncode == 0 and "FACTS" in probe.stdout, probe.stdout[-3000:] + probe.stderr[-3000:]
    facts = json.loads(probe.stdout.split("FACTS", 1)[1])

    # Uninstalled as far as Python can tell; the other plugin is still there and builds.
    assert facts["versions"] == {gone: None, kept: installed[kept]}
    assert facts["kept_built"] == kept

    # `latentgen plugins` exits 0, without the removed distribution; the rest import fine.
    listing = facts["runs"]["plugins"]["stdout"]
    assert facts["runs"]["plugins"]["exit"] == 0, listing
    assert gone not in listing and PLUGINS[gone]["name"] not in listing.split(), listing
    kept_lines = [line for line in listing.splitlines() if line.split()[:1] == [PLUGINS[kept]["name"]]]
    assert len(kept_lines) == 1 and kept in kept_lines[0] and kept_lines[0].rstrip().endswith("ok"), listing
    assert "FAILED" not in listing
    for kind in ("codec", "denoiser", "conditioner", "scheduler"):
        for name, (entry, *_) in registry.entries(kind).items():
            if entry.distribution == "latentgen":
                assert any(line.split()[:2] == [name, "latentgen"] for line in listing.splitlines()), (kind, name)

    # A Hydra override naming the removed option: Hydra names it and lists what is available instead.
    error = facts["override_error"]
    group = PLUGINS[gone]["kind"]
    assert error is not None and error.startswith("MissingConfigException"), error
    assert f"Could not find '{group}/{PLUGINS[gone]['name']}'" in error
    assert f"Available options in '{group}'" in error and ("ddim" if group == "scheduler" else "text") in error

    # The other plugin and the built-ins still sample through latentgen-sample; what needs the removed
    # plugin fails with one line that says what is missing.
    kept_run, needs_gone = facts["runs"]["kept"], facts["runs"]["needs_gone"]
    assert kept_run["exit"] == 0, kept_run["stderr"][-3000:]
    run_dir = tmp_path / ("run-minilm" if gone == "latentgen-example" else "run-smoke")
    assert json.loads((run_dir / "sample.json").read_text())["scheduler"] == ("ddim" if gone == "latentgen-example" else "rk4")
    assert (run_dir / "images" / "0000.png").is_file()
    assert needs_gone["exit"] == 1 and "Traceback" not in needs_gone["stderr"], needs_gone["stderr"]
    if gone == "latentgen-example":
        assert "Could not find 'scheduler/rk4'" in needs_gone["stderr"], needs_gone["stderr"]
    else:
        assert ("error: checkpoint" in needs_gone["stderr"] and "needs conditioner 'minilm' from distribution "
                "'latentgen-minilm'" in needs_gone["stderr"] and "pip install latentgen-minilm" in needs_gone["stderr"]), \
            needs_gone["stderr"]


def test_the_uninstalled_view_is_faithful(installed, tmp_path):
    """The view hides exactly the plugin: its module, metadata and Hydra search path are gone, latentgen is not."""
    python = environment_without("latentgen-example", tmp_path)
    code = ("import importlib.util, importlib.metadata as m; "
            "print(importlib.util.find_spec('latentgen_example'), importlib.util.find_spec('hydra_plugins.latentgen_example'), "
            "m.version('latentgen'), sorted(ep.name for ep in m.entry_points(group='latentgen.schedulers'))[:3])")
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=_clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["None", "None", installed_latentgen_version()], result.stdout
    assert "'ddim'" in result.stdout and "rk4" not in result.stdout
    assert importlib.metadata.version("latentgen-example")  # this environment is untouched


def installed_latentgen_version() -> str:
    return importlib.metadata.version("latentgen")
