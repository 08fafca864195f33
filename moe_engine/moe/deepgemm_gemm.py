"""DeepGEMM's m-grouped bf16 GEMMs for the expert projections' forward and input gradients on Hopper (sm90).

Measured on one H200 (``benchmarks/deepgemm_groups.py``, ``results/deepgemm_groups_h200.json``): the four
m-grouped GEMMs of a fwd+bwd run 6.5-10% faster than ``F.grouped_mm``'s CUTLASS kernel on every benchmark
shape, with the same bits; DeepGEMM's k-grouped weight-gradient kernel is slower there (and writes float32),
so the weight gradients stay on ``F.grouped_mm``.

DeepGEMM computes 128-row blocks that must not span two experts, so with it enabled token-choice dispatch
aligns its groups (``dispatch.py``, aligned groups: each group starts at a multiple of 128 rows, padding rows
zero). The kernels take DeepGEMM's "psum" layout: the row after each expert's last token, groups starting
at the next multiple of 128, so the unused rows at the end of the fixed-size buffers are not computed.

``enable(deepgemm_dir, build_dir)`` stages DeepGEMM's Python package in ``build_dir``, builds its C++
extension there (``torch.utils.cpp_extension``, in a subprocess; once per source hash) and imports it;
``experts.grouped_linear`` uses it from then on wherever it applies (``usable``). DeepGEMM compiles each
kernel with nvcc at its first call (cached under ``build_dir``/jit unless ``DG_JIT_CACHE_DIR`` says otherwise).
Needs an sm90 GPU, nvcc 12.3 or newer, a C++ compiler that links libstdc++ dynamically, and a DeepGEMM source
tree with the headers of its submodules (``git clone --recursive``); ``DeepGemmUnavailable`` says which one is
missing. No state at import; nothing is built until ``enable``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SWITCH = {"enabled": True}  # benchmarks set it False to time F.grouped_mm with DeepGEMM loaded
ALIGN = 128  # rows: DeepGEMM's M block on sm90 (get_mk_alignment_for_contiguous_layout)
_state: dict = {}  # "module": the imported deep_gemm package


class DeepGemmUnavailable(RuntimeError):
    """DeepGEMM cannot be built or run here; the message says what is missing."""


def enabled() -> bool:
    return "module" in _state and SWITCH["enabled"]


def disable() -> None:
    _state.clear()


def usable(x_MI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether ``grouped_linear`` runs this GEMM on DeepGEMM: enabled, bf16 on CUDA, and every dimension
    DeepGEMM's TMA descriptors and 64-wide K blocks take (for the input-gradient GEMM too)."""
    return (enabled() and x_MI.is_cuda and x_MI.dtype == torch.bfloat16 and w_EOI.dtype == torch.bfloat16
            and w_EOI.shape[1] % 64 == 0 and w_EOI.shape[2] % 64 == 0
            and x_MI.device.index == torch.cuda.current_device()  # DeepGEMM launches on the current device
            and _state["module"].get_mk_alignment_for_contiguous_layout() == ALIGN)  # a global others may set


