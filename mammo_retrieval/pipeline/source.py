"""Find candidate files: any name, any depth, with or without .dcm.

Two things are kept apart from the candidates, so that neither hides nor pollutes the rejections:
- files whose extension says they are plainly not DICOM (``labels.csv``, ``LICENCE.txt``, a database and
  its ``-wal``/``-shm``) are skipped unread and only counted: listing them as rejections was noise;
- a folder that cannot be listed (no read permission, I/O error) becomes a :class:`WalkError`, which the
  runner records as a rejection: ``os.walk`` would otherwise skip it without a word.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mammo_retrieval.core.errors import NotFoundError, RejectionCode

SKIP_NAMES = {"DICOMDIR"}  # a directory record, not an image
# Extensions that are never a DICOM image in an archive. Deliberately short: DICOM files often carry no
# extension or a UID-like one ("...1268071029.320"), which none of these match.
NOT_DICOM_SUFFIXES = frozenset({
    ".csv", ".tsv", ".txt", ".md", ".json", ".yaml", ".yml", ".html", ".htm", ".xml", ".pdf",
    ".png", ".jpg", ".jpeg", ".gif", ".py", ".db", ".sqlite", ".sqlite3", ".zip", ".gz",
})
NOT_DICOM_ENDINGS = ("-wal", "-shm", "-journal")  # SQLite's side files, e.g. mretrieve.db-wal
UNREADABLE_FOLDER = RejectionCode.UNREADABLE_FOLDER.value


@dataclass(frozen=True)
class WalkError:
    """A folder the walk could not list; recorded as a rejection with this code and reason."""

    path: str
    reason: str
    code: str = UNREADABLE_FOLDER


@dataclass
class Walk:
    files: list[Path] = field(default_factory=list)    # candidates for the reader, in sorted order
    skipped: list[Path] = field(default_factory=list)  # plainly not DICOM by extension, never read
    errors: list[WalkError] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)  # folders listed without error


def plainly_not_dicom(name: str) -> bool:
    """True for a file name whose extension marks it as a sidecar (see ``NOT_DICOM_SUFFIXES``)."""
    lower = name.lower()
    return os.path.splitext(lower)[1] in NOT_DICOM_SUFFIXES or lower.endswith(NOT_DICOM_ENDINGS)


def absolute_root(root: str | os.PathLike) -> Path:
    """The archive root as an absolute path, so stored paths work from any working directory.

    ``..`` is folded lexically only when that names the same folder (it would not after a symlinked
    parent); symlinks themselves are kept, never resolved: archives are often linked in from elsewhere.
    """
    plain = Path(root).absolute()
    tidy = Path(os.path.normpath(plain))
    try:
        return tidy if tidy == plain or os.path.samefile(tidy, plain) else plain
    except OSError:
        return plain


def walk(root: str | os.PathLike, exclude: tuple[Path, ...] = ()) -> Walk:
    """Every regular file under root (or root itself), sorted; symlinked folders are not followed.

    ``exclude`` holds folders (the index and cache) and files (the home's own database) to leave out
    entirely: they are this tool's state, neither skipped nor rejected.
    """
    root = Path(root)
    found = Walk()
    excluded = {p.resolve() for p in exclude}
    excluded_names = {p.name for p in excluded}  # resolve a file only when its name could match

    def add(path: Path) -> None:
        if path.name in SKIP_NAMES or path.name.startswith("."):
            return
        if path.name in excluded_names and path.resolve() in excluded:
            return
        (found.skipped if plainly_not_dicom(path.name) else found.files).append(path)

    if root.is_file():
        add(root)
        return found

    def unreadable(exc: OSError) -> None:
        found.errors.append(WalkError(str(exc.filename or root), f"cannot list this folder: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        found.folders.append(here)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() not in excluded)
        for name in sorted(filenames):
            path = here / name
            if path.is_file():
                add(path)
    return found


def state_paths(database_url: str, index_dir: Path, cache_dir: Path) -> tuple[Path, ...]:
    """The home's own state, never part of an archive: index and cache folders, and the SQLite database
    with its side files (a home inside the archive folder would otherwise list them as rejections)."""
    from sqlalchemy.engine import make_url
    paths = [Path(index_dir), Path(cache_dir)]
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        db = Path(url.database)
        paths += [db, *(db.with_name(db.name + end) for end in ("-wal", "-shm", "-journal"))]
    return tuple(paths)


def nothing_to_ingest(root: Path, found: Walk) -> NotFoundError:
    """An archive without a single candidate file is a mistake (wrong folder, unmounted share), not a success."""
    details = []
    if found.skipped:
        details.append(f"{len(found.skipped)} file(s) skipped as not DICOM by extension")
    if found.errors:
        details.append(f"{len(found.errors)} folder(s) unreadable, e.g. {found.errors[0].path}: "
                       f"{found.errors[0].reason}")
    return NotFoundError(f"no file to ingest under {root}" + (f" ({'; '.join(details)})" if details else ""),
                         hint="check the folder (is the share mounted?); files named "
                              "*.csv, *.txt, *.png, ... are skipped by extension")
