"""torch -> ONNX through torch.onnx.export(dynamo=True), symbolic axes taken from the graph's TensorSpecs."""

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditrt.runtime.errors import DitError
from ditrt.runtime.manifest import TensorSpec

from .graphs import export_args
from .ops import lowering

LOWERINGS = {"portable": "reference", "plugin": "plugin"}  # manifest name -> ops.lowering mode
DEFAULT_OPSET = 18


@contextlib.contextmanager
def softmax_casts_first():
    """softmax(x, dtype=float32) as a Cast then a Softmax. onnxscript (0.7) translates it as Softmax in x's dtype
    then Cast, which loses the fp32 softmax of transformers' eager attention in fp16/bf16 text encoders."""
    softmax = F.softmax

    def cast_first(input, dim=None, _stacklevel=3, dtype=None):
        return softmax(input if dtype is None else input.to(dtype), dim)

    F.softmax = cast_first
    try:
        yield
    finally:
        F.softmax = softmax


def project_error(e: BaseException) -> DitError | None:
    """The project error that caused e, if any: torch.export wraps what model code raises in its own exceptions."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, DitError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def export_onnx(
    module: nn.Module,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    path: Path,
    lowering_name: str = "portable",
    opset: int = DEFAULT_OPSET,
    external_data: bool = False,
    max_dim: int = 1024,
) -> None:
    """Write module as ONNX at path. Symbolic axes (e.g. "B") become dynamic dims named after them."""
    args, dynamic = export_args(module, inputs, max_dim)
    log = io.StringIO()
    quiet = logging.getLogger("torch.onnx")
    level, quiet.level = quiet.level, logging.ERROR  # the exporter's progress chatter is not for our users
    try:
        with (
            lowering(LOWERINGS[lowering_name]),
            torch.no_grad(),
            contextlib.redirect_stdout(log),
            warnings.catch_warnings(),
            softmax_casts_first(),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamic_shapes=dynamic,
                dynamo=True,
                opset_version=opset,
                input_names=[s.name for s in inputs],
                output_names=[s.name for s in outputs],
                verbose=False,
                optimize=True,
            )
    except (
        Exception
    ) as e:  # a check in model code (e.g. a size limit) reaches the user as itself, not as an export bug
        error = project_error(e)
        if error is None:
            raise
    else:
        error = None
    finally:
        quiet.setLevel(level)
    if error is not None:  # raised outside the handler, so that it does not chain back to the export error
        raise error
    for value in program.model.graph.inputs:  # the exporter may specialise a dim instead of failing
        spec = next(s for s in inputs if s.name == value.name)
        got = tuple(d if isinstance(d, int) else str(d) for d in value.shape)
        if got != tuple(spec.shape):
            raise RuntimeError(
                f"export specialised input {value.name!r} to shape {got}, declared {spec.shape}"
            )
    strip_build_metadata(program.model)
    program.save(str(path), external_data=external_data)


def strip_build_metadata(model) -> None:
    """Drop what the exporter records about the build: per node the Python stack trace (the builder's absolute
    paths), the FX node text and module scopes; per graph and value torch.export's bookkeeping. No runtime reads
    them, and they make the same model's bytes differ between install locations. Model-level metadata stays."""
    functions = list(model.functions.values())
    graphs = [*model.graphs(), *functions, *(sub for f in functions for sub in f.subgraphs())]
    for graph in graphs:
        values = [*graph.inputs, *graph.outputs, *getattr(graph, "initializers", {}).values()]
        for node in graph.all_nodes():  # with the nodes of subgraphs (If/Loop/Scan bodies)
            node.metadata_props.clear()
            node.doc_string = None
            values.extend(v for v in node.outputs if v is not None)
        for item in [graph, *values]:
            item.metadata_props.clear()
            item.doc_string = None
