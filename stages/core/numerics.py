"""How the floating-point work is done: `numerics: strict` (the default) or `fast` (params.yaml, top level).

The same params give the same bytes on one machine either way. Across machines, the last digits
of a sum depend on which SIMD kernels a library picks for the CPU it finds (AVX2, AVX-512, AMX) and
on how many threads split the work; a trained network then drifts further with every epoch.

- `strict`: every library is held to the same code path on every x86-64 CPU with AVX2, Intel or
  AMD, whatever newer instructions it has (AVX-512, AMX) and however many cores: torch's own
  kernels at their AVX2 build, oneDNN (convolutions) at AVX2, MKL (matrix products, linear algebra,
  vector math) in its conditional-numerical-reproducibility mode COMPATIBLE (the one code path MKL
  runs alike on Intel and AMD CPUs: its AVX2 path is reproducible on Intel CPUs only), numpy
  without its AVX-512 loops, OpenBLAS with its Haswell (AVX2) kernels, and a fixed number of
  threads everywhere (STRICT_THREADS, whatever the machine or the environment says). MKL's float32
  vector square root still differs between vendors, so the methods take square roots with
  stages.methods.neighbours.exact_sqrt and train with torch's fused Adam.
  On CUDA: deterministic algorithms, no TF32 and cuBLAS's deterministic workspace, which makes
  results identical between runs on one GPU model, not between GPU models or with the CPU.
- `fast`: each library uses what the CPU offers (and every core).

These settings must be in the environment before numpy or torch is imported, so `stages/__init__.py`
applies the mode of ./params.yaml when the package is first imported (every stage script, predict,
the demo, the tests); `configure_torch` adds what torch only takes at run time. Nothing here imports
numpy or torch at module level.
"""
from __future__ import annotations

import os
from pathlib import Path

MODES = ("strict", "fast")
DEFAULT = "strict"
# Threads of every library under strict: a fixed count, since how a reduction is split over
# threads changes its rounding. 2 suits the 2-core machines the default run is measured on.
STRICT_THREADS = 2

STRICT_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorised kernels: the AVX2 build even on AVX-512 CPUs
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (convolutions, pooling): no AVX-512 / AMX kernels
    # MKL: its vendor-independent code path (SSE2 without approximate reciprocals), reproducible for
    # any thread count; its AVX2 path is reproducible on Intel CPUs only (AMD ones take other kernels)
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # numpy: its AVX2 loops (AVX-512 uses SVML)
    "OPENBLAS_CORETYPE": "Haswell",  # numpy's and scipy's OpenBLAS: the AVX2 kernels
    "OMP_NUM_THREADS": str(STRICT_THREADS),
    "MKL_NUM_THREADS": str(STRICT_THREADS),
    "OPENBLAS_NUM_THREADS": str(STRICT_THREADS),
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # deterministic cuBLAS (CUDA only)
}

_active: str | None = None  # the mode applied to this process


def mode_of(params_file: str | Path = "params.yaml") -> str:
    """The `numerics` value of a params file, read as DVC reads it; DEFAULT when the file or the key is
    missing or unreadable (the stage's own params check then reports a bad value on one line)."""
    path = Path(params_file)
    try:
        from ruamel.yaml import YAML

        value = YAML(typ="safe").load(path.read_text()).get("numerics", DEFAULT)  # DVC's parser (core/params.py)
    except Exception:  # no file, not YAML, not a mapping: the params check says so later
        return DEFAULT
    return value if value in MODES else DEFAULT


def apply_environment(mode: str) -> None:
    """Set the environment of `mode` for this process and its children (first call wins)."""
    global _active
    if _active is not None:
        return
    _active = mode
    if mode == "strict":
        os.environ.update(STRICT_ENVIRONMENT)


def active_mode() -> str:
    return _active or DEFAULT


def configure_torch() -> None:
    """Run-time settings of the active mode (once per process); refuses to go on if strict came too late."""
    global _torch_configured
    if _torch_configured or active_mode() != "strict":
        return
    import torch

    from stages.core.errors import PipelineError, warn

    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        raise PipelineError(f"numerics: strict: torch already chose its {capability} kernels (it was imported "
                            "before the stages package set the environment); import stages first")
    if capability != "AVX2":
        warn("numerics: strict: this CPU has no AVX2, so results may differ in the last digits from "
             "those of AVX2 machines")
    torch.set_num_threads(STRICT_THREADS)
    use_deterministic_algorithms(torch)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _torch_configured = True


_torch_configured = False


def use_deterministic_algorithms(torch) -> None:
    """torch.use_deterministic_algorithms(True), without importing the compiler.

    torch's function also sets `torch._inductor.config.deterministic`, and importing that config imports
    the whole compiler stack: about 4 s of CPU in every stage process, for a switch that only matters to
    `torch.compile`, which nothing here uses. So set the run-time switch itself, and the compiler's too
    when something has already imported the compiler."""
    import sys

    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True)
    else:
        torch._C._set_deterministic_algorithms(True, warn_only=False)


def describe() -> str:
    """One line for logs and benchmark records."""
    if active_mode() == "strict":
        return f"strict (AVX2 kernels, {STRICT_THREADS} threads)"
    return f"fast (native kernels, {os.cpu_count()} cores)"
