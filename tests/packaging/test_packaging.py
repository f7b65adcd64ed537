"""Packaging: the explicit package list, what the wheel ships (configs, entry points, console
scripts), and that every shipped config names a registered component through the registry."""

from __future__ import annotations

import configparser
import importlib.resources
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import setuptools
import yaml

from latentgen import registry

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
GROUP_DIRS = ("codec", "denoiser", "conditioner", "scheduler", "dataset", "experiment")
CONSOLE_SCRIPTS = {
    "latentgen": "latentgen.cli.main:main",
    "latentgen-train": "latentgen.cli.train:main",
    "latentgen-sample": "latentgen.cli.sample:main",
    "latentgen-eval": "latentgen.cli.eval:main",
}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def _tree_packages() -> set[str]:
    return set(setuptools.find_packages(where=str(REPO), include=["latentgen*"])) | {"latentgen.conf"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--disable-pip-version-check", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300, cwd=out)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("latentgen-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def _dist_info_file(archive: zipfile.ZipFile, name: str) -> str:
    (member,) = [n for n in archive.namelist() if n.endswith(f".dist-info/{name}") and n.count("/") == 1]
    return archive.read(member).decode()


# ---- the package list --------------------------------------------------------------------------

def test_the_package_list_is_found_from_the_tree(pyproject):
    """setup.py finds the packages (a new subpackage needs no list entry); conf/ ships as latentgen.conf."""
    assert "packages" not in pyproject["tool"]["setuptools"]
    assert pyproject["tool"]["setuptools"]["package-dir"].get("latentgen.conf") == "conf"
    assert (CONF / "__init__.py").is_file()
    setup = (REPO / "setup.py").read_text()
    assert 'find_packages(include=["latentgen", "latentgen.*"])' in setup and '"latentgen.conf"' in setup


# ---- the wheel ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_wheel_ships_the_configs(wheel):
    names = set(wheel.namelist())
    assert "latentgen/conf/train.yaml" in names
    assert "latentgen/text/bpe_simple_vocab_16e6.txt.gz" in names  # the CLIP tokenizer needs no download
    from latentgen.nn.native_kernels import SOURCES  # compiled on first use from the installed sources
    assert all(f"latentgen/csrc/{source}" in names for source in SOURCES), SOURCES
    assert "latentgen/conf/sample.yaml" in names
    for group in GROUP_DIRS:
        assert any(n.startswith(f"latentgen/conf/{group}/") and n.endswith(".yaml") for n in names), group
    # Every YAML of conf/ is shipped (the package-data globs cover the tree's depth).
    for path in CONF.rglob("*.yaml"):
        assert f"latentgen/conf/{path.relative_to(CONF).as_posix()}" in names, path
    assert not any(n.startswith("conf/") for n in names)  # only under latentgen/


@pytest.mark.slow
def test_wheel_declares_entry_point_groups_and_console_scripts(wheel, pyproject):
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # entry-point names are case sensitive
    parser.read_string(_dist_info_file(wheel, "entry_points.txt"))
    for group in ("latentgen.codecs", "latentgen.denoisers", "latentgen.conditioners", "latentgen.schedulers",
                  "latentgen.datasets"):
        assert parser.has_section(group), group
        declared = pyproject["project"]["entry-points"][group]
        assert {k: v.strip() for k, v in parser[group].items()} == declared, group
    assert set(registry.GROUPS.values()) <= set(parser.sections())
    assert parser.has_section("console_scripts")
    scripts = {k: v.strip() for k, v in parser["console_scripts"].items()}
    assert scripts == CONSOLE_SCRIPTS


@pytest.mark.slow
def test_wheel_ships_every_entry_point_module(wheel, pyproject):
    names = set(wheel.namelist())
    for group, eps in pyproject["project"]["entry-points"].items():
        for value in eps.values():
            module = value.split(":")[0]
            assert f"{module.replace('.', '/')}.py" in names, (group, value)
    for value in CONSOLE_SCRIPTS.values():
        assert f"{value.split(':')[0].replace('.', '/')}.py" in names


@pytest.mark.slow
def test_wheel_ships_every_subpackage(wheel):
    names = set(wheel.namelist())
    for package in sorted(_tree_packages() - {"latentgen.conf"}):
        assert f"{package.replace('.', '/')}/__init__.py" in names, package


@pytest.mark.slow
def test_wheel_metadata(wheel, pyproject):
    metadata = _dist_info_file(wheel, "METADATA")
    assert "Name: latentgen\n" in metadata
    assert f"Version: {pyproject['project']['version']}\n" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not any("diffusers" in r or "transformers" in r for r in requires), requires
    assert any(r.startswith("Requires-Dist: torch") for r in requires), requires
    assert any(r.startswith("Requires-Dist: hydra-core") for r in requires), requires


# ---- the configs -------------------------------------------------------------------------------

def _targets(node, where=()):
    """Every mapping that has a `_target_` key, with where it sits."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node
        for key, value in node.items():
            yield from _targets(value, (*where, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _targets(value, (*where, index))


def _yaml_files() -> list[Path]:
    files = sorted(CONF.rglob("*.yaml"))
    assert files
    return files


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.relative_to(CONF).as_posix())
def test_configs_name_registered_components_through_the_registry(path):
    data = yaml.safe_load(path.read_text())
    group = path.relative_to(CONF).parts[0] if len(path.relative_to(CONF).parts) > 1 else None
    found = list(_targets(data))
    if group in registry.GROUPS:
        parents = [entry for entry in data.get("defaults", []) if isinstance(entry, str) and entry != "_self_"]
        if parents and not (found and found[0][0] == ()):
            # A variant (e.g. dit_s_4) extends another option of its group, which holds the _target_.
            assert all((path.parent / f"{parent}.yaml").is_file() for parent in parents), f"{path}: {parents}"
        else:
            # A component option of a kind's group is a registry node of that kind at its top.
            assert found and found[0][0] == (), f"{path} has no top-level _target_"
    for where, node in found:
        label = f"{path.relative_to(CONF)}:{'.'.join(map(str, where)) or '<top>'}"
        assert node["_target_"] == "latentgen.registry.build", label
        kind = node.get("kind")
        assert kind in registry.GROUPS, label
        if group in registry.GROUPS and where == ():
            assert kind == group, label
        assert node.get("name") in registry.available(kind), (label, node.get("name"))


def test_config_nodes_build_with_their_shipped_parameters():
    """The parameters each component YAML passes are ones the component accepts."""
    import inspect

    for path in _yaml_files():
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or "_target_" not in data:
            continue
        factory = registry.resolve(data["kind"], data["name"]).load()
        params = {k: v for k, v in data.items() if k not in ("_target_", "kind", "name")}
        signature = inspect.signature(factory)
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            continue  # e.g. the stack's declared widths: checked when built (test_hydra_config builds every option)
        signature.bind_partial(**params)  # raises TypeError on an unknown parameter


def test_conf_is_a_package_resource():
    root = importlib.resources.files("latentgen.conf")
    assert root.joinpath("train.yaml").is_file()
    assert root.joinpath("sample.yaml").is_file()
    assert "defaults" in root.joinpath("train.yaml").read_text()
    for group in GROUP_DIRS:
        assert any(p.name.endswith(".yaml") for p in root.joinpath(group).iterdir()), group
