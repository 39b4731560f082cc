// Layer normalisations, f32, two passes (mean, then mean squared deviation) so that a large mean
// does not swallow the variance as one-pass E[x^2] - E[x]^2 would (the CPU reference does the
// same in f64).

typedef long long i64;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// LayerNorm over the last axis: one warp per row. Grid: (ceil(rows / 4)), block: 128.
extern "C" __global__ void layer_norm_rows(const float* x, float* out, const float* gamma, const float* beta, i64 rows, i64 dim, float eps) {
    const i64 row = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* xr = x + row * dim;
    float s = 0.0f;
    for (i64 c = lane; c < dim; c += 32) s += xr[c];
    const float mean = warp_sum(s) / (float)dim;
    float v = 0.0f;
    for (i64 c = lane; c < dim; c += 32) {
        float t = xr[c] - mean;
        v += t * t;
    }
    const float inv = rsqrtf(warp_sum(v) / (float)dim + eps);
    float* o = out + row * dim;
    for (i64 c = lane; c < dim; c += 32) o[c] = (xr[c] - mean) * inv * gamma[c] + beta[c];
}

// LayerNorm2d over the channels of each pixel of NCHW: one thread per pixel, coalesced across
// pixels. Grid: (ceil(batch * spatial / 128)), block: 128.
extern "C" __global__ void layer_norm_nchw(const float* x, float* out, const float* gamma, const float* beta, i64 batch, i64 channels, i64 spatial, float eps) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= batch * spatial) return;
    const i64 b = idx / spatial, p = idx - b * spatial;
    const float* xb = x + b * channels * spatial + p;
    float s = 0.0f;
    for (i64 c = 0; c < channels; ++c) s += xb[c * spatial];
    const float mean = s / (float)channels;
    float v = 0.0f;
    for (i64 c = 0; c < channels; ++c) {
        float t = xb[c * spatial] - mean;
        v += t * t;
    }
    const float inv = rsqrtf(v / (float)channels + eps);
    float* ob = out + b * channels * spatial + p;
    for (i64 c = 0; c < channels; ++c) ob[c * spatial] = (xb[c * spatial] - mean) * inv * gamma[c] + beta[c];
}
