/* Matrix-vector products on GGUF weights kept exactly as the file stores them: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
 * Q5_K, Q6_K, IQ4_NL and IQ4_XS blocks are read in place, one row of blocks per output channel.
 *
 * Each block type has one decoder that turns a block into groups of 32 small integers (in registers) with a float
 * scale `a` and offset `b` per 16 values, so that the weight is exactly a * u + b (the dequantizer's value). Two
 * consumers share the decoders: the dot product for decoding and the dequantizer of tiles for prefill.
 *
 * The dot product quantizes the activations once per call to int8 in groups of 32 (a float scale per group, as
 * llama.cpp's Q8 activations), then multiplies integers: u8 x s8 dot products (AVX-512 VNNI, else AVX2's
 * maddubs), a float multiply-add per 32 weights for the scales, and the offsets through the activations' group
 * sums. The result is the dot product of the file's dequantized weights with the int8-rounded activations, to
 * float rounding (the tests hold it to exactly that). Needs AVX2 (with FMA and F16C); elsewhere the functions
 * return 0 and the caller dequantizes tiles instead.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GGUF_SIMD 1

/* GGML type ids (ggml.h) */
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ4_NL = 20, IQ4_XS = 23 };

static const int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* A decoded block: up to 8 groups of 32 values; `is_signed`: the values are s8 (u = w) rather than u8. */
typedef struct {
    __m256i v[8];
    float a[16], b[16]; /* per 16 values: weight = a * value + b */
    int zero;           /* Q4_0, Q5_0, Q6_K: the dequantizer computes a * (value - zero), one rounding */
} decoded;

static inline __m256i nibbles_lo(__m256i q) { return _mm256_and_si256(q, _mm256_set1_epi8(15)); }
static inline __m256i nibbles_hi(__m256i q) { return _mm256_and_si256(_mm256_srli_epi16(q, 4), _mm256_set1_epi8(15)); }

/* 16 bytes of a 32-value block: low nibbles are values 0-15, high nibbles 16-31. */
static inline __m256i nibbles_32(const uint8_t *p) {
    const __m128i q = _mm_loadu_si128((const __m128i *)p);
    const __m128i m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

/* 32 bits -> 32 bytes, byte j 0xff where bit j is set. */
static inline __m256i bits_32(const uint8_t *p) {
    uint32_t bits;
    memcpy(&bits, p, 4);
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int)bits),
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
    const __m256i select = _mm256_set1_epi64x((int64_t)0x8040201008040201);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
}

static inline void same_ab(decoded *o, int group, float a, float b) {
    o->a[2 * group] = o->a[2 * group + 1] = a;
    o->b[2 * group] = o->b[2 * group + 1] = b;
}

/* Q4_K and Q5_K: 6-bit scale and min of group g from 12 bytes */
static inline void k4_scale_min(const uint8_t *s, int g, int *sc, int *m) {
    if (g < 4) {
        *sc = s[g] & 63;
        *m = s[g + 4] & 63;
    } else {
        *sc = (s[g + 4] & 15) | ((s[g - 4] >> 6) << 4);
        *m = (s[g + 4] >> 4) | ((s[g] >> 6) << 4);
    }
}

/* The values of the 256-value block types, 8 groups of 32 bytes (u8; s8 for IQ4_XS). */
static inline __attribute__((always_inline)) void values(int type, const uint8_t *blk, __m256i *v) {
    switch (type) {
    case IQ4_XS: {
        const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS));
        for (int g = 0; g < 8; g++) v[g] = _mm256_shuffle_epi8(levels, nibbles_32(blk + 8 + 16 * g));
        break;
    }
    case Q4_K:
    case Q5_K: {
        const uint8_t *qs = blk + (type == Q4_K ? 16 : 48);
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16)); /* Q5_K's high bits */
        const __m256i sixteen = _mm256_set1_epi8(16);
        for (int j = 0; j < 4; j++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            v[2 * j] = nibbles_lo(q);
            v[2 * j + 1] = nibbles_hi(q);
            if (type == Q5_K) { /* bit 2j of qh[l] is value l's fifth bit in group 2j, bit 2j + 1 in 2j + 1 */
                const __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * j))), b1 = _mm256_set1_epi8((char)(2 << (2 * j)));
                v[2 * j] = _mm256_or_si256(v[2 * j], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), sixteen));
                v[2 * j + 1] = _mm256_or_si256(
                    v[2 * j + 1], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), sixteen));
            }
        }
        break;
    }
    case Q6_K: {
        const __m256i three = _mm256_set1_epi8(3);
        for (int half = 0; half < 2; half++) {
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * half));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * half + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * half));
            __m256i *w = v + 4 * half;
            w[0] = _mm256_or_si256(nibbles_lo(ql0), _mm256_slli_epi16(_mm256_and_si256(qh, three), 4));
            w[1] = _mm256_or_si256(nibbles_lo(ql1),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), three), 4));
            w[2] = _mm256_or_si256(nibbles_hi(ql0),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), three), 4));
            w[3] = _mm256_or_si256(nibbles_hi(ql1),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), three), 4));
        }
        break;
    }
    }
}

