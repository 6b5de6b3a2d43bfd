/* Attention of query tokens over a per-slot KV cache, each token reading only the positions it sees:
 * the decode step (one token per slot) and the prompt chunks of a prefill (a token per row, its slot's
 * positions up to its own). Built and loaded by r1kit/rollout/native.py (cc -O3 -march=native -fopenmp
 * -shared).
 *
 * Shapes (all contiguous, row-major): q and out (w, K, G, d): the G query heads that share KV head k;
 * keys and values (S, K, T, d): one layer of the engine's cache; lengths (w,): the number of leading
 * positions row r sees (its position + 1); slots (w,): the cache slot of row r, or NULL for slot r
 * (then w <= S). T is the cache's allocated length; positions >= lengths[r] are never read, so a
 * row's cost is its own length, not the longest one's.
 *
 * Arithmetic (per row r, KV head k, query head g; t < lengths[r]):
 *   score[g, t] = round(scale * sum_j q[g, j] k[t, j])   fp32 sum; round = to the storage dtype
 *   p[g, :]     = round(softmax(score[g, :]))            fp32 softmax
 *   out[g, j]   = round(sum_t p[g, t] v[t, j])           fp32 sum
 * (bf16 = 2: the scores are not rounded, see cache_attention_bf16.)
 * In bf16 the two intermediate roundings are those of HF's eager attention in bf16 (the matmul
 * output and the softmax cast back to the query dtype: transformers models/llama/modeling_llama.py
 * eager_attention_forward); in fp32 they are the identity.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define LANES 16 /* fp32 lanes of one AVX-512 register; head_dim must be a multiple */
#define AHEAD 16 /* rows prefetched ahead of the one read (a prefetch past the end does not fault) */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept quiet */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Element i of a bf16 (bf16 = 1) or fp32 array, as fp32; and the storage rounding of an fp32 value. */
static inline float load1(const void *a, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)a)[i]) : ((const float *)a)[i];
}
static inline float round1(float x, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(x)) : x; }

#ifdef __AVX512F__
/* 16 consecutive elements from i on (the first `count` of them, the rest 0) as fp32. */
static inline __m512 load16(const void *a, int64_t i, int bf16, int count) {
    __mmask16 m = count >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1u);
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)a + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)a + i);
}

/* Round 16 fp32 values to bf16 precision (nearest even; NaN unchanged), kept as fp32. */
static inline __m512 round16(__m512 x, int bf16) {
    if (!bf16) return x;
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_castsi512_ps(r), x);
}

/* Store the first `count` of 16 fp32 values at element i of a bf16 (rounded to nearest even) or fp32 array. */
static inline void store16(void *a, int64_t i, __m512 v, int bf16, int count) {
    __mmask16 m = count >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1u);
    if (bf16) {
        __m512i b = _mm512_srli_epi32(_mm512_castps_si512(round16(v, 1)), 16);
        _mm256_mask_storeu_epi16((uint16_t *)a + i, m, _mm512_cvtepi32_epi16(b));
    } else {
        _mm512_mask_storeu_ps((float *)a + i, m, v);
    }
}

/* exp(x) for x <= 0 (softmax after subtracting the max): x = n ln2 + r, |r| <= ln2/2, degree-7
 * Taylor polynomial of exp(r) (relative error < 2e-8), times 2^n by scalef (underflows to 0). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#ifdef __AVX512F__
/* Ask for row t of a (rows, d) array of the storage type ahead of its use (no fault past the end). */
static inline void prefetch_row(const void *a, int64_t t, int64_t d, int bf16) {
    const char *p = (const char *)a + t * d * (bf16 ? 2 : 4);
    for (int64_t b = 0; b < d * (bf16 ? 2 : 4); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

/* Lane i of the result = the sum of the 16 lanes of v[i]: a transposing tree of unpack/shuffle
 * adds (45 instructions for 16 sums instead of 16 horizontal reductions). */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 u[8], x[4], y[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of v[2i], v[2i+1] */
        u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane j: the lane-j partial sums of v[4i..4i+3] */
        x[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++) /* 128-bit lanes: [x2i L0+L1, x2i L2+L3, x2i+1 L0+L1, x2i+1 L2+L3] */
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* In place: s (n,) fp32 scores -> round(softmax(s)). */
static inline void softmax_row(float *sg, int64_t n, int bf16) {
    __m512 peak = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += LANES) {
        __mmask16 m = n - t >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1u);
        peak = _mm512_mask_max_ps(peak, m, peak, _mm512_maskz_loadu_ps(m, sg + t));
    }
    __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
    for (int64_t t = 0; t < n; t += LANES) {
        __mmask16 m = n - t >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1u);
        __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + t), top)));
        total = _mm512_add_ps(total, e);
        _mm512_mask_storeu_ps(sg + t, m, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t t = 0; t < n; t += LANES) {
        __mmask16 m = n - t >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1u);
        _mm512_mask_storeu_ps(sg + t, m, round16(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, sg + t), inv), bf16));
    }
}
#endif

