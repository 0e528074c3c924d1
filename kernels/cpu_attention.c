/* Fused bf16 attention over the paged KV pool for x86 CPUs with AVX512-BF16 (vdpbf16ps).
 *
 * One call serves a batch of sequences that each add `n_new` tokens: sequence b has
 * lengths[b] tokens whose pool slots are slot_table[b * slot_stride + i], the last n_new of
 * them new (already stored), and its query rows q[b * n_new + t] attend causally to keys
 * 0 .. lengths[b] - n_new + t. Prefill is one sequence with many new tokens, decode many
 * sequences with one each.
 *
 * Layout: the 16 lanes of a vector are 16 query rows of one kv head (token-major: row
 * t * group + g is token t, query head h * group + g), so the online softmax is vertical
 * (no horizontal reductions) and keys are read in place from the pool, one 32-bit pair of
 * dimensions broadcast at a time. Values are repacked per key block into key pairs
 * interleaved per dimension, the layout vdpbf16ps needs for p . V. Scores are in the log2
 * domain (q is pre-scaled by scale * log2(e)) and never leave the block buffer.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16      /* query rows per vector */
#define BLOCK_KEYS 64 /* keys per block: values repacked once per block */
#define KEY_GROUP 8   /* keys whose scores are accumulated together */
#define MAX_DIM 256

typedef struct {
    const float *q;
    const uint16_t *k_pool, *v_pool;
    float *out;
    const int64_t *slot_table, *lengths;
    int64_t slot_stride, n_new, h_q, h_kv;
    float scale_log2;
} Args;

typedef struct {
    int64_t b, h, first_block, blocks; /* row blocks [first_block, first_block + blocks) */
} Item;

static const uint16_t zero_row[MAX_DIM];

/* 2^x for x <= 0, exactly 0 below -126 (and for -inf). */
static inline __m512 exp2_ps(__m512 x) {
    __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n); /* [-0.5, 0.5]: Taylor series of e^(f ln 2), error < 3e-6 */
    __m512 p = _mm512_set1_ps(1.3333558e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(live, p, n);
}

static inline __m512bh bcast_pair(const uint32_t *p) {
    return (__m512bh)_mm512_set1_epi32((int)*p);
}

/* Dimension held at position p of a repacked value row: unpacklo/hi_epi16 interleave words
 * 0-3 / 4-7 of each 128-bit lane of a 32-dimension chunk. */
static inline int value_dim(int p) {
    int chunk = p / 32, w = p % 32, half = w / 16, i = w % 16;
    return chunk * 32 + 8 * (i / 4) + 4 * half + i % 4;
}

