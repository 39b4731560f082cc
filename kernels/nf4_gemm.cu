// Every GEMM-shaped operation of the CUDA backend: `linear` (activations x stored weights, NF4
// dequantised inside the main loop), `matmul` (activations x activations, batched), dense
// convolution as an implicit GEMM (no im2col buffer) and the k == stride transposed convolution
// as a GEMM followed by a scatter in the epilogue.
//
// One kernel body, parameterised at run time by a `GemmParams` record (mirrored field by field in
// models/src/cuda/params.rs), and at compile time only by what changes the inner loop: the
// storage of the B operand (f32 / fp16 / NF4) and whether the product runs on the tensor cores
// (mma.sync m16n8k16, bf16 operands by default or fp16 with -DMINISAM_MMA_F16, f32 accumulation)
// or on the CUDA cores in f32 (the reference mode, and tiny K where rounding the operands to 16
// bits would cost more than the tensor cores save).
//
// Tiles: 64 (M) x 64 (N) x 32 (K) per block of 128 threads, the operand tiles of the next steps
// in flight with cp.async while the current one is multiplied (the pipeline, what is copied raw
// and where NF4 is decoded: see "Shared memory and the copy pipeline" below). The finished C tile
// goes through shared memory once, so that the epilogue is one loop with coalesced stores.
//
// Compiled by NVRTC with no CUDA headers. The 16-bit conversions, the MMA and cp.async are inline
// PTX, each in a small function whose MINISAM_SIM branch calls the host simulator's emulation of
// the same instruction (kernels/sim): those shared with attention.cu (pack2, mma16816, cp_async,
// cp_async_commit) come from tensor_core.cuh, the only header, which NVRTC and the simulator both
// resolve (see its top comment); f16_to_f32, lds_pair and the pipeline's wait are below.
// Index arithmetic inside the tiles is 32-bit (the host refuses tensors of 2^31 elements or more).

#include "tensor_core.cuh"

#define BM 64
#define BN 64
#define BK 32
#define THREADS 128

// Operand B storage kinds (WeightKind in Rust).
#define W_F32 0
#define W_F16 1
#define W_NF4 2

// A operand modes.
#define A_ROWMAJOR 0
#define A_IM2COL 1

// Output modes.
#define C_ROWMAJOR 0
#define C_NCHW 1
#define C_CONVT 2

// Activations (Activation in Rust).
#define ACT_NONE 0
#define ACT_GELU 1
#define ACT_RELU 2

typedef long long i64;

// The main loop looks codes up in a shared-memory copy of this table (nf4_lookup); only the LoRA
// epilogue's load_weight, once per output, reads it here.
__constant__ float NF4_TABLE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// A weight in its stored precision. For NF4: `data` holds the codes (two per byte, low nibble
// first), `absq` one log2-coded absmax per 64-element block, `scales` an (offset, step) f32 pair
// per 256 blocks.
struct WeightRef {
    const void* data;
    const unsigned char* absq;
    const float* scales;
    i64 kind;
};

struct GemmParams {
    i64 m, n, k;
    i64 batch_count;
    // A: activations, f32.
    const float* a;
    i64 a_mode;
    i64 lda, a_batch;
    // implicit-GEMM convolution geometry (a_mode == A_IM2COL): m = (b, oy, ox), k = (ci, ky, kx)
    i64 cin, h, w, kh, kw, stride, pad, oh, ow;
    // B: element (n, k) of batch z lives at index z*b_batch + n*sbn + k*sbk.
    WeightRef b;
    i64 sbn, sbk, b_batch;
    // C
    float* c;
    i64 c_mode;
    i64 ldc, c_batch;
    i64 ct_k;           // C_CONVT: the kernel size (== stride); n = (co, ky, kx)
    const float* bias;  // bias[n / bias_div]
    i64 bias_div;
    const float* residual;  // added after the activation, same index as c
    i64 act;
    // LoRA epilogue: c += lora_scale * sum_j t[m, j] * B_lora[n, j], with t = x·Aᵀ either given
    // (lora_t, [M, lora_r], computed by an earlier launch) or computed by this kernel from the
    // A tiles it stages anyway (lora_a: f32 [lora_r, k], lora_r <= 64; tensor-core body only).
    const float* lora_t;
    WeightRef lora_b;
    i64 lora_r;
    float lora_scale;
    float pad_;
    const float* lora_a;
};

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
#ifdef MINISAM_SIM
    return msim::cvt_f32_f16(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ float nf4_absmax(const WeightRef& w, i64 block) {
    unsigned q = w.absq[block];
    if (q == 0) return 0.0f;
    i64 g = block >> 8;
    return exp2f(w.scales[2 * g] + (float)(q - 1) * w.scales[2 * g + 1]);
}

__device__ __forceinline__ float nf4_code(const WeightRef& w, i64 i) {
    unsigned char byte = ((const unsigned char*)w.data)[i >> 1];
    unsigned code = (i & 1) ? (byte >> 4) : (byte & 15);
    return NF4_TABLE[code];
}

// Element `i` (flattened row-major) of a weight of any kind, in f32.
__device__ __forceinline__ float load_weight(const WeightRef& w, i64 i) {
    if (w.kind == W_F32) return ((const float*)w.data)[i];
    if (w.kind == W_F16) return f16_to_f32(((const unsigned short*)w.data)[i]);
    return nf4_code(w, i) * nf4_absmax(w, i >> 6);
}

__device__ __forceinline__ float activate(float v, i64 act) {
    if (act == ACT_GELU) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    if (act == ACT_RELU) return fmaxf(v, 0.0f);
    return v;
}

// ---------------------------------------------------------------------------------------------
// Shared memory and the copy pipeline
//
// Each block computes a 64 x 64 tile of C over the whole K, in K steps of 32. The operand tiles of
// the next STAGES-1 steps are in flight (cp.async) while the current one is multiplied:
//   prologue: issue tiles 0 .. STAGES-2, one commit group each;
//   step kt:  wait until tile kt's group has landed (cp.async.wait_group STAGES-2: the later
//             groups may stay in flight), barrier (every thread's copies of tile kt are visible,
//             and every warp is done with tile kt-1), issue tile kt+STAGES-1 into the stage that
//             tile kt-1 used, then multiply tile kt.
// One barrier per step covers both hazards: read-after-write of tile kt and write-after-read of
// the stage refilled. A group is committed every step even when there is nothing left to issue,
// so the wait count stays STAGES-2 to the end.
//
// What is copied raw, what is decoded:
// - A (activations, f32) is staged as f32: 16-byte cp.async of whole 4-float chunks of a row when
//   the rows are 16-byte aligned (lda % 4 == 0 and an aligned base; the partial chunk at the K
//   edge copies fewer source bytes and zero-fills the rest), 4-byte cp.async per element
//   otherwise and for the implicit im2col gather (zero-filled, src-size 0, outside the image or
//   the matrix: a 4-byte cp.async can fetch any aligned f32, so the gather needs no synchronous
//   path). Rounding to 16 bits happens when the mma fragments are built, so the copy stays a raw
//   byte copy, and the A tile stays f32: that is why there is no ldmatrix here (it moves 16-bit
//   elements; an f32 tile would need a separate rounding pass through shared memory).
// - B stored as f32: as A (16-byte chunks for [N, K] rows, 4-byte elements for the transposed
//   [K, N] storage of matmul and the transposed convolution).
// - B stored as fp16: staged raw as 16-bit halves (16-byte chunks when rows are 8-aligned, a
//   guarded synchronous 2-byte load otherwise); in the fp16 mma build a pair of halves IS the
//   fragment register, in the bf16 build it is widened and rounded once in the fragment build.
// - B stored as NF4: when the weight is [N, K] with K a multiple of 64 (the model's linears: a
//   tile row is 32 codes of one absmax block), each row's 16 bytes of codes are one 16-byte
//   cp.async, and the row's absmax is decoded synchronously by the other half of the block; the
//   codes are dequantised in registers when the fragments are built, through a copy of the
//   16-entry table in shared memory (16 distinct banks: lanes with different codes never
//   conflict, equal codes broadcast; a __constant__ table would serialise them). Other layouts
//   (conv weights with K % 64 != 0, the transposed convolution's [K, N]) decode element by
//   element, synchronously, into an f32 tile.
// Synchronous stores into a stage are as safe as the copies: the stage is the one every warp
// finished with before this step's barrier, and it is read only after the barrier of its step.
// ---------------------------------------------------------------------------------------------

// Row pitch of the f32 tiles: 40 floats (160 B, 16-byte aligned for cp.async). The tensor-core
// A fragment reads float2 at row g, column 2t: with a pitch of 8 banks the 16 lanes of a
// half-warp (g 0..3, t 0..3) cover 32 distinct banks.
#define LDS (BK + 8)
// Row pitch of the fp16 B tile: 40 halves (80 B = 20 banks): the fragment reads (row g, word t)
// of 8 rows x 4 words fall in 32 distinct banks.
#define LDH (BK + 8)

template <int KIND>
struct GemmConfig {
    // The fp16 B tile is a quarter of the f32 one, which leaves room for a third stage within the
    // 48 KiB of static shared memory; f32 and NF4 (whose general path needs an f32 B tile) fit two.
    static constexpr int STAGES = KIND == W_F16 ? 3 : 2;
    static constexpr int BF_ROWS = KIND == W_F16 ? 1 : BN;   // f32 B tile (unused for fp16)
    static constexpr int BH_ROWS = KIND == W_F16 ? BN : 1;   // raw fp16 B tile
    static constexpr int BQ_ROWS = KIND == W_NF4 ? BN : 1;   // raw NF4 codes, 16 bytes per row
};

// Per-block geometry of the A rows for the implicit im2col, computed once before the K loop so
// the main loop does no division per element: input offset of the row's image, and the top-left
// input coordinate of its receptive field (may be negative: padding).
struct RowGeom {
    int base[BM];
    int y0[BM];
    int x0[BM];
};

template <int KIND>
struct GemmTiles {
    float A[GemmConfig<KIND>::STAGES][BM][LDS];
    float B[GemmConfig<KIND>::STAGES][GemmConfig<KIND>::BF_ROWS][LDS];
    unsigned short Bh[GemmConfig<KIND>::STAGES][GemmConfig<KIND>::BH_ROWS][LDH];
    unsigned char Bq[GemmConfig<KIND>::STAGES][GemmConfig<KIND>::BQ_ROWS][BK / 2];
    float absmax[GemmConfig<KIND>::STAGES][GemmConfig<KIND>::BQ_ROWS];
};

// The block's finished 64 x 64 tile, staged in shared memory over the operand tiles (padded rows:
// the column walk of the NCHW case falls in distinct banks).
#define LDC (BN + 1)

// After the K loop: the C tile and the fused LoRA's x·Aᵀ rows (33 KiB, within the 41-47 KiB of
// the stages they overlay).
struct OutTiles {
    float Cs[BM][LDC];
    float Ts[BM][LDC];
};

// 16-byte aligned: the destinations of the 16-byte copies (every row of every tile starts at a
// multiple of 16 bytes from here; shared arrays are otherwise only aligned to their element).
template <int KIND>
union __align__(16) GemmSmem {
    GemmTiles<KIND> t;
    OutTiles o;
};

// What stays fixed over the K loop, decided once per block.
struct Plan {
    bool a_vec;   // A row-major with 16-byte aligned rows
    bool b_vec;   // B rows ([N, K], sbk == 1) 16-byte aligned, in its storage type
    bool b_nf4q;  // NF4 codes copied raw (rows of whole 64-blocks, see above)
    bool b_kfast; // B's k is the contiguous index (sbk == 1): walk the tile along k
};

__device__ __forceinline__ bool aligned16(const void* p, i64 elements, int elem_bytes) {
    return (((unsigned long long)p + (unsigned long long)(elements * elem_bytes)) & 15) == 0;
}

template <int KIND>
__device__ __forceinline__ Plan make_plan(const GemmParams& p, i64 z) {
    Plan pl;
    pl.a_vec = p.a_mode == A_ROWMAJOR && (p.lda & 3) == 0 && aligned16(p.a, z * p.a_batch, 4);
    const i64 base = z * p.b_batch;
    pl.b_kfast = p.sbk == 1;
    if (KIND == W_F32) pl.b_vec = p.sbk == 1 && (p.sbn & 3) == 0 && aligned16(p.b.data, base, 4);
    else if (KIND == W_F16) pl.b_vec = p.sbk == 1 && (p.sbn & 7) == 0 && aligned16(p.b.data, base, 2);
    else pl.b_vec = false;
    pl.b_nf4q = KIND == W_NF4 && p.sbk == 1 && p.sbn == p.k && (p.k & 63) == 0 && (base & 63) == 0 &&
                (((unsigned long long)p.b.data) & 15) == 0;
    return pl;
}

// Waits until at most N of this thread's most recent groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef MINISAM_SIM
    msim::cp_async_wait_group(N);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// NF4 code -> value through the block's shared copy of the table.
__device__ __forceinline__ float nf4_lookup(const float* table, unsigned code) {
#ifdef MINISAM_SIM
    // Mutation hook (LaunchOptions::break_nf4_lookup): the neighbouring entry, as an off-by-one
    // index or a misordered table would give.
    if (msim::mutation_break_nf4_lookup()) code ^= 1;
#endif
    return table[code & 15];
}

// Before the K loop: the im2col row geometry and the NF4 table, then one barrier.
template <int KIND>
__device__ __forceinline__ void block_setup(const GemmParams& p, i64 m0, RowGeom& g, float* nf4_table) {
    if (p.a_mode == A_IM2COL) {
        for (int r = threadIdx.x; r < BM; r += THREADS) {
            const int pix = (int)(p.oh * p.ow);
            int m = (int)min(m0 + r, p.m - 1);
            int b = m / pix, rest = m - b * pix;
            int oy = rest / (int)p.ow, ox = rest - oy * (int)p.ow;
            g.base[r] = b * (int)(p.cin * p.h * p.w);
            g.y0[r] = oy * (int)p.stride - (int)p.pad;
            g.x0[r] = ox * (int)p.stride - (int)p.pad;
        }
    }
    if (KIND == W_NF4 && threadIdx.x < 16) nf4_table[threadIdx.x] = NF4_TABLE[threadIdx.x];
    __syncthreads();
}

// Issues (and for the synchronous paths, performs) the loads of K tile `k0` into stage `s`.
template <int KIND>
__device__ __forceinline__ void load_tile(const GemmParams& p, const Plan& pl, i64 z, i64 m0_, i64 n0_, i64 k0_, int s,
                                          GemmTiles<KIND>& t, const RowGeom& g, const float* nf4_table) {
    // 32-bit index arithmetic (see the top of the file): fewer registers in the unrolled copies.
    const int tid = threadIdx.x;
    const int M = (int)p.m, N = (int)p.n, K = (int)p.k;
    const int m0 = (int)m0_, n0 = (int)n0_, k0 = (int)k0_;
    // ---- A
    const float* a = p.a + z * p.a_batch;
    if (pl.a_vec) {
        const int lda = (int)p.lda;
#pragma unroll
        for (int i = 0; i < BM * BK / 4 / THREADS; ++i) {
            const int idx = tid + i * THREADS, r = idx >> 3, c = (idx & 7) * 4;
            const int m = m0 + r, left = K - (k0 + c);
            const bool in = m < M && left > 0;
            cp_async<16>(&t.A[s][r][c], in ? a + (m * lda + k0 + c) : a, in ? (unsigned)(left >= 4 ? 16 : left * 4) : 0u);
        }
    } else {
        // One column per thread: a warp covers 32 consecutive k of one row (coalesced when
        // row-major); the im2col decomposition of k happens once per tile.
        const int c = tid & (BK - 1);
        const int k = k0 + c;
        const bool kin = k < K;
        if (p.a_mode == A_ROWMAJOR) {
            const int lda = (int)p.lda;
            for (int r = tid / BK; r < BM; r += THREADS / BK) {
                const int m = m0 + r;
                const bool in = kin && m < M;
                cp_async<4>(&t.A[s][r][c], in ? a + (m * lda + k) : a, in ? 4u : 0u);
            }
        } else {
            const int kk = (int)(p.kh * p.kw);
            const int ci = k / kk, q = k - ci * kk;
            const int ky = q / (int)p.kw, kx = q - ky * (int)p.kw;
            const int h = (int)p.h, w = (int)p.w;
            const int koff = ci * h * w;
            for (int r = tid / BK; r < BM; r += THREADS / BK) {
                const int y = g.y0[r] + ky, x = g.x0[r] + kx;
                const bool in = kin && m0 + r < M && y >= 0 && y < h && x >= 0 && x < w;
                cp_async<4>(&t.A[s][r][c], in ? p.a + (g.base[r] + koff + y * w + x) : p.a, in ? 4u : 0u);
            }
        }
    }
    // ---- B
    const int base = (int)(z * p.b_batch);
    const int sbn = (int)p.sbn, sbk = (int)p.sbk;
    if (KIND == W_NF4 && pl.b_nf4q) {
        // Threads 0..63 copy one row's 16 bytes of codes; 64..127 decode that row's absmax (one
        // 64-element block covers the whole 32-column row of the tile).
        const int r = tid & (BN - 1), n = n0 + r;
        const int e = base + n * K + k0;
        const unsigned char* q = (const unsigned char*)p.b.data;
        if (tid < BN) {
            cp_async<16>(&t.Bq[s][r][0], n < N ? q + (e >> 1) : q, n < N ? 16u : 0u);
        } else {
            t.absmax[s][r] = n < N ? nf4_absmax(p.b, e >> 6) : 0.0f;
        }
    } else if (KIND == W_F16 && pl.b_vec) {
        const unsigned short* b = (const unsigned short*)p.b.data + base;
#pragma unroll
        for (int i = 0; i < BN * BK / 8 / THREADS; ++i) {
            const int idx = tid + i * THREADS, r = idx >> 2, c = (idx & 3) * 8;
            const int n = n0 + r, left = K - (k0 + c);
            const bool in = n < N && left > 0;
            cp_async<16>(&t.Bh[s][r][c], in ? b + (n * sbn + k0 + c) : b, in ? (unsigned)(left >= 8 ? 16 : left * 2) : 0u);
        }
    } else if (KIND == W_F16) {
        const unsigned short* b = (const unsigned short*)p.b.data + base;
        for (int idx = tid; idx < BN * BK; idx += THREADS) {
            const int r = pl.b_kfast ? idx / BK : idx % BN, c = pl.b_kfast ? idx % BK : idx / BN;
            const int n = n0 + r, k = k0 + c;
            t.Bh[s][r][c] = (n < N && k < K) ? b[n * sbn + k * sbk] : (unsigned short)0;
        }
    } else if (KIND == W_F32 && pl.b_vec) {
        const float* b = (const float*)p.b.data + base;
#pragma unroll
        for (int i = 0; i < BN * BK / 4 / THREADS; ++i) {
            const int idx = tid + i * THREADS, r = idx >> 3, c = (idx & 7) * 4;
            const int n = n0 + r, left = K - (k0 + c);
            const bool in = n < N && left > 0;
            cp_async<16>(&t.B[s][r][c], in ? b + (n * sbn + k0 + c) : b, in ? (unsigned)(left >= 4 ? 16 : left * 4) : 0u);
        }
    } else if (KIND == W_F32) {
        // Element copies; walk along whichever of n and k is contiguous in memory.
        const float* b = (const float*)p.b.data + base;
        for (int idx = tid; idx < BN * BK; idx += THREADS) {
            const int r = pl.b_kfast ? idx / BK : idx % BN, c = pl.b_kfast ? idx % BK : idx / BN;
            const int n = n0 + r, k = k0 + c;
            const bool in = n < N && k < K;
            cp_async<4>(&t.B[s][r][c], in ? b + (n * sbn + k * sbk) : b, in ? 4u : 0u);
        }
    } else {
        // NF4 in any other layout: decoded element by element into the f32 tile.
        for (int idx = tid; idx < BN * BK; idx += THREADS) {
            const int r = pl.b_kfast ? idx / BK : idx % BN, c = pl.b_kfast ? idx % BK : idx / BN;
            const int n = n0 + r, k = k0 + c;
            float v = 0.0f;
            if (n < N && k < K) {
                const int i = base + n * sbn + k * sbk;
                const unsigned char byte = ((const unsigned char*)p.b.data)[i >> 1];
                v = nf4_lookup(nf4_table, (i & 1) ? (byte >> 4) : (byte & 15)) * nf4_absmax(p.b, i >> 6);
            }
            t.B[s][r][c] = v;
        }
    }
}

// The element (row r, column c) of B tile stage `s` in f32, for the CUDA-core body.
template <int KIND>
__device__ __forceinline__ float b_value(const GemmTiles<KIND>& t, const Plan& pl, int s, int r, int c, const float* nf4_table) {
    if (KIND == W_F16) return f16_to_f32(t.Bh[s][r][c]);
    if (KIND == W_NF4 && pl.b_nf4q) {
        const unsigned byte = t.Bq[s][r][c >> 1];
        return nf4_lookup(nf4_table, (c & 1) ? (byte >> 4) : (byte & 15)) * t.absmax[s][r];
    }
    return t.B[s][r][c];
}

// Writes one finished accumulator: LoRA, bias, activation, residual, then the output layout.
// Inlined into one non-unrolled loop (write_tile), so there is one copy per kernel. It used to be a
// __noinline__ function taking `const GemmParams&`: taking the address of a kernel parameter makes
// the compiler copy the whole record (then 320 B) to a local-memory stack frame in every thread.
// `t_row`: row m of x·Aᵀ for LoRA (null without LoRA).
__device__ __forceinline__ void epilogue(const GemmParams& p, i64 z, i64 m, i64 n, float v, const float* t_row) {
    if (m >= p.m || n >= p.n) return;
    if (t_row) {
        float s = 0.0f;
        for (i64 j = 0; j < p.lora_r; ++j) s += t_row[j] * load_weight(p.lora_b, n * p.lora_r + j);
        v += p.lora_scale * s;
    }
    if (p.bias) v += p.bias[(int)n / (int)p.bias_div];
    v = activate(v, p.act);
    i64 o;
    if (p.c_mode == C_ROWMAJOR) {
        o = z * p.c_batch + m * p.ldc + n;
    } else if (p.c_mode == C_NCHW) {
        const int pix = (int)(p.oh * p.ow);
        const int b = (int)m / pix;
        o = ((i64)b * p.n + n) * pix + ((int)m - b * pix);
    } else {
        // transposed conv, kernel == stride == ct_k: m = (b, y, x) over the input, n = (co, ky, kx)
        const int k = (int)p.ct_k, kk = k * k, pix = (int)(p.h * p.w), w = (int)p.w;
        const int b = (int)m / pix, r = (int)m - b * pix, y = r / w, x = r - y * w;
        const int co = (int)n / kk, t = (int)n - co * kk, ky = t / k, kx = t - ky * k;
        const int cout = (int)p.n / kk;
        o = (((i64)b * cout + co) * ((i64)p.h * k) + y * k + ky) * ((i64)w * k) + x * k + kx;
    }
    if (p.residual) v += p.residual[o];
    p.c[o] = v;
}

// Writes the staged tile through the epilogue. NCHW output is contiguous along m, the other
// layouts along n: consecutive threads take consecutive addresses of the output either way.
// `Ts`: the block's rows of x·Aᵀ when this kernel computed them (fused LoRA), else null.
__device__ __forceinline__ void write_tile(const GemmParams& p, i64 z, i64 m0, i64 n0, const float (*Cs)[LDC], const float (*Ts)[LDC]) {
    const bool m_fast = p.c_mode == C_NCHW;
#pragma unroll 1
    for (int idx = threadIdx.x; idx < BM * BN; idx += THREADS) {
        const int r = m_fast ? idx % BM : idx / BN, c = m_fast ? idx / BM : idx % BN;
        const float* t_row = Ts ? Ts[r] : p.lora_t ? p.lora_t + (m0 + r) * p.lora_r : nullptr;
        epilogue(p, z, m0 + r, n0 + c, Cs[r][c], t_row);
    }
}

// Two adjacent 16-bit elements of shared memory as one 32-bit word (element c in the low half).
__device__ __forceinline__ unsigned lds_pair(const unsigned short* h) {
#ifdef MINISAM_SIM
    return (unsigned)h[0] | ((unsigned)h[1] << 16);
#else
    return *(const unsigned*)h;
#endif
}

// The mma B fragment {b0, b1} of tile rows r (n), columns c, c+1 and c+8, c+9 (k), decoded from
// the stage's storage.
template <int KIND>
__device__ __forceinline__ void b_fragment(const GemmTiles<KIND>& t, const Plan& pl, int s, int r, int c, const float* tab, unsigned* b) {
    if (KIND == W_F16) {
        const unsigned w0 = lds_pair(&t.Bh[s][r][c]), w1 = lds_pair(&t.Bh[s][r][c + 8]);
#ifdef MINISAM_MMA_F16
        // fp16 weights are fp16 operands already: the staged pair is the register.
        b[0] = w0;
        b[1] = w1;
#else
        b[0] = pack2(f16_to_f32(w0 & 0xffff), f16_to_f32(w0 >> 16));
        b[1] = pack2(f16_to_f32(w1 & 0xffff), f16_to_f32(w1 >> 16));
#endif
    } else if (KIND == W_NF4 && pl.b_nf4q) {
        // c is even: byte c/2 holds the codes of columns c (low nibble) and c+1.
        const float am = t.absmax[s][r];
        const unsigned q0 = t.Bq[s][r][c >> 1], q1 = t.Bq[s][r][(c + 8) >> 1];
        b[0] = pack2(nf4_lookup(tab, q0 & 15) * am, nf4_lookup(tab, q0 >> 4) * am);
        b[1] = pack2(nf4_lookup(tab, q1 & 15) * am, nf4_lookup(tab, q1 >> 4) * am);
    } else {
        b[0] = pack2(t.B[s][r][c], t.B[s][r][c + 1]);
        b[1] = pack2(t.B[s][r][c + 8], t.B[s][r][c + 9]);
    }
}

// The K loop shared by both bodies: the pipeline described above, `step(s, k0)` multiplying the
// tile of columns k0.. in stage s.
template <int KIND, class Step>
__device__ __forceinline__ void k_loop(const GemmParams& p, const Plan& pl, i64 z, i64 m0, i64 n0, GemmTiles<KIND>& t,
                                       const RowGeom& g, const float* tab, Step step) {
    constexpr int S = GemmConfig<KIND>::STAGES;
    const int ktiles = (int)((p.k + BK - 1) / BK);
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < ktiles) load_tile<KIND>(p, pl, z, m0, n0, (i64)s * BK, s, t, g, tab);
        cp_async_commit();
    }
    int s = 0;
