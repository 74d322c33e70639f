"""torch -> AOTInductor package (.pt2): torch.export of the same graphs the ONNX path exports, compiled ahead of time
by Inductor for one device, with the I/O declared once (graphs.export_args).

A package is machine code: it runs on the device kind, GPU architecture (or CPU instruction set) and torch version
that compiled it, which its manifest Target records and the torch backend checks. The dit ops go in as the C++
torch ops of kernels/cpp_ops on CUDA (lowering "kernels", the op library shipped beside the packages), and as their
plain-torch reference on CPU, where Inductor fuses them into its own loops (lowering "portable").
"""

import contextlib
import io
import logging
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ditrt.runtime.errors import BackendUnavailable, InputError
from ditrt.runtime.manifest import Component, Target, TensorSpec

from .graphs import export_args
from .onnx_export import project_error
from .ops import lowering
from .precision import precision_of

DEVICES = ("cpu", "cuda")
PACKAGE = "model.pt2"
LIBRARIES = "ops"  # the folder's subfolder holding the torch op libraries its packages call


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """The device to compile for (None: a visible GPU, else the CPU), refused before the slow export where
    it cannot be used here."""
    device = device or default_device()
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"--device cuda needs a CUDA GPU and a CUDA build of torch (this is torch {torch.__version__}"
            f"{', no GPU visible' if torch.version.cuda else ', a CPU-only build'}); export with --device cpu"
        )
    return device


def target_arch(device: str) -> str:
    """What a package compiled here needs: the GPU's sm_XY, or the vector ISA Inductor compiles CPU code for."""
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}"
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa()) or "default"


def export_package(
    module: nn.Module, inputs: list[TensorSpec], path: Path, device: str, lowering_name: str
) -> None:
    """Compile module for device into the AOTInductor package at path. Symbolic axes stay dynamic."""
    module = module.to(device).eval()
    args, dynamic = export_args(module, inputs)
    args = tuple(a.to(device) for a in args)
    log = io.StringIO()
    quiet = logging.getLogger("torch._inductor")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with (
            lowering("reference" if lowering_name == "portable" else lowering_name),
            torch.no_grad(),
            contextlib.redirect_stdout(log),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            program = torch.export.export(module, args, dynamic_shapes=dynamic)
            check_dynamic(program, inputs)
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as e:  # a check in model code (e.g. a size limit) reaches the user as itself
        error = project_error(e)
        if error is None:
            raise
    else:
        error = None
    finally:
        quiet.setLevel(level)
    if error is not None:
        raise error


def check_dynamic(program, inputs: list[TensorSpec]) -> None:
    """Every declared symbolic axis stayed symbolic (torch.export specialises an axis the graph fixes)."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = [n for n in placeholders if n.name not in program.graph_signature.inputs_to_parameters]
    user = [n for n in user if n.name not in program.graph_signature.inputs_to_buffers]
    user = [n for n in user if n.name not in program.graph_signature.inputs_to_lifted_tensor_constants]
    for spec, node in zip(inputs, user):
        got = [d if isinstance(d, int) else "sym" for d in node.meta["val"].shape]
        want = [d if isinstance(d, int) else "sym" for d in spec.shape]
        if got != want:
            raise RuntimeError(
                f"export specialised input {spec.name!r} to shape {got}, declared {spec.shape}"
            )


def export_component(graph, folder: Path, device: str) -> Component:
    """Export one engine into folder/<name>/model.pt2 (the dit ops as C++ torch ops where they can be built for
    a CUDA package) and describe it for the manifest."""
    libraries = op_libraries(folder) if device == "cuda" else []
    lowering_name = "kernels" if libraries else "portable"
    (folder / graph.name).mkdir()
    export_package(graph.module, graph.inputs, folder / graph.name / PACKAGE, device, lowering_name)
    target = Target(device, target_arch(device), torch.__version__, libraries)
    return Component(
        f"{graph.name}/{PACKAGE}",
        "torch",
        precision_of(graph.module),
        lowering_name,
        graph.inputs,
        graph.outputs,
        target,
    )


def op_libraries(folder: Path) -> list[str]:
    """The dit op libraries copied into folder/ops/ (in load order) for packages to call; [] after one warning
    where they cannot be built here (the packages then hold the ops' reference maths)."""
    from .kernels import cpp_ops

    built = cpp_ops.available()
    if built is None:
        return []
    (folder / LIBRARIES).mkdir(exist_ok=True)
    names = []
    for lib in cpp_ops.package_libraries():
        shutil.copy2(lib, folder / LIBRARIES / lib.name)
        names.append(f"{LIBRARIES}/{lib.name}")
    return names