#ifdef __AVX512F__
/* The fast path: GB query heads of head dim 16·D4 (both compile-time), their queries and output
 * accumulators held in registers (GB·D4 + D4 <= 32 zmm), each key and value row loaded once.
 * qf (GB, d) fp32; scores (GB, n) scratch; acc (GB, d) fp32 result. */
#define DEFINE_ATTEND_FIXED(D4, GB)                                                                      \
    static inline void attend_##D4##_##GB(const float *qf, const void *k, const void *v, int64_t n,     \
                                          float scale, int bf16, float *scores, float *acc) {           \
        const int64_t d = 16 * D4;                                                                      \
        __m512 qr[GB][D4], a[GB][D4];                                                                   \
        for (int g = 0; g < GB; g++)                                                                    \
            for (int c = 0; c < D4; c++) {                                                              \
                qr[g][c] = _mm512_loadu_ps(qf + g * d + 16 * c);                                        \
                a[g][c] = _mm512_setzero_ps();                                                          \
            }                                                                                           \
        for (int64_t t = 0; t < AHEAD && t < n; t++) prefetch_row(v, t, d, bf16); /* ready after scores */ \
        for (int64_t t0 = 0; t0 < n; t0 += LANES) {                                                     \
            int count = n - t0 < LANES ? (int)(n - t0) : LANES;                                         \
            __m512 dots[GB][LANES];                                                                     \
            for (int i = 0; i < LANES; i++) {                                                           \
                if (i >= count) {                                                                       \
                    for (int g = 0; g < GB; g++) dots[g][i] = _mm512_setzero_ps();                      \
                    continue;                                                                           \
                }                                                                                       \
                __m512 kr[D4];                                                                          \
                prefetch_row(k, t0 + i + AHEAD, d, bf16);                                               \
                for (int c = 0; c < D4; c++) kr[c] = load16(k, (t0 + i) * d + 16 * c, bf16, LANES);     \
                for (int g = 0; g < GB; g++) {                                                          \
                    __m512 dot = _mm512_mul_ps(qr[g][0], kr[0]);                                        \
                    for (int c = 1; c < D4; c++) dot = _mm512_fmadd_ps(qr[g][c], kr[c], dot);           \
                    dots[g][i] = dot;                                                                   \
                }                                                                                       \
            }                                                                                           \
            __mmask16 m = count >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1u);         \
            for (int g = 0; g < GB; g++)                                                                \
                _mm512_mask_storeu_ps(scores + g * n + t0, m,                                           \
                                      round16(_mm512_mul_ps(_mm512_set1_ps(scale), sum16(dots[g])), bf16 == 1)); \
        }                                                                                               \
        for (int g = 0; g < GB; g++) softmax_row(scores + g * n, n, bf16);                              \
        for (int64_t t = 0; t < n; t++) {                                                               \
            prefetch_row(v, t + AHEAD, d, bf16);                                                        \
            for (int c = 0; c < D4; c++) {                                                              \
                __m512 vr = load16(v, t * d + 16 * c, bf16, LANES);                                     \
                for (int g = 0; g < GB; g++)                                                            \
                    a[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + t]), vr, a[g][c]);          \
            }                                                                                           \
        }                                                                                               \
        for (int g = 0; g < GB; g++)                                                                    \
            for (int c = 0; c < D4; c++) _mm512_storeu_ps(acc + g * d + 16 * c, a[g][c]);               \
    }
DEFINE_ATTEND_FIXED(4, 1)
DEFINE_ATTEND_FIXED(4, 2)
DEFINE_ATTEND_FIXED(4, 3)
DEFINE_ATTEND_FIXED(4, 4)
DEFINE_ATTEND_FIXED(8, 1)
DEFINE_ATTEND_FIXED(8, 2)
DEFINE_ATTEND_FIXED(8, 3)
DEFINE_ATTEND_FIXED(8, 4)