#pragma unroll 1
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<S - 2>();
        __syncthreads();
        const int next = kt + S - 1;
        if (next < ktiles) load_tile<KIND>(p, pl, z, m0, n0, (i64)next * BK, next % S, t, g, tab);
        cp_async_commit();
        step(s, kt * BK);
        s = s + 1 == S ? 0 : s + 1;
    }
    // Nothing may still land in the stages once they hold the C tile (the last groups are empty,
    // but the count of in-flight groups is not tracked at run time), and every warp must be done
    // with the last tile before any warp overwrites it with C.
    cp_async_wait<0>();
    __syncthreads();
}

// Tensor-core body: 4 warps in a 2 x 2 grid, each owning a 32 x 32 piece of the tile as
// 2 (M) x 4 (N) fragments of m16n8.
template <int KIND>
__device__ __forceinline__ void gemm_tc(const GemmParams& p) {
    __shared__ GemmSmem<KIND> sm;
    __shared__ RowGeom geom;
    __shared__ float nf4_table[16];
    const i64 z = blockIdx.z;
    const i64 m0 = (i64)blockIdx.y * BM, n0 = (i64)blockIdx.x * BN;
    block_setup<KIND>(p, m0, geom, nf4_table);
    const Plan pl = make_plan<KIND>(p, z);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const int g = lane >> 2, t = lane & 3;
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
    // Fused LoRA: this warp's 32 rows times LoRA ranks wn .. wn+31 (the two warps that share rows
    // split the <= 64 ranks), accumulated with the A fragments already built for the main
    // product; Aᵀ's B fragments are read straight from global memory (r x K f32, small and
    // shared by every block, so it stays in L2/L1: staging it would not fit the shared memory).
    // Fragments at ranks >= lora_r are skipped (nf) or zero (a partial fragment).
    const int lr = p.lora_a ? (int)p.lora_r : 0;
    const int nf = lr > wn ? min(4, (lr - wn + 7) / 8) : 0;
    float tacc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) tacc[i][j][e] = 0.0f;

    k_loop<KIND>(p, pl, z, m0, n0, sm.t, geom, nf4_table, [&](int s, int k0) {
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned af[2][4], bf[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const float(*A)[LDS] = sm.t.A[s];
                const int r = wm + i * 16 + g, c = kk + 2 * t;
                af[i][0] = pack2(A[r][c], A[r][c + 1]);
                af[i][1] = pack2(A[r + 8][c], A[r + 8][c + 1]);
                af[i][2] = pack2(A[r][c + 8], A[r][c + 9]);
                af[i][3] = pack2(A[r + 8][c + 8], A[r + 8][c + 9]);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) b_fragment<KIND>(sm.t, pl, s, wn + j * 8 + g, kk + 2 * t, nf4_table, bf[j]);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma16816(acc[i][j], af[i][0], af[i][1], af[i][2], af[i][3], bf[j][0], bf[j][1]);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (j < nf) {
                    const int rank = wn + j * 8 + g, c = k0 + kk + 2 * t;
                    const float* la = p.lora_a + (i64)rank * p.k;
                    const int K = (int)p.k;
                    const bool in = rank < lr;
                    const float v0 = in && c < K ? la[c] : 0.0f, v1 = in && c + 1 < K ? la[c + 1] : 0.0f;
                    const float v8 = in && c + 8 < K ? la[c + 8] : 0.0f, v9 = in && c + 9 < K ? la[c + 9] : 0.0f;
                    const unsigned b0 = pack2(v0, v1), b1 = pack2(v8, v9);
#pragma unroll
                    for (int i = 0; i < 2; ++i) mma16816(tacc[i][j], af[i][0], af[i][1], af[i][2], af[i][3], b0, b1);
                }
            }
        }
    });
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = wm + i * 16 + g, c = wn + j * 8 + 2 * t;
            sm.o.Cs[r][c] = acc[i][j][0];
            sm.o.Cs[r][c + 1] = acc[i][j][1];
            sm.o.Cs[r + 8][c] = acc[i][j][2];
            sm.o.Cs[r + 8][c + 1] = acc[i][j][3];
            if (j < nf) {
                sm.o.Ts[r][c] = tacc[i][j][0];
                sm.o.Ts[r][c + 1] = tacc[i][j][1];
                sm.o.Ts[r + 8][c] = tacc[i][j][2];
                sm.o.Ts[r + 8][c + 1] = tacc[i][j][3];
            }
        }
    __syncthreads();
    write_tile(p, z, m0, n0, sm.o.Cs, p.lora_a ? sm.o.Ts : nullptr);
}

