// Attention: softmax(scale * q.k^T + bias) . v with an online softmax, so no Nq x Nk score
// matrix ever exists. Two bodies share the parameter record and the bias modes:
//
// - `attention_d*` (scalar, f32 on the CUDA cores): one thread owns one query row, keeping q and
//   its running output in registers, while the block streams K and V through shared memory in
//   tiles. Scores are taken CHUNK keys at a time so that the running output is rescaled once per
//   chunk rather than once per key. The f32 reference mode, and head dims the tensor-core body
//   does not cover.
// - `attention_tc_d*` (FlashAttention-2 style, tensor cores, below): mma.sync m16n8k16 with bf16
//   operands (fp16 with -DMINISAM_MMA_F16, as nf4_gemm.cu), f32 accumulation and softmax.
//
// The attention bias is computed on the fly (per-query row pointers, key position advanced
// incrementally: no integer division in the key loop):
// - bias_mode 1, TinyViT's learned table `[H, Nq, Nk]`, batch-head `bh` using head `bh % H`;
// - bias_mode 2, SAM's decomposed relative position: rel_h `[BH, Nq, Kh]`, rel_w `[BH, Nq, Kw]`,
//   bias(i, j) = rel_h[bh, i, j / Kw] + rel_w[bh, i, j % Kw].
//
// Head dims up to DP are handled by the instance for DP (the rest of the registers stay zero).
//
// Compiled by NVRTC with no CUDA headers. The 16-bit conversions, the MMA and cp.async are inline
// PTX, each in a small function whose MINISAM_SIM branch calls the host simulator's emulation of
// the same instruction (kernels/sim): those shared with nf4_gemm.cu (pack2, mma16816, cp_async,
// cp_async_commit) come from tensor_core.cuh, the only header, which NVRTC and the simulator both
// resolve (see its top comment); the wait this kernel's pipeline needs is below.

#include "tensor_core.cuh"

typedef long long i64;

#define THREADS 128
#define CHUNK 8
// No math headers under NVRTC: -inf by its bit pattern.
#define NEG_INF __int_as_float(0xff800000)

struct AttnParams {
    const float* q;
    const float* k;
    const float* v;
    float* out;
    i64 bh, nq, nk, d;
    float scale;
    float pad_;
    i64 bias_mode;  // 0 none, 1 table, 2 decomposed rel-pos
    const float* table;
    i64 heads;
    const float* rel_h;
    const float* rel_w;
    i64 kh, kw;
};

