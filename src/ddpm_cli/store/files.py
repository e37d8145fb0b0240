"""Reading inputs and writing outputs without ever leaving a half-written file.

`write_atomic` writes to a temporary file beside the target, flushes it to disk and renames it
into place, so a reader sees either the old file or the complete new one, never a torn one.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddpm_cli.errors import DataError, OutputError, UsageError

STDIO = "-"  # a path of "-" means stdin for inputs and stdout for outputs
# a run directory's checkpoints: the EMA weights with all a sampler needs, and the resumable
# training state (raw weights, optimizer, randomness)
MODEL, STATE = "model.safetensors", "train_state.safetensors"
SNAPSHOT = "model-{step:08d}.safetensors"  # a copy of MODEL at a step (ddpm train --keep)
BEST = "best.safetensors"  # the EMA weights with the run's lowest quality figure (--eval-every)
FIGURE = "heldout_loss"  # that figure's key in its metadata and in metrics.jsonl


def snapshots(folder: Path) -> list[tuple[int, Path]]:
    """The step-numbered snapshots in a run directory, (step, path) from the oldest."""
    found = []
    for path in Path(folder).glob("model-*.safetensors"):
        digits = path.name[len("model-") : -len(".safetensors")]
        if len(digits) >= 8 and digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def read_input_bytes(source: str | Path, what: str = "the image") -> bytes:
    """The bytes of a file, or of stdin when `source` is "-" (`what` it holds, for messages)."""
    if str(source) == STDIO:
        data = sys.stdin.buffer.read()
        if not data:
            raise DataError(f"no data on stdin for {what}; pipe an image file in, e.g. "
                            "`cat FILE.png | ddpm ...`")  # fmt: skip
        return data
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an image file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def check_output_path(path: Path, overwrite: bool = True, inputs: tuple = ()) -> None:
    """Fail early, before any work, if `path` cannot be written or would replace an input."""
    for source in inputs:
        if str(source) != STDIO and Path(source).exists() and path.exists():
            if os.path.samefile(source, path):
                raise UsageError(f"{path}: is the input image; choose another output file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"{path}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UsageError(f"{path}: {parent} is not a directory")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; give a file name")
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: already exists; pass --overwrite to replace it")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: cannot write to directory {parent}: permission denied")


@contextmanager
def output_folder(path: Path | None, tidy: bool = True) -> Iterator[None]:
    """make_folder for the block's outputs (None: none): with `tidy`, a folder it made is
    removed again if the block fails or is interrupted before anything is written into it
    (not where other processes share the folder: one's failure would hide in another's)."""
    created = new_folder(path) if tidy and path is not None else None
    if path is not None:
        make_folder(path)
    try:
        yield
    except BaseException:
        if created is not None:  # -o a/b/c may have made all three
            remove_made(path, created)
        raise


def remove_made(folder: Path, created: Path) -> None:
    """Remove `folder` and the folders above it up to `created` (new_folder's answer: the
    outermost one made for it), innermost first, each only while it is empty (or gone): what
    another process put there meanwhile stays, with the folders above it."""
    folder = Path(os.path.abspath(folder))
    if created != folder and created not in folder.parents:
        return
    while True:
        try:
            folder.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # not empty
            return
        if folder == created:
            return
        folder = folder.parent


def new_folder(out: Path) -> Path | None:
    """The outermost folder that making `out` creates: `out` itself, or a missing parent such
    as runs/; None when `out` exists. Absolute, with `..` resolved as written (`new/../runs`
    is runs/, whether or not new/ exists)."""
    out = Path(os.path.abspath(out))
    if out.exists():
        return None
    while out.parent != out and not out.parent.exists():
        out = out.parent
    return out


def make_folder(path: Path) -> Path:
    """Create the folder `path` (and its parents) if missing; one clear error when it cannot
    be (no permission, a read-only file system, a file in the way)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno == errno.ENOTDIR:
            reason = "a file of that name (or above it) is in the way"
        else:
            reason = e.strerror or str(e)
        raise OutputError(f"{path}: cannot create this folder: {reason}") from None
    return path


def write_atomic(path: Path, data: bytes, follow: bool = True) -> None:
    """Write `data` to `path` atomically: a temporary file, fsync, then rename over the target,
    and fsync the directory, so that a power cut cannot lose the rename either.

    A symlink is followed (its target is replaced, and the link kept) when `follow`, as a user
    who points an output at a link expects; a run's own files pass follow=False, so that a link
    planted in the run directory is replaced, never the file it points to.
    """
    path = Path(os.path.realpath(path)) if follow else Path(os.path.abspath(path))
    parent = path.parent if str(path.parent) else Path(".")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; match an ordinary open()
        os.replace(tmp_name, path)
        tmp_name = None
        sync_directory(parent)
    except OSError as e:
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OutputError(f"{path}: cannot write: {reason}") from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def sync_directory(folder: Path) -> None:
    """fsync a directory, making the renames in it durable (POSIX; elsewhere a no-op)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # Windows cannot open a directory; a rename there is already journaled
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


def append_line(path: Path, line: str) -> None:
    """Append one line to a run's log (metrics.jsonl, skipped.txt), never through a symlink
    planted in its place: a link is refused (ELOOP) rather than followed to its target."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{path}: is a symbolic link; a run writes its own logs, remove "
                              "the link") from None  # fmt: skip
        raise
    with os.fdopen(fd, "ab") as f:  # a name that is not UTF-8 is written as its own bytes
        f.write(os.fsencode(line if line.endswith("\n") else line + "\n"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def stdout_is_terminal() -> bool:
    return bool(sys.stdout is not None and sys.stdout.isatty())


def write_stdout(data: bytes) -> None:
    """Binary data to stdout (for `-o -`), flushed so pipes see it at once."""
    if sys.stdout is None:
        raise OutputError("stdout is closed; use -o FILE")
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


class RunLock:
    """An exclusive lock on a run directory (its `.lock` file) for as long as a training process
    holds it, so that a second `ddpm train` on the same directory refuses instead of writing
    between the first one's checkpoints. The operating system drops the lock when the process
    ends, however it ends, so a crash never leaves a stale lock. POSIX only (fcntl); elsewhere
    no lock is taken."""

    NAME = ".lock"

    def __init__(self, folder: Path, resume: bool = False):
        self.path = Path(folder) / self.NAME
        self.fd: int | None = None
        self.resume = resume  # a resume cannot choose another --out: not offered

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:
            return self
        try:  # never through a link planted in its place: that would truncate its target
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UsageError(f"{self.path}: is a symbolic link, not ddpm's lock file; "
                                 "remove it") from None  # fmt: skip
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise OutputError(f"{self.path}: cannot open the run's lock file "
                                  f"({e.strerror or e})") from None  # fmt: skip
            fix = "copy it somewhere writable and resume the copy" if self.resume else \
                "choose another --out"  # fmt: skip
            raise OutputError(f"{self.path.parent}: cannot write in this run directory "
                              f"({e.strerror or e}); {fix}") from None  # fmt: skip
        for attempt in range(3):  # holder() of another command holds it for a moment only
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt < 2:
                    time.sleep(0.05)
                    continue
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise self.busy(holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def busy(self, holder: str) -> UsageError:
        other = "" if self.resume else ", or choose another --out"
        return UsageError(f"{self.path.parent}: another ddpm train (pid {holder}) is using this "
                          f"run directory; wait for it to finish{other}")  # fmt: skip

    def holder(self) -> str | None:
        """The pid that the process holding this lock wrote, or None when none holds it (say, to
        tell a run still before its first checkpoint from a folder that is no run)."""
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)  # (a shared lock taken is dropped with the descriptor)
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
