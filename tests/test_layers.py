"""The import direction between the package's layers (LAYERS below; a module that joins the
package must be given one): the diffusion math and the model never reach up into training,
generation, evaluation or the CLI; sampling never loads the trainer; only the CLI imports typer
or rich."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "ddpm_cli"

LAYERS = {
    "base": {"errors", "config", "device", "files", "images"},
    "math": {"schedules", "diffusion", "samplers"},
    "model": {"unet", "winograd", "presets", "forward"},
    "data": {"data", "sources", "batches", "builtin"},
    "store": {"checkpoint", "interop"},
    "training": {"train", "train_state", "run", "run_files", "distributed"},
    "generation": {"sampling", "noising", "preview"},
    "evaluation": {"evaluation", "fid", "likelihood", "inspection", "plots"},
}
# what each layer may not import (besides the CLI, which nothing below it may import)
FORBIDDEN = {
    "base": {"math", "model", "data", "store", "training", "generation", "evaluation"},
    "math": {"model", "data", "store", "training", "generation", "evaluation"},
    "model": {"data", "store", "training", "generation", "evaluation"},
    "data": {"model", "training", "generation", "evaluation"},  # a run's data cache is a checkpoint
    "store": {"training", "generation", "evaluation"},
    "generation": {"training", "evaluation"},
}


def layer_of(module: str) -> str:
    if module == "cli" or module.startswith("cli."):
        return "cli"
    for layer, names in LAYERS.items():
        if module in names:
            return layer
    raise AssertionError(f"ddpm_cli.{module} belongs to no layer: add it to LAYERS")


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
            if node.module == "ddpm_cli":  # from ddpm_cli import winograd (or __version__)
                names.update(f"ddpm_cli.{a.name}" for a in node.names if a.name in modules())
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
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ddpm_cli import train\n    import rich.console\n")
    assert {"ddpm_cli.train", "rich.console"} <= imports(bad)