template <int DP, int KT>
__device__ void attention_body(const AttnParams& p) {
    __shared__ float Ks[KT][DP];
    __shared__ float Vs[KT][DP];
    const i64 bh = blockIdx.y;
    const i64 i = (i64)blockIdx.x * THREADS + threadIdx.x;
    const bool live = i < p.nq;
    const i64 d = p.d;

    float q[DP], acc[DP];
#pragma unroll
    for (int c = 0; c < DP; ++c) {
        q[c] = (live && c < d) ? p.q[(bh * p.nq + i) * d + c] * p.scale : 0.0f;
        acc[c] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    // Bias rows of this query, so the per-key cost is an add (no 64-bit division per key).
    const float* table_row = 0;
    const float* rh_row = 0;
    const float* rw_row = 0;
    if (live && p.bias_mode == 1) table_row = p.table + ((bh % p.heads) * p.nq + i) * p.nk;
    if (live && p.bias_mode == 2) {
        rh_row = p.rel_h + (bh * p.nq + i) * p.kh;
        rw_row = p.rel_w + (bh * p.nq + i) * p.kw;
    }
    const int kw = (int)p.kw;

    for (i64 j0 = 0; j0 < p.nk; j0 += KT) {
        const int tile = (int)min((i64)KT, p.nk - j0);
        for (int idx = threadIdx.x; idx < KT * DP; idx += THREADS) {
            int r = idx / DP, c = idx % DP;
            bool in = r < tile && c < d;
            i64 src = (bh * p.nk + j0 + r) * d + c;
            Ks[r][c] = in ? p.k[src] : 0.0f;
            Vs[r][c] = in ? p.v[src] : 0.0f;
        }
        __syncthreads();
        if (live) {
            // Position of key j0 in the (Kh, Kw) grid, advanced key by key below.
            int jh = 0, jw = 0;
            if (p.bias_mode == 2) {
                jh = (int)(j0 / p.kw);
                jw = (int)(j0 - (i64)jh * p.kw);
            }
            for (int jc = 0; jc < tile; jc += CHUNK) {
                float s[CHUNK];
                float cmax = NEG_INF;
#pragma unroll
                for (int u = 0; u < CHUNK; ++u) {
                    const int j = jc + u;
                    if (j < tile) {
                        float dot = 0.0f;
#pragma unroll
                        for (int c = 0; c < DP; ++c) dot = fmaf(q[c], Ks[j][c], dot);
                        float b = 0.0f;
                        if (table_row) b = table_row[j0 + j];
                        if (rh_row) {
                            b = rh_row[jh] + rw_row[jw];
                            if (++jw == kw) {
                                jw = 0;
                                ++jh;
                            }
                        }
                        s[u] = dot + b;
                        cmax = fmaxf(cmax, s[u]);
                    } else {
                        s[u] = NEG_INF;
                    }
                }
                const float m_new = fmaxf(m, cmax);
                // A row whose scores are all -inf so far keeps m = -inf: exp(-inf - -inf) is NaN,
                // so the correction is taken as 0 there (nothing has been accumulated yet).
                const float corr = (m == NEG_INF) ? 0.0f : expf(m - m_new);
                l *= corr;
#pragma unroll
                for (int c = 0; c < DP; ++c) acc[c] *= corr;
#pragma unroll
                for (int u = 0; u < CHUNK; ++u) {
                    const int j = jc + u;
                    const float e = (j < tile && m_new != NEG_INF) ? expf(s[u] - m_new) : 0.0f;
                    l += e;
                    if (j < tile) {
#pragma unroll
                        for (int c = 0; c < DP; ++c) acc[c] = fmaf(e, Vs[j][c], acc[c]);
                    }
                }
                m = m_new;
            }
        }
        __syncthreads();
    }
    if (live) {
        // A row whose scores were all -inf has l == 0: its output is NaN, as on the CPU reference
        // (kernels/src/attention.rs) and in PyTorch, so both backends give the same answer.
        const float inv = l > 0.0f ? 1.0f / l : __int_as_float(0x7fc00000);
#pragma unroll
        for (int c = 0; c < DP; ++c)
            if (c < d) p.out[(bh * p.nq + i) * d + c] = acc[c] * inv;
    }
}

// Grid: (ceil(Nq / 128), BH), block: 128 threads. Pick the smallest instance with DP >= d.
extern "C" __global__ void __launch_bounds__(THREADS) attention_d32(const AttnParams p) { attention_body<32, 64>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) attention_d64(const AttnParams p) { attention_body<64, 64>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) attention_d96(const AttnParams p) { attention_body<96, 32>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) attention_d128(const AttnParams p) { attention_body<128, 32>(p); }

// ---- Tensor-core body (FlashAttention-2 style) ----------------------------------------------
//
// Block: 4 warps, 64 query rows; each warp owns 16 rows for the whole key loop, so the softmax
// statistics never leave its registers and no warp waits on another except at the one barrier
// per key tile. Per warp and key tile of BKV keys:
//   S (16 x BKV)  = Q (16 x DP, bf16 fragments loaded once) . K^T          BKV/8 * DP/16 mma
//   S             = S * scale + bias, keys past Nk set to -inf            in registers
//   m, l, O       rescaled by exp(m_old - m_new) (online softmax)         in registers
//   O (16 x DP)  += P (16 x BKV, rounded to bf16 in registers) . V        DP/8 * BKV/16 mma
// The accumulator layout of S (c0,c1 = row g, cols 2t,2t+1; c2,c3 = row g+8) is exactly the A
// fragment layout of P for the next mma once two n8 tiles are paired into one k16 step, so P
// never goes through shared memory (FA2's register reuse).
//
// K and V tiles go global -> shared memory with cp.async in a 2-stage double buffer: tile i+1 is
// issued right after the barrier that opens tile i, so its copy overlaps tile i's mma work. The
// inputs are f32 (the backend's tensors), so the tiles are staged as f32 and rounded to 16 bits
// while building fragments (as gemm_tc does); ldmatrix needs 16-bit elements in shared memory and
// so does not fit here. Row stride DP + 4 floats: the V fragment reads (rows 2t, 2t+1, column g)
// then hit 32 distinct banks (2t·(DP + 4) = 8t mod 32 for every DP here, plus g < 8).
//
// Query rows past Nq compute on zero Q rows and are not stored; keys past Nk are zero-filled by
// cp.async (so 0 * V stays 0, never 0 * poison) and get -inf scores.

#define TC_BQ 64

// Waits for every copy this thread has issued (the pipeline has one group in flight at the wait).
__device__ __forceinline__ void cp_async_wait_all_groups() {
#ifdef MINISAM_SIM
    msim::cp_async_wait_group(0);
#else
    asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
}

// Issues the copies of key tile `j0` (rows j0..j0+BKV of K and V) into one stage; rows past Nk
// and columns past d are zero-filled. 16-byte copies when every row is 16-byte aligned (d a
// multiple of 4, K and V 16-byte aligned: the usual case), 4-byte copies otherwise.
template <int DP, int BKV>
__device__ __forceinline__ void issue_kv_tile(const float* kb, const float* vb, int j0, int nk, int d, bool vec,
                                              float (*Ks)[DP + 4], float (*Vs)[DP + 4]) {
    if (vec) {
        constexpr int CH = DP / 4;
        for (int idx = threadIdx.x; idx < BKV * CH; idx += THREADS) {
            const int r = idx / CH, c = (idx - r * CH) * 4;
            const bool in = j0 + r < nk && c < d;
            const int off = in ? (j0 + r) * d + c : 0;
            cp_async<16>(&Ks[r][c], kb + off, in ? 16 : 0);
            cp_async<16>(&Vs[r][c], vb + off, in ? 16 : 0);
        }
    } else {
        for (int idx = threadIdx.x; idx < BKV * DP; idx += THREADS) {
            const int r = idx / DP, c = idx - r * DP;
            const bool in = j0 + r < nk && c < d;
            const int off = in ? (j0 + r) * d + c : 0;
            cp_async<4>(&Ks[r][c], kb + off, in ? 4 : 0);
            cp_async<4>(&Vs[r][c], vb + off, in ? 4 : 0);
        }
    }
    cp_async_commit();
}

// One query row's bias source: the table row, or the rel_h / rel_w rows (clamped to a real row
// for padded queries, whose results are never stored).
struct BiasRow {
    const float* table;
    const float* rh;
    const float* rw;
};

__device__ __forceinline__ BiasRow bias_row(const AttnParams& p, i64 bh, i64 row) {
    const i64 r = min(row, p.nq - 1);
    BiasRow b = {0, 0, 0};
    if (p.bias_mode == 1) b.table = p.table + ((bh % p.heads) * p.nq + r) * p.nk;
    if (p.bias_mode == 2) {
        b.rh = p.rel_h + (bh * p.nq + r) * p.kh;
        b.rw = p.rel_w + (bh * p.nq + r) * p.kw;
    }
    return b;
}

template <int DP, int BKV>
__device__ void attention_tc_body(const AttnParams& p) {
    constexpr int KSTEPS = DP / 16;  // k16 steps of Q.K^T over the head dim
    constexpr int NT = BKV / 8;      // n8 tiles of S per key tile (= 2 x its k16 steps of P.V)
    constexpr int DT = DP / 8;       // n8 tiles of O over the head dim
    static_assert(DP % 16 == 0 && BKV % 16 == 0, "m16n8k16 tiling");
    __shared__ __align__(16) float Ks[2][BKV][DP + 4];
    __shared__ __align__(16) float Vs[2][BKV][DP + 4];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const i64 bh = blockIdx.y;
    const i64 warp_row = (i64)blockIdx.x * TC_BQ + warp * 16;
    // Warp-uniform: a warp whose 16 rows all lie past Nq only helps with the copies.
    const bool warp_live = warp_row < p.nq;
    const i64 row0 = warp_row + g, row1 = row0 + 8;
    const int d = (int)p.d, nk = (int)p.nk;
    const float* kb = p.k + bh * p.nk * p.d;
    const float* vb = p.v + bh * p.nk * p.d;
    const bool vec = (d & 3) == 0 && (((unsigned long long)p.k | (unsigned long long)p.v) & 15) == 0;

    // Tile 0 is in flight while Q's fragments load.
    issue_kv_tile<DP, BKV>(kb, vb, 0, nk, d, vec, Ks[0], Vs[0]);

    // Q fragments (A operand, row-major 16 x 16 per k-step), unscaled: the scale is applied to
    // the f32 scores, so the only rounding of q is the one to 16 bits.
    unsigned qf[KSTEPS][4];
    {
        const float* q0 = p.q + (bh * p.nq + min(row0, p.nq - 1)) * p.d;
        const float* q1 = p.q + (bh * p.nq + min(row1, p.nq - 1)) * p.d;
        const bool in0 = row0 < p.nq, in1 = row1 < p.nq;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
            const int c = ks * 16 + 2 * t;
#define QAT(rowp, in, col) (((in) && (col) < d) ? (rowp)[col] : 0.0f)
            qf[ks][0] = pack2(QAT(q0, in0, c), QAT(q0, in0, c + 1));
            qf[ks][1] = pack2(QAT(q1, in1, c), QAT(q1, in1, c + 1));
            qf[ks][2] = pack2(QAT(q0, in0, c + 8), QAT(q0, in0, c + 9));
            qf[ks][3] = pack2(QAT(q1, in1, c + 8), QAT(q1, in1, c + 9));
#undef QAT
        }
    }
    const BiasRow b0 = bias_row(p, bh, row0), b1 = bias_row(p, bh, row1);
    const int kw = (int)p.kw;

    float o[DT][4];
#pragma unroll
    for (int j = 0; j < DT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] = 0.0f;
    // Running max of rows g and g+8 (equal across the 4 lanes of a quad) and this lane's share
    // of their running sums (summed over the quad once, at the end: the rescale factor is the
    // same for every lane of a row, so the shares can be rescaled separately).
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;

    for (int j0 = 0, stage = 0; j0 < nk; j0 += BKV, stage ^= 1) {
        // This thread's copies of the tile have landed; the barrier makes everyone's visible, and
        // also tells that every warp is done with the previous tile, whose stage is refilled next.
        cp_async_wait_all_groups();
        __syncthreads();
        if (j0 + BKV < nk) issue_kv_tile<DP, BKV>(kb, vb, j0 + BKV, nk, d, vec, Ks[stage ^ 1], Vs[stage ^ 1]);
        if (!warp_live) continue;
        float (*K)[DP + 4] = Ks[stage];
        float (*V)[DP + 4] = Vs[stage];

        // S = Q . K^T: B fragment (k = head dim, n = key) is K's row-major rows as they lie.
        float s[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks) {
                const float* kr = &K[8 * j + g][ks * 16 + 2 * t];
                mma16816(s[j], qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3], pack2(kr[0], kr[1]), pack2(kr[8], kr[9]));
            }
        }

        // Scale, bias, mask; this lane's keys are j0 + 8j + 2t + e. For rel-pos, the key's (h, w)
        // position is found by one division per tile and advanced from there.
        int ph = 0, pw = 0;
        if (b0.rh) {
            ph = (j0 + 2 * t) / kw;
            pw = j0 + 2 * t - ph * kw;
        }
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            int h = ph, w = pw;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = j0 + 8 * j + 2 * t + e;
                if (key < nk) {
                    float bias0 = 0.0f, bias1 = 0.0f;
                    if (b0.table) {
                        bias0 = b0.table[key];
                        bias1 = b1.table[key];
                    } else if (b0.rh) {
                        bias0 = b0.rh[h] + b0.rw[w];
                        bias1 = b1.rh[h] + b1.rw[w];
                    }
                    s[j][e] = fmaf(s[j][e], p.scale, bias0);
                    s[j][2 + e] = fmaf(s[j][2 + e], p.scale, bias1);
                } else {
                    s[j][e] = NEG_INF;
                    s[j][2 + e] = NEG_INF;
                }
                mx0 = fmaxf(mx0, s[j][e]);
                mx1 = fmaxf(mx1, s[j][2 + e]);
                if (b0.rh && ++w == kw) {
                    w = 0;
                    ++h;
                }
            }
            if (b0.rh) {
                pw += 8;
                while (pw >= kw) {
                    pw -= kw;
                    ++ph;
                }
            }
        }
        // Row max over the quad that shares the row.
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // While a row has seen only -inf scores its max stays -inf: exp(-inf - -inf) is NaN, so
        // the correction is 0 there (nothing accumulated yet) and its weights are 0.
        const float corr0 = m0 == NEG_INF ? 0.0f : expf(m0 - mn0);
        const float corr1 = m1 == NEG_INF ? 0.0f : expf(m1 - mn1);
        m0 = mn0;
        m1 = mn1;
        l0 *= corr0;
        l1 *= corr1;