/* Run heads [0, G) of one item in groups of at most `most` heads through the fixed paths of D4. */
#define ATTEND_GROUPS(D4, most)                                                                          \
    for (int64_t g0 = 0; g0 < G; g0 += most) {                                                          \
        int64_t gb = G - g0 < most ? G - g0 : most;                                                     \
        const float *qg = qf + g0 * d;                                                                  \
        float *ag = acc + g0 * d;                                                                       \
        switch (gb) {                                                                                   \
            case 1: attend_##D4##_1(qg, k, v, n, scale, bf16, scores, ag); break;                       \
            case 2: attend_##D4##_2(qg, k, v, n, scale, bf16, scores, ag); break;                       \
            case 3: attend_##D4##_3(qg, k, v, n, scale, bf16, scores, ag); break;                       \
            default: attend_##D4##_4(qg, k, v, n, scale, bf16, scores, ag); break;                      \
        }                                                                                               \
    }
#endif


#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* The bf16 path on CPUs with AVX512-BF16: the q.k dots and the p.v sums as vdpbf16ps, which
 * multiplies bf16 pairs exactly and adds them in fp32 (the products of the fp32 path, summed in
 * another order: the fp32 sums differ by rounding, the bf16 results by at most one rounding, rarely).
 * Keys: per query head, 16 rows' (16-lane) partial dots, then the sum16 tree. Values: two rows t,
 * t+1 interleaved per 128-bit lane by unpacklo/hi_epi16 (dims {0-3, 8-11, ..} and {4-7, 12-15, ..}),
 * times the probability pair (p[t], p[t+1]); the dims are put back in order when stored.
 * q (G, d) bf16; scores (G, n) fp32 scratch; probs (G, n2) bf16 scratch (n2 = n rounded up to even);
 * acc (G, d) fp32 result. D2 = d / 32, GB heads per values pass (GB * 2 * D2 <= 16 accumulators). */
#define DEFINE_ATTEND_DP(D2, GB)                                                                         \
    static inline void attend_dp_##D2##_##GB(const uint16_t *v, int64_t n, int64_t g0,                  \
                                             const uint16_t *probs, int64_t n2, float *acc) {            \
        const int64_t d = 32 * D2;                                                                      \
        __m512 a[GB][2 * D2];                                                                           \
        for (int g = 0; g < GB; g++)                                                                    \
            for (int c = 0; c < 2 * D2; c++) a[g][c] = _mm512_setzero_ps();                             \
        for (int64_t t = 0; t < AHEAD && t < n; t++) prefetch_row(v, t, d, 1);                          \
        for (int64_t t = 0; t < n; t += 2) {                                                            \
            prefetch_row(v, t + AHEAD, d, 1);                                                           \
            prefetch_row(v, t + AHEAD + 1, d, 1);                                                       \
            __m512i pp[GB];                                                                             \
            for (int g = 0; g < GB; g++) {                                                              \
                int32_t pair;                                                                           \
                memcpy(&pair, probs + (g0 + g) * n2 + t, sizeof pair);                                  \
                pp[g] = _mm512_set1_epi32(pair);                                                        \
            }                                                                                           \
            for (int c = 0; c < D2; c++) {                                                              \
                __m512i r0 = _mm512_loadu_si512(v + t * d + 32 * c);                                    \
                __m512i r1 = t + 1 < n ? _mm512_loadu_si512(v + (t + 1) * d + 32 * c) : _mm512_setzero_si512(); \
                __m512i lo = _mm512_unpacklo_epi16(r0, r1), hi = _mm512_unpackhi_epi16(r0, r1);         \
                for (int g = 0; g < GB; g++) {                                                          \
                    a[g][2 * c] = _mm512_dpbf16_ps(a[g][2 * c], (__m512bh)pp[g], (__m512bh)lo);         \
                    a[g][2 * c + 1] = _mm512_dpbf16_ps(a[g][2 * c + 1], (__m512bh)pp[g], (__m512bh)hi); \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        /* lane 4m+i of a[.][2c] is dim 32c + 8m + i, of a[.][2c+1] dim 32c + 8m + 4 + i */              \
        const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);  \
        const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8); \
        for (int g = 0; g < GB; g++)                                                                    \
            for (int c = 0; c < D2; c++) {                                                              \
                float *o = acc + (g0 + g) * d + 32 * c;                                                 \
                _mm512_storeu_ps(o, _mm512_permutex2var_ps(a[g][2 * c], first, a[g][2 * c + 1]));       \
                _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(a[g][2 * c], second, a[g][2 * c + 1])); \
            }                                                                                           \
    }