def row_alignment(x_TD: torch.Tensor, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> int:
    """The group alignment dispatch must give these expert weights: DeepGEMM's block when it runs both
    projections, else 0."""
    return ALIGN if usable(x_TD, w_in_EHD) and usable(x_TD, w_out_EDF) else 0


class _MGroupedLinear(torch.autograd.Function):
    """y[r] = x[r] @ w[e(r)].T on aligned groups; forward and input gradient on DeepGEMM, the weight
    gradient on ``F.grouped_mm`` over whole groups. Padding rows of both outputs are zeroed (the weight
    gradients read them), tail rows stay undefined."""

    @staticmethod
    def forward(ctx, x_MI, w_EOI, ends_E, offsets_E, pad_rows_P):
        dg = _state["module"]
        x_MI, w_EOI = x_MI.contiguous(), w_EOI.contiguous()
        y_MO = x_MI.new_empty(x_MI.shape[0], w_EOI.shape[1])
        dg.m_grouped_bf16_gemm_nt_contiguous(x_MI, w_EOI, y_MO, ends_E, use_psum_layout=True)
        ctx.save_for_backward(x_MI, w_EOI, ends_E, offsets_E, pad_rows_P)
        return y_MO.index_fill_(0, pad_rows_P, 0)

    @staticmethod
    def backward(ctx, grad_MO):
        x_MI, w_EOI, ends_E, offsets_E, pad_rows_P = ctx.saved_tensors
        grad_MO = grad_MO.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_MO.new_empty(grad_MO.shape[0], w_EOI.shape[2])
            _state["module"].m_grouped_bf16_gemm_nn_contiguous(grad_MO, w_EOI, grad_x, ends_E, use_psum_layout=True)
            grad_x.index_fill_(0, pad_rows_P, 0)
        if ctx.needs_input_grad[1]:
            grad_w = F.grouped_mm(grad_MO.t(), x_MI, offs=offsets_E)
        return grad_x, grad_w, None, None, None


def grouped_linear(x_MI: torch.Tensor, w_EOI: torch.Tensor, p) -> torch.Tensor:
    """``experts.grouped_linear`` on DeepGEMM for an aligned ``DispatchPlan`` ``p``."""
    return _MGroupedLinear.apply(x_MI, w_EOI, p.ends_E, p.offsets_E, p.pad_rows_P)


# ----------------------------------------------------------------------------- building and loading

_NEEDED = ("csrc/python_api.cpp", "deep_gemm/__init__.py", "deep_gemm/include/deep_gemm",
           "third-party/cutlass/include/cute", "third-party/cutlass/include/cutlass", "third-party/fmt/include/fmt")

_BUILD = """
import sys
from torch.utils.cpp_extension import load
src, stage, cuda, abi = sys.argv[1:5]
load(name="_C", sources=[src + "/csrc/python_api.cpp"], build_directory=stage + "/build",
     extra_cflags=["-std=c++17", "-O3", "-fPIC", "-Wno-psabi", "-Wno-deprecated-declarations",
                   "-D_GLIBCXX_USE_CXX11_ABI=" + abi],
     extra_include_paths=[cuda + "/include", cuda + "/include/cccl", stage + "/deep_gemm/include",
                          src + "/third-party/cutlass/include", src + "/third-party/fmt/include"],
     extra_ldflags=["-L" + cuda + "/lib64", "-lcudart", "-lnvrtc"])
"""


def _digest(src: Path) -> str:
    h = hashlib.sha256()
    for f in sorted([*(src / "csrc").rglob("*"), *(src / "deep_gemm").rglob("*")]):
        if f.is_file() and not f.is_symlink() and f.suffix not in (".so", ".pyc"):
            h.update(str(f.relative_to(src)).encode() + f.read_bytes())
    return h.hexdigest()[:10]


def build(deepgemm_dir: str | Path, build_dir: str | Path) -> Path:
    """The staged package (``build_dir``/deepgemm-HASH, holding ``deep_gemm`` with its built ``_C``), built if
    missing: written beside its place and renamed in, so an interrupted build leaves nothing half-made."""
    from torch.utils.cpp_extension import CUDA_HOME

    src = Path(deepgemm_dir).resolve()
    missing = [n for n in _NEEDED if not (src / n).exists()]
    if missing:
        raise DeepGemmUnavailable(f"{src} is not a DeepGEMM source tree with its submodules' headers (no "
                                  f"{', '.join(missing)}): clone deepseek-ai/DeepGEMM with --recursive")
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        raise DeepGemmUnavailable("nvcc was not found (CUDA_HOME/bin/nvcc): DeepGEMM compiles its kernels with it; "
                                  "install the CUDA toolkit (12.3 or newer) or leave DeepGEMM off")
    build_dir = Path(build_dir).resolve()
    stage = build_dir / f"deepgemm-{_digest(src)}"
    if (stage / "deep_gemm" / "_C.so").exists():
        return stage
    tmp = build_dir / f".{stage.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src / "deep_gemm", tmp / "deep_gemm", symlinks=True,
                    ignore=shutil.ignore_patterns("cutlass", "cute", "*.so", "__pycache__"))
    for name in ("cutlass", "cute"):  # DeepGEMM's JIT reads these headers from its own include folder
        (tmp / "deep_gemm" / "include" / name).symlink_to(src / "third-party" / "cutlass" / "include" / name)
    abi = str(int(torch.compiled_with_cxx11_abi()))
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(src), str(tmp), CUDA_HOME, abi],
                          capture_output=True, text=True)
    built = tmp / "build" / "_C.so"
    if proc.returncode != 0 or not built.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()][:4]
        raise DeepGemmUnavailable("building DeepGEMM's extension failed: " + ("; ".join(errors) or proc.stderr[-800:]))
    if b"libstdc++.so" not in built.read_bytes():
        shutil.rmtree(tmp, ignore_errors=True)
        raise DeepGemmUnavailable(
            f"the C++ compiler ({os.environ.get('CXX', 'c++')}) linked libstdc++ into DeepGEMM's extension statically; "
            "that copy crashes on its first use of a locale beside PyTorch's: set CXX to a compiler that links it "
            "dynamically (on the lent H200 image: CXX=/usr/bin/g++)")
    shutil.copy2(built, tmp / "deep_gemm" / "_C.so")
    shutil.rmtree(stage, ignore_errors=True)
    os.replace(tmp, stage)
    return stage


def enable(deepgemm_dir: str | Path, build_dir: str | Path) -> None:
    """Build (if needed) and import DeepGEMM; ``experts.grouped_linear`` uses it from now on."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise DeepGemmUnavailable("DeepGEMM's bf16 kernels are used on sm90 (Hopper) GPUs only; this machine has "
                                  + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"))
    stage = build(deepgemm_dir, build_dir)
    os.environ.setdefault("DG_JIT_CACHE_DIR", str(Path(build_dir).resolve() / "jit"))
    loaded = sys.modules.get("deep_gemm")
    if loaded is not None and Path(loaded.__file__).resolve().parent != (stage / "deep_gemm").resolve():
        raise DeepGemmUnavailable(f"another deep_gemm is already imported ({loaded.__file__}); enable() loads the one "
                                  f"it builds ({stage}): call it before anything imports deep_gemm")
    if loaded is None:
        spec = importlib.util.spec_from_file_location("deep_gemm", stage / "deep_gemm" / "__init__.py",
                                                      submodule_search_locations=[str(stage / "deep_gemm")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["deep_gemm"] = module  # its relative imports look it up there
        spec.loader.exec_module(module)
    module = sys.modules["deep_gemm"]
    if module.get_mk_alignment_for_contiguous_layout() != ALIGN:
        raise DeepGemmUnavailable(f"this DeepGEMM aligns groups to {module.get_mk_alignment_for_contiguous_layout()} "
                                  f"rows; the engine's dispatch pads to {ALIGN}")
    _state["module"] = module
