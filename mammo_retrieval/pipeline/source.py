"""Find candidate files: any name, any depth, with or without .dcm.

Two things are kept apart from the candidates, so that neither hides nor pollutes the rejections:
- files whose extension says they are plainly not DICOM (``labels.csv``, ``LICENCE.txt``, a database and
  its ``-wal``/``-shm``) are skipped unread and only counted: listing them as rejections was noise;
- a folder that cannot be listed (no read permission, I/O error) becomes a :class:`WalkError`, which the
  runner records as a rejection: ``os.walk`` would otherwise skip it without a word; so does a symbolic
  link to nothing or to itself (``broken_link``), which would otherwise vanish as "not a file".

Symlinked folders are followed (archives are often assembled from links), each real folder walked once,
known by its (device, inode): a link back to a parent, or two links to one folder, cannot loop or double.
Paths stay as reached, never resolved.
"""
from __future__ import annotations

import logging
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
BROKEN_LINK = RejectionCode.BROKEN_LINK.value

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WalkError:
    """A folder the walk could not list, or a broken link; recorded as a rejection with this code and reason."""

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


def _resolved(path: Path) -> Path | None:
    """The real path, or None for a link loop (``Path.resolve`` raises RuntimeError for one)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def broken_link(path: Path) -> WalkError:
    """A symbolic link that leads to nothing (its target is gone) or to itself (a loop), named with its target."""
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return WalkError(str(path), f"broken or looping symbolic link{target}", BROKEN_LINK)


def walk(root: str | os.PathLike, exclude: tuple[Path, ...] = ()) -> Walk:
    """Every regular file under root (or root itself), sorted. Symlinked folders are followed, each real
    folder once (see the module's docstring); broken or looping links are errors, not silence.

    ``exclude`` holds folders (the index and cache) and files (the home's own database) to leave out
    entirely: they are this tool's state, neither skipped nor rejected.
    """
    root = Path(root)
    found = Walk()
    excluded = {p.resolve() for p in exclude}
    excluded_names = {p.name for p in excluded}  # resolve a file only when its name could match

    def add(path: Path, *, broken: bool = False) -> None:
        if path.name in SKIP_NAMES or path.name.startswith("."):
            return
        if path.name in excluded_names and _resolved(path) in excluded:
            return
        if plainly_not_dicom(path.name):
            found.skipped.append(path)  # a sidecar, even a dangling link to one: never read either way
        elif broken:
            found.errors.append(broken_link(path))
        else:
            found.files.append(path)

    if root.is_file() or (root.is_symlink() and not root.exists()):
        add(root, broken=not root.is_file())
        return found

    walked: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every real folder claimed for the walk

    def first_visit(folder: Path) -> bool:
        """Claim a folder; False when its real folder is claimed already (a second link, a loop)."""
        try:
            st = os.stat(folder)
        except OSError:
            return True  # let os.walk try to list it and report why it cannot
        key = (st.st_dev, st.st_ino)
        if key in walked:
            return False
        walked.add(key)
        return True

    def unreadable(exc: OSError) -> None:
        found.errors.append(WalkError(str(exc.filename or root), f"cannot list this folder: {exc.strerror or exc}"))

    first_visit(root)
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        here = Path(dirpath)
        found.folders.append(here)
        keep = []
        # a folder's own subfolders claim before links to folders, so a folder both linked and present
        # keeps its plain path; a claim is made on sight, so the shallowest path to a folder wins
        for name in sorted(dirnames, key=lambda d: (os.path.islink(here / d), d)):
            folder = here / name
            if _resolved(folder) in excluded:
                continue
            if first_visit(folder):
                keep.append(name)
            else:
                logger.info("not walked twice: %s leads to a folder already walked", folder)
        dirnames[:] = sorted(keep)
        for name in sorted(filenames):
            path = here / name
            if path.is_file():
                add(path)
            elif path.is_symlink() and not path.exists():  # is_file() is False for both; exists() hides ELOOP
                add(path, broken=True)
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
    folders = [e for e in found.errors if e.code == UNREADABLE_FOLDER]
    links = [e for e in found.errors if e.code == BROKEN_LINK]
    for errors, what in ((folders, "folder(s) unreadable"), (links, "broken or looping link(s)")):
        if errors:
            details.append(f"{len(errors)} {what}, e.g. {errors[0].path}: {errors[0].reason}")
    return NotFoundError(f"no file to ingest under {root}" + (f" ({'; '.join(details)})" if details else ""),
                         hint="check the folder (is the share mounted?); files named "
                              "*.csv, *.txt, *.png, ... are skipped by extension")
