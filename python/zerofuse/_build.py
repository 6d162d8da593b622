"""What this installation of zerofuse contains and what it sees at run time."""
import os
import platform
import sys

from . import _C


def build_info() -> dict:
    """Version, compiled-in features (CUDA and its architectures, CPU kernel
    variants, compiler) and what this process sees now (CUDA devices, torch)."""
    info = dict(_C.build_info())
    info["cuda_runtime"] = _C.cuda_status()
    info["cpu_threads"] = _C.num_threads()
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    try:
        import torch
    except ImportError:
        info["torch"] = None
    else:
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["torch_cuda_available"] = torch.cuda.is_available()
        from . import _torch_threads  # noqa: F401  (what the torch-facing parts would use)
    info["cpu_threading"] = _C.threading_backend()
    return info


def cmake_prefix_path() -> str:
    """The directory to put on CMAKE_PREFIX_PATH so that CMake's
    find_package(zerofuse) finds the installed C++ package (headers, library
    and zerofuseConfig.cmake live under it)."""
    return os.path.dirname(os.path.abspath(_C.__file__))


_THREADING = {"openmp": "torch's OpenMP team", "pool": "zerofuse's own pool"}


def format_build_info(info: dict) -> str:
    rows = [
        ("zerofuse", info["version"]),
        ("compiler", info["cxx_compiler"]),
        ("CPU kernels", f"{info['cpu_isa']} (built: {', '.join(info['cpu_isas'])}), {info['cpu_threads']} threads on {_THREADING[info['cpu_threading']]}"),
        (
            "CUDA kernels",
            f"yes, sm_{info['cuda_archs'].replace(',', ', sm_')} (nvcc {info['cuda_compiler_version']})"
            if info["cuda"]
            else "no (built without nvcc)",
        ),
        ("CUDA here", info["cuda_runtime"]),
        ("torch", info["torch"] or "not installed"),
    ]
    if info.get("torch"):
        rows.append(("torch CUDA", f"{info['torch_cuda'] or 'CPU build'}, available: {info['torch_cuda_available']}"))
    rows.append(("python", f"{info['python']} on {info['platform']}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":  # pragma: no cover
    print(format_build_info(build_info()), file=sys.stdout)
