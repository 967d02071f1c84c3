// Row kernels of the large-batch MoE path (ops/moe/grouped.py, ops/moe/quantized.py): the work around the
// grouped GEMMs, which torch did in 4-8 full passes over [T*k, H] tensors each (in fp32 for the fp8 scales).
// - fp8_rows: per-row e4m3 quantisation of bf16 rows, either gathered (xq[r] from x[index[r]]) or the
//   activation of gate|up rows (act = silu(g) * u in fp32, rounded to bf16 once, then quantised). One CTA per
//   row: the row's values go to shared memory with their max, then a = max / 448 (IEEE, 1 for a zero row) and
//   q = e4m3(v / a) (IEEE division, round to nearest even, saturating): torch's quantize_fp8_rows, bit for bit.
// - combine: out[t] = sum_j w[t, j] y[pos[t, j]] in fp32 (products rounded, then added in order j = 0..k-1
//   from 0, as index_add_ of the weighted rows into zeros does for k <= 2), cast once; pos < 0 adds nothing.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <tvm/ffi/extra/cuda/device_guard.h>

#include <type_traits>

#include "../common/check.h"
#include "../common/device.h"
#include "launchers.h"

namespace minimax_m1 {
namespace moe {
namespace {

constexpr int kRowThreads = 256;
constexpr float kE4m3Max = 448.f;
constexpr int kMaxRowCols = 16384;  // bf16 values of one row in shared memory: 32 KB

struct Fp8RowsParams {
  const __nv_bfloat16* src;
  int64_t src_stride;    // elements between source rows
  int64_t src_rows;      // gathered rows must index [0, src_rows)
  const int64_t* index;  // [rows] or null (row r reads source row r)
  int silu_mul;          // source row r holds gate | up, each `cols` wide
  int cols;              // multiple of 8
  uint8_t* dst;          // [rows, cols] e4m3
  float* scale;          // [rows]
};

__device__ __forceinline__ uint16_t e4m3x2(float x0, float x1) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 890
  uint16_t q;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(q) : "f"(x1), "f"(x0));  // x0 in the low byte
  return q;
#else
  __trap();
  return 0;
#endif
}

__global__ void __launch_bounds__(kRowThreads) fp8_rows_kernel(const Fp8RowsParams p) {
  extern __shared__ uint4 row_smem[];
  __shared__ float warp_max[kRowThreads / 32];
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t src_row = p.index ? p.index[r] : r;
  const bool valid = src_row >= 0 && src_row < p.src_rows;  // never read outside the source
  const __nv_bfloat16* src = p.src + (valid ? src_row : 0) * p.src_stride;
  float amax = 0.f;
  for (int c = 8 * tid; c < p.cols; c += 8 * kRowThreads) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (valid && p.silu_mul) {
      const uint4 g4 = __ldg(reinterpret_cast<const uint4*>(src + c));
      const uint4 u4 = __ldg(reinterpret_cast<const uint4*>(src + p.cols + c));
      const __nv_bfloat16* g = reinterpret_cast<const __nv_bfloat16*>(&g4);
      const __nv_bfloat16* u = reinterpret_cast<const __nv_bfloat16*>(&u4);
      __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&v);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float gf = __bfloat162float(g[i]);
        o[i] = __float2bfloat16_rn(__fmul_rn(__fdiv_rn(gf, __fadd_rn(1.f, expf(-gf))), __bfloat162float(u[i])));
      }
    } else if (valid) {
      v = __ldg(reinterpret_cast<const uint4*>(src + c));
    }
    const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(__bfloat162float(e[i])));
    row_smem[c / 8] = v;  // read back by this thread only
  }
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
  if ((tid & 31) == 0) warp_max[tid >> 5] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int w = 1; w < kRowThreads / 32; ++w) amax = fmaxf(amax, warp_max[w]);
  const float a = amax > 0.f ? __fdiv_rn(amax, kE4m3Max) : 1.f;
  if (tid == 0) p.scale[r] = a;
  uint8_t* dst = p.dst + r * p.cols;
  for (int c = 8 * tid; c < p.cols; c += 8 * kRowThreads) {
    const uint4 v = row_smem[c / 8];
    const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&v);
    uint32_t o[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t lo = e4m3x2(__fdiv_rn(__bfloat162float(e[4 * i]), a), __fdiv_rn(__bfloat162float(e[4 * i + 1]), a));
      const uint32_t hi = e4m3x2(__fdiv_rn(__bfloat162float(e[4 * i + 2]), a), __fdiv_rn(__bfloat162float(e[4 * i + 3]), a));
      o[i] = lo | (hi << 16);
    }
    *reinterpret_cast<uint2*>(dst + c) = make_uint2(o[0], o[1]);
  }
}

