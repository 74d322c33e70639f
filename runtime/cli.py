"""dit-run: generate images from an engine folder written by dit-export."""

import json
import re
import signal
import sys
import time
from contextlib import contextmanager

import click

from .errors import DitError
from .schedules import SAMPLERS


@contextmanager
def signal_handlers(handlers: dict):
    """Install {signal: handler} for the block, the previous handlers afterwards (outside the main thread signals
    are not ours to handle: nothing changes). dit-run and dit-export make SIGTERM (kill, a service manager) act as
    Ctrl-C does, so that temporary files are cleaned up; while torch and onnx import, dit-export ends at once on
    either: raised inside a native extension's import, KeyboardInterrupt would abort it with a traceback."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupt(signum, frame):
    raise KeyboardInterrupt


class OneLineUsageError(click.ClickException):
    """A usage error shown as every other error of our CLIs: one `error: ...` line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class OneLineCommand(click.Command):
    """A click command whose usage errors (a bad option value, an unknown option, a missing argument, a UsageError
    raised by the command) print one line instead of click's Usage/Try/Error block, as the README promises;
    Ctrl-C is `error: interrupted`, exit 130. Used by dit-run and dit-export."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            raise OneLineUsageError(e.format_message()) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise OneLineUsageError(e.format_message()) from None
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engines", type=click.Path())
@click.option("-p", "--prompt", help="What to generate (text-conditioned models).")
@click.option(
    "-n", "--negative-prompt", help="What to steer away from (text-conditioned models; default empty)."
)
@click.option(
    "-c", "--class-label", "class_label", help="Class to generate (class-conditional models), e.g. 7."
)
@click.option(
    "--steps", type=int, default=None, help="Sampling steps (default: the model's, from the manifest)."
)
@click.option(
    "-g",
    "--guidance",
    "--cfg-scale",
    "guidance",
    type=float,
    default=None,
    help="Classifier-free guidance scale; 1 = no guidance (default: the model's).",
)
@click.option(
    "--sampler",
    default=None,
    help=f"Switch the folder's scheduler as diffusers' X.from_config(config) "
    f"does (default: the folder's): {', '.join(SAMPLERS)}. euler: flow models; ddim: epsilon/v models; "
    "dpm++*: both.",
)
@click.option(
    "--shift",
    type=float,
    default=None,
    help="Static flow shift for euler / flow dpm++ samplers (default: the folder's).",
)
@click.option(
    "--max-sequence-length",
    type=int,
    default=None,
    help="T5 tokens per prompt for SD3/Flux folders "
    "(default: the pipeline's, 256 / 512), within the range the engines were built for.",
)
@click.option(
    "-s",
    "--seed",
    type=int,
    default=-1,
    show_default=True,
    help="Seed; negative picks a random one. Image i of a batch uses seed + i.",
)
@click.option(
    "-W",
    "--width",
    type=int,
    help="Image width: the engines' size (PixArt: or a size whose resolution "
    "bin is the engines' size; the image is resized and cropped to it).",
)
@click.option("-H", "--height", type=int, help="Image height; as --width.")
@click.option(
    "-b", "--batch-size", type=int, default=1, show_default=True, help="Images to generate at once."
)
@click.option(
    "-o",
    "--output",
    default="output.png",
    show_default=True,
    help="PNG path; a batch writes NAME-0000.png, NAME-0001.png, ...",
)
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option("--no-metadata", is_flag=True, help="Leave the generation parameters out of the PNG.")
@click.option(
    "--backend",
    default="onnxruntime",
    show_default=True,
    help="Engine backend: onnxruntime; tensorrt for folders exported with --engine tensorrt; torch for "
    "folders exported with --engine aoti (needs PyTorch: pip install 'ditrt[torch]').",
)
@click.option(
    "--threads", type=int, default=None, help="CPU threads for ONNX Runtime or torch (default: all cores)."
)
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the engine files at load.")
@click.option("--json", "as_json", is_flag=True, help="Print outputs, seeds and per-stage timings as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(
    engines,
    prompt,
    negative_prompt,
    class_label,
    steps,
    guidance,
    sampler,
    shift,
    max_sequence_length,
    seed,
    width,
    height,
    batch_size,
    output,
    force,
    no_metadata,
    backend,
    threads,
    no_verify,
    as_json,
    quiet,
    debug,
):
    """Generate images with the engine folder ENGINES (written by dit-export).

    Progress goes to stderr; the written paths (or, with --json, one JSON object) go to stdout.
    Errors are one line on stderr with exit code 2.
    """
    from .outputs import output_paths
    from .pipeline import Pipeline

    try:
        with signal_handlers({signal.SIGTERM: interrupt}):  # as Ctrl-C: temporary PNGs are removed
            # ASCII digits only: str.isdigit() is also true for '²', which int() refuses
            label = (
                int(class_label) if class_label and re.fullmatch(r"-?[0-9]+", class_label) else class_label
            )
            output_paths(
                output, batch_size if batch_size >= 1 else 1, force
            )  # fail before the work, not after
            with Pipeline.load(engines, backend=backend, verify=not no_verify, threads=threads) as pipe:
                show = not (quiet or as_json) and sys.stderr.isatty()
                with (
                    click.progressbar(
                        length=steps or pipe.manifest.scheduler.default_steps,
                        label="denoising",
                        file=sys.stderr,
                    )
                    if show
                    else _NoBar() as bar
                ):
                    result = pipe(
                        prompt=prompt,
                        negative_prompt=negative_prompt,
                        class_label=label,
                        steps=steps,
                        guidance=guidance,
                        seed=seed,
                        batch_size=batch_size,
                        width=width,
                        height=height,
                        sampler=sampler,
                        shift=shift,
                        max_sequence_length=max_sequence_length,
                        on_step=lambda i, n: bar.update(1),
                    )
                start = time.perf_counter()
                paths = result.save(output, overwrite=force, metadata=not no_metadata)
                timings = dict(result.timings_ms, png_encode=(time.perf_counter() - start) * 1e3)
    except Exception as e:
        report(e, debug)
    m = pipe.manifest
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "outputs": [str(p) for p in paths],
                    "seeds": result.seeds,
                    "model": m.model,
                    "family": m.family,
                    "backend": backend,
                    "steps": steps or m.scheduler.default_steps,
                    "guidance": m.scheduler.default_guidance if guidance is None else guidance,
                    "sampler": pipe.scheduler_config(sampler, shift)["_class_name"],
                    "size": list(pipe.image_size),
                    "warnings": list(result.warnings),
                    "timings_ms": {k: round(v, 3) for k, v in timings.items()},
                }
            )
        )
    else:
        if not quiet:
            click.echo(f"seed {result.seeds[0]}, {timings['total']:.0f} ms", err=True)
        for p in paths:
            click.echo(str(p))


def report(e: Exception, debug: bool) -> None:
    """Every CLI failure as one line on stderr: exit 2 for a project error (bad input, damaged folder...), 1 for
    anything else (a bug or the environment); --debug re-raises for the traceback."""
    if debug:
        raise e
    if isinstance(e, DitError):
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    click.echo(
        f"error: internal error ({type(e).__name__}: {first}); rerun with --debug for the traceback", err=True
    )
    sys.exit(1)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass
