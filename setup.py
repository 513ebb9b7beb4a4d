"""Build pyattn and its compiled extension pyattn._C.

The CPU kernels (OpenMP) are always built. The CUDA kernels are built when the
installed torch is a CUDA build and nvcc is found; PYATTN_WITH_CUDA=1 demands
them (and fails if impossible), PYATTN_WITH_CUDA=0 skips them. The decision
never asks for a GPU, so a GPU-less build machine still builds CUDA kernels.
Targets default to sm_80 and sm_90 (TORCH_CUDA_ARCH_LIST overrides).
"""
import glob
import os
import shlex
import shutil
import subprocess

from setuptools import setup
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def find_nvcc():
    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


def cuda_decision():
    """(build_cuda, reason) from PYATTN_WITH_CUDA, torch.version.cuda and nvcc."""
    wish = os.environ.get("PYATTN_WITH_CUDA", "auto").strip().lower()
    if wish in ("0", "false", "no", "off"):
        return False, "PYATTN_WITH_CUDA=0"
    nvcc = find_nvcc()
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if nvcc is None:
        missing.append("nvcc not found (set CUDA_HOME)")
    if wish in ("1", "true", "yes", "on"):
        if missing:
            raise SystemExit("pyattn: PYATTN_WITH_CUDA=1 but " + "; ".join(missing))
        return True, f"PYATTN_WITH_CUDA=1, nvcc {nvcc}"
    if missing:
        return False, "; ".join(missing)
    return True, f"torch CUDA {torch.version.cuda}, nvcc {nvcc}"


# Intel CPUs from Skylake to Cascade Lake (this project's benchmark host) run a
# jump that crosses or ends on a 32-byte boundary from the slow decoders (the
# "JCC erratum" microcode), so a kernel's speed moved with where unrelated code
# placed its loops: an edit outside the hot loop made the zeros-mode conv
# input gradient 9-18% slower, and with this flag it was level (0.98-1.02x).
BRANCH_ALIGNMENT = "-Wa,-mbranches-within-32B-boundaries"


def branch_alignment_flags():
    """[BRANCH_ALIGNMENT] where the C++ compiler's assembler takes it (x86 GNU as)."""
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    command = compiler + [BRANCH_ALIGNMENT, "-x", "c++", "-c", "-o", os.devnull, "-"]
    try:
        probe = subprocess.run(command, input=b"int f() { return 0; }\n", capture_output=True,
                               timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    # A compiler that only warns about the flag would not pass it on.
    return [BRANCH_ALIGNMENT] if probe.returncode == 0 and not probe.stderr.strip() else []


def extension():
    build_cuda, reason = cuda_decision()
    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # The C++ standard is the one torch's build helper picks.
    alignment = branch_alignment_flags()
    cxx = ["-O3", "-fopenmp"] + alignment
    aligned = "; C++ jumps kept off 32-byte boundaries" if alignment else ""
    macros = []
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        # Comma-separated: a ';' inside the define would split the compiler command.
        archs = ",".join(os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split())
        sources += [os.path.relpath(p, ROOT) for p in
                    sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        macros += [("PYATTN_WITH_CUDA", None), ("PYATTN_CUDA_ARCHS", f'"{archs}"')]
        kind = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]}
        print(f"pyattn build: CPU kernels (OpenMP) + CUDA kernels for {archs} ({reason}){aligned}")
    else:
        kind = cpp_extension.CppExtension
        extra = {"cxx": cxx}
        print(f"pyattn build: CPU kernels (OpenMP) only; CUDA skipped: {reason}{aligned}")
    return kind(
        name="pyattn._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    name="pyattn",
    version="0.1.0",
    description="Fused padded conv2d, FlashAttention-style attention and CSR SpMM as torch ops",
    python_requires=">=3.10",
    packages=["pyattn", "pyattn.ops", "pyattn.nn", "pyattn.models", "pyattn.studies",
              "pyattn.kernels"],
    package_dir={"pyattn.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "packaging"],
)
