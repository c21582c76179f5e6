/* chatlm's CPU kernels for decoding: matrix-vector products on int8 and int4 weights, RMSNorm, the attention step
 * of one new token over the KV cache, and a whole Llama decoder layer built from them. Decoding streams every
 * weight once per token, so these read each weight byte once, keep activations and accumulators in float32, and
 * split the work across threads.
 *
 * C with vector intrinsics where they pay (AVX-512, AVX2) and plain loops elsewhere, compiled on the user's machine
 * with -march=native (see native.py). Threads come from OpenMP, the runtime torch itself uses.
 *
 * Weights: int8 (n, k) with a float32 scale per row (w = q * scale); int4 in torch's packed CPU layout (see
 * chatlm_q4_torch_layout_matmul), so that torch's kernels and chatlm's read the same bytes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define ROWS 4 /* output rows per step: independent accumulators, one read of x for four rows */

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* Dot products of one row of x with the int8 rows r0..r0+ROWS-1. */
#if defined(__AVX512F__)
static inline void q8_dots(const float *x, const int8_t *q, int64_t k, int64_t r0, float out[ROWS]) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < k; b += 16) {
        const __m512 xb = _mm512_loadu_ps(x + b);
        for (int r = 0; r < ROWS; r++) {
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(q + (r0 + r) * k + b));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), xb, acc[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline void q8_dots(const float *x, const int8_t *q, int64_t k, int64_t r0, float out[ROWS]) {
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < k; b += 8) {
        const __m256 xb = _mm256_loadu_ps(x + b);
        for (int r = 0; r < ROWS; r++) {
            const __m128i bytes = _mm_loadl_epi64((const __m128i *)(q + (r0 + r) * k + b));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), xb, acc[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = sum8(acc[r]);
}
#else
static inline void q8_dots(const float *x, const int8_t *q, int64_t k, int64_t r0, float out[ROWS]) {
    for (int r = 0; r < ROWS; r++) {
        float acc = 0.f;
        for (int64_t j = 0; j < k; j++) acc += (float)q[(r0 + r) * k + j] * x[j];
        out[r] = acc;
    }
}
#endif

/* y (m, n) = (x (m, k) @ Q^T) * scale for int8 Q (n, k); n % ROWS == 0, k % 16 == 0. */
void chatlm_q8_matmul(const float *x, int64_t m, int64_t k, const int8_t *q, const float *scales, int64_t n,
                      float *y) {
#pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
        for (int64_t t = 0; t < m; t++) {
            float dots[ROWS];
            q8_dots(x + t * k, q, k, r0, dots);
            for (int r = 0; r < ROWS; r++) y[t * n + r0 + r] = dots[r] * scales[r0 + r];
        }
    }
}

/* exp for x <= 0, to about 1 ulp: 2^n * p(r) with r = x - n ln 2 in [-ln2/2, ln2/2]; vectorizes. */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float n = nearbyintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f; /* ln 2 in two parts, for an exact r */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return p * two_n;
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does (NaN stays NaN) */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* Vector helpers for rows of the cache (float32 or bfloat16): q . row, and acc += p * row, d % WIDTH == 0. */
#if defined(__AVX512F__)
#define WIDTH 16
typedef __m512 vec;
static inline vec vload(const void *base, int is_bf16, int64_t at) {
    if (is_bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + at))), 16));
    return _mm512_loadu_ps((const float *)base + at);
}
#define VZERO _mm512_setzero_ps()
#define VFMA _mm512_fmadd_ps
#define VSET1 _mm512_set1_ps
#define VSUM _mm512_reduce_add_ps
#define VADD _mm512_add_ps
#define VLOADF _mm512_loadu_ps
#define VSTOREF _mm512_storeu_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define WIDTH 8
typedef __m256 vec;
static inline vec vload(const void *base, int is_bf16, int64_t at) {
    if (is_bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + at))), 16));
    return _mm256_loadu_ps((const float *)base + at);
}
#define VZERO _mm256_setzero_ps()
#define VFMA _mm256_fmadd_ps
#define VSET1 _mm256_set1_ps
#define VSUM sum8
#define VADD _mm256_add_ps
#define VLOADF _mm256_loadu_ps
#define VSTOREF _mm256_storeu_ps
#endif

