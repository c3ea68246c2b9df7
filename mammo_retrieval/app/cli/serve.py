from __future__ import annotations

import click

from mammo_retrieval.app.cli._common import workspace


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback requires a token.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="File whose first line is the access token (else $MRETRIEVE_TOKEN).")
@click.option("--max-upload-mb", default=512, show_default=True, type=click.IntRange(1, 8192),
              help="Largest DICOM upload accepted.")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, token_file: str | None, max_upload_mb: int) -> None:
    """Serve the search API and the review pages (/ and /qc), warm, until interrupted."""
    from mammo_retrieval.app.http.api import create_app
    from mammo_retrieval.app.http.server import check_bind, resolve_token, run
    token = resolve_token(token_file)
    check_bind(host, token)
    app = create_app(workspace(ctx), token=token, max_upload=max_upload_mb * 1024 * 1024)

    def listening(url: str) -> None:
        note = " (open it once with ?token=<your token>)" if token else ""
        click.echo(f"mretrieve serving on {url}{note}; API docs at {url}docs; Ctrl+C stops", err=False)
    run(app, host, port, on_listening=listening)
