"""Typed settings of the export stage; fields equal the keys of params.yaml ``export:``.

    export:
      opset: 21                         # 21+ for the quantized graphs' blocked DequantizeLinear
      experts_implementation: grouped_mm   # transformers' exportable experts: grouped_mm | batched_mm
      with_past: true                   # also the generation graphs (decoder with past; Switch encoder + decoder)
      fused_moe: none                   # cuda | cpu: also graphs with onnxruntime's com.microsoft::MoE for that EP
      parity: {cases: [[1, 5], [3, 17]], tolerance: 1.0e-4, seed: 1234}
      latency: {batch_sizes: [1, 8], length: 64, repeats: 5}   # a quick check; benchmarks/onnx_latency.py measures
      gate: {...}                       # the quantize stage's gate, for the quantized ONNX model
      providers: {order: [cpu], cpu: {...}, cuda: {...}, tensorrt: {...}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from moe_engine.config import Config
from moe_engine.quantize.config import GateConfig


@dataclass
class ParityConfig(Config):
    """ONNX Runtime (CPU, fp32) against stock transformers on inputs unlike the export example."""

    section = "export.parity"
    cases: list[list[int]] = field(default_factory=lambda: [[1, 5], [3, 17]])  # [batch, length]
    past_length: int = 6  # prompt length before the decode steps of the with-past check
    decode_steps: int = 3
    tolerance: float = 1e-4  # max |ort - torch| / max |torch| over the attended positions
    seed: int = 1234

    def check(self) -> None:
        self.require(bool(self.cases) and all(len(c) == 2 and c[0] >= 1 and c[1] >= 2 for c in self.cases), "cases",
                     "a non-empty list of [batch >= 1, length >= 2]")
        self.require(self.past_length >= 1, "past_length", ">= 1")
        self.require(self.decode_steps >= 1, "decode_steps", ">= 1")
        self.require(0 < self.tolerance < 1, "tolerance", "in (0, 1)")


@dataclass
class LatencyConfig(Config):
    """A quick in-stage latency check (DVC metrics); benchmarks/onnx_latency.py is the careful one."""

    section = "export.latency"
    enabled: bool = True
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    length: int = 64
    repeats: int = 5

    def check(self) -> None:
        self.require(all(b >= 1 for b in self.batch_sizes), "batch_sizes", "a list of batch sizes >= 1")
        self.require(self.length >= 1, "length", ">= 1")
        self.require(self.repeats >= 1, "repeats", ">= 1")


@dataclass
class CpuProvider(Config):
    section = "export.providers.cpu"
    intra_op_threads: int = 0  # 0 = onnxruntime's default (one per core)
    inter_op_threads: int = 0
    # onnxruntime fuses a quantized graph's DequantizeLinear -> MatMul into MatMulNBits; level 4 computes it with
    # int8 activations (faster, ~3e-3 relative logits error on the demo model), 0 in float32 (same numbers as torch)
    matmulnbits_accuracy_level: int = 0

    def check(self) -> None:
        self.require(self.matmulnbits_accuracy_level in (0, 1, 2, 3, 4), "matmulnbits_accuracy_level", "0, 1, 2, 3 or 4")
        self.require(self.intra_op_threads >= 0, "intra_op_threads", ">= 0")
        self.require(self.inter_op_threads >= 0, "inter_op_threads", ">= 0")


@dataclass
class CudaProvider(Config):
    """``CUDAExecutionProvider`` options (onnxruntime-gpu)."""

    section = "export.providers.cuda"
    device_id: int = 0
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = "kSameAsRequested"
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    extra: dict[str, Any] = field(default_factory=dict)  # any other documented option, passed as is

    def check(self) -> None:
        self.require(self.device_id >= 0, "device_id", ">= 0")


@dataclass
class TensorRTProvider(Config):
    """``TensorrtExecutionProvider`` options (onnxruntime-gpu built with TensorRT, TensorRT libraries on
    the library path). Unsupported nodes fall back to the next provider in ``order``."""

    section = "export.providers.tensorrt"
    device_id: int = 0
    fp16: bool = True  # trt_fp16_enable
    int8: bool = False  # trt_int8_enable (needs a calibration table; the QDQ graphs carry their own scales)
    max_workspace_gb: float = 4.0  # trt_max_workspace_size
    engine_cache: bool = True  # trt_engine_cache_enable: build engines once per shape profile
    cache_dir: str = "outputs/export/trt_cache"  # trt_engine_cache_path
    # shape profile per dynamic input ("input_ids:1x1,attention_mask:1x1"); empty = onnxruntime builds per shape
    profile_min_shapes: str = ""
    profile_opt_shapes: str = ""
    profile_max_shapes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        self.require(self.device_id >= 0, "device_id", ">= 0")
        self.require(self.max_workspace_gb > 0, "max_workspace_gb", "> 0")
        profiles = [bool(self.profile_min_shapes), bool(self.profile_opt_shapes), bool(self.profile_max_shapes)]
        self.require(all(profiles) or not any(profiles), "profile_min_shapes", "set together with profile_opt_shapes and "
                     "profile_max_shapes, or all three empty")


@dataclass
class ProvidersConfig(Config):
    section = "export.providers"
    order: list[Literal["tensorrt", "cuda", "cpu"]] = field(default_factory=lambda: ["cpu"])
    cpu: CpuProvider = field(default_factory=CpuProvider)
    cuda: CudaProvider = field(default_factory=CudaProvider)
    tensorrt: TensorRTProvider = field(default_factory=TensorRTProvider)

    def check(self) -> None:
        self.require(bool(self.order) and len(set(self.order)) == len(self.order), "order",
                     "a non-empty list of distinct providers (tensorrt, cuda, cpu), the first preferred")


@dataclass
class ExportConfig(Config):
    section = "export"
    opset: int = 21
    experts_implementation: Literal["grouped_mm", "batched_mm"] = "grouped_mm"
    with_past: bool = True
    fused_moe: Literal["none", "cuda", "cpu"] = "none"
    example_batch: int = 2  # the export example's shape; parity is checked on other shapes
    example_length: int = 8
    parity: ParityConfig = field(default_factory=ParityConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    providers: ProvidersConfig = field(default_factory=ProvidersConfig)

    def check(self) -> None:
        self.require(21 <= self.opset <= 23, "opset", "in [21, 23] (blocked DequantizeLinear needs 21)")
        self.require(self.example_batch >= 2, "example_batch", ">= 2 (1 would be specialised by torch.export)")
        self.require(self.example_length >= 2, "example_length", ">= 2 (1 would be specialised by torch.export)")
