"""python -m ditrt.export.kernels build [--force] | ptx FILE.cu [--arch compute_80]

build compiles libditkernels.so (nvcc) and libditrt_ops.so (g++, the ditrt torch ops) and prints their paths, one
a line, in that order."""

import argparse
import sys

from . import cpp_ops
from .build import KernelUnavailable, build, emit_ptx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditrt.export.kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build", help="compile csrc/ into the kernel cache and print the paths of the kernel and op libraries"
    )
    b.add_argument("--force", action="store_true", help="rebuild even if the cached libraries exist")
    p = sub.add_parser("ptx", help="print the PTX of one .cu file (relative paths are inside csrc/)")
    p.add_argument("source")
    p.add_argument("--arch", default="compute_80")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build(args.force), flush=True)
            print(cpp_ops.build(args.force))
        else:
            print(emit_ptx(args.source, args.arch))
    except KernelUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
