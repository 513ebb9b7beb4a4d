"""``python -m pyattn info``: versions, compiled backends, GPU and Triton."""
import argparse
import importlib.metadata
import platform

import torch


def info() -> str:
    import pyattn
    from pyattn.backends import compiled_backends, triton_status

    build = compiled_backends()
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    cuda = (f"cuda (archs {build['cuda_archs']})" if build["cuda"]
            else "cuda: not compiled in")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    can_run, why = triton_status()
    ops = sorted(name for name in dir(torch.ops.pyattn) if not name.startswith("_"))
    lines = [
        f"pyattn   {pyattn.__version__}",
        f"python   {platform.python_version()} ({platform.machine()})",
        f"torch    {torch.__version__} (built with CUDA {torch.version.cuda or 'none'}, "
        f"{torch.get_num_threads()} CPU threads)",
        f"triton   {triton_version}",
        f"compiled cpu ({'OpenMP' if build['openmp'] else 'no OpenMP'}); {cuda}",
        f"gpu      {', '.join(gpus) if gpus else 'none visible'}",
        f"triton can run: {'yes' if can_run else 'no'} ({why})",
        f"ops      {', '.join('pyattn::' + op for op in ops)}",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pyattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, compiled backends, GPU and Triton status")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())


if __name__ == "__main__":
    main()
