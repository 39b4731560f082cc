// Direct NCHW convolution for the grouped and depthwise cases (dense convolutions run as an
// implicit GEMM in nf4_gemm.cu). One thread per output element; the weight is read in its stored
// precision (f32, fp16 or NF4) and dequantised in registers. f32 arithmetic.

typedef long long i64;

#define W_F32 0
#define W_F16 1
#define W_NF4 2

#define ACT_NONE 0
#define ACT_GELU 1
#define ACT_RELU 2

__constant__ float NF4_TABLE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Same record as nf4_gemm.cu's: data (codes / f16 / f32), per-block log2 absmax codes, per-256-
// block (offset, step) pairs, kind.
struct WeightRef {
    const void* data;
    const unsigned char* absq;
    const float* scales;
    i64 kind;
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

__device__ __forceinline__ float load_weight(const WeightRef& w, i64 i) {
    if (w.kind == W_F32) return ((const float*)w.data)[i];
    if (w.kind == W_F16) return f16_to_f32(((const unsigned short*)w.data)[i]);
    const unsigned char byte = ((const unsigned char*)w.data)[i >> 1];
    const float code = NF4_TABLE[(i & 1) ? (byte >> 4) : (byte & 15)];
    const i64 block = i >> 6;
    const unsigned q = w.absq[block];
    if (q == 0) return 0.0f;
    const i64 g = block >> 8;
    return code * exp2f(w.scales[2 * g] + (float)(q - 1) * w.scales[2 * g + 1]);
}

__device__ __forceinline__ float activate(float v, i64 act) {
    if (act == ACT_GELU) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    if (act == ACT_RELU) return fmaxf(v, 0.0f);
    return v;
}

struct ConvParams {
    const float* x;
    float* out;
    WeightRef w;
    const float* bias;
    i64 batch, cin, h, w_, cout, kh, kw, stride, pad, groups, oh, ow, act;
};

// Grid-stride over batch * cout * oh * ow outputs, in NCHW order (coalesced writes).
extern "C" __global__ void conv2d_direct(const ConvParams p) {
    const i64 n = p.batch * p.cout * p.oh * p.ow;
    const i64 cin_g = p.cin / p.groups, cout_g = p.cout / p.groups;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 ox = i % p.ow, t = i / p.ow;
        i64 oy = t % p.oh;
        t /= p.oh;
        i64 co = t % p.cout, b = t / p.cout;
        i64 g = co / cout_g;
        float acc = 0.0f;
        for (i64 ci = 0; ci < cin_g; ++ci) {
            const float* plane = p.x + (b * p.cin + g * cin_g + ci) * p.h * p.w_;
            const i64 wbase = (co * cin_g + ci) * p.kh * p.kw;
            for (i64 ky = 0; ky < p.kh; ++ky) {
                i64 y = oy * p.stride - p.pad + ky;
                if (y < 0 || y >= p.h) continue;
                for (i64 kx = 0; kx < p.kw; ++kx) {
                    i64 x = ox * p.stride - p.pad + kx;
                    if (x < 0 || x >= p.w_) continue;
                    acc = fmaf(plane[y * p.w_ + x], load_weight(p.w, wbase + ky * p.kw + kx), acc);
                }
            }
        }
        if (p.bias) acc += p.bias[co];
        p.out[i] = activate(acc, p.act);
    }
}