/* A block's values with a float scale and offset per 16 (all block types): for the dequantizer, and the dot
 * products of the 32-value types. */
static inline __attribute__((always_inline)) void decode(int type, const uint8_t *blk, decoded *o) {
    o->zero = type == Q4_0 ? 8 : type == Q5_0 ? 16 : type == Q6_K ? 32 : 0;
    switch (type) {
    case Q4_0:
        o->v[0] = nibbles_32(blk + 2);
        same_ab(o, 0, f16(blk), -8.f * f16(blk));
        break;
    case Q4_1:
        o->v[0] = nibbles_32(blk + 4);
        same_ab(o, 0, f16(blk), f16(blk + 2));
        break;
    case Q5_0:
        o->v[0] = _mm256_or_si256(nibbles_32(blk + 6), _mm256_and_si256(bits_32(blk + 2), _mm256_set1_epi8(16)));
        same_ab(o, 0, f16(blk), -16.f * f16(blk));
        break;
    case Q5_1:
        o->v[0] = _mm256_or_si256(nibbles_32(blk + 8), _mm256_and_si256(bits_32(blk + 4), _mm256_set1_epi8(16)));
        same_ab(o, 0, f16(blk), f16(blk + 2));
        break;
    case Q8_0:
        o->v[0] = _mm256_loadu_si256((const __m256i *)(blk + 2));
        same_ab(o, 0, f16(blk), 0.f);
        break;
    case IQ4_NL: {
        const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4_LEVELS));
        o->v[0] = _mm256_shuffle_epi8(levels, nibbles_32(blk + 2));
        same_ab(o, 0, f16(blk), 0.f);
        break;
    }
    case IQ4_XS: {
        values(type, blk, o->v);
        const float d = f16(blk);
        uint16_t high;
        memcpy(&high, blk + 2, 2);
        for (int g = 0; g < 8; g++) {
            const int ls = ((blk[4 + g / 2] >> (4 * (g % 2))) & 15) | (((high >> (2 * g)) & 3) << 4);
            same_ab(o, g, d * (float)(ls - 32), 0.f);
        }
        break;
    }
    case Q4_K:
    case Q5_K: {
        values(type, blk, o->v);
        const float d = f16(blk), dmin = f16(blk + 2);
        for (int g = 0; g < 8; g++) {
            int sc, m;
            k4_scale_min(blk + 4, g, &sc, &m);
            same_ab(o, g, d * (float)sc, -dmin * (float)m);
        }
        break;
    }
    case Q6_K: {
        values(type, blk, o->v);
        const float d = f16(blk + 208);
        const int8_t *sc = (const int8_t *)(blk + 192);
        for (int h = 0; h < 16; h++) {
            o->a[h] = d * (float)sc[h];
            o->b[h] = -32.f * o->a[h];
        }
        break;
    }
    }
}

static inline int values_per_block(int type) {
    return type == Q4_K || type == Q5_K || type == Q6_K || type == IQ4_XS ? 256 : 32;
}

static int block_bytes(int type) {
    switch (type) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    case IQ4_NL: return 18;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    case IQ4_XS: return 136;
    }
    return 0;
}

static inline int is_signed(int type) { return type == Q8_0 || type == IQ4_NL || type == IQ4_XS; }

static int supported(int type) {
    switch (type) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: case Q4_K: case Q5_K: case Q6_K: case IQ4_NL: case IQ4_XS:
        return 1;
    }
    return 0;
}

/* Activations of one row, quantized: int8 values, a scale per group (32 values for the 32-value block types,
 * 256 for the others, as llama.cpp's Q8_0 and Q8_K), and the sum of every 16 int8 values. */
typedef struct {
    const int8_t *q;
    const float *scale;
    const int16_t *sums; /* k / 16 */
} qrow;

static inline int activation_group(int type) { return values_per_block(type); }

static void quantize_rows(const float *x, int64_t m, int64_t k, int group, int8_t *q, float *scale,
                          int16_t *sums) {
    for (int64_t g = 0; g < m * k / group; g++) {
        const float *xg = x + g * group;
        float top = 0.f;
        for (int j = 0; j < group; j++) top = fmaxf(top, fabsf(xg[j]));
        const float inv = top > 0.f ? 127.f / top : 0.f;
        scale[g] = top / 127.f;
        for (int h = 0; h < group / 16; h++) {
            int total = 0;
            for (int j = 16 * h; j < 16 * h + 16; j++) {
                const int v = (int)nearbyintf(xg[j] * inv);
                q[g * group + j] = (int8_t)v;
                total += v;
            }
            sums[g * group / 16 + h] = (int16_t)total;
        }
    }
}

