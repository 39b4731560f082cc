// Layout and element-wise operations: permute, block copies (narrow and concat), NHWC padding,
// broadcast add, scale + activation. All f32; one thread per output element (grid-stride).

typedef long long i64;

#define MAX_RANK 8

#define ACT_NONE 0
#define ACT_GELU 1
#define ACT_RELU 2

__device__ __forceinline__ float activate(float v, i64 act) {
    if (act == ACT_GELU) return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    if (act == ACT_RELU) return fmaxf(v, 0.0f);
    return v;
}

struct PermuteParams {
    i64 rank;
    i64 n;
    i64 out_shape[MAX_RANK];
    i64 src_stride[MAX_RANK];  // input stride of each output axis
};

extern "C" __global__ void permute(const float* x, float* out, const PermuteParams p) {
    for (i64 o = (i64)blockIdx.x * blockDim.x + threadIdx.x; o < p.n; o += (i64)gridDim.x * blockDim.x) {
        i64 rest = o, src = 0;
        for (int a = (int)p.rank - 1; a >= 0; --a) {
            i64 c = rest % p.out_shape[a];
            rest /= p.out_shape[a];
            src += c * p.src_stride[a];
        }
        out[o] = x[src];
    }
}

// dst[b, dst_off + j, r] = src[b, src_off + j, r] for b < outer, j < len, r < inner, where the
// middle axis has src_dim / dst_dim entries: `narrow` (dst_off 0) and one piece of `concat`.
extern "C" __global__ void copy_block(const float* src, float* dst, i64 outer, i64 len, i64 inner, i64 src_dim, i64 src_off, i64 dst_dim, i64 dst_off) {
    const i64 piece = len * inner, n = outer * piece;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 b = i / piece, r = i - b * piece;
        dst[(b * dst_dim + dst_off) * inner + r] = src[(b * src_dim + src_off) * inner + r];
    }
}

// [B, H, W, C] -> [B, H + pad_h, W + pad_w, C], zeros at the bottom and right.
extern "C" __global__ void pad_hw(const float* x, float* out, i64 b, i64 h, i64 w, i64 c, i64 oh, i64 ow) {
    const i64 n = b * oh * ow * c;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 ch = i % c, t = i / c;
        i64 x_ = t % ow;
        t /= ow;
        i64 y = t % oh, bi = t / oh;
        out[i] = (y < h && x_ < w) ? x[((bi * h + y) * w + x_) * c + ch] : 0.0f;
    }
}

// out = a + b, b broadcast over a's leading axes (b has `blen` elements, a suffix of a's shape).
extern "C" __global__ void add_broadcast(const float* a, const float* b, float* out, i64 n, i64 blen) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = a[i] + b[i % blen];
}

// out = act(a * s).
extern "C" __global__ void scale_act(const float* a, float* out, i64 n, float s, i64 act) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = activate(a[i] * s, act);
}
