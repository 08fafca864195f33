"""CUTLASS grouped GEMMs for the expert projections on Hopper (sm90), the fastest configuration per shape.

torch's ``F.grouped_mm`` runs one CUTLASS kernel configuration for every grouped GEMM of more than 128 rows
per group (cooperative schedule, 128x256x64 tiles, 2x1 clusters). ``enable(cutlass_dir, build_dir)`` builds
``grouped_gemm_sm90.cu`` at the configurations of ``CONFIGS`` (nvcc, once; the libraries are kept in
``build_dir`` under a hash of the source and flags), and from then on ``experts.grouped_linear`` runs each
expert GEMM, forward and both gradients, with the fastest of those configurations and of ``F.grouped_mm``
itself, timed the first time a shape is met outside CUDA graph capture. Every configuration computes
``F.grouped_mm``'s bits (checked on the GPU by ``tests/moe/test_cutlass_gemm.py`` and on every benchmarked
shape by ``benchmarks/grouped_gemm_tiles.py``), so enabling it changes speed, never results.

Needs an sm90 GPU, nvcc (CUDA 12.4 or newer) and a CUTLASS 3 source tree (only its ``include/`` is read);
``CutlassUnavailable`` says which one is missing. No state at import; nothing is built until ``enable``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("grouped_gemm_sm90.cu")
# name: (TILE_M, TILE_N, TILE_K, CLUSTER_M, CLUSTER_N, PINGPONG); the first is the one F.grouped_mm runs
CONFIGS = {
    "coop_128x256x64_c2x1": (128, 256, 64, 2, 1, 0),
    "coop_256x128x64_c2x1": (256, 128, 64, 2, 1, 0),
    "coop_256x128x64_c1x2": (256, 128, 64, 1, 2, 0),
    "coop_128x256x64_c1x2": (128, 256, 64, 1, 2, 0),
    "coop_128x128x64_c2x1": (128, 128, 64, 2, 1, 0),
    "pong_128x128x64_c2x1": (128, 128, 64, 2, 1, 1),
    "pong_64x256x64_c1x1": (64, 256, 64, 1, 1, 1),
}
SCHEDULES = ((0, 1), (0, 4), (1, 1), (1, 4))  # (raster along N, max swizzle): runtime arguments of each kernel
FWD, DGRAD, WGRAD = 0, 1, 2
ENTRY = {FWD: "gg_fwd", DGRAD: "gg_dgrad", WGRAD: "gg_wgrad"}
MIN_GAIN = 0.02  # a kernel replaces F.grouped_mm only when it is at least this much faster (tuning is noisy)


class CutlassUnavailable(RuntimeError):
    """The CUTLASS grouped GEMMs cannot be built or run here; the message says what is missing."""


SWITCH = {"enabled": True}  # benchmarks set it False to time F.grouped_mm with the kernels loaded
_libs: dict[str, ctypes.CDLL] = {}
_choices: dict[tuple, tuple | None] = {}  # shape key -> (config, raster, swizzle), None: F.grouped_mm
_entries: dict[tuple, tuple] = {}  # (config, case, E) -> (entry point, scratch bytes)


def loaded() -> list[str]:
    """The configurations ``enable`` loaded (whatever ``SWITCH`` says)."""
    return list(_libs)


def enabled() -> bool:
    return bool(_libs) and SWITCH["enabled"]


def disable() -> None:
    _libs.clear()
    _choices.clear()
    _entries.clear()


def choices() -> dict[str, str]:
    """What runs for each shape met so far: {"fwd E=64 N=2048 K=2048 rows=131072": "coop_.../M1" or "torch"}."""
    names = {FWD: "fwd", DGRAD: "dgrad", WGRAD: "wgrad"}
    return {f"{names[k[0]]} E={k[1]} dims={k[2]}x{k[3]} rows={k[4]}":
            ("torch" if c is None else f"{c[0]}/{'N' if c[1] else 'M'}{c[2]}") for k, c in _choices.items()}


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    found = shutil.which("nvcc")
    if found:
        return found
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return None


def _command(nvcc: str, cutlass: Path, name: str, out: Path) -> list[str]:
    m, n, k, cm, cn, pong = CONFIGS[name]
    return [nvcc, "-O3", "-DNDEBUG", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
            "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr", "-diag-suppress", "20012",
            f"-DTILE_M={m}", f"-DTILE_N={n}", f"-DTILE_K={k}", f"-DCLUSTER_M={cm}", f"-DCLUSTER_N={cn}",
            f"-DPONG={pong}", f"-I{cutlass / 'include'}", "-o", str(out), str(SOURCE)]


def build(cutlass_dir: str | Path, build_dir: str | Path, configs=None, jobs: int | None = None) -> dict[str, Path]:
    """Build the libraries that ``build_dir`` lacks (in parallel); returns {config: path}. Each is written beside
    its place and renamed in, named by a hash of the source, the CUTLASS version header and the flags."""
    cutlass = Path(cutlass_dir).resolve()
    header = cutlass / "include" / "cutlass" / "cutlass.h"
    if not header.exists():
        raise CutlassUnavailable(f"{cutlass} is not a CUTLASS source tree (no include/cutlass/cutlass.h): pass the "
                                 "folder of a CUTLASS 3 checkout")
    nvcc = _nvcc()
    if nvcc is None:
        raise CutlassUnavailable("nvcc is not on PATH (nor in $CUDA_HOME/bin): the CUTLASS grouped GEMMs are built "
                                 "with it; install the CUDA toolkit or use F.grouped_mm (the default)")
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    version = (cutlass / "include" / "cutlass" / "version.h")
    digest = hashlib.sha256(SOURCE.read_bytes() + (version.read_bytes() if version.exists() else b"")).hexdigest()[:10]
    names = list(configs or CONFIGS)
    paths = {n: build_dir / f"gg_{n}_{digest}.so" for n in names}

    def one(name: str):
        out = paths[name]
        if out.exists():
            return name, None
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        proc = subprocess.run(_command(nvcc, cutlass, name, tmp), capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            errors = [line for line in proc.stderr.splitlines() if "error" in line][:3]
            return name, "; ".join(errors) or proc.stderr[-500:]
        os.replace(tmp, out)
        return name, None

    missing = [n for n in names if not paths[n].exists()]
    failed = {}
    if missing:
        with ThreadPoolExecutor(max_workers=min(len(missing), jobs or os.cpu_count() or 1)) as pool:
            failed = {name: err for name, err in pool.map(one, missing) if err}
    if failed:
        raise CutlassUnavailable("nvcc could not build " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    return paths


def enable(cutlass_dir: str | Path, build_dir: str | Path, configs=None) -> list[str]:
    """Build (if needed) and load the kernels; ``experts.grouped_linear`` uses them from now on."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise CutlassUnavailable("the CUTLASS grouped GEMMs need an sm90 GPU (H100/H200); this machine has "
                                 + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"))
    paths = build(cutlass_dir, build_dir, configs)
    disable()
    for name, path in paths.items():
        lib = ctypes.CDLL(str(path))
        lib.gg_scratch_bytes.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.gg_scratch_bytes.restype = ctypes.c_size_t
        for entry in ENTRY.values():
            fn = getattr(lib, entry)
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            fn.restype = ctypes.c_int
        _libs[name] = lib
    return list(_libs)


