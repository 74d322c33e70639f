"""dit-serve: OpenAI's image API (POST /v1/images/generations) over engine folders written by dit-export."""

import signal
import sys
import threading
from pathlib import Path

import click

from ditrt.runtime.cli import OneLineCommand, OneLineUsageError, report


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engines", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to bind.")
@click.option(
    "--queue-size",
    type=click.IntRange(0, 10_000),
    default=16,
    show_default=True,
    help="Requests per model that may wait beyond the running ones; more get 429 with Retry-After.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0.1, 86_400),
    default=300.0,
    show_default=True,
    help="Seconds a request may take, queue included (then 504).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Engine calls at once per model (CPU: 1 uses every core; GPU: 2 overlaps host and device work).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Images per engine call; a request with a larger n takes turns with the others.",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False),
    help="File of API keys, one per line (# comments): /v1/* then needs Authorization: Bearer <key>.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(1024, 1 << 30),
    default=1 << 20,
    show_default=True,
    help="Request body limit.",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Allow browser pages of this origin (repeatable; default none).",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(0, 3600),
    default=30.0,
    show_default=True,
    help="On SIGTERM/Ctrl-C: seconds running requests may finish before they are cancelled.",
)
@click.option(
    "--access-log", default="-", show_default=True, help="JSON-lines access log: a file, - (stderr) or off."
)
@click.option(
    "--backend", default="onnxruntime", show_default=True, help="Engine backend, as dit-run's --backend."
)
@click.option("--threads", type=int, default=None, help="CPU threads per engine (default: all cores).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the engine files at load.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(
    engines,
    host,
    port,
    queue_size,
    timeout_s,
    concurrency,
    max_batch,
    api_key_file,
    max_body_bytes,
    cors_origins,
    shutdown_timeout,
    access_log,
    backend,
    threads,
    no_verify,
    debug,
):
    """Serve the engine folders ENGINES (each FOLDER or NAME=FOLDER; the name defaults to the manifest's model)
    over HTTP: POST /v1/images/generations as OpenAI's image API, GET /v1/models, /health, /ready, /metrics,
    and a playground page at /.
    """
    try:
        import uvicorn

        from ditrt.runtime import load_manifest

        from .app import ServeOptions, build_app, load_models, parse_spec
    except ImportError as e:
        click.echo(
            f"error: dit-serve needs the serve extra ({e.name} is missing): pip install 'ditrt[serve]'",
            err=True,
        )
        sys.exit(2)
    log = None
    try:
        keys = read_keys(api_key_file) if api_key_file else ()
        log = open_log(access_log)
        if threads is not None and threads < 1:
            raise OneLineUsageError(f"--threads {threads} is not allowed; use 1 or more")
        for spec in engines:  # a missing or foreign folder is refused before the server starts
            load_manifest(parse_spec(spec)[1], verify=False)
    except click.ClickException:
        raise
    except Exception as e:
        report(e, debug)
    options = ServeOptions(
        queue_size=queue_size,
        timeout_s=timeout_s,
        api_keys=keys,
        max_body_bytes=max_body_bytes,
        cors_origins=tuple(cors_origins),
        concurrency=concurrency,
        max_batch=max_batch,
        shutdown_timeout_s=shutdown_timeout,
        access_log=log,
    )
    # the server answers at once (/health; /ready says "loading") while the folders load in a thread
    app = build_app(lambda: load_models(list(engines), backend, threads, verify=not no_verify), options)
    service = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not service.draining:  # the first signal: running requests have shutdown_timeout to finish,
                service.draining = True  # then are cancelled, each answered 503 within a step (uvicorn waits
                deadline = threading.Timer(shutdown_timeout, service.cancel_all)  # a little longer for that)
                deadline.daemon = True
                deadline.start()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:  # a stop that was asked for and done: exit 0, not re-raised
                self._captured_signals.remove(sig)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,  # ours is the JSON-lines log
        timeout_graceful_shutdown=shutdown_timeout + 5,
        lifespan="on",
    )
    server = Server(config)
    service.stop = lambda: setattr(server, "should_exit", True)
    service.on_ready = lambda: click.echo(f"dit-serve: ready: {', '.join(service.models)}", err=True)
    click.echo(f"dit-serve: loading on http://{host}:{port} (playground at /, readiness at /ready)", err=True)
    try:
        server.run()
    except SystemExit as e:  # uvicorn's own exit when it cannot start (e.g. the port is taken: it said why)
        if e.code not in (None, 0):
            sys.exit(2)
        raise
    finally:
        for pipe in service.models.values():
            pipe.close()
        if log not in (None, sys.stderr):
            log.close()
    if service.load_error is not None:
        report(service.load_error, debug)
    if not server.started:  # e.g. the port is taken: uvicorn said why
        sys.exit(2)


def read_keys(path: str) -> tuple[str, ...]:
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # a BOM is not part of a key
    except (OSError, UnicodeDecodeError) as e:
        raise OneLineUsageError(
            f"cannot read --api-key-file {path!r} ({getattr(e, 'strerror', None) or e})"
        ) from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise OneLineUsageError(f"--api-key-file {path!r} holds no keys (one per line)")
    if any(len(k) < 8 or any(c.isspace() for c in k) for k in keys):
        raise OneLineUsageError(
            f"--api-key-file {path!r}: every key needs 8 or more characters and no spaces"
        )
    return keys


def open_log(access_log: str):
    if access_log == "off":
        return None
    if access_log == "-":
        return sys.stderr
    try:
        return open(access_log, "a", encoding="utf-8")  # open for the server's life
    except OSError as e:
        raise OneLineUsageError(f"cannot open --access-log {access_log!r} ({e.strerror or e})") from None


if __name__ == "__main__":
    main()
