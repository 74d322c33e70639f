"""dit-export: build engine folders from built-in models.

Nothing heavy is imported at module level: --help and --list answer at once, also where the export extra (torch)
is not installed; the export itself says which extra to install.
"""

import os
import shlex
import signal
import sys
from pathlib import Path

import click

from ditrt.runtime.cli import OneLineCommand, interrupt, report, signal_handlers
from ditrt.runtime.errors import BackendUnavailable

from .catalog import MODELS

EXPORT_EXTRA = ("torch", "onnx", "onnxscript", "safetensors", "transformers")  # pyproject's [export] packages


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option(
    "-o", "--output", "output", type=click.Path(), help="Engine folder to write (default: engines/MODEL)."
)
@click.option(
    "--lowering",
    type=click.Choice(["portable", "plugin"]),
    default="portable",
    show_default=True,
    help="Custom ops as standard ONNX (runs on ONNX Runtime) or as TensorRT plugin nodes.",
)
@click.option(
    "--engine",
    type=click.Choice(["onnx", "tensorrt", "aoti"]),
    default="onnx",
    show_default=True,
    help="onnx: ONNX engines (ONNX Runtime). tensorrt: also a TensorRT engine (.plan) per component, from the "
    "plugin lowering (needs TensorRT and an NVIDIA GPU). aoti: AOTInductor packages (.pt2) instead of ONNX, "
    "run with `dit-run --backend torch`. Plans and packages run only on the GPU model (or CPU type) and "
    "versions that built them.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="With --engine aoti: the device to compile for (default: a visible GPU, else the CPU).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp32",
    show_default=True,
    help="Compute precision. fp16/bf16 keep norm statistics, softmax, timestep and RoPE tables in fp32 "
    "and engine inputs/outputs in fp32; T5 stays fp32, the VAE and Gemma-2 run fp32 under fp16. "
    "ONNX Runtime on CPU runs fp32 and fp16 engines, not bf16.",
)
@click.option(
    "--opset", type=click.IntRange(17, 23), default=None, help="ONNX opset (default 18; 22 for bf16)."
)
@click.option(
    "--random-weights",
    is_flag=True,
    help="Build a built-in architecture with seeded random weights (benchmarks); recorded in the manifest.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    default=0,
    show_default=True,
    help="Seed for --random-weights.",
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Store weights beside the .onnx file (default: when they exceed 256 MiB).",
)
@click.option(
    "-H",
    "--height",
    type=click.IntRange(min=1),
    help="Image height the engines are built for (pipeline folders; default: the model's native size).",
)
@click.option("-W", "--width", type=click.IntRange(min=1), help="Image width the engines are built for.")
@click.option(
    "--variant",
    help="Weights variant of a diffusers folder, as diffusers' variant= (e.g. fp16: "
    "*.fp16.safetensors); components without it use their plain weights. Default: the plain weights, or a "
    "component's only variant.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace the output folder if it is an engine folder (or empty); "
    "anything else there is refused, never deleted.",
)
@click.option("--list", "list_models", is_flag=True, help="List the built-in models and exit.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(
    model,
    output,
    lowering,
    engine,
    device,
    precision,
    opset,
    random_weights,
    seed,
    external_data,
    height,
    width,
    variant,
    force,
    list_models,
    debug,
):
    """Export MODEL to an engine folder: ONNX engines (text encoder, denoiser step, VAE decoder), tokenizer
    files and manifest.json.

    MODEL is a built-in name (see --list) or a diffusers folder: a pipeline folder (with
    model_index.json and transformer/) or a transformer folder (config.json + safetensors).
    The folder is written to a temporary location and renamed when complete, so a failed
    export leaves nothing behind. Run it with `dit-run FOLDER`.
    """
    if list_models:
        for name, description in MODELS.items():
            click.echo(f"{name:<18} {description}")
        return
    if not model:
        raise click.UsageError("missing MODEL; see `dit-export --list` for the built-in models")
    if (
        engine == "tensorrt"
        and click.get_current_context().get_parameter_source("lowering").name == "DEFAULT"
    ):
        lowering = "plugin"  # TensorRT engines are built from the plugin lowering
    default_output = f"engines/{Path(model).resolve().name}"  # resolved: `dit-export .` names the folder
    if output == "":
        raise click.BadParameter(
            "must not be empty; leave --output out for engines/MODEL", param_hint="'--output'"
        )
    output = output or default_output
    command = shlex.join(["dit-export", *sys.argv[1:]])
    manifest = run_export(
        model,
        output,
        debug,
        random_weights=random_weights,
        seed=seed,
        lowering=lowering,
        opset=opset,
        external_data=external_data,
        height=height,
        width=width,
        force=force,
        make_parent=output == default_output,
        command=command,
        engine=engine,
        device=device,
        precision=precision,
        variant=variant,
    )
    size = sum(f.bytes for f in manifest.files.values())
    click.echo(
        f"wrote {output} ({manifest.model}, {len(manifest.files)} file(s), {size / 1e6:.1f} MB)", err=True
    )
    click.echo(output)


def run_export(model: str, output: str, debug: bool, **options):
    """export_model with every failure as one line: errors as report() prints them, a missing export extra by
    name, Ctrl-C and SIGTERM (after the staging folder is cleaned up) as `interrupted`, exit 130."""
    try:
        with signal_handlers(
            {signal.SIGINT: _exit_at_once, signal.SIGTERM: _exit_at_once}
        ):  # nothing written yet
            require_export_extra()
            from transformers.utils import logging as transformers_logging

            from .exporter import export_model
            from .presets import get_preset
        with signal_handlers({signal.SIGTERM: interrupt}):  # the staging folder is cleaned up as on Ctrl-C
            transformers_logging.disable_progress_bar()  # its weight-loading bars are not ours to show
            if not Path(model).exists():
                get_preset(model)  # fail on a bad name before the slow part
            return export_model(model, output, **options)
    except KeyboardInterrupt:
        if debug:
            raise
        click.echo("error: interrupted; nothing was written", err=True)
        sys.exit(130)
    except Exception as e:
        report(e, debug)


def require_export_extra() -> None:
    """Import the export extra's packages, or say in one line which extra to install (a runtime-only install)."""
    import importlib

    for name in EXPORT_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing = getattr(e, "name", None) or name
            raise BackendUnavailable(
                f"dit-export needs the export extra: pip install 'ditrt[export]' (missing module: {missing})"
            ) from None


def _exit_at_once(signum, frame):
    os.write(2, b"error: interrupted; nothing was written\n")
    os._exit(130)  # nothing is written yet, so nothing needs cleaning up
