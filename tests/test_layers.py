"""The import direction between the package's layers: its subpackages, plus the base modules at
the top (BASE below; a module that joins the top must be added there): the diffusion math and the
model never reach up into training, generation, evaluation or the CLI; sampling never loads the
trainer; only the CLI imports typer or rich; no module grows past MAX_LINES."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "ddpm_cli"

BASE = {"errors", "config", "sampler_config", "noise_config", "runtime", "host", "device",
        "distributed", "text"}  # fmt: skip
PACKAGES = {"diffusion", "model", "data", "store", "training", "generation", "evaluation", "cli"}
# what each layer may not import (besides the CLI, which nothing below it may import)
FORBIDDEN = {
    "base": PACKAGES - {"cli"},
    "diffusion": {"model", "data", "store", "training", "generation", "evaluation"},
    "model": {"data", "store", "training", "generation", "evaluation"},
    "data": {"model", "training", "generation", "evaluation"},  # a run's data cache is a checkpoint
    "store": {"training", "generation", "evaluation"},
    "generation": {"training", "evaluation"},
    "training": {"evaluation"},
    "evaluation": {"training"},
}
MAX_LINES = 400  # a module readable in one sitting


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    if top in PACKAGES:
        return top
    if module in BASE:
        return "base"
    raise AssertionError(f"ddpm_cli.{module} has no layer: move it into a subpackage or BASE")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and parts != ("__main__",) and parts != ("__init__",):
            found[".".join(parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module an import statement in the file names, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module.split(".")[0] == "ddpm_cli":  # from ddpm_cli.training import train
                inner = node.module.removeprefix("ddpm_cli").lstrip(".")
                for alias in node.names:
                    name = f"{inner}.{alias.name}".lstrip(".")
                    if name in modules():
                        names.add(f"ddpm_cli.{name}")
    return names


@pytest.mark.parametrize("module", sorted(m for m in modules() if layer_of(m) != "cli"))
def test_the_core_imports_downward_only_and_never_typer_or_rich(module):
    mine = layer_of(module)
    for name in imports(modules()[module]):
        top = name.split(".")[0]
        assert top not in ("typer", "rich", "click"), f"{module} imports {name}: CLI only"
        if top != "ddpm_cli" or name == "ddpm_cli":
            continue
        theirs = layer_of(name.removeprefix("ddpm_cli."))
        assert theirs != "cli", f"{module} imports the CLI ({name})"
        assert theirs not in FORBIDDEN.get(mine, set()), (
            f"{module} ({mine}) imports {name} ({theirs})"
        )


def test_every_module_has_a_layer_and_the_test_sees_violations(tmp_path):
    for module in modules():
        layer_of(module)
    assert set(FORBIDDEN) | {"cli"} == PACKAGES | {"base"}
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ddpm_cli.training import train\n    import rich.console\n")
    assert {"ddpm_cli.training", "ddpm_cli.training.train", "rich.console"} <= imports(bad)


@pytest.mark.parametrize("module", sorted(modules()))
def test_every_module_is_readable_in_one_sitting(module):
    lines = len(modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"ddpm_cli.{module} has {lines} lines: split it by concern"


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"{init.relative_to(PACKAGE)} needs a docstring"
