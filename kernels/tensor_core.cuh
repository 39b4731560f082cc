// Tensor-core and cp.async helpers shared by attention.cu and nf4_gemm.cu: the 16-bit operand
// conversion, mma.sync m16n8k16 and cp.async with its commit. Each wraps one PTX instruction in a
// small function whose MINISAM_SIM branch calls the host simulator's emulation of the same
// instruction (kernels/sim, msim::...).
//
// How it reaches the compilers: a .cu file says `#include "tensor_core.cuh"`. NVRTC gets this
// text as an in-memory header of the program (models/src/cuda/compile.rs, HEADERS; part of the
// kernel cache key of every source that includes it), so a deployed binary still needs no source
// tree; the simulator's build (kernels/sim/build.rs) puts kernels/ on the include path. Diagnostics
// name this file and its own lines either way.
//
// Only what both modules use the same way lives here: the cp.async waits differ (attention.cu waits
// for every group, nf4_gemm.cu keeps STAGES-2 in flight) and stay in their modules, as do
// nf4_gemm.cu's f16_to_f32 and lds_pair. The simulator rewrites `__shared__` and `__syncthreads`
// in the .cu text only, so this file must use neither (build.rs checks).
//
// Operand type: bf16 by default, fp16 with -DMINISAM_MMA_F16 (compile.rs, MmaPrecision).

#ifndef MINISAM_TENSOR_CORE_CUH
#define MINISAM_TENSOR_CORE_CUH

// Two f32 values rounded to one 16-bit pair register, `lo` in the low half (element c of a
// fragment pair), `hi` in the high half.
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
#ifdef MINISAM_SIM
#ifdef MINISAM_MMA_F16
    return msim::cvt_rn_satfinite_f16x2_f32(hi, lo);
#else
    return msim::cvt_rn_bf16x2_f32(hi, lo);
#endif
#else
    unsigned r;
#ifdef MINISAM_MMA_F16
    // .satfinite: an activation above 65504 becomes ±65504, not ±inf (which would turn the
    // whole accumulator, and every later layer, into inf/NaN). bf16 has f32's range.
    asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
#endif
}

// c (16 x 8 f32 accumulator fragment, 4 per lane) += A (16 x 16, a0..a3) . B (16 x 8, b0, b1).
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
#ifdef MINISAM_SIM
#ifdef MINISAM_MMA_F16
    msim::mma_m16n8k16_f16(c, a0, a1, a2, a3, b0, b1);
#else
    msim::mma_m16n8k16_bf16(c, a0, a1, a2, a3, b0, b1);
#endif
#elif defined(MINISAM_MMA_F16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

#ifndef MINISAM_SIM
// cp.async takes a shared-state-space address; a generic pointer to shared memory converts.
__device__ __forceinline__ unsigned shared_address(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
#endif

// cp.async of `BYTES` (4 or 16) bytes, of which the first `src_bytes` come from global memory and
// the rest are zero-filled (src_bytes = 0: a padded row or column, no global read).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, unsigned src_bytes) {
#ifdef MINISAM_SIM
    msim::cp_async(dst, src, BYTES, src_bytes);
#else
    if (BYTES == 16)
        // .cg: a tile is read once per block, so bypass L1.
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst)), "l"(src), "r"(src_bytes) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(shared_address(dst)), "l"(src), "r"(src_bytes) : "memory");
#endif
}

// Closes this thread's current group of cp.async copies (the unit the modules' waits count).
__device__ __forceinline__ void cp_async_commit() {
#ifdef MINISAM_SIM
    msim::cp_async_commit_group();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

#endif  // MINISAM_TENSOR_CORE_CUH
