"""Helpers shared by commands: building the workspace and printing rows."""
from __future__ import annotations

import csv
import io
import json
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import click

from mammo_retrieval.core.csv_safety import neutralise_row


def workspace(ctx: click.Context):
    from mammo_retrieval.app.workspace import Workspace
    return Workspace(ctx.obj)


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def format_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(neutralise_row(r) for r in rows)  # header fields must not run as spreadsheet formulas
    return buf.getvalue().rstrip("\n")


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


@contextmanager
def progress_bar(unit: str, *, disable: bool, desc: str | None = None) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on stderr, fed by a library's ``on_progress(done, total)`` callback; closed however the
    command ends."""
    from tqdm import tqdm
    bar = tqdm(total=0, unit=unit, desc=desc, disable=disable, file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


class StepProgress:
    """Renders a library ``on_progress(step, done, total)`` callback on stderr.

    A tqdm bar per step on a terminal; elsewhere (logs, CI, pipes) one plain line when a step starts, so
    a long ``qc`` or ``evaluate`` is never silent and never fills a log with carriage returns.
    """

    def __init__(self, command: str, enabled: bool = True) -> None:
        import sys
        self.command, self.enabled = command, enabled
        self.stream = sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.step: str | None = None
        self.bar = None

    def __call__(self, step: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if step != self.step:
            self.close()
            self.step = step
            if self.tty and total > 1:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=f"{self.command}: {step}", file=self.stream, leave=False)
            else:
                click.echo(f"{self.command}: {step}...", err=True)
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


no_progress_option = click.option("--no-progress", is_flag=True, help="No progress on stderr.")


# How the CLI names the operations that library errors suggest (errors.Remedy.action)
COMMANDS = {
    "ingest": "mretrieve ingest ARCHIVE_DIR",
    "index_rebuild": "mretrieve index rebuild",
    "index_rebuild_force": "mretrieve index rebuild --force",
    "db_upgrade": "mretrieve db upgrade",
    "status": "mretrieve status",
    "rollback": "mretrieve reindex --rollback",
    "reindex": "mretrieve reindex --model CKPT",
    "qc": "mretrieve qc",
    "export": "mretrieve export --out DIR",
}


def render_error(exc) -> str:
    """``error: message`` and one ``hint:`` line per remedy, with the command that applies it."""
    lines = [f"error: {exc.message}"]
    for remedy in exc.remedies:
        command = COMMANDS.get(remedy.action or "")
        lines.append(f"  hint: {remedy.text}" + (f": run `{command}`" if command else ""))
    return "\n".join(lines)


def kos_file_name(study_instance_uid: str) -> str:
    """``kos-<StudyInstanceUID>.dcm``; a UID that is not a plain one (ingest keeps "1.2/../x") is named by its
    SHA-256 instead, so that it never becomes a path."""
    import hashlib

    from mammo_retrieval.dicom.header import plain_uid
    if plain_uid(study_instance_uid):
        return f"kos-{study_instance_uid}.dcm"
    return f"kos-uid-sha256-{hashlib.sha256(study_instance_uid.encode()).hexdigest()[:32]}.dcm"


def write_or_send_kos(documents, path: str | None, stow_url: str | None, ws, *, folder: bool) -> None:
    """Write Key Object Selection documents (one to a file, or each to ``kos_file_name`` in a folder)
    and/or STOW them; says where on stderr, so that --format json stays clean."""
    from pathlib import Path

    from mammo_retrieval.core.fileio import write_atomic
    if path:
        target = Path(path)
        if folder:
            target.mkdir(parents=True, exist_ok=True)
        for document in documents[:1] if not folder else documents:
            out = target / kos_file_name(document.StudyInstanceUID) if folder else target
            write_atomic(out, lambda fh, d=document: d.save_as(fh, enforce_file_format=True))
            click.echo(f"kos: {out}", err=True)
    if stow_url:
        ws.stow(stow_url, documents)
        click.echo(f"kos: {len(documents)} document(s) stored at {stow_url} by STOW-RS", err=True)
