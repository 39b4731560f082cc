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
// Tiles: 64 (M) x 64 (N) x 32 (K) per block of 128 threads. Both operand tiles are staged in
// shared memory as f32; the tensor-core path rounds to 16 bits when it builds its fragments, so
// the NF4 codes are decoded exactly once per tile, into shared memory, and never reach global
// memory in any wider form.
//
// Compiled by NVRTC with no headers at all: the 16-bit conversions and the MMA are inline PTX,
// each in a small function whose MINISAM_SIM branch calls the host simulator's emulation of the
// same instruction (kernels/sim).
// Index arithmetic inside the tiles is 32-bit (the host refuses tensors of 2^31 elements or more).

#define BM 64
#define BN 64
#define BK 32
#define LDS (BK + 4)
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
    // LoRA epilogue: c += lora_scale * sum_j lora_t[m, j] * B_lora[n, j]
    const float* lora_t;
    WeightRef lora_b;
    i64 lora_r;
    float lora_scale;
    float pad_;
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

// Per-block geometry of the A rows for the implicit im2col, computed once before the K loop so
// the main loop does no division per element: input offset of the row's image, and the top-left
// input coordinate of its receptive field (may be negative: padding).
struct RowGeom {
    int base[BM];
    int y0[BM];
    int x0[BM];
};

__device__ __forceinline__ void row_geometry(const GemmParams& p, i64 m0, RowGeom& g) {
    if (p.a_mode != A_IM2COL) return;
    for (int r = threadIdx.x; r < BM; r += THREADS) {
        const int pix = (int)(p.oh * p.ow);
        int m = (int)min(m0 + r, p.m - 1);
        int b = m / pix, rest = m - b * pix;
        int oy = rest / (int)p.ow, ox = rest - oy * (int)p.ow;
        g.base[r] = b * (int)(p.cin * p.h * p.w);
        g.y0[r] = oy * (int)p.stride - (int)p.pad;
        g.x0[r] = ox * (int)p.stride - (int)p.pad;
    }
    __syncthreads();
}

// Stages the A tile (rows m0.., columns k0..) as f32. Thread t always loads column t % 32, so a
// warp reads 32 consecutive k of one row (coalesced for row-major A); zero outside the matrix.
__device__ __forceinline__ void stage_a(const GemmParams& p, i64 z, i64 m0, i64 k0, float (*As)[LDS], const RowGeom& g) {
    const int c = threadIdx.x & (BK - 1);
    const i64 k = k0 + c;
    const bool kin = k < p.k;
    if (p.a_mode == A_ROWMAJOR) {
        const float* a = p.a + z * p.a_batch + k;
        for (int r = threadIdx.x / BK; r < BM; r += THREADS / BK) {
            const i64 m = m0 + r;
            As[r][c] = (kin && m < p.m) ? a[m * p.lda] : 0.0f;
        }
        return;
    }
    // implicit im2col: k -> (ci, ky, kx), once per tile
    const int kk = (int)(p.kh * p.kw);
    const int ci = (int)k / kk, t = (int)k - ci * kk;
    const int ky = t / (int)p.kw, kx = t - ky * (int)p.kw;
    const int h = (int)p.h, w = (int)p.w;
    const int koff = ci * h * w;
    for (int r = threadIdx.x / BK; r < BM; r += THREADS / BK) {
        const int y = g.y0[r] + ky, x = g.x0[r] + kx;
        const bool in = kin && m0 + r < p.m && y >= 0 && y < h && x >= 0 && x < w;
        As[r][c] = in ? p.a[g.base[r] + koff + y * w + x] : 0.0f;
    }
}