static inline float sum8f(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline int32_t sum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* 16 int16 sums of 2 products each: u (u8, at most 63, where maddubs cannot saturate) times x (s8); signed
 * weights (|w| <= 128) move their sign onto x first. */
static inline __m256i pairs_u8(__m256i u, __m256i x) { return _mm256_maddubs_epi16(u, x); }
static inline __m256i pairs_s8(__m256i w, __m256i x) {
    return _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

/* Word w of each 128-bit lane of a vector of 8 int16 scales (both lanes alike), broadcast over its lane:
 * SCALE_PICK[g] picks scale g in both lanes, SCALE_PICK_2[g] scale 2g in the low lane and 2g + 1 in the high. */
static inline __m256i pick_word(__m256i scales, int lo, int hi) {
    const __m256i control = _mm256_set_m128i(_mm_set1_epi16((short)(0x0100 * (2 * hi + 1) + 2 * hi)),
                                             _mm_set1_epi16((short)(0x0100 * (2 * lo + 1) + 2 * lo)));
    return _mm256_shuffle_epi8(scales, control);
}

/* The dot products below take T tokens (1, or TOKENS for prefill) per row of weights: each block is decoded once
 * for all of them. Each token's result depends on that token alone (its own int8 rounding), so a prompt computed in
 * one piece or in several (a prefix cache, a server's batches) gives the same numbers. */
#define TOKENS 4
#ifndef PREFETCH
#define PREFETCH 4096
#endif

/* One row of 256-value blocks (Q4_K, Q5_K, Q6_K, IQ4_XS) . x: integer sums over a block (each group's dot times
 * its integer scale), one float multiply-add per block; the offsets (mins) through x's 16-value sums. */
static inline __attribute__((always_inline)) void row_dot_256(int type, const uint8_t *row, int bytes,
                                                              const qrow *x, const int T, int64_t k, float *out) {
    __m256 acc[TOKENS];
    float offset[TOKENS];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps(), offset[t] = 0.f;
    __m256i v[8];
    for (int64_t blk = 0; blk < k / 256; blk++) {
        const uint8_t *b = row + blk * bytes;
        for (int line = 0; line < bytes; line += 64) _mm_prefetch((const char *)b + PREFETCH + line, _MM_HINT_T0);
        values(type, b, v);
        float d;
        __m256i scales, sc16 = _mm256_setzero_si256(), m16 = _mm256_setzero_si256(), second = scales;
        if (type == Q6_K) {
            d = f16(b + 208);
            sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
            scales = _mm256_permute2x128_si256(sc16, sc16, 0x00); /* scales 0-7, both lanes */
            second = _mm256_permute2x128_si256(sc16, sc16, 0x11); /* scales 8-15 */
        } else {
            uint32_t w[3], sc[2], mn[2] = {0, 0};
            memcpy(w, b + 4, 12);
            d = f16(b);
            if (type == IQ4_XS) {
                uint16_t high;
                memcpy(&high, b + 2, 2);
                uint8_t ls[8];
                for (int g = 0; g < 8; g++)
                    ls[g] = (uint8_t)(((b[4 + g / 2] >> (4 * (g % 2))) & 15) | (((high >> (2 * g)) & 3) << 4));
                memcpy(sc, ls, 8);
            } else { /* Q4_K, Q5_K: 6-bit scales and mins of 8 groups in 12 bytes */
                sc[0] = w[0] & 0x3f3f3f3fu;
                sc[1] = (w[2] & 0x0f0f0f0fu) | ((w[0] >> 2) & 0x30303030u);
                mn[0] = w[1] & 0x3f3f3f3fu;
                mn[1] = ((w[2] >> 4) & 0x0f0f0f0fu) | ((w[1] >> 2) & 0x30303030u);
            }
            scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)sc)));
            if (type == IQ4_XS) scales = _mm256_sub_epi16(scales, _mm256_set1_epi16(32));
            const __m128i m8 = _mm_loadl_epi64((const __m128i *)mn);
            m16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8)); /* each min twice: per 16 values */
        }
        const float dmin = type == Q4_K || type == Q5_K ? f16(b + 2) : 0.f;
        for (int t = 0; t < T; t++) {
            const int8_t *xq = x[t].q + blk * 256;
            const __m256i sums16 = _mm256_loadu_si256((const __m256i *)(x[t].sums + blk * 16));
            __m256i total = _mm256_setzero_si256();
            float block_offset = 0.f;
            for (int g = 0; g < 8; g++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * g));
                __m256i p, scale;
                if (type == Q6_K) {
                    p = pairs_u8(v[g], xv);
                    scale = pick_word(g < 4 ? scales : second, 2 * (g % 4), 2 * (g % 4) + 1);
                } else {
                    p = type == IQ4_XS ? pairs_s8(v[g], xv) : pairs_u8(v[g], xv);
                    scale = pick_word(scales, g, g);
                }
                total = _mm256_add_epi32(total, _mm256_madd_epi16(p, scale));
            }
            if (type == Q6_K) block_offset = -32.f * d * (float)sum8i(_mm256_madd_epi16(sc16, sums16));
            if (type == Q4_K || type == Q5_K) /* - dmin * sum over groups of min * (sum of x in the group) */
                block_offset = -dmin * (float)sum8i(_mm256_madd_epi16(m16, sums16));
            const float s = x[t].scale[blk];
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_set1_ps(d * s), acc[t]);
            offset[t] += block_offset * s;
        }
    }
    for (int t = 0; t < T; t++) out[t] = sum8f(acc[t]) + offset[t];
}