static float row_dot(const float *q, const void *base, int is_bf16, int64_t at, int64_t d) {
#ifdef WIDTH
    if (d % WIDTH == 0) {
        vec a = VZERO, b = VZERO;
        int64_t j = 0;
        for (; j + 2 * WIDTH <= d; j += 2 * WIDTH) {
            a = VFMA(VLOADF(q + j), vload(base, is_bf16, at + j), a);
            b = VFMA(VLOADF(q + j + WIDTH), vload(base, is_bf16, at + j + WIDTH), b);
        }
        if (j < d) a = VFMA(VLOADF(q + j), vload(base, is_bf16, at + j), a);
        return VSUM(VADD(a, b));
    }
#endif
    float dot = 0.f;
    for (int64_t j = 0; j < d; j++)
        dot += q[j] * (is_bf16 ? bf16_to_float(((const uint16_t *)base)[at + j]) : ((const float *)base)[at + j]);
    return dot;
}

static void row_axpy(float *acc, float p, const void *base, int is_bf16, int64_t at, int64_t d) {
#ifdef WIDTH
    if (d % WIDTH == 0) {
        const vec pv = VSET1(p);
        for (int64_t j = 0; j < d; j += WIDTH) VSTOREF(acc + j, VFMA(pv, vload(base, is_bf16, at + j), VLOADF(acc + j)));
        return;
    }
#endif
    for (int64_t j = 0; j < d; j++)
        acc[j] += p * (is_bf16 ? bf16_to_float(((const uint16_t *)base)[at + j]) : ((const float *)base)[at + j]);
}

#ifdef WIDTH
/* Four dot products at once: independent chains keep the FMA units busy. d % WIDTH == 0. */
static inline void row_dot4(const float *q, const void *base, int is_bf16, int64_t at, int64_t stride, int64_t d,
                            float *out) {
    vec a0 = VZERO, a1 = VZERO, a2 = VZERO, a3 = VZERO;
    for (int64_t j = 0; j < d; j += WIDTH) {
        const vec qj = VLOADF(q + j);
        a0 = VFMA(qj, vload(base, is_bf16, at + j), a0);
        a1 = VFMA(qj, vload(base, is_bf16, at + stride + j), a1);
        a2 = VFMA(qj, vload(base, is_bf16, at + 2 * stride + j), a2);
        a3 = VFMA(qj, vload(base, is_bf16, at + 3 * stride + j), a3);
    }
    out[0] = VSUM(a0);
    out[1] = VSUM(a1);
    out[2] = VSUM(a2);
    out[3] = VSUM(a3);
}

/* out (d values) = sum_s p[s] * row_s, the running sums in registers, 4 * WIDTH channels at a time.
 * d % (4 * WIDTH) == 0. */
static void weighted_rows(const float *p, int64_t length, const void *base, int is_bf16, int64_t at,
                          int64_t stride, int64_t d, float *out) {
    for (int64_t c = 0; c < d; c += 4 * WIDTH) {
        vec a0 = VZERO, a1 = VZERO, a2 = VZERO, a3 = VZERO;
        for (int64_t s = 0; s < length; s++) {
            const vec ps = VSET1(p[s]);
            const int64_t r = at + s * stride + c;
            a0 = VFMA(ps, vload(base, is_bf16, r), a0);
            a1 = VFMA(ps, vload(base, is_bf16, r + WIDTH), a1);
            a2 = VFMA(ps, vload(base, is_bf16, r + 2 * WIDTH), a2);
            a3 = VFMA(ps, vload(base, is_bf16, r + 3 * WIDTH), a3);
        }
        VSTOREF(out + c, a0);
        VSTOREF(out + c + WIDTH, a1);
        VSTOREF(out + c + 2 * WIDTH, a2);
        VSTOREF(out + c + 3 * WIDTH, a3);
    }
}
#endif

