// The MoE layer's expert GEMMs as CUTLASS 3 grouped GEMMs (sm90a, bf16 in, fp32 accumulate, bf16 out), with the
// tile, cluster and schedule fixed at compile time: moe_engine/moe/cutlass_gemm.py builds one shared library per
// configuration and picks the fastest per GEMM shape (torch's F.grouped_mm runs one of them, cooperative
// 128x256x64 with 2x1 clusters, for every shape). Every configuration gives F.grouped_mm's bits: the same MMA
// instructions accumulate each output element over K in the same order.
//
// Build (CUTLASS's include/ on the path; cutlass_gemm.py does this):
//   nvcc -O3 -DNDEBUG -std=c++17 -shared -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a \
//     --expt-relaxed-constexpr -DTILE_M=128 -DTILE_N=256 -DTILE_K=64 -DCLUSTER_M=2 -DCLUSTER_N=1 -DPONG=0 \
//     -I$CUTLASS/include -o gg_coop_128x256x64_c2x1.so moe_engine/moe/grouped_gemm_sm90.cu
// (without -DNDEBUG, CUTLASS's device asserts are calls that serialise the wgmma pipeline: ptxas warning C7510)
//
// Three entry points, each one grouped GEMM over E experts whose rows are contiguous and ordered by expert
// (offs_E: the cumulative row counts, int32 on the device, as F.grouped_mm takes them); no host sync:
//   gg_fwd   y[rows_e, N]  = x[rows_e, K] @ w[e]^T,  w [E, N, K] (a forward projection)
//   gg_dgrad dx[rows_e, N] = g[rows_e, K] @ w[e],    w [E, K, N] (an input gradient)
//   gg_wgrad dw[e][M, N]   = h[rows_e, M]^T @ x[rows_e, N]     (a weight gradient; K is ragged)
// All operands are packed; the return value is 0, or negative where the launch could not be made.
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

using namespace cute;

namespace ggt {  // named: kernels templated on anonymous-namespace types break nvcc's registration stub

using Element = cutlass::bfloat16_t;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
using Tile = Shape<Int<TILE_M>, Int<TILE_N>, Int<TILE_K>>;
using Cluster = Shape<Int<CLUSTER_M>, Int<CLUSTER_N>, _1>;
#if PONG
using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
#else
using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
#endif

// The kernel for one operand layout pair, at namespace scope: inside a class template the host compiler (g++)
// rejects the builders' dependent CollectiveOp types.
#define GROUPED_GEMM(NAME, LAYOUT_A, LAYOUT_B)                                                                        \
  namespace NAME {                                                                                                     \
  using LayoutD = cutlass::layout::RowMajor;                                                                           \
  using Epilogue = cutlass::epilogue::collective::CollectiveBuilder<                                                   \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,                                              \
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutD*, 8, Element, LayoutD*, 8,       \
      EpilogueSchedule, cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;                   \
  using Mainloop = cutlass::gemm::collective::CollectiveBuilder<                                                       \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LAYOUT_A*, 8, Element, LAYOUT_B*, 8, float, Tile, \
      Cluster, cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(Epilogue::SharedStorage))>,  \
      MainloopSchedule>::CollectiveOp;                                                                                 \
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;                               \
  struct G {                                                                                                           \
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;                                                  \
    using StrideA = Kernel::InternalStrideA;                                                                           \
    using StrideB = Kernel::InternalStrideB;                                                                           \
    using StrideD = Kernel::InternalStrideD;                                                                           \
  };                                                                                                                   \
  }

GROUPED_GEMM(fwd, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor)
GROUPED_GEMM(dgrad, cutlass::layout::RowMajor, cutlass::layout::RowMajor)
GROUPED_GEMM(wgrad, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor)

// A packed stride has one dynamic entry (the leading dimension) among static 1s and 0s: set it.
template <class Stride>
__device__ Stride packed(int64_t ld) {
  Stride s{};
  if constexpr (is_static_v<remove_cvref_t<decltype(get<0>(s))>>) {
    get<1>(s) = ld;
  } else {
    get<0>(s) = ld;
  }
  return s;
}

enum Case { kFwd = 0, kDgrad = 1, kWgrad = 2 };

// One thread per expert: its problem size, operand pointers and strides, from offs_E (no host sync).
template <class G, int kCase>
__global__ void prepare(const Element* a, const Element* b, Element* d, const int* offs_E, int E, int M, int N, int K,
                        typename ProblemShape::UnderlyingProblemShape* shapes, const Element** pa, const Element** pb,
                        Element** pd, typename G::StrideA* sa, typename G::StrideB* sb, typename G::StrideD* sd) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int64_t start = e == 0 ? 0 : offs_E[e - 1];
  int rows = offs_E[e] - static_cast<int>(start);
  if constexpr (kCase != kWgrad) {  // A row-major [rows, K]; D [rows, N]; B = w[e], [N, K] K-major (forward)
    shapes[e] = {rows, N, K};          // or [K, N] N-major (input gradient): same offset, other stride
    pa[e] = a + start * K;
    pb[e] = b + static_cast<int64_t>(e) * N * K;
    pd[e] = d + start * N;
    sa[e] = packed<typename G::StrideA>(K);
    sb[e] = packed<typename G::StrideB>(kCase == kFwd ? K : N);
  } else {  // A = h^T: h [rows, M] row-major is [M, rows] column-major; B = x [rows, N] (N-major); D = dw[e] [M, N]
    shapes[e] = {M, N, rows};
    pa[e] = a + start * M;
    pb[e] = b + start * N;
    pd[e] = d + static_cast<int64_t>(e) * M * N;
    sa[e] = packed<typename G::StrideA>(M);
    sb[e] = packed<typename G::StrideB>(N);
  }
  sd[e] = packed<typename G::StrideD>(N);
}