template <typename T>
struct CombineParams {
  const T* y;          // [rows, H]
  int64_t rows;
  const int64_t* pos;  // [tokens, top_k]: the row of y holding (t, j), or < 0
  const float* weights;  // [tokens, top_k]
  int top_k;
  int hidden;          // multiple of 8
  T* out;              // [tokens, H]
};

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) combine_kernel(const CombineParams<T> p) {
  const int64_t t = blockIdx.x;
  for (int c = 8 * threadIdx.x; c < p.hidden; c += 8 * kRowThreads) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < p.top_k; ++j) {
      const int64_t row = p.pos[t * p.top_k + j];
      if (row < 0 || row >= p.rows) continue;
      const float w = p.weights[t * p.top_k + j];
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p.y + row * p.hidden + c));
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(to_f(e[i]), w));
    }
    uint4 o;
    T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int i = 0; i < 8; ++i) oe[i] = from_f<T>(acc[i]);
    *reinterpret_cast<uint4*>(p.out + t * p.hidden + c) = o;
  }
}

bool is_i64(const TensorView& t) {
  const DLDataType d = t.dtype();
  return d.code == kDLInt && d.bits == 64 && d.lanes == 1;
}

bool is_e4m3(const TensorView& t) {
  const DLDataType d = t.dtype();
  return d.code == kDLFloat8_e4m3fn && d.bits == 8 && d.lanes == 1;
}

void check_index(const TensorView& t, const char* name, int64_t n) {
  if (!is_i64(t)) TVM_FFI_THROW(ValueError) << name << " must be int64";
  check_shape(t, name, {n});
  check_contiguous(t, name);
}

}  // namespace

void fp8_rows(TensorView src, TensorView index, TensorView dst, TensorView scale, bool silu_mul) {
  const int device_id = src.device().device_id;
  check_cuda({{&index, "index"}, {&dst, "dst"}, {&scale, "scale"}}, device_id, "src");
  check_dtype(src, "src", Dtype::kBF16);
  if (src.ndim() != 2 || dst.ndim() != 2) TVM_FFI_THROW(ValueError) << "src and dst must be 2-D";
  check_rows_16b(src, "src");
  if (!is_e4m3(dst)) TVM_FFI_THROW(ValueError) << "dst must be float8_e4m3fn";
  check_contiguous(dst, "dst");
  check_aligned(data_of(dst), 8, "dst");
  const int64_t rows = dst.size(0), cols = dst.size(1);
  check_dtype(scale, "scale", Dtype::kF32);
  check_shape(scale, "scale", {rows});
  check_contiguous(scale, "scale");
  const bool gather = index.numel() > 0 || src.size(0) != rows;
  if (gather) check_index(index, "index", rows);
  if (silu_mul && gather) TVM_FFI_THROW(ValueError) << "silu_mul takes no index";
  if (src.size(1) != (silu_mul ? 2 * cols : cols))
    TVM_FFI_THROW(ValueError) << "src has " << src.size(1) << " columns; dst's " << cols
                              << (silu_mul ? " need 2 * that (gate | up)" : " need as many");
  if (cols % 8 != 0 || cols < 8 || cols > kMaxRowCols)
    TVM_FFI_THROW(ValueError) << "rows must have a multiple of 8 columns, at most " << kMaxRowCols << ", got " << cols;
  if (rows == 0) return;
  tvm::ffi::CUDADeviceGuard guard(device_id);
  const DeviceInfo info = device_info(device_id);
  if (10 * info.cc_major + info.cc_minor < 89)
    TVM_FFI_THROW(ValueError) << "fp8 rows need compute capability 8.9 or newer";
  Fp8RowsParams p{static_cast<const __nv_bfloat16*>(data_of(src)), src.stride(0), src.size(0),
                  gather ? static_cast<const int64_t*>(data_of(index)) : nullptr, silu_mul ? 1 : 0,
                  static_cast<int>(cols), static_cast<uint8_t*>(data_of(dst)), static_cast<float*>(data_of(scale))};
  const size_t smem = static_cast<size_t>(cols) * 2;
  fp8_rows_kernel<<<static_cast<unsigned>(rows), kRowThreads, smem, current_stream(device_id)>>>(p);
  MINIMAX_CHECK_LAUNCH();
}