#pragma unroll
        for (int j = 0; j < DT; ++j) {
            o[j][0] *= corr0;
            o[j][1] *= corr0;
            o[j][2] *= corr1;
            o[j][3] *= corr1;
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                s[j][e] = mn0 == NEG_INF ? 0.0f : expf(s[j][e] - mn0);
                s[j][2 + e] = mn1 == NEG_INF ? 0.0f : expf(s[j][2 + e] - mn1);
                l0 += s[j][e];
                l1 += s[j][2 + e];
            }
        }

        // O += P . V. P's A fragment for keys 16kk..16kk+15 is S tiles 2kk (a0, a1) and 2kk+1
        // (a2, a3), packed where they lie; V's B fragment (k = key, n = head dim) is two keys of
        // one column per register.
#pragma unroll
        for (int kk = 0; kk < BKV / 16; ++kk) {
            const unsigned a0 = pack2(s[2 * kk][0], s[2 * kk][1]);
            const unsigned a1 = pack2(s[2 * kk][2], s[2 * kk][3]);
            const unsigned a2 = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            const unsigned a3 = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int j = 0; j < DT; ++j) {
                const float* vr = &V[16 * kk + 2 * t][8 * j + g];
                const unsigned v0 = pack2(vr[0], vr[DP + 4]);
                const unsigned v1 = pack2(vr[8 * (DP + 4)], vr[9 * (DP + 4)]);
                mma16816(o[j], a0, a1, a2, a3, v0, v1);
            }
        }
    }
    if (!warp_live) return;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    // A row whose scores were all -inf has l == 0: NaN, as the CPU backend (kernels/src/attention.rs)
    // and PyTorch give.
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : __int_as_float(0x7fc00000);
    const float inv1 = l1 > 0.0f ? 1.0f / l1 : __int_as_float(0x7fc00000);
    float* out0 = p.out + (bh * p.nq + row0) * p.d;
    float* out1 = p.out + (bh * p.nq + row1) * p.d;
#pragma unroll
    for (int j = 0; j < DT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int c = 8 * j + 2 * t + e;
            if (c < d) {
                if (row0 < p.nq) out0[c] = o[j][e] * inv0;
                if (row1 < p.nq) out1[c] = o[j][2 + e] * inv1;
            }
        }
    }
}

// Grid: (ceil(Nq / 64), BH), block: 128 threads (4 warps x 16 query rows). The smallest instance
// with DP >= d; key tiles of 64 (DP <= 32) or 32 keys keep the two f32 stages of K and V under
// 48 KiB (DP 80: 2 x 2 x 32 x 84 x 4 B = 43 008 B).
extern "C" __global__ void __launch_bounds__(THREADS) attention_tc_d16(const AttnParams p) { attention_tc_body<16, 64>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) attention_tc_d32(const AttnParams p) { attention_tc_body<32, 64>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) attention_tc_d64(const AttnParams p) { attention_tc_body<64, 32>(p); }
extern "C" __global__ void __launch_bounds__(THREADS) attention_tc_d80(const AttnParams p) { attention_tc_body<80, 32>(p); }
