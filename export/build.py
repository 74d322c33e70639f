"""Building engines from a Source: the precision cast, the engine size, the graphs (denoiser step, text encoder,
VAE decoder) with their I/O, and each graph compiled to ONNX in the engine folder being written."""

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ditrt.runtime.errors import InputError
from ditrt.runtime.manifest import Component, Scheduler, TensorSpec
from ditrt.runtime.schedules import check_config, prediction_of

from .graphs import DecoderGraph, StepGraph, decoder_io, step_io
from .onnx_export import DEFAULT_OPSET, LOWERINGS, export_onnx
from .precision import MIN_OPSET, PRECISIONS, apply_policy, precision_of
from .source import Source

# Weights above this go beside model.onnx as external data: an inline model is serialised as one protobuf in
# memory, a second copy of its weights (sana-600m bf16: 4.6x the weight bytes at peak, 1.6x with external data),
# and protobuf cannot hold 2 GB anyway.
INLINE_WEIGHTS = 256 * 2**20


@dataclass(frozen=True)
class Graph:
    """One engine to export: its module and I/O, declared once."""

    name: str  # the manifest's component name and the engine's subfolder
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True)
class Build:
    graphs: list[Graph]
    latent_hw: tuple[int, int]
    scheduler: Scheduler
    null_class: int | None
    precision: dict  # what the precision policy did, for the manifest's export record


def export_opset(lowering: str, precision: str, opset: int | None) -> int:
    """Check the lowering and the precision (before the slow export) -> the ONNX opset to export with."""
    if lowering not in LOWERINGS:
        raise InputError(f"unknown lowering {lowering!r}; choose from {', '.join(LOWERINGS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    need = MIN_OPSET.get(precision, 0)
    if opset and opset < need:
        raise InputError(
            f"{precision} engines need ONNX opset {need} or newer (got --opset {opset}); "
            f"use --opset {need} or leave it out"
        )
    return opset or max(DEFAULT_OPSET, need)


def build(source: Source, precision: str, height: int | None = None, width: int | None = None) -> Build:
    """The engines of a source at the requested size (pixels; default: the family's latent size), cast as the
    precision policy says. The engine I/O stays fp32 at every precision."""
    model, vae = source.model, source.vae
    policy = apply_policy(precision, model, vae, source.text.graph if source.text is not None else None)
    multiple = source.family.latent_multiple(model.cfg)
    if height or width:
        hw = image_to_latent(height, width, vae, multiple, model)
    else:
        hw = source.latent_hw or source.family.default_latent_hw(model.cfg)
    scheduler = manifest_scheduler(source, hw)  # refuses what the runtime cannot reproduce
    image_hw = (hw[0] * vae.cfg.spatial_factor, hw[1] * vae.cfg.spatial_factor) if vae is not None else hw
    step = StepGraph(model, source.text_len, hw, image_hw)
    graphs = [Graph("denoiser", step, *step_io(model, source.text_len, hw))]
    if source.text is not None:
        text = source.text.graph
        graphs.append(Graph("text_encoder", text, text.inputs, text.outputs))
    if vae is not None:
        graphs.append(Graph("vae_decoder", DecoderGraph(vae), *decoder_io(vae, hw)))
    return Build(graphs, hw, scheduler, step.cond.null_class, policy)


def image_to_latent(height: int | None, width: int | None, vae, multiple: int, model=None) -> tuple[int, int]:
    """--height/--width (pixels) -> latent (H, W); engines are built for one size, so it is checked here, with the
    model's own limits (e.g. a stored position table) in pixels, before the slow export."""
    if vae is None:
        raise InputError(
            "--height/--width need a pipeline folder with a VAE (the pixel-to-latent factor comes from it)"
        )
    if not height or not width:
        raise InputError(f"give both --height and --width (got {height!r} and {width!r})")
    step = vae.cfg.spatial_factor * multiple
    for name, v in (("height", height), ("width", width)):
        if v < step or v % step:
            raise InputError(
                f"{name} {v} is not allowed; use a multiple of {step} (e.g. "
                f"{max(step, v // step * step)} or {(v // step + 1) * step})"
            )
    f = step // multiple
    if hasattr(model, "check_latent_size"):
        model.check_latent_size(height // f, width // f, vae_factor=f)
    return height // f, width // f


def manifest_scheduler(source: Source, latent_hw: tuple[int, int]) -> Scheduler:
    """The manifest's scheduler: the (folder's) diffusers config, checked to be reproducible for this pipeline's
    set_timesteps call, whose μ follows the number of image tokens the transformer sees at this size."""
    call = dict(source.call)
    if call:
        k = source.family.latent_multiple(source.model.cfg)
        call["image_seq_len"] = (latent_hw[0] // k) * (latent_hw[1] // k)
    config = check_config(source.sampler.config, call)
    return Scheduler(config, prediction_of(config), source.sampler.steps, source.sampler.guidance, call)


def export_component(
    graph: Graph, folder: Path, lowering: str, opset: int, external_data: bool | None
) -> Component:
    """Export one engine into folder/<name>/model.onnx and describe it for the manifest.

    external_data: None = when the weights exceed INLINE_WEIGHTS; True/False force it.
    """
    if external_data is None:
        external_data = (
            sum(t.numel() * t.element_size() for t in graph.module.state_dict().values()) > INLINE_WEIGHTS
        )
    (folder / graph.name).mkdir()
    export_onnx(
        graph.module,
        graph.inputs,
        graph.outputs,
        folder / graph.name / "model.onnx",
        lowering,
        opset,
        external_data,
    )
    backend = "onnxruntime" if lowering == "portable" else "tensorrt"
    return Component(
        f"{graph.name}/model.onnx", backend, precision_of(graph.module), lowering, graph.inputs, graph.outputs
    )