// Where the per-expert arguments sit in the caller's scratch buffer; the GEMM's workspace follows them.
template <class G>
struct Layout {
  static size_t align(size_t n) { return (n + 255) / 256 * 256; }
  size_t shapes = 0, pa, pb, pd, sa, sb, sd, workspace;
  explicit Layout(int E) {
    pa = align(E * sizeof(typename ProblemShape::UnderlyingProblemShape));
    pb = pa + align(E * sizeof(void*));
    pd = pb + align(E * sizeof(void*));
    sa = pd + align(E * sizeof(void*));
    sb = sa + align(E * sizeof(typename G::StrideA));
    sd = sb + align(E * sizeof(typename G::StrideB));
    workspace = sd + align(E * sizeof(typename G::StrideD));
  }
};

int sm_count() {
  static int count = 0;
  if (count == 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev);
  }
  return count;
}

template <class G>
typename G::Gemm::Arguments arguments(char* base, int E, int raster_along_n, int swizzle) {
  using Gemm = typename G::Gemm;
  Layout<G> at(E);
  auto* shapes = reinterpret_cast<typename ProblemShape::UnderlyingProblemShape*>(base + at.shapes);
  auto** pd = reinterpret_cast<Element**>(base + at.pd);
  auto* sd = reinterpret_cast<typename G::StrideD*>(base + at.sd);
  cutlass::KernelHardwareInfo hw;
  hw.sm_count = sm_count();
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                                {E, shapes, nullptr},
                                {reinterpret_cast<const Element**>(base + at.pa),
                                 reinterpret_cast<typename G::StrideA*>(base + at.sa),
                                 reinterpret_cast<const Element**>(base + at.pb),
                                 reinterpret_cast<typename G::StrideB*>(base + at.sb)},
                                {{}, const_cast<const Element**>(pd), sd, pd, sd},
                                hw};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.thread.dAlpha = {_0{}, _0{}, 0};
  args.epilogue.thread.dBeta = {_0{}, _0{}, 0};
  args.scheduler.raster_order = raster_along_n ? decltype(args.scheduler.raster_order)::AlongN
                                               : decltype(args.scheduler.raster_order)::AlongM;
  args.scheduler.max_swizzle_size = swizzle;
  return args;
}

template <class G>
size_t scratch_bytes(int E) {
  auto args = arguments<G>(nullptr, E, 0, 1);
  return Layout<G>(E).workspace + G::Gemm::get_workspace_size(args) + 256;
}

// The caller's scratch (scratch_bytes(E) of device memory on the same stream) holds everything the launch needs,
// so calls on several streams or inside CUDA graphs never share state.
template <class G, int kCase>
int run(const void* a, const void* b, void* d, const int* offs_E, int E, int M, int N, int K, int raster_along_n,
        int swizzle, void* scratch, size_t bytes, cudaStream_t stream) {
  using Gemm = typename G::Gemm;
  if (bytes < scratch_bytes<G>(E)) return -1;
  char* base = static_cast<char*>(scratch);
  Layout<G> at(E);
  prepare<G, kCase><<<(E + 127) / 128, 128, 0, stream>>>(
      static_cast<const Element*>(a), static_cast<const Element*>(b), static_cast<Element*>(d), offs_E, E, M, N, K,
      reinterpret_cast<typename ProblemShape::UnderlyingProblemShape*>(base + at.shapes),
      reinterpret_cast<const Element**>(base + at.pa), reinterpret_cast<const Element**>(base + at.pb),
      reinterpret_cast<Element**>(base + at.pd), reinterpret_cast<typename G::StrideA*>(base + at.sa),
      reinterpret_cast<typename G::StrideB*>(base + at.sb), reinterpret_cast<typename G::StrideD*>(base + at.sd));
  if (cudaGetLastError() != cudaSuccess) return -2;
  auto args = arguments<G>(base, E, raster_along_n, swizzle);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return -3;
  void* workspace = base + (at.workspace + 255) / 256 * 256;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return -5;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return -6;
  return cudaGetLastError() == cudaSuccess ? 0 : -7;
}

}  // namespace ggt

extern "C" {
// Device memory the caller passes as scratch to an entry point of this case (0 fwd, 1 dgrad, 2 wgrad).
size_t gg_scratch_bytes(int kase, int E) {
  return kase == 0 ? ggt::scratch_bytes<ggt::fwd::G>(E)
                   : kase == 1 ? ggt::scratch_bytes<ggt::dgrad::G>(E) : ggt::scratch_bytes<ggt::wgrad::G>(E);
}
int gg_fwd(const void* x, const void* w, void* y, const int* offs_E, int E, int N, int K, int raster, int swizzle,
           void* scratch, size_t bytes, cudaStream_t stream) {
  return ggt::run<ggt::fwd::G, ggt::kFwd>(x, w, y, offs_E, E, 0, N, K, raster, swizzle, scratch, bytes, stream);
}
int gg_dgrad(const void* g, const void* w, void* dx, const int* offs_E, int E, int N, int K, int raster, int swizzle,
             void* scratch, size_t bytes, cudaStream_t stream) {
  return ggt::run<ggt::dgrad::G, ggt::kDgrad>(g, w, dx, offs_E, E, 0, N, K, raster, swizzle, scratch, bytes, stream);
}
int gg_wgrad(const void* h, const void* x, void* dw, const int* offs_E, int E, int M, int N, int raster, int swizzle,
             void* scratch, size_t bytes, cudaStream_t stream) {
  return ggt::run<ggt::wgrad::G, ggt::kWgrad>(h, x, dw, offs_E, E, M, N, 0, raster, swizzle, scratch, bytes, stream);
}
}