static inline __attribute__((always_inline)) void run_item(const Args *a, Item it, const int D) {
    const int64_t group = a->h_q / a->h_kv, n = a->n_new, rows = group * n;
    const int64_t length = a->lengths[it.b], history = length - n;
    const int64_t *slots = a->slot_table + it.b * a->slot_stride;
    const int64_t nb = it.blocks;
    const int64_t pool_row = a->h_kv * D; /* elements per slot */
    const uint16_t *k_base = a->k_pool + it.h * D, *v_base = a->v_pool + it.h * D;

    uint32_t *qp = aligned_alloc(64, (size_t)nb * (D / 2) * LANES * 4);
    float *acc = aligned_alloc(64, (size_t)nb * D * LANES * 4);
    float *state = aligned_alloc(64, (size_t)nb * 2 * LANES * 4); /* max, sum per block */
    int32_t *limit = aligned_alloc(64, (size_t)nb * LANES * 4);
    int64_t *last_key = malloc((size_t)nb * sizeof(int64_t));
    uint32_t *vp = aligned_alloc(64, (size_t)(BLOCK_KEYS / 2) * D * 4);
    float *scores = aligned_alloc(64, (size_t)BLOCK_KEYS * LANES * 4);
    uint32_t *pp = aligned_alloc(64, (size_t)(BLOCK_KEYS / 2) * LANES * 4);
    float qrow[MAX_DIM] __attribute__((aligned(64)));
    uint16_t qbf[MAX_DIM] __attribute__((aligned(64)));

    /* Queries: bf16, pre-scaled, pairs of dimensions transposed so lanes are rows. */
    for (int64_t rb = 0; rb < nb; rb++) {
        last_key[rb] = -1;
        for (int r = 0; r < LANES; r++) {
            int64_t row = (it.first_block + rb) * LANES + r;
            uint32_t *dst = qp + rb * (D / 2) * LANES + r;
            if (row < rows) {
                int64_t t = row / group, g = row % group;
                const float *src = a->q + ((it.b * n + t) * a->h_q + it.h * group + g) * D;
                for (int i = 0; i < D; i++) qrow[i] = src[i] * a->scale_log2;
                for (int i = 0; i < D; i += 32) {
                    __m512bh c = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qrow + i + 16),
                                                      _mm512_loadu_ps(qrow + i));
                    _mm512_store_si512((void *)(qbf + i), (__m512i)c);
                }
                const uint32_t *pairs = (const uint32_t *)qbf;
                for (int j = 0; j < D / 2; j++) dst[j * LANES] = pairs[j];
                limit[rb * LANES + r] = (int32_t)(history + t);
                if (history + t > last_key[rb]) last_key[rb] = history + t;
            } else {
                for (int j = 0; j < D / 2; j++) dst[j * LANES] = 0;
                limit[rb * LANES + r] = INT32_MAX; /* a padding lane sees everything: no NaN */
            }
        }
        _mm512_store_ps(state + rb * 2 * LANES, _mm512_set1_ps(-INFINITY));
        _mm512_store_ps(state + rb * 2 * LANES + LANES, _mm512_setzero_ps());
    }
    memset(acc, 0, (size_t)nb * D * LANES * 4);

    for (int64_t kb = 0; kb < length; kb += BLOCK_KEYS) {
        const int nk = (int)(length - kb < BLOCK_KEYS ? length - kb : BLOCK_KEYS);
        const int pairs = (nk + 1) / 2;
        const int masked = kb + nk - 1 > history; /* reaches the new tokens */
        const uint16_t *krow[BLOCK_KEYS + KEY_GROUP];
        for (int k = 0; k < BLOCK_KEYS + KEY_GROUP; k++)
            krow[k] = k < nk ? k_base + slots[kb + k] * pool_row : zero_row;
        for (int kk = 0; kk < pairs; kk++) {
            const uint16_t *v0 = v_base + slots[kb + 2 * kk] * pool_row;
            const uint16_t *v1 = 2 * kk + 1 < nk ? v_base + slots[kb + 2 * kk + 1] * pool_row
                                                 : zero_row;
            for (int c = 0; c < D; c += 32) {
                __m512i x = _mm512_loadu_si512(v0 + c), y = _mm512_loadu_si512(v1 + c);
                _mm512_store_si512(vp + kk * D + c, _mm512_unpacklo_epi16(x, y));
                _mm512_store_si512(vp + kk * D + c + 16, _mm512_unpackhi_epi16(x, y));
            }
        }
        for (int64_t rb = 0; rb < nb; rb++) {
            if (kb > last_key[rb]) continue; /* every row of the block is before these keys */
            const uint32_t *q = qp + rb * (D / 2) * LANES;
            for (int kg = 0; kg < nk; kg += KEY_GROUP) {
                __m512 s[KEY_GROUP];
                const uint32_t *kr[KEY_GROUP];
                for (int u = 0; u < KEY_GROUP; u++) {
                    s[u] = _mm512_setzero_ps();
                    kr[u] = (const uint32_t *)krow[kg + u];
                }
                for (int j = 0; j < D / 2; j++) {
                    __m512bh qv = (__m512bh)_mm512_load_si512(q + j * LANES);
#pragma GCC unroll 8
                    for (int u = 0; u < KEY_GROUP; u++)
                        s[u] = _mm512_dpbf16_ps(s[u], qv, bcast_pair(kr[u] + j));
                }
                for (int u = 0; u < KEY_GROUP; u++) _mm512_store_ps(scores + (kg + u) * LANES, s[u]);
            }
            const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
            if (masked) {
                __m512i lim = _mm512_load_si512(limit + rb * LANES);
                for (int k = 0; k < nk; k++) {
                    __mmask16 ok = _mm512_cmp_epi32_mask(_mm512_set1_epi32((int)(kb + k)), lim,
                                                         _MM_CMPINT_LE);
                    _mm512_store_ps(scores + k * LANES,
                                    _mm512_mask_blend_ps(ok, neg_inf,
                                                         _mm512_load_ps(scores + k * LANES)));
                }
            }
            if (nk % 2) _mm512_store_ps(scores + nk * LANES, neg_inf);
            float *st = state + rb * 2 * LANES;
            __m512 m_old = _mm512_load_ps(st), top = m_old;
            for (int k = 0; k < nk; k++) top = _mm512_max_ps(top, _mm512_load_ps(scores + k * LANES));
            /* Lanes whose max did not grow keep factor exactly 1: rescale only when one did. */
            const int grew = _mm512_cmp_ps_mask(top, m_old, _CMP_GT_OQ) != 0;
            const __m512 alpha = exp2_ps(_mm512_sub_ps(m_old, top));
            __m512 sum = _mm512_mul_ps(_mm512_load_ps(st + LANES), alpha);
            const __m512i interleave = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
            for (int kk = 0; kk < pairs; kk++) {
                __m512 p0 = exp2_ps(_mm512_sub_ps(_mm512_load_ps(scores + 2 * kk * LANES), top));
                __m512 p1 = exp2_ps(_mm512_sub_ps(_mm512_load_ps(scores + (2 * kk + 1) * LANES),
                                                  top));
                sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
                __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);
                _mm512_store_si512(pp + kk * LANES, _mm512_permutexvar_epi16(interleave, both));
            }
            _mm512_store_ps(st, top);
            _mm512_store_ps(st + LANES, sum);
            float *ac = acc + rb * D * LANES;
            for (int dc = 0; dc < D; dc += 16) {
                __m512 o[16];
#pragma GCC unroll 16
                for (int e = 0; e < 16; e++) {
                    o[e] = _mm512_load_ps(ac + (dc + e) * LANES);
                    if (grew) o[e] = _mm512_mul_ps(o[e], alpha);
                }
                for (int kk = 0; kk < pairs; kk++) {
                    __m512bh pv = (__m512bh)_mm512_load_si512(pp + kk * LANES);
                    const uint32_t *v = vp + kk * D + dc;
#pragma GCC unroll 16
                    for (int e = 0; e < 16; e++) o[e] = _mm512_dpbf16_ps(o[e], pv, bcast_pair(v + e));
                }
#pragma GCC unroll 16
                for (int e = 0; e < 16; e++) _mm512_store_ps(ac + (dc + e) * LANES, o[e]);
            }
        }
    }

    /* Normalize and write rows back in [token, head, dim] order. */
    for (int64_t rb = 0; rb < nb; rb++) {
        const float *sum = state + rb * 2 * LANES + LANES;
        for (int r = 0; r < LANES; r++) {
            int64_t row = (it.first_block + rb) * LANES + r;
            if (row >= rows) break;
            int64_t t = row / group, g = row % group;
            float *dst = a->out + ((it.b * n + t) * a->h_q + it.h * group + g) * D;
            float inv = 1.0f / sum[r];
            const float *ac = acc + rb * D * LANES + r;
            for (int p = 0; p < D; p++) dst[value_dim(p)] = ac[p * LANES] * inv;
        }
    }
    free(qp);
    free(acc);
    free(state);
    free(limit);
    free(last_key);
    free(vp);
    free(scores);
    free(pp);
}

