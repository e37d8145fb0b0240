"""Every environment switch ddpm obeys, read once into one frozen object.

`current()` reads the environment the first time it is asked (the command line asks at
start-up, so a bad value is refused before any work) and returns the same Runtime afterwards;
nothing else in the package reads these variables. Tests and benchmarks change a switch for a
block with `use(replace(current(), winograd=False))`.

Switches that can change a result's bits (`RECORDED`) are written into every checkpoint's
metadata and every sampled PNG's text chunks; docs/cli.md lists them all (test_docs checks it).
torchrun's own variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) are its protocol, not
switches: distributed.py reads them, except the rank (and whether there is a job), which
`torchrun_rank()` reads here for the command line, which must say things once per job without
loading torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ddpm_cli.errors import ConfigError


@dataclass(frozen=True)
class Switch:
    variable: str
    field: str
    meaning: str


SWITCHES = (
    Switch("DDPM_WINOGRAD", "winograd",
           "0 runs torch's 3x3 convolutions on the CPU instead of ddpm's Winograd kernel"),
    Switch("DDPM_AMX_BF16", "amx_bf16",
           "0 keeps fp32 as the CPU default precision on CPUs with AMX (default there: bf16)"),
    Switch("DDPM_CUDA_GRAPHS", "cuda_graphs", "0 turns off CUDA graphs when sampling on a GPU"),
    Switch("DDPM_TUNE_MALLOC", "tune_malloc",
           "0 leaves glibc's allocator as it is (default: freed large blocks stay mapped)"),
    Switch("ONEDNN_MAX_CPU_ISA", "cpu_isa",
           "oneDNN's own cap on CPU instructions (DNNL_MAX_CPU_ISA too); a cap without AMX makes "
           "ddpm choose as on a CPU without AMX"),
    Switch("DDPM_DIST_TIMEOUT", "dist_timeout_s",
           "seconds a torchrun process waits for the others (default 600)"),
    Switch("DDPM_DEBUG", "debug", "1 prints the traceback of an internal error"),
)  # fmt: skip
RECORDED = ("winograd", "cpu_isa")  # the switches that change a result's bits


@dataclass(frozen=True)
class Runtime:
    winograd: bool = True
    amx_bf16: bool = True
    cuda_graphs: bool = True
    tune_malloc: bool = True
    cpu_isa: str = ""  # upper case; "" when uncapped
    dist_timeout_s: float = 600.0  # rank 0's sample grids must fit in it
    debug: bool = False

    def recorded(self) -> dict:
        """The switches that change results, as checkpoints and PNGs record them."""
        return {name: getattr(self, name) for name in RECORDED}

    def command_prefix(self) -> str:
        """`VAR=value ` for each result-changing switch set away from its default, to put
        before a command that must give the same bits."""
        default = Runtime()
        parts = []
        for s in SWITCHES:
            value = getattr(self, s.field)
            if s.field in RECORDED and value != getattr(default, s.field):
                text = ("1" if value else "0") if isinstance(value, bool) else str(value)
                parts.append(f"{s.variable}={text} ")
        return "".join(parts)


def _flag(variable: str, value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{variable}={value!r}: set it to 0 or 1, or unset it")


def from_env(env: Mapping[str, str] = os.environ) -> Runtime:
    """The switches in `env`, checked; unset ones keep their defaults."""
    values: dict = {}
    for name in ("DDPM_WINOGRAD", "DDPM_AMX_BF16", "DDPM_CUDA_GRAPHS", "DDPM_TUNE_MALLOC"):
        if env.get(name, "") != "":
            field = next(s.field for s in SWITCHES if s.variable == name)
            values[field] = _flag(name, env[name])
    if env.get("DDPM_DEBUG", "") != "":
        values["debug"] = _flag("DDPM_DEBUG", env["DDPM_DEBUG"])
    values["cpu_isa"] = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or ""
    values["cpu_isa"] = values["cpu_isa"].strip().upper()
    if env.get("DDPM_DIST_TIMEOUT", "") != "":
        text = env["DDPM_DIST_TIMEOUT"]
        try:
            seconds = float(text)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds < float("inf"):
            raise ConfigError(f"DDPM_DIST_TIMEOUT={text!r}: give a number of seconds above 0")
        values["dist_timeout_s"] = seconds
    return Runtime(**values)


_current: Runtime | None = None


def torchrun_rank() -> int:
    """This process's rank in a torchrun job (its RANK), 0 outside one: a RANK without a
    WORLD_SIZE above 1 (set by some other launcher) makes no job."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def current() -> Runtime:
    """The process's switches, read from the environment on the first call."""
    global _current
    if _current is None:
        _current = from_env()
    return _current


@contextlib.contextmanager
def use(runtime: Runtime) -> Iterator[Runtime]:
    """Run a block with other switches (tests, benchmarks); the previous ones come back."""
    global _current
    before, _current = _current, runtime
    try:
        yield runtime
    finally:
        _current = before