/* One query per (batch, head) over the first `length` cached keys and values, no mask:
 * out (b, heads, d) = softmax(scale * q . k) v, with heads / kv_heads query heads sharing a kv head.
 * k and v are float32 or bfloat16 with strides (batch, head, position) in elements; the last dimension is dense.
 * For bfloat16 the softmax weights are rounded to bfloat16 before they meet v, as in torch's own kernel. */
void chatlm_attend_one(const float *q, const void *k, const void *v, int kv_bf16, int64_t batch, int64_t heads,
                       int64_t kv_heads, int64_t length, int64_t d, const int64_t *k_strides,
                       const int64_t *v_strides, const int64_t *starts, float scale, float *out) {
    const int64_t group = heads / kv_heads, full_length = length;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (size_t)(full_length + d));
        float *acc = scores + full_length;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < batch * heads; bh++) {
            const int64_t b = bh / heads, kvh = (bh % heads) / group;
            const float *qh = q + bh * d;
            /* a row's keys may start later (`starts`: the slots before are another row's, or padding) */
            const int64_t first = starts ? starts[b] : 0, length = full_length - first;
            const int64_t k_base = b * k_strides[0] + kvh * k_strides[1] + first * k_strides[2];
            const int64_t v_base = b * v_strides[0] + kvh * v_strides[1] + first * v_strides[2];
            int64_t s = 0;
#ifdef WIDTH
            if (d % WIDTH == 0)
                for (; s + 4 <= length; s += 4)
                    row_dot4(qh, k, kv_bf16, k_base + s * k_strides[2], k_strides[2], d, scores + s);
#endif
            for (; s < length; s++) scores[s] = row_dot(qh, k, kv_bf16, k_base + s * k_strides[2], d);
            float top = -INFINITY;
            for (s = 0; s < length; s++) {
                scores[s] *= scale;
                top = scores[s] > top ? scores[s] : top;
            }
            float total = 0.f;
#pragma omp simd reduction(+ : total)
            for (int64_t s = 0; s < length; s++) {
                scores[s] = exp_nonpositive(scores[s] - top);
                total += scores[s];
            }
            if (kv_bf16)
                for (s = 0; s < length; s++) scores[s] = bf16_to_float(float_to_bf16(scores[s]));
#ifdef WIDTH
            if (d % (4 * WIDTH) == 0) {
                weighted_rows(scores, length, v, kv_bf16, v_base, v_strides[2], d, acc);
            } else
#endif
            {
                for (int64_t j = 0; j < d; j++) acc[j] = 0.f;
                for (s = 0; s < length; s++) row_axpy(acc, scores[s], v, kv_bf16, v_base + s * v_strides[2], d);
            }
            float *o = out + bh * d;
            for (int64_t j = 0; j < d; j++) o[j] = acc[j] / total;
        }
        free(scores);
    }
}

/* RMSNorm over rows of `dim` values, float32 or bfloat16 in and out, in the order of operations of transformers'
 * LlamaRMSNorm: h = x / sqrt(mean(x^2) + eps) in float32, cast to the input dtype, then times the weight (whose
 * product is rounded to bfloat16 for bfloat16 tensors). */
void chatlm_rms_norm(const void *x, const void *weight, int is_bf16, int64_t rows, int64_t dim, float eps,
                     void *out) {
#pragma omp parallel for schedule(static) if (rows > 16)
    for (int64_t r = 0; r < rows; r++) {
        float squares = 0.f;
        if (is_bf16) {
            const uint16_t *xr = (const uint16_t *)x + r * dim, *w = weight;
            uint16_t *o = (uint16_t *)out + r * dim;
#pragma omp simd reduction(+ : squares)
            for (int64_t j = 0; j < dim; j++) squares += bf16_to_float(xr[j]) * bf16_to_float(xr[j]);
            const float inv = 1.f / sqrtf(squares / (float)dim + eps);
            for (int64_t j = 0; j < dim; j++) {
                const float h = bf16_to_float(float_to_bf16(bf16_to_float(xr[j]) * inv));
                o[j] = float_to_bf16(bf16_to_float(w[j]) * h);
            }
        } else {
            const float *xr = (const float *)x + r * dim, *w = weight;
            float *o = (float *)out + r * dim;
#pragma omp simd reduction(+ : squares)
            for (int64_t j = 0; j < dim; j++) squares += xr[j] * xr[j];
            const float inv = 1.f / sqrtf(squares / (float)dim + eps);
#pragma omp simd
            for (int64_t j = 0; j < dim; j++) o[j] = w[j] * (xr[j] * inv);
        }
    }
}

