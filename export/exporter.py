"""export_model: a built-in model or a diffusers folder -> an engine folder, in three steps:
source.py (what the folder holds), build.py (modules, graphs, ONNX) and folder.py (staging, hashing, atomic rename)."""

import os
from dataclasses import dataclass

from ditrt.runtime.errors import InputError
from ditrt.runtime.manifest import Latent, Manifest

from . import aoti
from .build import build, export_component, export_opset
from .folder import check_output, file_entries, staging_folder, write_manifest
from .source import Source, resolve_source
from .text_encoders import save_tokenizer
from .trt.build import check_engine, engine_components


@dataclass(frozen=True)
class ExportOptions:
    """How to export (dit-export's options)."""

    random_weights: bool = False  # built-in architectures: seeded random weights, recorded in the manifest
    seed: int = 0  # for random_weights
    variant: str | None = None  # diffusers' weights variant (e.g. "fp16") of a folder's components
    precision: str = "fp32"  # fp32, fp16, bf16 (see precision.POLICY)
    height: int | None = None  # image size in pixels the engines are built for (default: the model's)
    width: int | None = None
    lowering: str = "portable"  # custom ops as standard ONNX, or as TensorRT plugin nodes ("plugin")
    engine: str = "onnx"  # "tensorrt": also build .plan files; "aoti": AOTInductor packages instead of ONNX
    device: str | None = None  # "aoti": the device to compile for (default: a visible GPU, else the CPU)
    opset: int | None = None  # default: onnx_export.DEFAULT_OPSET (22 for bf16)
    external_data: bool | None = None  # None: weights beside the .onnx file above 256 MiB
    force: bool = False  # replace an existing engine folder (never anything else)
    make_parent: bool = False  # create the output's missing parent folders
    command: str = ""  # the command line, for the manifest's record


def export_model(
    source: str, out: str | os.PathLike, options: ExportOptions | None = None, **fields
) -> Manifest:
    """Export a built-in model or a diffusers folder (denoiser step graph, and text encoder and VAE decoder where
    there are) as an engine folder at `out`, atomically; return its manifest (engine "tensorrt": .plan files).
    Options come as an ExportOptions or as its fields by keyword."""
    opts = _options(options, fields)
    opset = export_opset(opts.lowering, opts.precision, opts.opset)
    check_engine(opts.engine, opts.lowering)  # e.g. TensorRT missing: say so before the slow export
    device = aoti.check_device(opts.device) if opts.engine == "aoti" else None
    if opts.device is not None and opts.engine != "aoti":
        raise InputError(
            "--device applies to --engine aoti only (ONNX engines choose their device at run time)"
        )
    check_output(out, opts.force, opts.make_parent)  # before the (slow) export, not after it
    info = provenance(opset)
    src = resolve_source(source, opts.random_weights, opts.seed, opts.variant, opts.precision)
    engines = build(src, opts.precision, opts.height, opts.width)
    with staging_folder(out, opts.force, opts.make_parent) as tmp:
        if device is not None:
            components = {g.name: aoti.export_component(g, tmp, device) for g in engines.graphs}
        else:
            components = {
                g.name: export_component(g, tmp, opts.lowering, opset, opts.external_data)
                for g in engines.graphs
            }
        for sub, tokenizer, _ in src.text.tokenizers if src.text is not None else ():
            save_tokenizer(tokenizer, tmp / sub)
        components = engine_components(opts.engine, tmp, components)
        record = {
            "command": opts.command,
            "source": source,
            "seed": opts.seed if opts.random_weights else None,
            "text_len": src.text_len,
            "variant": opts.variant,
            "notes": src.notes,
            "training": src.training,
            "precision": engines.precision,
            **info,
        }
        manifest = Manifest(
            model=src.name,
            family=src.family.name,
            conditioning="class" if src.family.class_conditional else "text",
            class_names=list(src.class_names),
            random_weights=opts.random_weights,
            resolution_bins=resolution_bins(src),
            latent=latent(src, engines.latent_hw),
            scheduler=engines.scheduler,
            null_class=engines.null_class,
            components=components,
            files=file_entries(tmp),
            text=[spec for *_, spec in src.text.tokenizers] if src.text is not None else [],
            export=record,
        )
        write_manifest(tmp, manifest)
    return manifest


def _options(options: ExportOptions | None, fields: dict) -> ExportOptions:
    if options is not None and fields:
        raise TypeError("give export_model an ExportOptions or its fields by keyword, not both")
    try:
        return options or ExportOptions(**fields)
    except TypeError as e:  # an unknown keyword
        raise TypeError(
            f"export_model: {e}; options: {', '.join(ExportOptions.__dataclass_fields__)}"
        ) from None


def latent(src: Source, latent_hw: tuple[int, int]) -> Latent:
    """The manifest's latent: unpacked channels and size, with the VAE's scaling (identity without a VAE)."""
    k = src.family.packing
    vae = src.vae.cfg if src.vae is not None else None
    return Latent(
        src.model.cfg.in_channels // k**2,
        latent_hw[0],
        latent_hw[1],
        vae.scaling_factor if vae else 1.0,
        vae.shift_factor if vae else 0.0,
        k,
    )


def resolution_bins(src: Source) -> dict[str, list[int]]:
    """The resolution bins the engines honour, where the family's pipeline bins sizes (PixArt), else {}."""
    if src.family.resolution_bins is None:
        return {}
    return {r: list(hw) for r, hw in src.family.resolution_bins(src.model.cfg, src.vae).items()}


def provenance(opset: int) -> dict:
    """With what an engine folder was built (the manifest's informational `export` fields). Nothing of the machine
    or the moment, so that the same source, options and versions give the same bytes anywhere; `created` only from
    SOURCE_DATE_EPOCH (the reproducible-builds convention) when it is set."""
    import datetime
    import platform

    import onnx
    import torch

    import ditrt.runtime as rt

    info = {
        "versions": {
            "ditrt": rt.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "opset": opset,
            "python": platform.python_version(),
        }
    }
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        if not epoch.isdigit():
            raise InputError(
                f"SOURCE_DATE_EPOCH {epoch!r} is not a number of seconds since 1970; set an integer "
                "or unset it"
            )
        info["created"] = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).isoformat()
    return info