/* One row of 32-value blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) . x: a float multiply-add per block. */
static inline __attribute__((always_inline)) void row_dot_32(int type, const uint8_t *row, int bytes, const qrow *x,
                                                             const int T, int64_t k, float *out) {
    __m256 acc[TOKENS];
    float offset[TOKENS];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps(), offset[t] = 0.f;
    decoded o;
    for (int64_t blk = 0; blk < k / 32; blk++) {
        _mm_prefetch((const char *)row + blk * bytes + PREFETCH, _MM_HINT_T0); /* blocks under 64 bytes */
        decode(type, row + blk * bytes, &o);
        for (int t = 0; t < T; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(x[t].q + blk * 32));
            const __m256i p = is_signed(type) ? pairs_s8(o.v[0], xv) : pairs_u8(o.v[0], xv);
            const __m256i dots = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
            const float s = x[t].scale[blk];
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(o.a[0] * s), acc[t]);
            if (!is_signed(type)) offset[t] += o.b[0] * s * (float)(x[t].sums[2 * blk] + x[t].sums[2 * blk + 1]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = sum8f(acc[t]) + offset[t];
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* With AVX-512 VNNI, Q4_K, Q5_K and Q6_K take 64 values per instruction: the int16 pair sums of maddubs meet
 * their group's scale in vpdpwssd, which adds them into one int32 accumulator per block. Q4_K and Q5_K store
 * groups 2j and 2j + 1 in the low and high nibbles of the same 32 bytes, so a 64-byte load holds groups
 * (0, 2) in its low nibbles and (1, 3) in its high ones: x is laid out in that order (see `x_order`). */
#define K_512 1

static inline int interleaved_x(int type) { return type == Q4_K || type == Q5_K; }

/* vpermw indexes: words 0-15 take scale a, words 16-31 scale b */
static inline __m512i scale_pair(__m512i scales, int a, int b) {
    const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)a)),
                                           _mm256_set1_epi16((short)b), 1);
    return _mm512_permutexvar_epi16(idx, scales);
}

static inline __attribute__((always_inline)) void row_dot_k_512(int type, const uint8_t *row, int bytes,
                                                                const qrow *x, const int T, int64_t k, float *out) {
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc[TOKENS];
    __m256 offset[TOKENS]; /* per 16-value lane: the offsets, summed once at the end */
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps(), offset[t] = _mm256_setzero_ps();
    __m512i v[4], scale[4]; /* a block: 4 x 64 values, and the int16 scale of each value's group */
    for (int64_t blk = 0; blk < k / 256; blk++) {
        const uint8_t *b = row + blk * bytes;
        /* the weights stream from memory once: ask for them PREFETCH bytes ahead, past page boundaries (where the
         * hardware's prefetchers stop) and across rows */
        for (int line = 0; line < bytes; line += 64) _mm_prefetch((const char *)b + PREFETCH + line, _MM_HINT_T0);
        float d, dmin = 0.f;
        __m256i per16; /* each 16 values' integer factor for the offsets: Q6_K's scales, Q4_K / Q5_K's mins */
        if (type == Q6_K) {
            d = f16(b + 208);
            per16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
            const __m512i scales = _mm512_castsi256_si512(per16);
            const __m512i three = _mm512_set1_epi8(3);
            for (int half = 0; half < 2; half++) { /* v: values 0-63 and 64-127 of each half, in order */
                const __m512i ql = _mm512_loadu_si512((const void *)(b + 64 * half));
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * half));
                const __m512i qh01 = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
                const __m512i qh23 = _mm512_srli_epi16(qh01, 4);
                v[2 * half] = _mm512_or_si512(_mm512_and_si512(ql, low),
                                              _mm512_slli_epi16(_mm512_and_si512(qh01, three), 4));
                v[2 * half + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low),
                                                  _mm512_slli_epi16(_mm512_and_si512(qh23, three), 4));
                const int s0 = 8 * half; /* scales per 16 values */
                const __m512i idx = _mm512_set_epi16(s0 + 3, s0 + 3, s0 + 3, s0 + 3, s0 + 3, s0 + 3, s0 + 3, s0 + 3,
                                                     s0 + 2, s0 + 2, s0 + 2, s0 + 2, s0 + 2, s0 + 2, s0 + 2, s0 + 2,
                                                     s0 + 1, s0 + 1, s0 + 1, s0 + 1, s0 + 1, s0 + 1, s0 + 1, s0 + 1,
                                                     s0, s0, s0, s0, s0, s0, s0, s0);
                scale[2 * half] = _mm512_permutexvar_epi16(idx, scales);
                scale[2 * half + 1] = _mm512_permutexvar_epi16(_mm512_add_epi16(idx, _mm512_set1_epi16(4)), scales);
            }
        } else { /* Q4_K, Q5_K: v[c] holds groups (0, 2), (1, 3), (4, 6), (5, 7) (x is laid out to match) */
            d = f16(b);
            dmin = f16(b + 2);
            /* the 6-bit scales and mins of 8 groups, from the 12 bytes after d and dmin (32-bit words w0-w2 in
             * lanes 1-3), in vector registers: lanes [scales 0-3, scales 4-7, mins 0-3, mins 4-7] */
            const __m128i head = _mm_loadu_si128((const __m128i *)b);
            const __m128i low_bits = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(head, 0xed /* w0 w2 w1 w2 */),
                                                                  _mm_set_epi32(4, 0, 0, 0)),
                                                   _mm_set_epi32(0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f));
            const __m128i high_bits = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(head, 0xa5 /* w0 w0 w1 w1 */), 2),
                                                    _mm_set_epi32(0x30303030, 0, 0x30303030, 0));
            const __m128i sm = _mm_or_si128(low_bits, high_bits);
            const __m512i scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
            const uint8_t *qs = b + (type == Q4_K ? 16 : 48);
            const __m512i q0 = _mm512_loadu_si512((const void *)qs), q1 = _mm512_loadu_si512((const void *)(qs + 64));
            v[0] = _mm512_and_si512(q0, low);
            v[1] = _mm512_and_si512(_mm512_srli_epi16(q0, 4), low);
            v[2] = _mm512_and_si512(q1, low);
            v[3] = _mm512_and_si512(_mm512_srli_epi16(q1, 4), low);
            if (type == Q5_K) { /* group g's fifth bits: bit g of qh[l] */
                const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)));
                const __m512i sixteen = _mm512_set1_epi8(16);
                static const int first[4] = {0, 1, 4, 5};
                for (int c = 0; c < 4; c++) {
                    const __m512i bits = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << first[c])),
                                                            _mm256_set1_epi8((char)(1 << (first[c] + 2))), 1);
                    v[c] = _mm512_or_si512(v[c], _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(qh, bits), sixteen));
                }
            }
            static const int pair[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
            for (int c = 0; c < 4; c++) scale[c] = scale_pair(scales, pair[c][0], pair[c][1]);
            per16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm)); /* each min twice */
        }
        /* offsets: Q6_K's values are u - 32, so - 32 d sum(scale * x); Q4_K's and Q5_K's - dmin sum(min * x) */
        const float per16_factor = type == Q6_K ? -32.f * d : -dmin;
        for (int t = 0; t < T; t++) {
            const int8_t *xq = x[t].q + blk * 256;
            __m512i total = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(xq + 64 * c));
                total = _mm512_dpwssd_epi32(total, _mm512_maddubs_epi16(v[c], xv), scale[c]);
            }
            const __m256i sums16 = _mm256_loadu_si256((const __m256i *)(x[t].sums + blk * 16));
            const float s = x[t].scale[blk];
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(d * s), acc[t]);
            offset[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(per16, sums16)),
                                        _mm256_set1_ps(per16_factor * s), offset[t]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = _mm512_reduce_add_ps(acc[t]) + sum8f(offset[t]);
}

