"""dit-export: build engine folders from built-in models."""

import shlex
import sys

import click

from ditrt.runtime.errors import DitError

from .presets import BUILTINS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("-o", "--output", "output", type=click.Path(), help="Engine folder to write (default: engines/MODEL).")
@click.option("--lowering", type=click.Choice(["portable", "plugin"]), default="portable", show_default=True,
              help="Custom ops as standard ONNX (runs on ONNX Runtime) or as TensorRT plugin nodes.")
@click.option("--opset", type=click.IntRange(17, 23), default=None, help="ONNX opset (default 18).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--list", "list_models", is_flag=True, help="List the built-in models and exit.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(model, output, lowering, opset, force, list_models, debug):
    """Export MODEL (a built-in model name) to an engine folder: ONNX files + manifest.json.

    The folder is written to a temporary location and renamed when complete, so a failed
    export leaves nothing behind. Run it with `dit-run FOLDER`.
    """
    if list_models:
        for b in BUILTINS.values():
            click.echo(f"{b.name:<12} {b.description}")
        return
    if not model:
        raise click.UsageError("missing MODEL; see `dit-export --list` for the built-in models")
    output = output or f"engines/{model}"
    try:
        from pathlib import Path

        from .folder import export_builtin
        from .presets import get_builtin

        get_builtin(model)  # fail on a bad name before touching the disk
        if output.startswith("engines/"):
            Path("engines").mkdir(exist_ok=True)
        command = shlex.join(["dit-export", *sys.argv[1:]])
        manifest = export_builtin(model, output, lowering, opset, force, command)
    except DitError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    size = sum(f.bytes for f in manifest.files.values())
    click.echo(f"wrote {output} ({manifest.model}, {len(manifest.files)} file(s), {size / 1e6:.1f} MB)", err=True)
    click.echo(output)
