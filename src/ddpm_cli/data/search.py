"""Which files under a data folder are images, and their classes: a recursive search that
follows links (not in loops), skips hidden files and says what it could not search; the class
of each image (its first-level subfolder); a fingerprint of the folder's names and sizes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ddpm_cli.errors import DataError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def scan(folder: Path, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order. Hidden files and folders
    are skipped; links to files and folders are followed, except a link back to a folder above
    it. What could not be searched (a folder that cannot be listed, a link to nothing, a loop)
    is added to `skipped` as (path, reason), beside the files that fail to decode."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such directory")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory; give a folder of images")
    found, problems = [], []
    top = folder.stat()
    stack = [(folder, frozenset({(top.st_dev, top.st_ino)}))]  # each folder with those above it
    while stack:
        here, above = stack.pop()
        try:
            entries = list(os.scandir(here))
        except OSError as e:
            why = e.strerror or str(e)
            if here == folder:
                raise DataError(f"{folder}: cannot list this folder ({why})") from None
            problems.append((str(here), f"{here}: cannot list this folder ({why}): any images "
                             "in it are left out"))  # fmt: skip
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = here / entry.name
            try:
                if entry.is_dir():
                    st = entry.stat()
                    if (st.st_dev, st.st_ino) in above:
                        problems.append((str(path), f"{path}: a link back to a folder above it, "
                                         "not followed"))  # fmt: skip
                    else:
                        stack.append((path, above | {(st.st_dev, st.st_ino)}))
                elif path.suffix.lower() in EXTENSIONS:
                    if entry.is_file():
                        found.append(path)
                    elif entry.is_symlink() and not path.exists():
                        problems.append((str(path), f"{path}: a link to a file that is not there"))
            except OSError as e:
                problems.append((str(path), f"{path}: cannot read ({e.strerror or e})"))
    if skipped is not None:
        skipped.extend(sorted(problems))
    return sorted(found)


def class_labels(folder: Path, paths: list[Path]) -> tuple[list[int], list[str]] | None:
    """Each image's class (the index of its first-level subfolder among the sorted names) and
    the class names; None unless every image sits in one of two or more subfolders."""
    firsts = []
    for p in paths:
        parts = p.relative_to(folder).parts
        if len(parts) < 2:
            return None
        firsts.append(parts[0])
    names = sorted(set(firsts))
    if len(names) < 2:
        return None
    index = {n: i for i, n in enumerate(names)}
    return [index[f] for f in firsts], names


def loose_beside_classes(folder: Path, paths: list[Path]) -> list[Path]:
    """The images directly in `folder` when the rest sit in two or more subfolders: the files
    that keep a folder of class subfolders from training a class-conditional model."""
    loose = [p for p in paths if p.parent == folder]
    subfolders = {p.relative_to(folder).parts[0] for p in paths if p.parent != folder}
    return loose if len(subfolders) >= 2 else []


def fingerprint(folder: Path, paths: list[Path]) -> str:
    """A hash of the relative names and sizes of `paths`: it changes when files are added,
    removed, renamed or rewritten with another size. Names are hashed as the file system's bytes
    (os.fsencode), so a name that is not valid UTF-8 hashes too, and a UTF-8 one as before."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fsencode(f"{p.relative_to(folder).as_posix()}\0{p.stat().st_size}\n"))
    return h.hexdigest()[:16]
