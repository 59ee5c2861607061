"""`fastgpt compile-check`: compile every Triton kernel for sm_80/sm_90 without a GPU."""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compile-check", help="compile all Triton kernels for NVIDIA targets; report registers and spills",
        description="Compile every kernel listed by a fastgpt.kernels module's compile_specs() at GPT-2 "
                    "shapes for each --arch (no GPU needed) and print a Markdown table of registers, "
                    "spills, shared memory and tensor-core use. Exits 1 if any kernel fails to compile "
                    "or spills registers.")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], metavar="CC",
                        help="compute capabilities to target, e.g. 80 (A100) 90 (H100); default: 80 90")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="only kernels whose name contains one of these strings")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the Markdown report to FILE")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    import os
    import sys

    from ..errors import FastGPTError

    bad = [cc for cc in args.arch if not 75 <= cc <= 120]
    if bad:
        raise FastGPTError(f"--arch {bad[0]}: expected a CUDA compute capability such as 80 or 90")
    options = ["--arch", *map(str, args.arch)] + (["--only", *args.only] if args.only else []) + \
              (["--out", args.out] if args.out else [])
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter swaps @triton.jit kernels for Python; compile in a clean process.
        from ..kernels.compile_check import run_in_subprocess
        argv = options[:-1] + [os.path.abspath(args.out)] if args.out else options
        done = run_in_subprocess(argv)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        return done.returncode
    from ..kernels.compile_check import report
    return report(args.arch, args.only, args.out, "python3 -m fastgpt compile-check " + " ".join(options))