/* x * cos + rotate_half(x) * sin over the first `rotary` channels (the rest as they are), rounded as torch rounds
 * it: each product and the sum to bfloat16 when x and the tables are bfloat16, only the result when the tables are
 * float32 (float32 math), nothing for float32 x. The file is built without contracting a * b + c into FMAs, so
 * the float32 roundings are torch's too. Reads x, writes float32 values into out. */
static void rope_row(const void *x, int64_t at, int x_bf16, const void *cos, const void *sin, int64_t t_at,
                     int tables_f32, int64_t rotary, int64_t d, float *out) {
    const int64_t half = rotary / 2;
    const int round_each = x_bf16 && !tables_f32;
    for (int64_t j = 0; j < d; j++) {
        const float xj = x_bf16 ? bf16_to_float(((const uint16_t *)x)[at + j]) : ((const float *)x)[at + j];
        if (j >= rotary) {
            out[j] = xj;
            continue;
        }
        const int64_t partner = j < half ? j + half : j - half;
        float other = x_bf16 ? bf16_to_float(((const uint16_t *)x)[at + partner]) : ((const float *)x)[at + partner];
        other = j < half ? -other : other;
        const float c = tables_f32 ? ((const float *)cos)[t_at + j] : bf16_to_float(((const uint16_t *)cos)[t_at + j]);
        const float s = tables_f32 ? ((const float *)sin)[t_at + j] : bf16_to_float(((const uint16_t *)sin)[t_at + j]);
        float a = xj * c, b = other * s;
        if (round_each) {
            a = bf16_to_float(float_to_bf16(a));
            b = bf16_to_float(float_to_bf16(b));
        }
        const float r = a + b;
        out[j] = x_bf16 ? bf16_to_float(float_to_bf16(r)) : r;
    }
}

static void store_row(const float *values, void *base, int is_bf16, int64_t at, int64_t d) {
    for (int64_t j = 0; j < d; j++) {
        if (is_bf16)
            ((uint16_t *)base)[at + j] = float_to_bf16(values[j]);
        else
            ((float *)base)[at + j] = values[j];
    }
}

/* One decoding step of an attention layer after its projections, for one new token per row: rotate q and the new
 * k (rope), write the new k and v into the cache at slot `offset`, attend over slots 0..offset, and write the
 * result (batch, heads * d) in the model's dtype. q, k, v: heads (kv_heads) rows of d values per batch row, at
 * `*_bstride` elements apart; tables (batch, rotary) at `t_bstride`; caches (batch, kv_heads, capacity, d), dense. */
void chatlm_decode_attention(const void *q, int64_t q_bstride, const void *k, int64_t k_bstride, const void *v,
                             int64_t v_bstride, const void *cos, const void *sin, int64_t t_bstride,
                             int tables_f32, int64_t rotary, void *k_cache, void *v_cache, int64_t capacity,
                             int64_t offset, const int64_t *starts, int is_bf16, int64_t batch, int64_t heads,
                             int64_t kv_heads, int64_t d, float scale, void *out) {
    const int64_t cache_strides[3] = {kv_heads * capacity * d, capacity * d, d};
    float *qf = malloc(sizeof(float) * (size_t)(2 * batch * heads * d + d));
    float *attended = qf + batch * heads * d, *row = attended + batch * heads * d;
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < heads; h++)
            rope_row(q, b * q_bstride + h * d, is_bf16, cos, sin, b * t_bstride, tables_f32, rotary, d,
                     qf + (b * heads + h) * d);
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t slot = b * cache_strides[0] + h * cache_strides[1] + offset * cache_strides[2];
            rope_row(k, b * k_bstride + h * d, is_bf16, cos, sin, b * t_bstride, tables_f32, rotary, d, row);
            store_row(row, k_cache, is_bf16, slot, d);
            if (is_bf16)
                memcpy((uint16_t *)v_cache + slot, (const uint16_t *)v + b * v_bstride + h * d, 2 * (size_t)d);
            else
                memcpy((float *)v_cache + slot, (const float *)v + b * v_bstride + h * d, 4 * (size_t)d);
        }
    }
    chatlm_attend_one(qf, k_cache, v_cache, is_bf16, batch, heads, kv_heads, offset + 1, d, cache_strides,
                      cache_strides, starts, scale, attended);
    store_row(attended, out, is_bf16, 0, batch * heads * d);
    free(qf);
}

