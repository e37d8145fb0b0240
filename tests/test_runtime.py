"""The environment switches: read once into runtime.Runtime, checked, documented, recorded."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from ddpm_cli import runtime
from ddpm_cli.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "ddpm_cli"


def test_unset_switches_keep_the_defaults_and_set_ones_are_parsed():
    assert runtime.from_env({}) == runtime.Runtime()
    rt = runtime.from_env({
        "DDPM_WINOGRAD": "0", "DDPM_AMX_BF16": "off", "DDPM_CUDA_GRAPHS": "false",
        "DDPM_TUNE_MALLOC": "no", "DNNL_MAX_CPU_ISA": " avx2 ", "DDPM_DIST_TIMEOUT": "30",
        "DDPM_DEBUG": "1",
    })  # fmt: skip
    assert rt == runtime.Runtime(False, False, False, False, "AVX2", 30.0, True)
    # oneDNN reads ONEDNN_ before DNNL_
    both = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "DNNL_MAX_CPU_ISA": "AVX2"}
    assert runtime.from_env(both).cpu_isa == "AVX512_CORE"
    assert runtime.from_env({"DDPM_WINOGRAD": "", "DDPM_DEBUG": "0"}) == runtime.Runtime()


@pytest.mark.parametrize(
    "env", [{"DDPM_WINOGRAD": "maybe"}, {"DDPM_DEBUG": "2"}, {"DDPM_DIST_TIMEOUT": "-5"},
            {"DDPM_DIST_TIMEOUT": "soon"}, {"DDPM_DIST_TIMEOUT": "inf"}],
)  # fmt: skip
def test_a_bad_value_is_refused_naming_the_variable(env):
    with pytest.raises(ConfigError, match=next(iter(env))):
        runtime.from_env(env)


def test_every_field_is_a_documented_switch():
    fields = [f.name for f in dataclasses.fields(runtime.Runtime)]
    assert [s.field for s in runtime.SWITCHES] == fields
    assert set(runtime.RECORDED) <= {s.field for s in runtime.SWITCHES}
    cli_md = (PACKAGE.parent.parent / "docs" / "cli.md").read_text()
    for s in runtime.SWITCHES:
        assert f"`{s.variable}`" in cli_md


def test_nothing_else_in_the_package_reads_the_environment():
    """Only runtime.py reads switches; distributed.py reads torchrun's own variables."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "runtime.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                assert path.name == "distributed.py", f"{path.name} reads the environment"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith(("DDPM_", "ONEDNN_", "DNNL_")) and " " not in node.value:
                    raise AssertionError(f"{path.name} names {node.value}")


def test_use_changes_the_switches_for_a_block_only():
    before = runtime.current()
    off = dataclasses.replace(before, winograd=False)
    with runtime.use(off):
        assert runtime.current() is off
    assert runtime.current() is before


def test_the_command_prefix_sets_the_recorded_switches_away_from_their_defaults():
    assert runtime.Runtime().command_prefix() == ""
    rt = runtime.Runtime(winograd=False, cpu_isa="AVX2", debug=True, dist_timeout_s=5)
    assert rt.command_prefix() == "DDPM_WINOGRAD=0 ONEDNN_MAX_CPU_ISA=AVX2 "
    assert rt.recorded() == {"winograd": False, "cpu_isa": "AVX2"}
    assert json.loads(json.dumps(rt.recorded())) == rt.recorded()


def test_the_cli_refuses_a_bad_switch_in_one_line(runner):
    from ddpm_cli.cli import app

    with runtime.use(None):  # as at start-up: read from the environment
        r = runner.invoke(app, ["inspect", "--help"], env={"DDPM_WINOGRAD": "maybe"})
    assert r.exit_code == 2
    assert "DDPM_WINOGRAD='maybe'" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