/* The 32-value types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) two blocks per 64-byte vector: vpdpbusd sums 4
 * products per int32 lane (lanes 0-7 block one, 8-15 block two), one float multiply-add per pair of blocks. Zero
 * points (Q4_0's 8, Q5_0's 16) come off in integers (u - z exactly, as the dequantizer's a * (u - z)); Q4_1's and
 * Q5_1's float minimum multiplies x's sums per lane; signed values (Q8_0, IQ4_NL) move their sign onto x. */
static inline __m512i pair_nibbles(const uint8_t *p0, const uint8_t *p1) { /* 16 bytes each: 64 values */
    const __m256i q = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)p1), _mm_loadu_si128((const __m128i *)p0));
    const __m512i twice = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0), _mm512_castsi256_si512(q));
    return _mm512_and_si512(_mm512_srlv_epi64(twice, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0)), _mm512_set1_epi8(15));
}

static inline __m512 pair_f16(const uint8_t *p0, const uint8_t *p1) { /* lanes 0-7: *p0, 8-15: *p1 */
    uint16_t h0, h1;
    memcpy(&h0, p0, 2);
    memcpy(&h1, p1, 2);
    return _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16((short)h1), _mm_set1_epi16((short)h0)));
}

static inline __attribute__((always_inline)) void row_dot_32_512(int type, const uint8_t *row, int bytes,
                                                                 const qrow *x, const int T, int64_t k, float *out) {
    __m512 acc[TOKENS];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    const int zero = type == Q4_0 ? 8 : type == Q5_0 ? 16 : 0, has_min = type == Q4_1 || type == Q5_1;
    const __m512i zeros = _mm512_set1_epi8((char)zero), ones = _mm512_set1_epi8(1), sixteen = _mm512_set1_epi8(16);
    for (int64_t blk = 0; blk < k / 32; blk += 2) {
        const uint8_t *b0 = row + blk * bytes, *b1 = b0 + bytes;
        _mm_prefetch((const char *)b0 + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)b0 + PREFETCH + 64, _MM_HINT_T0);
        __m512i v;
        __m512 mins = _mm512_setzero_ps();
        switch (type) {
        case Q8_0:
            v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))),
                                   _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1);
            break;
        case IQ4_NL:
            v = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)IQ4_LEVELS)),
                                    pair_nibbles(b0 + 2, b1 + 2));
            break;
        case Q5_0:
        case Q5_1: {
            const int at = type == Q5_0 ? 2 : 4;
            uint32_t h0, h1;
            memcpy(&h0, b0 + at, 4);
            memcpy(&h1, b1 + at, 4);
            v = _mm512_or_si512(pair_nibbles(b0 + at + 4, b1 + at + 4),
                                _mm512_maskz_mov_epi8(((uint64_t)h1 << 32) | h0, sixteen));
            break;
        }
        default: /* Q4_0, Q4_1 */
            v = pair_nibbles(b0 + (type == Q4_0 ? 2 : 4), b1 + (type == Q4_0 ? 2 : 4));
        }
        if (has_min) mins = pair_f16(b0 + 2, b1 + 2);
        const __m512 d = pair_f16(b0, b1);
        const __mmask64 negative = is_signed(type) ? _mm512_movepi8_mask(v) : 0;
        const __m512i u = is_signed(type) ? _mm512_abs_epi8(v) : v;
        for (int t = 0; t < T; t++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(x[t].q + blk * 32));
            const __m512 s = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(x[t].scale[blk]), _mm512_set1_ps(x[t].scale[blk + 1]));
            __m512i dots;
            if (is_signed(type))
                dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv));
            else
                dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv);
            if (zero) dots = _mm512_sub_epi32(dots, _mm512_dpbusd_epi32(_mm512_setzero_si512(), zeros, xv));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(d, s), acc[t]);
            if (has_min) {
                const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, xv);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(mins, s), acc[t]);
            }
        }
    }
    for (int t = 0; t < T; t++) out[t] = _mm512_reduce_add_ps(acc[t]);
}
#else
static inline int interleaved_x(int type) { (void)type; return 0; }
#endif