/* y (m, n) = x (m, k) @ W^T for int4 W in torch's packed CPU layout (what torch._convert_weight_to_int4pack_for_cpu
 * writes on CPUs with AVX-512): output channels in blocks of 64, each block stored input by input, 32 bytes per
 * input, byte j holding channel j in its low nibble and channel j + 32 in its high one; scale and zero point per
 * (group, channel) in `sz` (k / group, n, 2), bfloat16 or float32, w = (q - 8) * scale + zero. x and y are float32
 * (torch's kernel rounds x to bfloat16). Returns 0 without AVX-512 (the caller uses torch's kernel). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
/* One block of 64 output channels for `rows` (1 or 2) rows of x at once: each input's 64 weights are unpacked to
 * floats once and used for every row, so checking a few tokens (speculative decoding) costs little more than one. */
static inline __attribute__((always_inline)) void q4_block_rows(const float *x, int64_t k, const uint8_t *wb,
                                                                const void *sz, int sz_f32, int64_t group,
                                                                int64_t n, int64_t blk, const float *xsum,
                                                                int64_t groups, const int rows, float *y) {
    const __m256i low = _mm256_set1_epi8(15);
    __m512 acc[2][4];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 part[2][4];
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < 4; c++) part[r][c] = _mm512_setzero_ps();
        for (int64_t i = g * group; i < (g + 1) * group; i++) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(wb + i * 32));
            const __m256i lo = _mm256_and_si256(bytes, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
            const __m512 w[4] = {
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo))),
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1))),
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi))),
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1))),
            };
            for (int r = 0; r < rows; r++) {
                const __m512 xv = _mm512_set1_ps(x[r * k + i]);
                for (int c = 0; c < 4; c++) part[r][c] = _mm512_fmadd_ps(w[c], xv, part[r][c]);
            }
        }
        for (int c = 0; c < 4; c++) {
            const int64_t at = (g * n + blk * 64 + c * 16) * 2; /* 16 (scale, zero) pairs */
            __m512 s, z;
            if (sz_f32) {
                const float *p = (const float *)sz + at;
                const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
                const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
                s = _mm512_permutex2var_ps(a, even, b);
                z = _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b);
            } else {
                const __m512i pairs = _mm512_loadu_si512((const void *)((const uint16_t *)sz + at));
                s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
                z = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xffff0000u)));
            }
            /* sum over the group of ((q - 8) s + z) x = s (q . x) + (z - 8 s) sum(x) */
            const __m512 shift = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, z);
            for (int r = 0; r < rows; r++) {
                acc[r][c] = _mm512_fmadd_ps(s, part[r][c], acc[r][c]);
                acc[r][c] = _mm512_fmadd_ps(shift, _mm512_set1_ps(xsum[r * groups + g]), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(y + r * n + blk * 64 + c * 16, acc[r][c]);
}
#endif

int chatlm_q4_torch_layout_matmul(const float *x, int64_t m, int64_t k, const uint8_t *packed, const void *sz,
                                  int sz_f32, int64_t group, int64_t n, float *y) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const int64_t blocks = n / 64, groups = k / group;
    float *xsum = malloc(sizeof(float) * (size_t)(m * groups));
    for (int64_t i = 0; i < m * groups; i++) {
        float s = 0.f;
        for (int64_t j = 0; j < group; j++) s += x[i * group + j];
        xsum[i] = s;
    }
#pragma omp parallel for schedule(static)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const uint8_t *wb = packed + blk * k * 32;
        int64_t t = 0;
        for (; t + 2 <= m; t += 2)
            q4_block_rows(x + t * k, k, wb, sz, sz_f32, group, n, blk, xsum + t * groups, groups, 2, y + t * n);
        if (t < m)
            q4_block_rows(x + t * k, k, wb, sz, sz_f32, group, n, blk, xsum + t * groups, groups, 1, y + t * n);
    }
    free(xsum);
    return 1;