// CUDA-core f32 body: each thread owns 4 rows x 8 columns (columns strided by 8 so that a warp
// reads 8 consecutive B rows without bank conflicts).
template <int KIND>
__device__ __forceinline__ void gemm_f32(const GemmParams& p) {
    __shared__ GemmSmem<KIND> sm;
    __shared__ RowGeom geom;
    __shared__ float nf4_table[16];
    const i64 z = blockIdx.z;
    const i64 m0 = (i64)blockIdx.y * BM, n0 = (i64)blockIdx.x * BN;
    block_setup<KIND>(p, m0, geom, nf4_table);
    const Plan pl = make_plan<KIND>(p, z);
    const int tm = (threadIdx.x >> 3) * 4, tn = threadIdx.x & 7;
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    k_loop<KIND>(p, pl, z, m0, n0, sm.t, geom, nf4_table, [&](int s, int) {
#pragma unroll 8
        for (int kk = 0; kk < BK; ++kk) {
            float a[4], b[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = sm.t.A[s][tm + i][kk];
#pragma unroll
            for (int j = 0; j < 8; ++j) b[j] = b_value<KIND>(sm.t, pl, s, tn + 8 * j, kk, nf4_table);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
    });
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) sm.o.Cs[tm + i][tn + 8 * j] = acc[i][j];
    __syncthreads();
    // The CUDA-core body does not fuse LoRA: the backend passes it lora_t, never lora_a.
    write_tile(p, z, m0, n0, sm.o.Cs, nullptr);
}

// Grid: (ceil(N / 64), ceil(M / 64), batch_count), block: 128 threads.
extern "C" __global__ void __launch_bounds__(THREADS) gemm_tc_f32w(const GemmParams p) { gemm_tc<W_F32>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) gemm_tc_f16w(const GemmParams p) { gemm_tc<W_F16>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) gemm_tc_nf4w(const GemmParams p) { gemm_tc<W_NF4>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) gemm_simt_f32w(const GemmParams p) { gemm_f32<W_F32>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) gemm_simt_f16w(const GemmParams p) { gemm_f32<W_F16>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) gemm_simt_nf4w(const GemmParams p) { gemm_f32<W_NF4>(p); }
