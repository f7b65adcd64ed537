"""The documentation that is generated from the code matches it, and the README keeps to its job."""

from __future__ import annotations

import re
from pathlib import Path

from latentgen import registry

REPO = Path(__file__).resolve().parents[2]


def test_the_component_catalogue_is_what_the_registry_generates(monkeypatch):
    from latentgen.cli.catalogue import markdown

    monkeypatch.setenv(registry.AUTOLOAD_ENV, "1")  # latentgen's own components only
    registry.refresh()
    try:
        generated = markdown()
    finally:
        monkeypatch.delenv(registry.AUTOLOAD_ENV)
        registry.refresh()
    committed = (REPO / "docs" / "components.md").read_text()
    assert committed == generated, ("docs/components.md is out of date: regenerate it with "
                                    "LATENTGEN_DISABLE_PLUGIN_AUTOLOAD=1 latentgen plugins --markdown > docs/components.md")


def test_readme_gives_the_two_commands_and_links_that_resolve():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert len(readme.splitlines()) <= 120, "README is the front door: keep it to a couple of screens"
    for document in (REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md")),
                     REPO / "benchmarks" / "README.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", document.read_text()):
            if "://" not in target:
                assert (document.parent / target).exists(), f"{document.name} links to missing {target}"


def test_ci_runs_the_test_command_readme_gives():
    assert "make test" in (REPO / ".ci" / "run").read_text()