#else
    (void)x, (void)m, (void)k, (void)packed, (void)sz, (void)sz_f32, (void)group, (void)n, (void)y;
    return 0;
#endif
}

/* gguf_kernels.c */
int chatlm_gguf_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int type, int64_t row_bytes,
                       int64_t n, float *y);
int64_t chatlm_gguf_row_bytes(int type, int64_t k);

/* A linear layer as the fused decoder step sees it: int4 (torch's packed layout, see above), int8 weights, or
 * GGUF blocks as stored (bits 0, group: the GGML type id). */
typedef struct {
    int bits;
    const void *weight, *scales; /* int4: packed, (scale, zero) pairs; int8: (n, k) values, float32 scales */
    int scales_f32;
    int64_t group, n, k;
    const float *bias; /* or NULL */
} chatlm_linear;

static void linear_rows(const chatlm_linear *l, const float *x, int64_t m, float *y) {
    if (l->bits == 0)
        chatlm_gguf_matmul(x, m, l->k, l->weight, (int)l->group, chatlm_gguf_row_bytes((int)l->group, l->k), l->n, y);
    else if (l->bits == 4)
        chatlm_q4_torch_layout_matmul(x, m, l->k, l->weight, l->scales, l->scales_f32, l->group, l->n, y);
    else
        chatlm_q8_matmul(x, m, l->k, l->weight, l->scales, l->n, y);
    if (l->bias)
        for (int64_t t = 0; t < m; t++)
            for (int64_t j = 0; j < l->n; j++) y[t * l->n + j] += l->bias[j];
}

/* What sets a decoder layer apart from Llama's, declared per layer: its RMSNorm weights as the kernel multiplies
 * them (Gemma's 1 + w computed already), NULL where the layer has no such norm, and the rest of its math. */
typedef struct {
    const float *input;          /* before attention (NULL: OLMo 2) */
    const float *post_attention; /* on attention's output, before the residual (Gemma 2/3, OLMo 2) */
    const float *pre_mlp;        /* before the MLP (Llama's post_attention_layernorm) */
    const float *post_mlp;       /* on the MLP's output, before the residual (Gemma 2/3, OLMo 2) */
    const float *q, *k;          /* on q and k before rope (Qwen3, Gemma 3: each head; OLMo 2: all heads) */
    int64_t q_width, k_width;    /* values per q and k norm: head_dim, or all heads' */
    float eps;
    int gelu_tanh;  /* the MLP's activation: 0 SiLU, 1 GELU (tanh approximation) */
    int64_t window; /* attend to the latest `window` positions only (0: all) */
} chatlm_layer_math;

static void norm_or_copy(const float *x, const float *weight, int64_t rows, int64_t dim, float eps, float *out) {
    if (weight)
        chatlm_rms_norm(x, weight, 0, rows, dim, eps, out);
    else
        memcpy(out, x, sizeof(float) * (size_t)(rows * dim));
}

/* x += norm(y) (norm: NULL adds y as it is) */
static void add_residual(float *x, float *y, const float *weight, int64_t rows, int64_t dim, float eps) {
    if (weight) chatlm_rms_norm(y, weight, 0, rows, dim, eps, y);
    for (int64_t i = 0; i < rows * dim; i++) x[i] += y[i];
}