DEFINE_ATTEND_DP(2, 1)
DEFINE_ATTEND_DP(2, 2)
DEFINE_ATTEND_DP(2, 3)
DEFINE_ATTEND_DP(2, 4)
DEFINE_ATTEND_DP(4, 1)
DEFINE_ATTEND_DP(4, 2)

/* scores[g, t] = round(scale * q[g] . k[t]) for every head g < G (bf16 pairs, fp32 sums). */
#define DEFINE_SCORES_DP(D2)                                                                             \
    static inline void scores_dp_##D2(const uint16_t *q, const uint16_t *k, int64_t n, int64_t G,        \
                                      float scale, int rs, float *scores) {                              \
        const int64_t d = 32 * D2;                                                                      \
        for (int64_t g = 0; g < G; g++) {                                                               \
            __m512bh qr[D2];                                                                            \
            for (int c = 0; c < D2; c++) qr[c] = (__m512bh)_mm512_loadu_si512(q + g * d + 32 * c);      \
            for (int64_t t0 = 0; t0 < n; t0 += LANES) {                                                 \
                int count = n - t0 < LANES ? (int)(n - t0) : LANES;                                     \
                __m512 dots[LANES];                                                                     \
                for (int i = 0; i < LANES; i++) {                                                       \
                    __m512 dot = _mm512_setzero_ps();                                                   \
                    if (i < count) {                                                                    \
                        if (g == 0) prefetch_row(k, t0 + i + AHEAD, d, 1);                              \
                        for (int c = 0; c < D2; c++)                                                    \
                            dot = _mm512_dpbf16_ps(dot, qr[c], (__m512bh)_mm512_loadu_si512(k + (t0 + i) * d + 32 * c)); \
                    }                                                                                   \
                    dots[i] = dot;                                                                      \
                }                                                                                       \
                __mmask16 m = count >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1u);     \
                _mm512_mask_storeu_ps(scores + g * n + t0, m, round16(_mm512_mul_ps(_mm512_set1_ps(scale), sum16(dots)), rs)); \
            }                                                                                           \
        }                                                                                               \
    }
DEFINE_SCORES_DP(2)
DEFINE_SCORES_DP(4)

/* One (slot, KV head) of the bf16 path for d = 32 * D2 (64 or 128): scores, softmax, bf16 pairs,
 * values in head groups of at most `most`. */
#define ATTEND_DP(D2, most)                                                                              \
    do {                                                                                                \
        scores_dp_##D2(q, k, n, G, scale, rs, scores);                                                  \
        int64_t n2 = n + (n & 1);                                                                       \
        for (int64_t g = 0; g < G; g++) {                                                               \
            softmax_row(scores + g * n, n, 1);                                                          \
            for (int64_t t = 0; t < n; t += LANES) {                                                    \
                int count = n - t < LANES ? (int)(n - t) : LANES;                                       \
                __mmask16 m = count >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1u);     \
                __m512i u = _mm512_srli_epi32(_mm512_castps_si512(_mm512_maskz_loadu_ps(m, scores + g * n + t)), 16); \
                _mm256_mask_storeu_epi16(probs + g * n2 + t, m, _mm512_cvtepi32_epi16(u)); /* exact: rounded */ \
            }                                                                                           \
            if (n & 1) probs[g * n2 + n] = 0;                                                           \
        }                                                                                               \
        for (int64_t g0 = 0; g0 < G; g0 += most) {                                                      \
            switch (G - g0 < most ? G - g0 : most) {                                                    \
                case 1: attend_dp_##D2##_1(v, n, g0, probs, n2, acc); break;               \
                case 2: attend_dp_##D2##_2(v, n, g0, probs, n2, acc); break;               \
                DP_CASES_##D2                                                                           \
            }                                                                                           \
        }                                                                                               \
    } while (0)
#define DP_CASES_2 case 3: attend_dp_2_3(v, n, g0, probs, n2, acc); break; \
                   default: attend_dp_2_4(v, n, g0, probs, n2, acc); break;
#define DP_CASES_4 default: attend_dp_4_2(v, n, g0, probs, n2, acc); break;

static inline int attend_dp(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t n, int64_t G,
                            int64_t d, float scale, int rs, float *scores, uint16_t *probs, float *acc) {
    if (d == 64) ATTEND_DP(2, 4);
    else if (d == 128) ATTEND_DP(4, 2);
    else return 0;
    return 1;
}
#endif