static inline __attribute__((always_inline)) void row_dot(int type, const uint8_t *row, int bytes, const qrow *x,
                                                          const int T, int64_t k, float *out) {
#ifdef K_512
    if (type == Q4_K || type == Q5_K || type == Q6_K) {
        row_dot_k_512(type, row, bytes, x, T, k, out);
        return;
    }
    if (values_per_block(type) == 32 && k % 64 == 0) {
        row_dot_32_512(type, row, bytes, x, T, k, out);
        return;
    }
#endif
    if (values_per_block(type) == 256)
        row_dot_256(type, row, bytes, x, T, k, out);
    else
        row_dot_32(type, row, bytes, x, T, k, out);
}

/* The precise variant: activations rounded to int16 per 32 values (about float32's precision for a sum: a
 * relative error near 1e-5), for the logits, where int8's error can swap two close tokens. Any block type, through
 * `decode`; about half the int8 path's speed. */
static void quantize_rows16(const float *x, int64_t m, int64_t k, int16_t *q, float *scale, int32_t *sums) {
    for (int64_t g = 0; g < m * k / 32; g++) {
        const float *xg = x + g * 32;
        float top = 0.f;
        for (int j = 0; j < 32; j++) top = fmaxf(top, fabsf(xg[j]));
        const float inv = top > 0.f ? 32767.f / top : 0.f;
        scale[g] = top / 32767.f;
        for (int h = 0; h < 2; h++) {
            int32_t total = 0;
            for (int j = 16 * h; j < 16 * h + 16; j++) {
                const int v = (int)nearbyintf(xg[j] * inv);
                q[g * 32 + j] = (int16_t)v;
                total += v;
            }
            sums[2 * g + h] = total;
        }
    }
}

static inline __attribute__((always_inline)) float row_dot_precise(int type, const uint8_t *row, const int16_t *xq,
                                                                   const float *scale, const int32_t *sums,
                                                                   int64_t k) {
    const int per = values_per_block(type), groups = per / 32, bytes = block_bytes(type);
    __m256 acc = _mm256_setzero_ps();
    float offset = 0.f;
    decoded o;
    for (int64_t blk = 0; blk < k / per; blk++) {
        decode(type, row + blk * bytes, &o);
        for (int g = 0; g < groups; g++) {
            const int64_t at = blk * groups + g;
            const __m128i v0 = _mm256_castsi256_si128(o.v[g]), v1 = _mm256_extracti128_si256(o.v[g], 1);
            const __m256i w0 = is_signed(type) ? _mm256_cvtepi8_epi16(v0) : _mm256_cvtepu8_epi16(v0);
            const __m256i w1 = is_signed(type) ? _mm256_cvtepi8_epi16(v1) : _mm256_cvtepu8_epi16(v1);
            const __m256i d0 = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(xq + 32 * at)));
            const __m256i d1 = _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xq + 32 * at + 16)));
            const float s = scale[at];
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(o.a[2 * g] * s), acc);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(o.a[2 * g + 1] * s), acc);
            if (!is_signed(type))
                offset += (o.b[2 * g] * (float)sums[2 * at] + o.b[2 * g + 1] * (float)sums[2 * at + 1]) * s;
        }
    }
    return sum8f(acc) + offset;
}

#define ROW_DOT_PRECISE(T)                                                                                      \
    static float row_dot_precise_##T(const uint8_t *row, const int16_t *xq, const float *scale,                \
                                     const int32_t *sums, int64_t k) {                                          \
        return row_dot_precise(T, row, xq, scale, sums, k);                                                    \
    }
