// Host emulation of the inline PTX the kernels use, from the PTX ISA's definitions:
// - cvt.f32.f16: exact (every f16 is an f32), subnormals included;
// - cvt.rn{.satfinite}.{bf16x2,f16x2}.f32 d, a, b: round to nearest even, a into the upper half of
//   d, b into the lower; NaN becomes the canonical NaN (0x7fff); without .satfinite a value past
//   the format's range rounds to infinity, with it to the largest finite value of its sign;
// - mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: D = A·B + C for a 16 x 16
//   row-major A, a 16 x 8 column-major B and a 16 x 8 f32 C, each spread over the warp's 32 lanes
//   in the ISA's fragment layout (groupID = lane / 4, threadID_in_group = lane % 4):
//     A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..2t+1), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..);
//     B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g);
//     C/D: c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1);
//   the lower-numbered element of a pair in the lower 16 bits. The ISA leaves the order and
//   internal precision of the 16-term sum open; here the products (exact in f32) are summed in
//   f64 and rounded once, which a GPU matches to within a few f32 ulp per instruction.
#include <cstring>

#include "../include/minisam_sim.h"

namespace msim {
namespace {

uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

constexpr uint16_t kCanonicalNaN = 0x7fff;

uint16_t f32_to_bf16_rn(float f) {
    const uint32_t u = bits(f);
    if ((u & 0x7fffffff) > 0x7f800000) return kCanonicalNaN;
    // Round to nearest even on the 16 dropped bits; a carry into the exponent is the right
    // answer (up to infinity for values past bf16's largest finite).
    const uint32_t rounding = 0x7fff + ((u >> 16) & 1);
    return (uint16_t)((u + rounding) >> 16);
}

// f32 to IEEE binary16, round to nearest even, optionally saturating to ±65504.
uint16_t f32_to_f16_rn(float f, bool satfinite) {
    const uint32_t u = bits(f);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    const uint32_t mag = u & 0x7fffffff;
    if (mag > 0x7f800000) return kCanonicalNaN;
    const uint16_t inf = satfinite ? (uint16_t)(sign | 0x7bff) : (uint16_t)(sign | 0x7c00);
    if (mag >= 0x477ff000) return inf;  // rounds to 65536 or more (65520 and up)
    const int exp = (int)(mag >> 23) - 127;
    if (exp >= -14) {
        // Normal f16: keep 10 of 23 mantissa bits, round to nearest even (a carry may bump the
        // exponent, which the threshold above kept finite).
        const uint32_t m = (mag & 0x7fffff) | 0x800000;
        const uint32_t shift = 13;
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) ++r;
        // r holds the implicit bit at 1 << 10; exponent field = exp + 15.
        return (uint16_t)(sign | (uint16_t)(((uint32_t)(exp + 15) << 10) + (r - 0x400)));
    }
    // Subnormal f16 (or zero): value = r * 2^-24.
    if (exp < -25) return sign;  // below half the smallest subnormal: rounds to zero
    const uint32_t m = (mag & 0x7fffff) | 0x800000;  // value = m * 2^(exp - 23)
    const uint32_t shift = (uint32_t)(-exp - 1);     // to units of 2^-24: m >> (-(exp - 23) - 24)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return (uint16_t)(sign | r);
}

float bf16_to_f32(uint16_t h) { return from_bits((uint32_t)h << 16); }

struct MmaLane {
    unsigned a[4];
    unsigned b[2];
};

// Element (row, k) of A, from the lane that holds it.
float a_elem(const unsigned char* all, int row, int k, float (*widen)(uint16_t)) {
    const int lane = (row % 8) * 4 + (k % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    MmaLane l;
    std::memcpy(&l, all + kSlotBytes * lane, sizeof l);
    return widen((uint16_t)(l.a[reg] >> (16 * (k & 1))));
}

// Element (k, n) of B.
float b_elem(const unsigned char* all, int k, int n, float (*widen)(uint16_t)) {
    const int lane = n * 4 + (k % 8) / 2;
    const int reg = k >= 8 ? 1 : 0;
    MmaLane l;
    std::memcpy(&l, all + kSlotBytes * lane, sizeof l);
    return widen((uint16_t)(l.b[reg] >> (16 * (k & 1))));
}

float f16_widen(uint16_t h) { return cvt_f32_f16(h); }

// Each lane needs two rows of A (g and g + 8) and two columns of B (2t and 2t + 1): they are
// widened once, 64 elements, rather than once per product term (128 indirect calls per lane made
// this the simulator's hottest function). The sum is the same, in the same order.
template <float (*Widen)(uint16_t)>
void mma_m16n8k16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    MmaLane mine{{a0, a1, a2, a3}, {b0, b1}};
    if (mutation_swap_mma_a12()) std::swap(mine.a[1], mine.a[2]);
    const unsigned char* all = warp_exchange(0xffffffffu, &mine, sizeof mine);
    const int lane = (int)lane_id(), g = lane / 4, t = lane % 4;
    double a[2][16], b[2][16];
    for (int k = 0; k < 16; ++k) {
        a[0][k] = (double)a_elem(all, g, k, Widen);
        a[1][k] = (double)a_elem(all, g + 8, k, Widen);
        b[0][k] = (double)b_elem(all, k, 2 * t, Widen);
        b[1][k] = (double)b_elem(all, k, 2 * t + 1, Widen);
    }
    for (int i = 0; i < 4; ++i) {
        const double* ar = a[i >= 2 ? 1 : 0];
        const double* bc = b[i & 1];
        double sum = 0.0;
        for (int k = 0; k < 16; ++k) sum += ar[k] * bc[k];
        c[i] = (float)(sum + (double)c[i]);
    }
}

}  // namespace

float cvt_f32_f16(unsigned short h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return from_bits(sign | 0x7f800000 | (man << 13));  // inf / NaN (payload kept)
    if (exp != 0) return from_bits(sign | ((exp + 112) << 23) | (man << 13));
    // zero or subnormal: man * 2^-24, exact in f32
    const float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
}

unsigned cvt_rn_bf16x2_f32(float a, float b) { return ((unsigned)f32_to_bf16_rn(a) << 16) | f32_to_bf16_rn(b); }

unsigned cvt_rn_satfinite_f16x2_f32(float a, float b) {
    return ((unsigned)f32_to_f16_rn(a, true) << 16) | f32_to_f16_rn(b, true);
}

unsigned short cvt_rn_f16_f32(float a) { return f32_to_f16_rn(a, false); }

unsigned short cvt_rn_bf16_f32(float a) { return f32_to_bf16_rn(a); }

void mma_m16n8k16_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    mma_m16n8k16<bf16_to_f32>(c, a0, a1, a2, a3, b0, b1);
}

void mma_m16n8k16_f16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    mma_m16n8k16<f16_widen>(c, a0, a1, a2, a3, b0, b1);
}

}  // namespace msim