// Stages the B tile (rows n0.., columns k0..) as f32, decoding the stored precision.
template <int KIND>
__device__ __forceinline__ void stage_b(const GemmParams& p, i64 z, i64 n0, i64 k0, float (*Bs)[LDS], float* absmax_row) {
    const i64 base = z * p.b_batch;
    if (KIND == W_NF4) {
        // Fast path: a [N, K] matrix whose rows are whole 64-element blocks, so the 32 columns of
        // one tile row share one absmax: decode it once per row, not once per element.
        bool rows_blocked = p.sbk == 1 && p.sbn == p.k && (p.k & 63) == 0 && (base & 63) == 0;
        if (rows_blocked) {
            if (threadIdx.x < BN) {
                i64 n = n0 + threadIdx.x;
                absmax_row[threadIdx.x] = n < p.n && k0 < p.k ? nf4_absmax(p.b, (base + n * p.k + k0) >> 6) : 0.0f;
            }
            __syncthreads();
            for (int idx = threadIdx.x; idx < BN * BK; idx += THREADS) {
                int r = idx / BK, c = idx % BK;
                i64 n = n0 + r, k = k0 + c;
                Bs[r][c] = (n < p.n && k < p.k) ? nf4_code(p.b, base + n * p.k + k) * absmax_row[r] : 0.0f;
            }
            return;
        }
    }
    for (int idx = threadIdx.x; idx < BN * BK; idx += THREADS) {
        int r = idx / BK, c = idx % BK;
        i64 n = n0 + r, k = k0 + c;
        float v = 0.0f;
        if (n < p.n && k < p.k) {
            i64 i = base + n * p.sbn + k * p.sbk;
            if (KIND == W_F32) v = ((const float*)p.b.data)[i];
            else if (KIND == W_F16) v = f16_to_f32(((const unsigned short*)p.b.data)[i]);
            else v = nf4_code(p.b, i) * nf4_absmax(p.b, i >> 6);
        }
        Bs[r][c] = v;
    }
}

