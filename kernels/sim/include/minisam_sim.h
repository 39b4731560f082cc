// The CUDA C++ dialect of kernels/*.cu, as host C++17: the simulator's language layer.
//
// build.rs compiles every kernels/*.cu as host C++ with this header force-included and
// MINISAM_SIM defined. Each source lands inside an anonymous namespace (so the helpers of one .cu,
// and of its other build variants, never merge with another's), its kernels renamed to
// `msim_<module>_<variant>__<kernel>` so the variants coexist in one binary.
//
// What maps to what:
// - `__global__`, `__device__`, `__host__`: nothing (plain functions; the namespace gives them
//   internal linkage). `__forceinline__` / `__noinline__`: GCC's always_inline / noinline.
// - `__constant__`: `const` (device code may not write constant memory; host-side
//   cuMemcpyToSymbol is not emulated).
// - `__shared__`: `static thread_local`. One OS thread runs one block at a time, so a static is one
//   block's shared memory. build.rs appends `MSIM_SHARED(name);` after each declaration: the
//   runtime learns the variable's address and size, poisons it with NaN bytes when the launch
//   first meets it and again before every later block, and checks the 48 KiB static limit.
// - `threadIdx` & co.: the running fiber's / block's coordinates (runtime.cpp).
// - `__syncthreads`, `__shfl_*_sync`: runtime calls that switch fibers (see runtime.cpp for the
//   scheduling rule that makes a missing barrier visible).
// - Inline PTX cannot go through g++: each use sits in a small device function of the .cu with
//   an `#ifdef MINISAM_SIM` branch calling the emulation below (ptx.cpp), written from the PTX
//   ISA's definition of the instruction (rounding, NaN, saturation, fragment layouts).
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define MSIM_TLS __attribute__((tls_model("initial-exec")))

namespace msim {

struct uint3 {
    unsigned x, y, z;
};
typedef uint3 dim3;

struct BlockCoords {
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};

extern thread_local const uint3* t_thread_idx MSIM_TLS;
extern thread_local BlockCoords t_block MSIM_TLS;

// Block barrier. `site` numbers the call in a mutant build (-1 otherwise): the launch options may
// name one site to skip, proving that the tests notice a missing barrier.
void syncthreads(int site = -1);

// A warp collective: every live lane of the warp must call it with the same mask (all live lanes;
// partial masks are refused). Each lane publishes `bytes` (at most 64) and gets the 32 lanes'
// records, `stride` 64 bytes apart, once all have arrived.
const unsigned char* warp_exchange(unsigned mask, const void* mine, size_t bytes);
constexpr size_t kSlotBytes = 64;

// Registers a `__shared__` variable of the running kernel (see above).
void shared_register(void* p, size_t bytes);

// cp.async{.ca,.cg}.shared.global [dst], [src], cp_size{, src_size} (cp_size 4, 8 or 16 bytes;
// bytes past src_size are zero-filled). The copy is only queued: it lands in shared memory when a
// cp.async.wait_group (or wait_all) of this thread retires its group, so a missing wait leaves the
// old contents (NaN poison in a fresh buffer) for whoever reads.
void cp_async(void* dst, const void* src, unsigned cp_size, unsigned src_size);
void cp_async_commit_group();
// Completes this thread's committed groups except the `n` most recent.
void cp_async_wait_group(unsigned n);
// cp.async.wait_all: commit, then wait for everything.
void cp_async_wait_all();

// ldmatrix.sync.aligned.m8n8.x{num}{.trans}.shared.b16 (a warp collective): lanes 8j..8j+7 give
// the row addresses of matrix j; d[j] receives this lane's fragment of matrix j: row lane/4,
// columns 2(lane%4) and 2(lane%4)+1, the lower column in the lower half (with .trans, of the
// transposed matrix).
void ldmatrix(unsigned* d, int num, bool trans, const void* row_address);

// __syncwarp(mask): a warp collective with nothing exchanged.
void syncwarp(unsigned mask);

// Mutation switches of the running launch (LaunchOptions::mutations).
bool mutation_swap_mma_a12();
// A kernel-side hook: nf4_gemm.cu's NF4 table lookup returns the neighbouring entry.
bool mutation_break_nf4_lookup();

// PTX emulation (ptx.cpp).
float cvt_f32_f16(unsigned short h);
// cvt.rn.bf16x2.f32 d, a, b / cvt.rn.satfinite.f16x2.f32 d, a, b: a to the upper half of d.
unsigned cvt_rn_bf16x2_f32(float a, float b);
unsigned cvt_rn_satfinite_f16x2_f32(float a, float b);
// cvt.rn.f16.f32 / cvt.rn.bf16.f32 (a value past the range rounds to infinity).
unsigned short cvt_rn_f16_f32(float a);
unsigned short cvt_rn_bf16_f32(float a);
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 {c} = {a}·{b} + {c}, on this
// lane's fragments (a warp collective).
void mma_m16n8k16_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1);
void mma_m16n8k16_f16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1);