ROW_DOT_PRECISE(Q4_0)
ROW_DOT_PRECISE(Q4_1)
ROW_DOT_PRECISE(Q5_0)
ROW_DOT_PRECISE(Q5_1)
ROW_DOT_PRECISE(Q8_0)
ROW_DOT_PRECISE(Q4_K)
ROW_DOT_PRECISE(Q5_K)
ROW_DOT_PRECISE(Q6_K)
ROW_DOT_PRECISE(IQ4_NL)
ROW_DOT_PRECISE(IQ4_XS)

typedef float (*row_dot_precise_fn)(const uint8_t *, const int16_t *, const float *, const int32_t *, int64_t);

static row_dot_precise_fn row_dot_precise_for(int type) {
    switch (type) {
    case Q4_0: return row_dot_precise_Q4_0;
    case Q4_1: return row_dot_precise_Q4_1;
    case Q5_0: return row_dot_precise_Q5_0;
    case Q5_1: return row_dot_precise_Q5_1;
    case Q8_0: return row_dot_precise_Q8_0;
    case Q4_K: return row_dot_precise_Q4_K;
    case Q5_K: return row_dot_precise_Q5_K;
    case Q6_K: return row_dot_precise_Q6_K;
    case IQ4_NL: return row_dot_precise_IQ4_NL;
    case IQ4_XS: return row_dot_precise_IQ4_XS;
    }
    return NULL;
}

/* Per type: one token, and TOKENS at once */
#define ROW_DOT(T)                                                                                              \
    static void row_dot_##T(const uint8_t *row, const qrow *x, int n, int64_t k, float *out) {               \
        if (n == 1)                                                                                             \
            row_dot(T, row, block_bytes(T), x, 1, k, out);                                                      \
        else                                                                                                    \
            row_dot(T, row, block_bytes(T), x, TOKENS, k, out);                                                 \
    }
ROW_DOT(Q4_0)
ROW_DOT(Q4_1)
ROW_DOT(Q5_0)
ROW_DOT(Q5_1)
ROW_DOT(Q8_0)
ROW_DOT(Q4_K)
ROW_DOT(Q5_K)
ROW_DOT(Q6_K)
ROW_DOT(IQ4_NL)
ROW_DOT(IQ4_XS)

typedef void (*row_dot_fn)(const uint8_t *, const qrow *, int, int64_t, float *);

static row_dot_fn row_dot_for(int type) {
    switch (type) {
    case Q4_0: return row_dot_Q4_0;
    case Q4_1: return row_dot_Q4_1;
    case Q5_0: return row_dot_Q5_0;
    case Q5_1: return row_dot_Q5_1;
    case Q8_0: return row_dot_Q8_0;
    case Q4_K: return row_dot_Q4_K;
    case Q5_K: return row_dot_Q5_K;
    case Q6_K: return row_dot_Q6_K;
    case IQ4_NL: return row_dot_IQ4_NL;
    case IQ4_XS: return row_dot_IQ4_XS;
    }
    return NULL;
}
#endif

/* 1 where the GGUF kernels run for this type on this CPU (built with AVX2, FMA and F16C), else 0. */
int chatlm_gguf_supports(int type) {
#ifdef GGUF_SIMD
    return supported(type);
#else
    (void)type;
    return 0;
#endif
}

/* Bytes of a row of k values of this type (0 where not supported). */
int64_t chatlm_gguf_row_bytes(int type, int64_t k) {
#ifdef GGUF_SIMD
    return supported(type) ? k / values_per_block(type) * block_bytes(type) : 0;
#else
    (void)type, (void)k;
    return 0;
#endif
}

/* y (m, n) = x (m, k) @ W^T for W (n, k) of GGUF blocks of `type`, row r at w + r * row_bytes; x float32, k a
 * multiple of the block's values. Returns 0 (nothing written) where the type or the CPU is not supported. */