// Writes one finished accumulator: LoRA, bias, activation, residual, then the output layout.
// Inlined into one non-unrolled loop (write_tile), so there is one copy per kernel. It used to be a
// __noinline__ function taking `const GemmParams&`: taking the address of a kernel parameter makes
// the compiler copy the whole 320 B record to a local-memory stack frame in every thread.
__device__ __forceinline__ void epilogue(const GemmParams& p, i64 z, i64 m, i64 n, float v) {
    if (m >= p.m || n >= p.n) return;
    if (p.lora_t) {
        float s = 0.0f;
        for (i64 j = 0; j < p.lora_r; ++j) s += p.lora_t[m * p.lora_r + j] * load_weight(p.lora_b, n * p.lora_r + j);
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

// The block's finished 64 x 64 tile, staged in shared memory (padded rows: the column walk of
// the NCHW case and the fragment stores fall in distinct banks).
#define LDC (BN + 1)

// Writes the staged tile through the epilogue. NCHW output is contiguous along m, the other
// layouts along n: consecutive threads take consecutive addresses of the output either way.
__device__ __forceinline__ void write_tile(const GemmParams& p, i64 z, i64 m0, i64 n0, const float (*Cs)[LDC]) {
    const bool m_fast = p.c_mode == C_NCHW;
#pragma unroll 1
    for (int idx = threadIdx.x; idx < BM * BN; idx += THREADS) {
        const int r = m_fast ? idx % BM : idx / BN, c = m_fast ? idx / BM : idx % BN;
        epilogue(p, z, m0 + r, n0 + c, Cs[r][c]);
    }
}

// Shared memory of one block: the operand tiles during the K loop, the output tile after it.
struct GemmTiles {
    float As[BM][LDS];
    float Bs[BN][LDS];
    float absmax_row[BN];
};
union GemmSmem {
    GemmTiles t;
    float Cs[BM][LDC];
};

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

// Tensor-core body: 4 warps in a 2 x 2 grid, each owning a 32 x 32 piece of the tile as
// 2 (M) x 4 (N) fragments of m16n8.
template <int KIND>
__device__ __forceinline__ void gemm_tc(const GemmParams& p) {
    __shared__ GemmSmem sm;
    __shared__ RowGeom geom;
    float (*As)[LDS] = sm.t.As;
    float (*Bs)[LDS] = sm.t.Bs;
    const i64 z = blockIdx.z;
    const i64 m0 = (i64)blockIdx.y * BM, n0 = (i64)blockIdx.x * BN;
    row_geometry(p, m0, geom);
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

    for (i64 k0 = 0; k0 < p.k; k0 += BK) {
        stage_a(p, z, m0, k0, As, geom);
        stage_b<KIND>(p, z, n0, k0, Bs, sm.t.absmax_row);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned af[2][4], bf[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int r = wm + i * 16 + g, c = kk + 2 * t;
                af[i][0] = pack2(As[r][c], As[r][c + 1]);
                af[i][1] = pack2(As[r + 8][c], As[r + 8][c + 1]);
                af[i][2] = pack2(As[r][c + 8], As[r][c + 9]);
                af[i][3] = pack2(As[r + 8][c + 8], As[r + 8][c + 9]);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int r = wn + j * 8 + g, c = kk + 2 * t;
                bf[j][0] = pack2(Bs[r][c], Bs[r][c + 1]);
                bf[j][1] = pack2(Bs[r][c + 8], Bs[r][c + 9]);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma16816(acc[i][j], af[i][0], af[i][1], af[i][2], af[i][3], bf[j][0], bf[j][1]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = wm + i * 16 + g, c = wn + j * 8 + 2 * t;
            sm.Cs[r][c] = acc[i][j][0];
            sm.Cs[r][c + 1] = acc[i][j][1];
            sm.Cs[r + 8][c] = acc[i][j][2];
            sm.Cs[r + 8][c + 1] = acc[i][j][3];
        }
    __syncthreads();
    write_tile(p, z, m0, n0, sm.Cs);
}

// CUDA-core f32 body: each thread owns 4 rows x 8 columns (columns strided by 8 so that a warp
// reads 8 consecutive B rows without bank conflicts).
template <int KIND>
__device__ __forceinline__ void gemm_f32(const GemmParams& p) {
    __shared__ GemmSmem sm;
    __shared__ RowGeom geom;
    float (*As)[LDS] = sm.t.As;
    float (*Bs)[LDS] = sm.t.Bs;
    const i64 z = blockIdx.z;
    const i64 m0 = (i64)blockIdx.y * BM, n0 = (i64)blockIdx.x * BN;
    row_geometry(p, m0, geom);
    const int tm = (threadIdx.x >> 3) * 4, tn = threadIdx.x & 7;
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    for (i64 k0 = 0; k0 < p.k; k0 += BK) {
        stage_a(p, z, m0, k0, As, geom);
        stage_b<KIND>(p, z, n0, k0, Bs, sm.t.absmax_row);
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < BK; ++kk) {
            float a[4], b[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[tm + i][kk];
#pragma unroll
            for (int j = 0; j < 8; ++j) b[j] = Bs[tn + 8 * j][kk];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) sm.Cs[tm + i][tn + 8 * j] = acc[i][j];
    __syncthreads();
    write_tile(p, z, m0, n0, sm.Cs);
}

// Grid: (ceil(N / 64), ceil(M / 64), batch_count), block: 128 threads.
extern "C" __global__ void __launch_bounds__(THREADS) gemm_tc_f32w(const GemmParams p) { gemm_tc<W_F32>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) gemm_tc_f16w(const GemmParams p) { gemm_tc<W_F16>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) gemm_tc_nf4w(const GemmParams p) { gemm_tc<W_NF4>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) gemm_simt_f32w(const GemmParams p) { gemm_f32<W_F32>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) gemm_simt_f16w(const GemmParams p) { gemm_f32<W_F16>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) gemm_simt_nf4w(const GemmParams p) { gemm_f32<W_NF4>(p); }
