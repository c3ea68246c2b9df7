from __future__ import annotations

import signal
import threading

import click

from mammo_retrieval.app.cli._common import workspace


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback requires --allow.")
@click.option("--port", default=11112, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--ae-title", default=None, help="Our AE title (default: pacs.listen_ae_title, MRETRIEVE).")
@click.option("--allow", "allowed", multiple=True, metavar="AE",
              help="Only these calling AE titles may send (repeatable); default: any.")
@click.option("--batch-images", type=click.IntRange(1, 4096), default=None,
              help="Index a batch at this many images (default: pacs.listen_batch_images).")
@click.option("--batch-seconds", type=click.FloatRange(0, 3600), default=None,
              help="...or this long after its first image (default: pacs.listen_batch_seconds).")
@click.pass_context
def listen(ctx: click.Context, host: str, port: int, ae_title: str | None, allowed: tuple[str, ...],
           batch_images: int | None, batch_seconds: float | None) -> None:
    """Receive mammograms by DICOM C-STORE and index them as they arrive, until interrupted.

    Each instance is validated as ingest does: one that ingest would reject gets a failure status with
    the reason, and is recorded. Accepted files are written to the spool (pacs.spool_dir) before the
    success status is sent, and kept there as their stored path; on start, the spool is ingested first,
    so a crash before indexing loses nothing. C-ECHO is answered.
    """
    ws = workspace(ctx)
    listener = ws.listener(host=host, port=port, ae_title=ae_title, allowed=allowed, batch_images=batch_images,
                           batch_seconds=batch_seconds)
    listener.check_address()  # options and address first: a large spool takes a while to recover
    recovered = ws.recover_spool()
    if recovered is not None:
        click.echo(f"spool: indexed {recovered.ingested} received earlier, {recovered.already_present} already "
                   f"indexed, {len(recovered.rejected)} rejected")
    ws.encoder  # loaded before the first association, not during it
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    listener.start()
    s = listener.settings
    click.echo(f"mretrieve listening for C-STORE on {s.host}:{listener.port} as {s.ae_title}"
               + (f", from {', '.join(s.allowed)} only" if s.allowed else "") + "; Ctrl+C stops")
    try:
        stop.wait()
    finally:
        listener.stop()
        click.echo(f"stopped: received {listener.handler.received}, refused {listener.handler.refused}, "
                   f"indexed {listener.batcher.indexed}, pending {listener.batcher.pending()} (kept in the spool)")