int chatlm_gguf_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int type, int64_t row_bytes,
                       int64_t n, float *y) {
#ifdef GGUF_SIMD
    if (!supported(type) || k % values_per_block(type)) return 0;
    const int group = activation_group(type);
    /* q is m * k bytes, a multiple of 32: the floats and int16 after it stay aligned */
    int8_t *q = malloc((size_t)(m * k) + sizeof(float) * (size_t)(m * k / group) + 2 * (size_t)(m * k / 16));
    float *scale = (float *)(q + m * k);
    int16_t *sums = (int16_t *)(scale + m * k / group);
    quantize_rows(x, m, k, group, q, scale, sums);
    if (interleaved_x(type)) /* each 64 values: groups in the order 0, 2, 1, 3 (see row_dot_k_512) */
        for (int64_t c = 0; c < m * k; c += 128) {
            int8_t tmp[128];
            memcpy(tmp, q + c, 128);
            memcpy(q + c + 32, tmp + 64, 32);
            memcpy(q + c + 64, tmp + 32, 32);
        }
    const row_dot_fn dot = row_dot_for(type);
    if (m == 1) {
        const qrow x0 = {q, scale, sums};
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < n; r++) dot(w + r * row_bytes, &x0, 1, k, y + r);
    } else {
        /* tiles of ROW_TILE rows (their blocks stay in cache) x TOKENS tokens (each block decoded once for them) */
        enum { ROW_TILE = 16 };
#pragma omp parallel for schedule(static)
        for (int64_t r0 = 0; r0 < n; r0 += ROW_TILE)
            for (int64_t t0 = 0; t0 < m; t0 += TOKENS) {
                qrow xs[TOKENS];
                for (int i = 0; i < TOKENS; i++) { /* past the last token: it again, its results dropped */
                    const int64_t t = t0 + i < m ? t0 + i : m - 1;
                    xs[i] = (qrow){q + t * k, scale + t * k / group, sums + t * k / 16};
                }
                for (int64_t r = r0; r < n && r < r0 + ROW_TILE; r++) {
                    float out[TOKENS];
                    dot(w + r * row_bytes, xs, TOKENS, k, out);
                    for (int i = 0; i < TOKENS && t0 + i < m; i++) y[(t0 + i) * n + r] = out[i];
                }
            }
    }
    free(q);
    return 1;
#else
    (void)x, (void)m, (void)k, (void)w, (void)type, (void)row_bytes, (void)n, (void)y;
    return 0;
#endif
}

/* As chatlm_gguf_matmul, with the activations rounded to int16 per 32 values rather than int8 (see
 * row_dot_precise). */
int chatlm_gguf_matmul_precise(const float *x, int64_t m, int64_t k, const uint8_t *w, int type, int64_t row_bytes,
                               int64_t n, float *y) {
#ifdef GGUF_SIMD
    if (!supported(type) || k % values_per_block(type)) return 0;
    int16_t *q = malloc(2 * (size_t)(m * k) + sizeof(float) * (size_t)(m * k / 32) + 4 * (size_t)(m * k / 16));
    float *scale = (float *)(q + m * k);
    int32_t *sums = (int32_t *)(scale + m * k / 32);
    quantize_rows16(x, m, k, q, scale, sums);
    const row_dot_precise_fn dot = row_dot_precise_for(type);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r++)
        for (int64_t t = 0; t < m; t++)
            y[t * n + r] = dot(w + r * row_bytes, q + t * k, scale + t * k / 32, sums + t * k / 16, k);
    free(q);
    return 1;
#else
    (void)x, (void)m, (void)k, (void)w, (void)type, (void)row_bytes, (void)n, (void)y;
    return 0;
#endif
}

#ifdef GGUF_SIMD
/* Eight float32 to bfloat16, rounded to nearest even (the values are finite: scales times small integers). */
static inline __m128i to_bf16(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}
#endif

/* Rows [0, n) of W dequantized to float32 (n, k), with the dequantizer's own roundings (a * (u - zero), or
 * a * u + b), so bit for bit its values (the tests check it against chatlm.loading.gguf_dequant); with bf16 = 1,
 * those values rounded to bfloat16 (nearest even), for a bfloat16 matmul. */
int chatlm_gguf_dequantize(const uint8_t *w, int type, int64_t row_bytes, int64_t n, int64_t k, void *out, int bf16) {
#ifdef GGUF_SIMD
    if (!supported(type) || k % values_per_block(type)) return 0;
    const int per = values_per_block(type), groups = per / 32, bytes = block_bytes(type);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        decoded o;
        for (int64_t blk = 0; blk < k / per; blk++) {
            decode(type, w + r * row_bytes + blk * bytes, &o);
            for (int g = 0; g < groups; g++) {
                const int64_t at = r * k + blk * per + g * 32;
                for (int half = 0; half < 2; half++) {
                    const __m128i bytes16 = half ? _mm256_extracti128_si256(o.v[g], 1) : _mm256_castsi256_si128(o.v[g]);
                    for (int e = 0; e < 2; e++) {
                        const __m128i eight = e ? _mm_srli_si128(bytes16, 8) : bytes16;
                        const __m256i ints = is_signed(type) ? _mm256_cvtepi8_epi32(eight) : _mm256_cvtepu8_epi32(eight);
                        const __m256 a = _mm256_set1_ps(o.a[2 * g + half]);
                        __m256 v;
                        if (o.zero)
                            v = _mm256_mul_ps(a, _mm256_cvtepi32_ps(_mm256_sub_epi32(ints, _mm256_set1_epi32(o.zero))));
                        else
                            v = _mm256_add_ps(_mm256_mul_ps(a, _mm256_cvtepi32_ps(ints)),
                                              _mm256_set1_ps(o.b[2 * g + half]));
                        if (bf16)
                            _mm_storeu_si128((__m128i *)((uint16_t *)out + at + 16 * half + 8 * e), to_bf16(v));
                        else
                            _mm256_storeu_ps((float *)out + at + 16 * half + 8 * e, v);
                    }
                }
            }
        }
    }
    return 1;
#else
    (void)w, (void)type, (void)row_bytes, (void)n, (void)k, (void)out, (void)bf16;
    return 0;
#endif
}
