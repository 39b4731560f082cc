// Kernels that exist only to test the simulator itself (built as variant "probe"; never compiled
// by NVRTC): coordinates, shuffles, the PTX emulation on explicit inputs, and the faults the
// runtime must report instead of hanging or answering.

typedef long long i64;

// out[t] = (threadIdx, blockIdx, blockDim, gridDim) of global thread t, x fastest.
extern "C" __global__ void probe_coords(unsigned* out) {
    const unsigned block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const unsigned thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    unsigned* o = out + 12 * (block * blockDim.x * blockDim.y * blockDim.z + thread);
    const unsigned v[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                            blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
    for (int i = 0; i < 12; ++i) o[i] = v[i];
}

// The four shuffles of v = 10 * threadIdx.x + 1 with one lane/delta argument and width.
extern "C" __global__ void probe_shuffles(int* out, int arg, int width) {
    const int v = 10 * (int)threadIdx.x + 1;
    int* o = out + 4 * threadIdx.x;
    o[0] = __shfl_sync(0xffffffffu, v, arg, width);
    o[1] = __shfl_up_sync(0xffffffffu, v, (unsigned)arg, width);
    o[2] = __shfl_down_sync(0xffffffffu, v, (unsigned)arg, width);
    o[3] = __shfl_xor_sync(0xffffffffu, v, arg, width);
}

// Each thread publishes its id in shared memory; after the barrier it reads its neighbour's.
extern "C" __global__ void probe_neighbour(int* out) {
    __shared__ int ids[1024];
    const unsigned n = blockDim.x;
    ids[threadIdx.x] = (int)(blockIdx.x * n + threadIdx.x);
    __syncthreads();
    out[blockIdx.x * n + threadIdx.x] = ids[(threadIdx.x + 1) % n];
}

// Reads shared memory nobody wrote: the simulator's poison (all bits set) must show.
extern "C" __global__ void probe_unwritten_shared(unsigned* out) {
    __shared__ unsigned fresh[128];
    out[threadIdx.x] = fresh[threadIdx.x];
}

// One lane of each warp enters a shuffle while the rest wait at the barrier: a deadlock.
extern "C" __global__ void probe_deadlock(int* out) {
    if ((threadIdx.x & 31) == 0) out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
    else __syncthreads();
}

// A shuffle naming only half the warp.
extern "C" __global__ void probe_partial_mask(int* out) { out[threadIdx.x] = __shfl_sync(0x0000ffffu, (int)threadIdx.x, 0); }

// 52 000 bytes of static shared memory: over CUDA's 48 KiB.
extern "C" __global__ void probe_too_much_shared(float* out) {
    __shared__ float big[13000];
    big[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = big[0];
}

// The conversions, on explicit inputs: hi/lo pairs to bf16x2 and satfinite f16x2, f16 to f32.
extern "C" __global__ void probe_cvt(const float* hi, const float* lo, unsigned* bf16x2, unsigned* f16x2, const unsigned short* h, float* widened, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        bf16x2[i] = msim::cvt_rn_bf16x2_f32(hi[i], lo[i]);
        f16x2[i] = msim::cvt_rn_satfinite_f16x2_f32(hi[i], lo[i]);
        widened[i] = msim::cvt_f32_f16(h[i]);
    }
}

// One warp's mma.m16n8k16 on fragments given per lane: a[4 * lane + r], b[2 * lane + r],
// c[4 * lane + r] in, d[4 * lane + r] out.
extern "C" __global__ void probe_mma(const unsigned* a, const unsigned* b, const float* c, float* d, int f16) {
    const unsigned l = threadIdx.x;
    float acc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
    if (f16) msim::mma_m16n8k16_f16(acc, a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3], b[2 * l], b[2 * l + 1]);
    else msim::mma_m16n8k16_bf16(acc, a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3], b[2 * l], b[2 * l + 1]);
    for (int r = 0; r < 4; ++r) d[4 * l + r] = acc[r];
}

// cp.async: each thread copies 16 bytes (4 floats) of `src` into shared memory in two groups
// (the second zero-filled past `src_bytes`), and records what its own shared slots hold before
// any wait, after wait_group(1) and after wait_group(0); then, after a barrier, reads its
// neighbour's slots. out: per thread 4 x 8 floats.
extern "C" __global__ void probe_cp_async(const float* src, float* out, int src_bytes) {
    __shared__ __align__(16) float first[128 * 4];
    __shared__ __align__(16) float second[128 * 4];
    const unsigned t = threadIdx.x, n = blockDim.x;
    float* o = out + 32 * t;
    msim::cp_async(&first[4 * t], &src[4 * t], 16, 16);
    msim::cp_async_commit_group();
    msim::cp_async(&second[4 * t], &src[4 * (n + t)], 16, (unsigned)src_bytes);
    msim::cp_async_commit_group();
    for (int i = 0; i < 4; ++i) o[i] = first[4 * t + i], o[4 + i] = second[4 * t + i];
    msim::cp_async_wait_group(1);
    for (int i = 0; i < 4; ++i) o[8 + i] = first[4 * t + i], o[12 + i] = second[4 * t + i];
    msim::cp_async_wait_group(0);
    for (int i = 0; i < 4; ++i) o[16 + i] = first[4 * t + i], o[20 + i] = second[4 * t + i];
    __syncthreads();
    const unsigned u = (t + 1) % n;
    for (int i = 0; i < 4; ++i) o[24 + i] = first[4 * u + i], o[28 + i] = second[4 * u + i];
}

// ldmatrix .x1/.x2/.x4, plain and .trans, from a [32 x 8] b16 matrix stacked as four 8 x 8
// matrices (matrix j = rows 8j..8j+7) copied into shared memory; lane l gives the address of
// row l. out[(variant * 32 + lane) * 4 + j] = d[j], variants x1, x2, x4, x1.trans, x2.trans,
// x4.trans.
extern "C" __global__ void probe_ldmatrix(const unsigned short* m, unsigned* out) {
    __shared__ __align__(16) unsigned short tile[32 * 8];
    const unsigned l = threadIdx.x;
    for (int c = 0; c < 8; ++c) tile[8 * l + c] = m[8 * l + c];
    __syncthreads();
    int variant = 0;
    for (int trans = 0; trans < 2; ++trans)
        for (int num = 1; num <= 4; num *= 2) {
            unsigned d[4] = {0, 0, 0, 0};
            msim::ldmatrix(d, num, trans != 0, &tile[8 * l]);
            for (int j = 0; j < 4; ++j) out[(variant * 32 + l) * 4 + j] = d[j];
            ++variant;
        }
}

// Atomics from every thread of every block onto one counter, and __syncwarp.
extern "C" __global__ void probe_atomics(int* counter, unsigned* maximum) {
    __syncwarp();
    atomicAdd(counter, 1);
    atomicMax(maximum, blockIdx.x * blockDim.x + threadIdx.x);
}

// cuda_fp16.h / cuda_bf16.h scalar conversions, round trip.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void probe_half(const float* in, unsigned short* h, unsigned short* b, float* back, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const __half hv = __float2half_rn(in[i]);
        const __nv_bfloat16 bv = __float2bfloat16(in[i]);
        h[i] = hv.x;
        b[i] = bv.x;
        back[2 * i] = __half2float(hv);
        back[2 * i + 1] = __bfloat162float(bv);
    }
}