/* One (slot, KV head): q (G, d) and out (G, d), k and v (n, d) rows of the storage type.
 * Scratch: scores (G, n), qf (G, d), acc (G, d), all fp32. */
static inline void attend(const void *q, const void *k, const void *v, void *out, int64_t n, int64_t G,
                          int64_t d, float scale, int bf16, float *scores, float *qf, float *acc, uint16_t *probs) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (bf16 && attend_dp(q, k, v, n, G, d, scale, bf16 == 1, scores, probs, acc)) {
        for (int64_t j = 0; j < G * d; j++) ((uint16_t *)out)[j] = f32_to_bf16(acc[j]);
        return;
    }
#else
    (void)probs;
#endif
    for (int64_t j = 0; j < G * d; j++) qf[j] = load1(q, j, bf16);
#ifdef __AVX512F__
    if (d == 64) {
        ATTEND_GROUPS(4, 4)
    } else if (d == 128) {
        ATTEND_GROUPS(8, 2)
    } else {
    for (int64_t t = 0; t < n; t++) {
        for (int64_t g = 0; g < G; g++) {
            __m512 dot = _mm512_setzero_ps();
            for (int64_t c = 0; c < d; c += LANES)
                dot = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * d + c), load16(k, t * d + c, bf16, LANES), dot);
            scores[g * n + t] = round1(scale * _mm512_reduce_add_ps(dot), bf16 == 1);
        }
    }
    for (int64_t g = 0; g < G; g++) softmax_row(scores + g * n, n, bf16);
    memset(acc, 0, (size_t)(G * d) * sizeof(float));
    for (int64_t t = 0; t < n; t++) {
        for (int64_t c = 0; c < d; c += LANES) {
            __m512 row = load16(v, t * d + c, bf16, LANES);
            for (int64_t g = 0; g < G; g++) {
                float *a = acc + g * d + c;
                _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n + t]), row, _mm512_loadu_ps(a)));
            }
        }
    }
    }
#else
    for (int64_t t = 0; t < n; t++)
        for (int64_t g = 0; g < G; g++) {
            float dot = 0;
            for (int64_t j = 0; j < d; j++) dot += qf[g * d + j] * load1(k, t * d + j, bf16);
            scores[g * n + t] = round1(scale * dot, bf16 == 1);
        }
    for (int64_t g = 0; g < G; g++) {
        float *sg = scores + g * n, peak = -INFINITY, total = 0;
        for (int64_t t = 0; t < n; t++) peak = sg[t] > peak ? sg[t] : peak;
        for (int64_t t = 0; t < n; t++) total += (sg[t] = expf(sg[t] - peak));
        for (int64_t t = 0; t < n; t++) sg[t] = round1(sg[t] / total, bf16);
    }
    memset(acc, 0, (size_t)(G * d) * sizeof(float));
    for (int64_t t = 0; t < n; t++)
        for (int64_t g = 0; g < G; g++)
            for (int64_t j = 0; j < d; j++) acc[g * d + j] += scores[g * n + t] * load1(v, t * d + j, bf16);
#endif
    for (int64_t j = 0; j < G * d; j++) {
        if (bf16) ((uint16_t *)out)[j] = f32_to_bf16(acc[j]);
        else ((float *)out)[j] = acc[j];
    }
}

#ifndef R1KIT_KERNELS_KEY
#define R1KIT_KERNELS_KEY ""
#endif
/* The hash native.py named this build by: a cached library under another name's hash is rebuilt. */
const char *r1kit_kernels_key(void) { return R1KIT_KERNELS_KEY; }

/* 1 when the vectorized (AVX-512) loops were compiled in, 0 for the portable loops. */
int cache_attention_simd(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* The whole step's attention for one layer. Returns 0, -1 when d is not a multiple of LANES, -2
 * when scratch memory could not be allocated. */
static int run(const void *q, const void *keys, const void *values, const int64_t *lengths, const int64_t *slots,
               void *out, int64_t w, int64_t K, int64_t G, int64_t T, int64_t d, float scale, int threads, int bf16) {
    if (d % LANES) return -1;
    size_t item = bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* scores (G, T), qf (G, d), acc (G, d) fp32, then probs (G, T + 1) bf16 */
        float *scratch = malloc((size_t)(G * T + 2 * G * d + G * (T + 2) / 2 + 1) * sizeof(float));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t i = 0; i < w * K; i++) {
            if (!scratch) continue;
            int64_t r = i / K, n = lengths[r];
            int64_t c = (slots ? slots[r] : r) * K + i % K; /* the (slot, KV head) block of the cache */
            n = n < 1 ? 1 : n > T ? T : n;
            attend((const char *)q + i * G * d * item, (const char *)keys + c * T * d * item,
                   (const char *)values + c * T * d * item, (char *)out + i * G * d * item, n, G, d, scale, bf16,
                   scratch, scratch + G * T, scratch + G * T + G * d, (uint16_t *)(scratch + G * T + 2 * G * d));
        }
        free(scratch);
    }
    return failed ? -2 : 0;
}