void combine(TensorView y, TensorView pos, TensorView weights, TensorView out) {
  const int device_id = y.device().device_id;
  check_cuda({{&pos, "pos"}, {&weights, "weights"}, {&out, "out"}}, device_id, "y");
  const Dtype dt = dtype_of(y);
  if (dt != Dtype::kBF16 && dt != Dtype::kF16) TVM_FFI_THROW(ValueError) << "y must be bfloat16 or float16";
  if (y.ndim() != 2 || out.ndim() != 2 || weights.ndim() != 2) TVM_FFI_THROW(ValueError) << "y, weights and out must be 2-D";
  const int64_t tokens = out.size(0), hidden = out.size(1), top_k = weights.size(1);
  check_dtype(out, "out", dt);
  check_shape(y, "y", {y.size(0), hidden});
  check_contiguous(y, "y");
  check_contiguous(out, "out");
  check_aligned(data_of(y), 16, "y");
  check_aligned(data_of(out), 16, "out");
  check_dtype(weights, "weights", Dtype::kF32);
  check_shape(weights, "weights", {tokens, top_k});
  check_contiguous(weights, "weights");
  if (!is_i64(pos)) TVM_FFI_THROW(ValueError) << "pos must be int64";
  check_shape(pos, "pos", {tokens, top_k});
  check_contiguous(pos, "pos");
  if (hidden % 8 != 0 || hidden < 8) TVM_FFI_THROW(ValueError) << "hidden must be a positive multiple of 8";
  if (tokens == 0) return;
  tvm::ffi::CUDADeviceGuard guard(device_id);
  const cudaStream_t stream = current_stream(device_id);
  if (dt == Dtype::kBF16) {
    CombineParams<__nv_bfloat16> p{static_cast<const __nv_bfloat16*>(data_of(y)), y.size(0),
                                   static_cast<const int64_t*>(data_of(pos)),
                                   static_cast<const float*>(data_of(weights)), static_cast<int>(top_k),
                                   static_cast<int>(hidden), static_cast<__nv_bfloat16*>(data_of(out))};
    combine_kernel<<<static_cast<unsigned>(tokens), kRowThreads, 0, stream>>>(p);
  } else {
    CombineParams<__half> p{static_cast<const __half*>(data_of(y)), y.size(0),
                            static_cast<const int64_t*>(data_of(pos)), static_cast<const float*>(data_of(weights)),
                            static_cast<int>(top_k), static_cast<int>(hidden), static_cast<__half*>(data_of(out))};
    combine_kernel<<<static_cast<unsigned>(tokens), kRowThreads, 0, stream>>>(p);
  }
  MINIMAX_CHECK_LAUNCH();
}

}  // namespace moe
}  // namespace minimax_m1