def launch(config: str, case: int, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, offs_E: torch.Tensor,
           d1: int, d2: int, raster: int = 0, swizzle: int = 1) -> None:
    """One grouped GEMM with one configuration: ``case`` FWD (d1 N, d2 K), DGRAD (N, K) or WGRAD (M, N)."""
    E = offs_E.numel()
    key = (config, case, E)
    entry = _entries.get(key)
    if entry is None:  # the function and its scratch size, looked up once (the host's time per call counts)
        lib = _libs[config]
        entry = _entries[key] = (getattr(lib, ENTRY[case]), int(lib.gg_scratch_bytes(case, E)))
    fn, nbytes = entry
    scratch = torch.empty(nbytes, dtype=torch.uint8, device=a.device)
    code = fn(a.data_ptr(), b.data_ptr(), out.data_ptr(), offs_E.data_ptr(), E, d1, d2, raster, swizzle,
              scratch.data_ptr(), nbytes, torch.cuda.current_stream(a.device).cuda_stream)
    if code != 0:
        raise RuntimeError(f"CUTLASS grouped GEMM {config} ({ENTRY[case]}) failed to launch (code {code})")


def _time(fn, reps: int = 3, launches: int = 10) -> float:
    """Median ms per call of ``launches`` back-to-back calls: one call between two events would also count the
    host's time to launch it, which a layer's stream of kernels hides."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(launches):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / launches)
    return sorted(times)[len(times) // 2]


def _choose(key: tuple, case: int, a, b, out_shape, offs_E, d1, d2, reference) -> tuple | None:
    if key in _choices:
        return _choices[key]
    if torch.cuda.is_current_stream_capturing():  # tune on eager calls only; a graph keeps F.grouped_mm
        return None
    best, best_ms = None, _time(reference) * (1 - MIN_GAIN)
    out = torch.empty(out_shape, dtype=a.dtype, device=a.device)
    for config in _libs:
        for raster, swizzle in SCHEDULES:
            ms = _time(lambda: launch(config, case, a, b, out, offs_E, d1, d2, raster, swizzle))
            if ms < best_ms:
                best, best_ms = (config, raster, swizzle), ms
    _choices[key] = best
    return best


def _gemm(case: int, a, b, offs_E, out_shape, d1: int, d2: int, reference):
    key = (case, offs_E.numel(), d1, d2, a.shape[0], a.device.index)
    choice = _choose(key, case, a, b, out_shape, offs_E, d1, d2, reference)
    if choice is None:
        return reference()
    out = torch.empty(out_shape, dtype=a.dtype, device=a.device)
    launch(choice[0], case, a, b, out, offs_E, d1, d2, choice[1], choice[2])
    return out


def fwd(x_AI, w_EOI, offs_E):
    """y[a] = x[a] @ w[e(a)]^T over rows sorted by expert (rows past the last group are left undefined)."""
    E, O, I = w_EOI.shape
    return _gemm(FWD, x_AI, w_EOI, offs_E, (x_AI.shape[0], O), O, I,
                 lambda: F.grouped_mm(x_AI, w_EOI.transpose(-2, -1), offs=offs_E))


def dgrad(gy_AO, w_EOI, offs_E):
    """dx[a] = gy[a] @ w[e(a)]."""
    E, O, I = w_EOI.shape
    return _gemm(DGRAD, gy_AO, w_EOI, offs_E, (gy_AO.shape[0], I), I, O, lambda: F.grouped_mm(gy_AO, w_EOI, offs=offs_E))


def wgrad(gy_AO, x_AI, offs_E):
    """dw[e] = gy[rows of e]^T @ x[rows of e], [E, O, I] (zero for an expert with no rows)."""
    E, O, I = offs_E.numel(), gy_AO.shape[1], x_AI.shape[1]
    return _gemm(WGRAD, gy_AO, x_AI, offs_E, (E, O, I), O, I, lambda: F.grouped_mm(gy_AO.t(), x_AI, offs=offs_E))


class GroupedLinear(torch.autograd.Function):
    """``F.grouped_mm(x, w.transpose(-2, -1), offs)`` with its forward and both gradients on the tuned kernels."""

    @staticmethod
    def forward(ctx, x_AI, w_EOI, offs_E):
        ctx.save_for_backward(x_AI, w_EOI, offs_E)
        return fwd(x_AI, w_EOI, offs_E)

    @staticmethod
    def backward(ctx, gy_AO):
        x_AI, w_EOI, offs_E = ctx.saved_tensors
        gy_AO = gy_AO.contiguous()
        dx = dgrad(gy_AO, w_EOI, offs_E) if ctx.needs_input_grad[0] else None
        dw = wgrad(gy_AO, x_AI, offs_E) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def usable(x_AI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether ``grouped_linear`` can take this call: kernels loaded, packed bf16 operands, 16-byte aligned."""
    return (enabled() and x_AI.is_cuda and x_AI.dtype == w_EOI.dtype == torch.bfloat16 and x_AI.is_contiguous()
            and w_EOI.is_contiguous() and x_AI.data_ptr() % 16 == 0 and w_EOI.data_ptr() % 16 == 0
            and x_AI.shape[1] % 8 == 0 and w_EOI.shape[1] % 8 == 0)


def grouped_linear(x_AI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return GroupedLinear.apply(x_AI, w_EOI, offs_E)