/* round_scores: 1 rounds the scores to bf16 (HF eager attention, the decode step's torch path),
 * 0 keeps them in fp32 (torch's CPU scaled_dot_product_attention, the prefill's torch path); the
 * probabilities are rounded to bf16 either way. The fp32 kernel rounds nothing and ignores it. */
int cache_attention_bf16(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const int64_t *lengths,
                         const int64_t *slots, uint16_t *out, int64_t w, int64_t K, int64_t G, int64_t T, int64_t d,
                         float scale, int round_scores, int threads) {
    return run(q, keys, values, lengths, slots, out, w, K, G, T, d, scale, threads, round_scores ? 1 : 2);
}

int cache_attention_f32(const float *q, const float *keys, const float *values, const int64_t *lengths,
                        const int64_t *slots, float *out, int64_t w, int64_t K, int64_t G, int64_t T, int64_t d,
                        float scale, int round_scores, int threads) {
    (void)round_scores;
    return run(q, keys, values, lengths, slots, out, w, K, G, T, d, scale, threads, 0);
}

/* ---------------------------------------------------------------------------------------------
 * The decoder layer's elementwise steps, each one pass over its rows with the rounding of the torch
 * ops it replaces in r1kit/rollout/engine.py (round = to the storage dtype after every torch op;
 * the identity in fp32). Rows are split over threads when there are enough of them.
 * ------------------------------------------------------------------------------------------- */

#define PARALLEL_MIN 8192 /* elements below which a call stays on one thread */

/* x (n, D) += delta (n, D) when delta is not NULL (round(x + delta)), then
 * out (n, D) = round(weight * round(x * rsqrt(mean(x^2) + eps))): HF LlamaRMSNorm (statistics in fp32)
 * after the residual add. */
static void add_rms_norm(void *x, const void *delta, const void *weight, void *out, int64_t n, int64_t D,
                         float eps, int bf16, int threads) {
#pragma omp parallel for num_threads(threads) if (n * D >= PARALLEL_MIN) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        float sum = 0;
#ifdef __AVX512F__
        __m512 squares = _mm512_setzero_ps();
        for (int64_t j = 0; j < D; j += LANES) {
            int count = D - j < LANES ? (int)(D - j) : LANES;
            __m512 v = load16(x, r * D + j, bf16, count);
            if (delta) {
                v = round16(_mm512_add_ps(v, load16(delta, r * D + j, bf16, count)), bf16);
                store16(x, r * D + j, v, bf16, count);
            }
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        sum = _mm512_reduce_add_ps(squares);
        __m512 inv = _mm512_set1_ps(1.0f / sqrtf(sum / (float)D + eps));
        for (int64_t j = 0; j < D; j += LANES) {
            int count = D - j < LANES ? (int)(D - j) : LANES;
            __m512 h = round16(_mm512_mul_ps(load16(x, r * D + j, bf16, count), inv), bf16);
            store16(out, r * D + j, _mm512_mul_ps(h, load16(weight, j, bf16, count)), bf16, count);
        }
#else
        for (int64_t j = 0; j < D; j++) {
            int64_t i = r * D + j;
            float v = load1(x, i, bf16);
            if (delta) {
                v = round1(v + load1(delta, i, bf16), bf16);
                if (bf16) ((uint16_t *)x)[i] = f32_to_bf16(v);
                else ((float *)x)[i] = v;
            }
            sum += v * v;
        }
        float inv = 1.0f / sqrtf(sum / (float)D + eps);
        for (int64_t j = 0; j < D; j++) {
            int64_t i = r * D + j;
            float h = round1(load1(x, i, bf16) * inv, bf16) * load1(weight, j, bf16);
            if (bf16) ((uint16_t *)out)[i] = f32_to_bf16(h);
            else ((float *)out)[i] = h;
        }
#endif
    }
}