static void run_item_any(const Args *a, Item it, int64_t d) {
    switch (d) {
    case 32: run_item(a, it, 32); break;
    case 64: run_item(a, it, 64); break;
    case 96: run_item(a, it, 96); break;
    case 128: run_item(a, it, 128); break;
    case 160: run_item(a, it, 160); break;
    case 192: run_item(a, it, 192); break;
    case 224: run_item(a, it, 224); break;
    case 256: run_item(a, it, 256); break;
    }
}

/* Returns 0, or -1 for a head dimension that is not a multiple of 32 up to 256. */
int vp_attention_bf16(const float *q, const uint16_t *k_pool, const uint16_t *v_pool, float *out,
                      const int64_t *slot_table, int64_t slot_stride, const int64_t *lengths,
                      int64_t n_seqs, int64_t n_new, int64_t h_q, int64_t h_kv, int64_t d,
                      float scale, int threads) {
    if (d % 32 || d < 32 || d > MAX_DIM || h_q % h_kv) return -1;
    Args a = {q, k_pool, v_pool, out, slot_table, lengths, slot_stride, n_new, h_q, h_kv,
              scale * 1.44269504088896341f};
    const int64_t blocks = (h_q / h_kv * n_new + LANES - 1) / LANES;
    /* Enough items for every thread: split a (sequence, kv head)'s row blocks when there are
     * fewer of those than threads. */
    int64_t heads = n_seqs * h_kv, split = 1;
    if (heads < threads) split = (threads + heads - 1) / heads;
    if (split > blocks) split = blocks;
    const int64_t per = (blocks + split - 1) / split;
    Item *items = malloc((size_t)(heads * split) * sizeof(Item));
    int64_t count = 0;
    for (int64_t b = 0; b < n_seqs; b++)
        for (int64_t h = 0; h < h_kv; h++)
            for (int64_t first = 0; first < blocks; first += per)
                items[count++] = (Item){b, h, first, blocks - first < per ? blocks - first : per};
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && count > 1)
    for (int64_t i = 0; i < count; i++) run_item_any(&a, items[i], d);
    free(items);
    return 0;
}

int vp_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}
