"""Which files under a data folder are images, and their classes: a recursive search that
follows links (each folder once), skips hidden files and says what it could not enter; the class
of each image (its first-level subfolder); a fingerprint of the folder's names and sizes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ddpm_cli.errors import DataError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def unreadable(path: Path, error: OSError) -> str:
    """The reason a file or folder that is there could not be read (gone since, or not ours
    to read)."""
    return f"{path}: cannot read ({error.strerror or error})"


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def scan(folder: Path, unsearched: list[tuple[str, str]] | None = None) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order. Hidden files and folders are
    skipped. Links to files are followed; so are links to folders, after every real folder and
    each folder once: a link to a folder already searched (a loop, a second name for a class)
    adds nothing. What the search could not enter, or entered elsewhere (a folder it cannot
    list, a link to nothing, a link to a folder already searched), is added to `unsearched` as
    (path, reason)."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such directory")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory; give a folder of images")
    found, problems = [], []
    seen = {_identity(folder.stat()): folder}  # each folder searched, by the name it was found
    real, links = [folder], []  # folders to search; links to folders, searched after them
    while real or links:
        if real:
            here = real.pop()
        else:
            # the shallowest name wins, then the first in sorted order: a class folder's own
            links.sort(key=lambda link: (len(link[0].parts), str(link[0])), reverse=True)
            here, key = links.pop()
            if key in seen:
                problems.append((str(here), f"{here}: a link to {seen[key]}, searched once, "
                                 "under that name"))  # fmt: skip
                continue
            seen[key] = here
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
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
            image = path.suffix.lower() in EXTENSIONS
            try:
                if entry.is_dir(follow_symlinks=False):
                    key = _identity(entry.stat(follow_symlinks=False))
                    if key in seen:  # reached again through a link above it, or a bind mount
                        problems.append((str(path), f"{path}: the same folder as {seen[key]} "
                                         "(reached again through a link or a mount), searched "
                                         "once, under that name"))  # fmt: skip
                    else:
                        seen[key] = path
                        real.append(path)
                elif entry.is_symlink() and entry.is_dir():
                    links.append((path, _identity(entry.stat())))
                elif image and entry.is_file():
                    found.append(path)
                elif entry.is_symlink() and not os.path.exists(path) and (image or not path.suffix):
                    problems.append((str(path), f"{path}: a link to nothing (is a drive or a "
                                     "folder missing?)"))  # fmt: skip
            except OSError as e:
                problems.append((str(path), unreadable(path, e)))
    if unsearched is not None:
        unsearched.extend(sorted(problems))
    return sorted(found)


def images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder` (not below it), hidden ones (a Mac's ._photo.png)
    skipped as the search skips them, in sorted order."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and p.is_file())


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