/* out (n, F) = round(round(silu(gate)) * up) for gate_up (n, 2F) = [gate | up]: SwiGLU's activation. */
static void silu_mul(const void *gate_up, void *out, int64_t n, int64_t F, int bf16, int threads) {
#pragma omp parallel for num_threads(threads) if (n * F >= PARALLEL_MIN) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        int64_t j = 0;
#ifdef __AVX512F__
        for (; j + LANES <= F; j += LANES) {
            __m512 g = load16(gate_up, r * 2 * F + j, bf16, LANES), u = load16(gate_up, r * 2 * F + F + j, bf16, LANES);
            __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            __m512 s = round16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), bf16);
            __m512 y = round16(_mm512_mul_ps(s, u), bf16);
            if (bf16) {
                __m512i b = _mm512_srli_epi32(_mm512_castps_si512(y), 16);
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + r * F + j), _mm512_cvtepi32_epi16(b));
            } else {
                _mm512_storeu_ps((float *)out + r * F + j, y);
            }
        }
#endif
        for (; j < F; j++) {
            float g = load1(gate_up, r * 2 * F + j, bf16), u = load1(gate_up, r * 2 * F + F + j, bf16);
            float y = round1(round1(g / (1.0f + expf(-g)), bf16) * u, bf16);
            if (bf16) ((uint16_t *)out)[r * F + j] = f32_to_bf16(y);
            else ((float *)out)[r * F + j] = y;
        }
    }
}

/* Rotary embedding of q and k (half-split layout, HF apply_rotary_pos_emb: round(round(x cos) +
 * round(rot(x) sin)), rot(x) = [-x2, x1]) for n rows of qkv (n, H + 2K, d), each at positions[r] of
 * the tables cos, sin (positions, d); writes the rotated q to q_out (n, H, d), the rotated k to k_out
 * (n, K, d) and to keys (S, K, T, d) at [slots[r], :, positions[r]], and v to values there. */
static void rope_store(const void *qkv, const void *cos, const void *sin, const int64_t *slots,
                       const int64_t *positions, void *q_out, void *k_out, void *keys, void *values, int64_t n,
                       int64_t H, int64_t K, int64_t T, int64_t d, int bf16, int threads) {
    int64_t half = d / 2, width = (H + 2 * K) * d;
#pragma omp parallel for num_threads(threads) if (n * width >= PARALLEL_MIN) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const int64_t p = positions[r], base = r * width;
#ifdef __AVX512F__
        if (half % LANES == 0) {
            for (int64_t h = 0; h < H + K; h++) {
                const int64_t src = base + h * d;
                for (int64_t j = 0; j < half; j += LANES) {
                    __m512 x1 = load16(qkv, src + j, bf16, LANES), x2 = load16(qkv, src + half + j, bf16, LANES);
                    __m512 c1 = load16(cos, p * d + j, bf16, LANES), c2 = load16(cos, p * d + half + j, bf16, LANES);
                    __m512 s1 = load16(sin, p * d + j, bf16, LANES), s2 = load16(sin, p * d + half + j, bf16, LANES);
                    __m512 minus_x2 = _mm512_sub_ps(_mm512_setzero_ps(), x2);
                    __m512 y1 = _mm512_add_ps(round16(_mm512_mul_ps(x1, c1), bf16), round16(_mm512_mul_ps(minus_x2, s1), bf16));
                    __m512 y2 = _mm512_add_ps(round16(_mm512_mul_ps(x2, c2), bf16), round16(_mm512_mul_ps(x1, s2), bf16));
                    void *dst = h < H ? q_out : k_out;
                    int64_t at = h < H ? (r * H + h) * d : (r * K + h - H) * d;
                    store16(dst, at + j, y1, bf16, LANES);
                    store16(dst, at + half + j, y2, bf16, LANES);
                    if (h >= H) {
                        int64_t c = ((slots[r] * K + h - H) * T + p) * d;
                        store16(keys, c + j, y1, bf16, LANES);
                        store16(keys, c + half + j, y2, bf16, LANES);
                    }
                }
            }
            size_t item = bf16 ? 2 : 4;
            for (int64_t k = 0; k < K; k++)
                memcpy((char *)values + (((slots[r] * K + k) * T + p) * d) * item,
                       (const char *)qkv + (base + (H + K + k) * d) * item, (size_t)d * item);
            continue;
        }
#endif
        for (int64_t h = 0; h < H + K; h++) {
            for (int64_t j = 0; j < d; j++) {
                float x = load1(qkv, base + h * d + j, bf16);
                float o = j < half ? -load1(qkv, base + h * d + j + half, bf16) : load1(qkv, base + h * d + j - half, bf16);
                float y = round1(round1(x * load1(cos, p * d + j, bf16), bf16) + round1(o * load1(sin, p * d + j, bf16), bf16), bf16);
                int64_t at = h < H ? (r * H + h) * d + j : (r * K + h - H) * d + j;
                void *dst = h < H ? q_out : k_out;
                if (bf16) ((uint16_t *)dst)[at] = f32_to_bf16(y);
                else ((float *)dst)[at] = y;
                if (h >= H) {
                    int64_t c = ((slots[r] * K + h - H) * T + p) * d + j;
                    if (bf16) ((uint16_t *)keys)[c] = f32_to_bf16(y);
                    else ((float *)keys)[c] = y;
                }
            }
        }
        size_t item = bf16 ? 2 : 4;
        for (int64_t k = 0; k < K; k++)
            memcpy((char *)values + (((slots[r] * K + k) * T + p) * d) * item,
                   (const char *)qkv + (base + (H + K + k) * d) * item, (size_t)d * item);
    }
}

