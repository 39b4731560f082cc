// Flash-style attention: softmax(scale * q.k^T + bias) . v with an online softmax, so no
// Nq x Nk score matrix ever exists. f32 throughout (CUDA cores): one thread owns one query row,
// keeping q and its running output in registers, while the block streams K and V through shared
// memory in tiles. Scores are taken CHUNK keys at a time so that the running output is rescaled
// once per chunk rather than once per key.
//
// The attention bias is computed on the fly (per-query row pointers, key position advanced
// incrementally: no integer division in the key loop):
// - bias_mode 1, TinyViT's learned table `[H, Nq, Nk]`, batch-head `bh` using head `bh % H`;
// - bias_mode 2, SAM's decomposed relative position: rel_h `[BH, Nq, Kh]`, rel_w `[BH, Nq, Kw]`,
//   bias(i, j) = rel_h[bh, i, j / Kw] + rel_w[bh, i, j % Kw].
//
// Head dims up to DP are handled by the instance for DP (the rest of the registers stay zero).

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
