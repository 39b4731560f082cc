// Bilinear resize of [planes, H, W] with PyTorch's align_corners=False, antialias=False rule,
// with the same f32 tap arithmetic and association as the CPU reference (kernels/src/resize.rs):
// interpolate along x within each source row, then along y. Explicit _rn intrinsics keep the
// compiler from contracting into FMAs, so the result matches the CPU bit for bit where the taps do.

typedef long long i64;

struct Tap {
    i64 i0, i1;
    float w0, w1;
};

__device__ __forceinline__ Tap tap(i64 in_size, i64 out_size, i64 d) {
    const float scale = __fdiv_rn((float)in_size, (float)out_size);
    float real = __fsub_rn(__fmul_rn(scale, __fadd_rn((float)d, 0.5f)), 0.5f);
    real = fmaxf(real, 0.0f);
    Tap t;
    t.i0 = min((i64)real, in_size - 1);
    t.w1 = fminf(fmaxf(__fsub_rn(real, (float)t.i0), 0.0f), 1.0f);
    t.w0 = __fsub_rn(1.0f, t.w1);
    t.i1 = t.i0 < in_size - 1 ? t.i0 + 1 : t.i0;
    return t;
}

// Grid-stride over planes * out_h * out_w outputs.
extern "C" __global__ void resize_bilinear(const float* x, float* out, i64 planes, i64 h, i64 w, i64 out_h, i64 out_w) {
    const i64 n = planes * out_h * out_w;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 ox = i % out_w, t = i / out_w;
        i64 oy = t % out_h, plane = t / out_h;
        Tap ty = tap(h, out_h, oy), tx = tap(w, out_w, ox);
        const float* r0 = x + (plane * h + ty.i0) * w;
        const float* r1 = x + (plane * h + ty.i1) * w;
        float top = __fadd_rn(__fmul_rn(r0[tx.i0], tx.w0), __fmul_rn(r0[tx.i1], tx.w1));
        float bottom = __fadd_rn(__fmul_rn(r1[tx.i0], tx.w0), __fmul_rn(r1[tx.i1], tx.w1));
        out[i] = __fadd_rn(__fmul_rn(top, ty.w0), __fmul_rn(bottom, ty.w1));
    }
}