void add_rms_norm_bf16(uint16_t *x, const uint16_t *delta, const uint16_t *weight, uint16_t *out, int64_t n,
                       int64_t D, float eps, int threads) {
    add_rms_norm(x, delta, weight, out, n, D, eps, 1, threads);
}
void add_rms_norm_f32(float *x, const float *delta, const float *weight, float *out, int64_t n, int64_t D,
                      float eps, int threads) {
    add_rms_norm(x, delta, weight, out, n, D, eps, 0, threads);
}
void silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t n, int64_t F, int threads) {
    silu_mul(gate_up, out, n, F, 1, threads);
}
void silu_mul_f32(const float *gate_up, float *out, int64_t n, int64_t F, int threads) {
    silu_mul(gate_up, out, n, F, 0, threads);
}
void rope_store_bf16(const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                     const int64_t *positions, uint16_t *q_out, uint16_t *k_out, uint16_t *keys, uint16_t *values,
                     int64_t n, int64_t H, int64_t K, int64_t T, int64_t d, int threads) {
    rope_store(qkv, cos, sin, slots, positions, q_out, k_out, keys, values, n, H, K, T, d, 1, threads);
}
void rope_store_f32(const float *qkv, const float *cos, const float *sin, const int64_t *slots,
                    const int64_t *positions, float *q_out, float *k_out, float *keys, float *values, int64_t n,
                    int64_t H, int64_t K, int64_t T, int64_t d, int threads) {
    rope_store(qkv, cos, sin, slots, positions, q_out, k_out, keys, values, n, H, K, T, d, 0, threads);
}

/* out (b, V) = softmax of each row of x (b, V), fp32 (the sampler's probabilities): max, exp and sum,
 * scale; exp as exp16 (relative error < 2e-8) where AVX-512 is compiled in. */
void softmax_rows_f32(const float *x, float *out, int64_t b, int64_t V, int threads) {
#pragma omp parallel for num_threads(threads) if (b * V >= PARALLEL_MIN) schedule(static)
    for (int64_t r = 0; r < b; r++) {
        const float *xr = x + r * V;
        float *o = out + r * V;
        int64_t j = 0;
        float peak = -INFINITY;
        double total = 0; /* the portable loop's one running sum stays exact enough over 10^5 terms */
#ifdef __AVX512F__
        __m512 vpeak = _mm512_set1_ps(-INFINITY), vtotal = _mm512_setzero_ps();
        for (; j + LANES <= V; j += LANES) vpeak = _mm512_max_ps(vpeak, _mm512_loadu_ps(xr + j));
        peak = _mm512_reduce_max_ps(vpeak);
#endif
        for (; j < V; j++) peak = xr[j] > peak ? xr[j] : peak;
        j = 0;
#ifdef __AVX512F__
        __m512 top = _mm512_set1_ps(peak);
        for (; j + LANES <= V; j += LANES) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(xr + j), top));
            vtotal = _mm512_add_ps(vtotal, e);
            _mm512_storeu_ps(o + j, e);
        }
        total = _mm512_reduce_add_ps(vtotal);
#endif
        for (; j < V; j++) total += (o[j] = expf(xr[j] - peak));
        float inv = (float)(1.0 / total);
        for (j = 0; j < V; j++) o[j] *= inv;
    }
}