static inline float gelu_tanh(float v) { /* torch's approximate="tanh" */
    return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

/* One decoding step of a decoder layer: pre-norm attention and a gated MLP with residuals, the norms and
 * activation that `math` declares, float32 activations, in one call: one new token per row, or `tokens` new
 * tokens of a single row (batch 1: speculative decoding checks its guesses so), causal among themselves.
 * x (batch * tokens, hidden) is updated in place; the caches get the new keys and values from slot `offset` on;
 * row b attends to slots starts[b]..offset (NULL: 0), within the window if there is one. The same operations in
 * the same order as the module path (models/), each through the kernels above. */
void chatlm_decode_layer(float *x, int64_t batch, int64_t tokens, int64_t hidden, const chatlm_layer_math *math,
                         const chatlm_linear *proj /* q, k, v, o, gate, up, down */, const float *cos,
                         const float *sin, int64_t rotary, float *k_cache, float *v_cache, int64_t capacity,
                         int64_t offset, const int64_t *starts, int64_t heads, int64_t kv_heads, int64_t d,
                         float scale) {
    const int64_t qd = heads * d, kvd = kv_heads * d, inter = proj[4].n;
    const float eps = math->eps;
    const int64_t rows = batch * tokens;
    float *h = malloc(sizeof(float) * (size_t)(rows * (hidden + qd + 2 * kvd + qd + hidden + 2 * inter)));
    float *q = h + rows * hidden, *k = q + rows * qd, *v = k + rows * kvd, *attn = v + rows * kvd;
    float *o = attn + rows * qd, *g = o + rows * hidden, *u = g + rows * inter;
    int64_t *first = malloc(sizeof(int64_t) * (size_t)batch); /* each row's first visible slot */
    norm_or_copy(x, math->input, rows, hidden, eps, h);
    linear_rows(&proj[0], h, rows, q);
    linear_rows(&proj[1], h, rows, k);
    linear_rows(&proj[2], h, rows, v);
    if (math->q) chatlm_rms_norm(q, math->q, 0, rows * qd / math->q_width, math->q_width, eps, q);
    if (math->k) chatlm_rms_norm(k, math->k, 0, rows * kvd / math->k_width, math->k_width, eps, k);
    if (tokens == 1) {
        for (int64_t b = 0; b < batch; b++) {
            first[b] = starts ? starts[b] : 0;
            if (math->window && offset + 1 - math->window > first[b]) first[b] = offset + 1 - math->window;
        }
        chatlm_decode_attention(q, qd, k, kvd, v, kvd, cos, sin, rotary, 1, rotary, k_cache, v_cache, capacity,
                                offset, first, 0, batch, heads, kv_heads, d, scale, attn);
    } else /* one row: token t sees the cache and tokens 0..t, written just before it attends */
        for (int64_t t = 0; t < tokens; t++) {
            first[0] = starts ? starts[0] : 0;
            if (math->window && offset + t + 1 - math->window > first[0]) first[0] = offset + t + 1 - math->window;
            chatlm_decode_attention(q + t * qd, qd, k + t * kvd, kvd, v + t * kvd, kvd, cos + t * rotary,
                                    sin + t * rotary, rotary, 1, rotary, k_cache, v_cache, capacity, offset + t,
                                    first, 0, 1, heads, kv_heads, d, scale, attn + t * qd);
        }
    linear_rows(&proj[3], attn, rows, o);
    add_residual(x, o, math->post_attention, rows, hidden, eps);
    norm_or_copy(x, math->pre_mlp, rows, hidden, eps, h);
    linear_rows(&proj[4], h, rows, g);
    linear_rows(&proj[5], h, rows, u);
    if (math->gelu_tanh)
        for (int64_t i = 0; i < rows * inter; i++) g[i] = gelu_tanh(g[i]) * u[i];
    else
        for (int64_t i = 0; i < rows * inter; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i]; /* silu(gate) * up */
    linear_rows(&proj[6], g, rows, o);
    add_residual(x, o, math->post_mlp, rows, hidden, eps);
    free(first);
    free(h);
}

/* 1 where chatlm_q4_torch_layout_matmul runs (built with AVX-512), 0 where it only returns 0. */
int chatlm_has_int4_kernel(void) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}