// This lane's index in its warp.
unsigned lane_id();

enum class ShflMode { Idx, Up, Down, Bfly };

// shfl.sync.{idx,up,down,bfly}.b32 per the PTX ISA, with `c` packed as CUDA's __shfl_*_sync do
// (segment mask from `width`, clamp 0x1f except for `up`): a source lane outside the segment's
// bounds yields the lane's own value.
template <typename T>
T shfl(ShflMode mode, unsigned mask, T v, int b, int width) {
    static_assert(sizeof(T) <= kSlotBytes, "shuffle payload too large");
    const unsigned char* all = warp_exchange(mask, &v, sizeof(T));
    const unsigned lane = lane_id();
    const unsigned segmask = (32u - (unsigned)width) & 31u;
    const unsigned cval = mode == ShflMode::Up ? 0u : 31u;
    const unsigned min_lane = lane & segmask;
    const unsigned max_lane = min_lane | (cval & ~segmask);
    unsigned j = lane;
    bool in = false;
    switch (mode) {
        case ShflMode::Up: j = lane - (unsigned)b; in = (int)j >= (int)max_lane; break;
        case ShflMode::Down: j = lane + (unsigned)b; in = j <= max_lane; break;
        case ShflMode::Bfly: j = lane ^ (unsigned)b; in = j <= max_lane; break;
        case ShflMode::Idx: j = min_lane | ((unsigned)b & ~segmask); in = j <= max_lane; break;
    }
    T out;
    std::memcpy(&out, all + kSlotBytes * (in ? j : lane), sizeof(T));
    return out;
}

}  // namespace msim

// ---- The CUDA C++ surface -------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __constant__ const
#define __shared__ static thread_local MSIM_TLS
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define MSIM_SHARED(name) ::msim::shared_register((void*)&(name), sizeof(name))

#define threadIdx (*::msim::t_thread_idx)
#define blockIdx (::msim::t_block.block_idx)
#define blockDim (::msim::t_block.block_dim)
#define gridDim (::msim::t_block.grid_dim)
#define warpSize 32

inline void __syncthreads() { ::msim::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::msim::syncwarp(mask); }

template <typename T>
inline T __ldg(const T* p) { return *p; }

// cuda_fp16.h / cuda_bf16.h's scalar types and conversions (include/cuda_fp16.h and cuda_bf16.h
// are stubs, so a kernel that includes them compiles here too). Arithmetic on them is not
// emulated: convert to float.
struct __half {
    unsigned short x;
};
struct __nv_bfloat16 {
    unsigned short x;
};
inline __half __float2half_rn(float f) { return __half{::msim::cvt_rn_f16_f32(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return ::msim::cvt_f32_f16(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{::msim::cvt_rn_bf16_f32(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) {
    const unsigned u = (unsigned)b.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Atomics: blocks run one at a time and a fiber is never interrupted between two
// synchronisation points, so a plain read-modify-write is atomic here.
template <typename T>
inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T>
inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <typename T>
inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T>
inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
template <typename T>
inline T atomicMin(T* p, T v) { T old = *p; *p = old < v ? old : v; return old; }
template <typename T>
inline T atomicCAS(T* p, T compare, T v) { T old = *p; if (old == compare) *p = v; return old; }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) { return ::msim::shfl(::msim::ShflMode::Idx, mask, v, src, width); }
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) { return ::msim::shfl(::msim::ShflMode::Up, mask, v, (int)delta, width); }
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) { return ::msim::shfl(::msim::ShflMode::Down, mask, v, (int)delta, width); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) { return ::msim::shfl(::msim::ShflMode::Bfly, mask, v, lane_mask, width); }

// Bit casts.
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }

// IEEE round-to-nearest arithmetic that the compiler may not contract (the host build has
// -ffp-contract=off anyway, so only fmaf fuses, as the kernels ask).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

// Device math. The host libm is correctly rounded or close to it; CUDA's expf/erff/exp2f are
// within 2 ulp, rsqrtf within 2 ulp: the tests' tolerances cover the difference.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : std::fmin(std::fmax(x, 0.0f), 1.0f); }

// CUDA's integer and float min/max overloads (same-type pairs, as the device headers declare).
#define MSIM_MINMAX(T)                                  \
    inline T min(T a, T b) { return a < b ? a : b; }    \
    inline T max(T a, T b) { return a > b ? a : b; }
MSIM_MINMAX(int)
MSIM_MINMAX(unsigned)
MSIM_MINMAX(long)
MSIM_MINMAX(unsigned long)
MSIM_MINMAX(long long)
MSIM_MINMAX(unsigned long long)
#undef MSIM_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
