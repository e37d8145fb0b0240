"""Errors the core raises and the CLI turns into one line on stderr.

Every error a user can cause is a `DdpmError`. `exit_code` says how the command line ends:
2 for usage errors (a bad argument, a missing or unreadable input), 1 for runtime failures
(a write that fails, a device that breaks mid-run).
"""

from __future__ import annotations

import errno


class DdpmError(Exception):
    """Base of every error ddpm reports to a user; the message is one line saying what to do."""

    exit_code = 1
    # whether every process of a torchrun job meets it alike (it follows from the options and
    # the shared run directory), so that rank 0 alone says it; else each process that meets
    # it does, naming its rank (files, devices and packages differ between machines)
    job_wide = False


class UsageError(DdpmError):
    """The user asked for something that cannot work as given (bad option value, bad input)."""

    exit_code = 2
    job_wide = True


class ConfigError(UsageError):
    """A configuration value is out of range or inconsistent."""


class DataError(UsageError):
    """An input file is missing, unreadable, or not an image."""

    job_wide = False


class DeviceError(UsageError):
    """The requested device does not exist on this machine."""

    job_wide = False


class OutputError(DdpmError):
    """An output file could not be written."""


class MissingExtra(UsageError):
    """An optional dependency (an extra such as ddpm-cli[plot]) is not installed."""

    job_wide = False


class LoggerError(UsageError):
    """A live logger (--log) could not start: not logged in, a bad setting."""

    job_wide = False


class ResourceError(DdpmError):
    """The machine ran out of something (memory, disk): the user's situation, not a bug."""


def exhausted(error: BaseException) -> str | None:
    """What ran out when `error` is the machine running out of memory or disk rather than a
    bug: "memory", "disk space", or None. torch reports memory as RuntimeErrors: CUDA's and
    MPS's OutOfMemoryError ("... out of memory ..."), the CPU allocator's "DefaultCPUAllocator:
    can't allocate memory"."""
    if isinstance(error, MemoryError):
        return "memory"
    if isinstance(error, RuntimeError):
        text = str(error).lower()
        if "out of memory" in text or "can't allocate memory" in text:
            return "memory"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk space"
    return None


RESOURCE_HINTS = {
    "memory": "try a smaller --batch-size, or close other programs",
    "disk space": "free some space, or write elsewhere (--out, -o)",
}
