/* Fused bf16 attention over the paged KV pool for x86 CPUs with AVX512-BF16 (vdpbf16ps).
 *
 * One call serves a batch of sequences that each add `n_new` tokens: sequence b has
 * lengths[b] tokens whose pool slots are slot_table[b * slot_stride + i], the last n_new of
 * them new (already stored), and its query rows q[b * n_new + t] attend causally to keys
 * 0 .. lengths[b] - n_new + t. Prefill is one sequence with many new tokens, decode many
 * sequences with one each.
 *
 * Layout: the lanes of a vector are query rows of one kv head (token-major: row t * group + g
 * is token t, query head h * group + g), so the online softmax is vertical (no horizontal
 * reductions) and keys are read in place from the pool, one 32-bit pair of dimensions
 * broadcast at a time. Values are repacked per key block into key pairs interleaved per
 * dimension, the layout vdpbf16ps needs for p . V. Scores are in the log2 domain (q is
 * pre-scaled by scale * log2(e)) and never leave the block buffer.
 *
 * Rows go in blocks of 16 (zmm); a last block of at most 8 rows uses 8-lane (ymm) vectors,
 * which cost half as much per instruction, so few rows (a decode step of a 7-query group, the
 * tail of a prefill) do not pay for 16. Every lane computes the same operations in either
 * width, so a row's result does not depend on how the rows were blocked.
 *
 * The row-block code is written once for a lane count W and compiled for W = 16 and W = 8:
 * this file includes itself with VP_ROW_BLOCK defined (the part after #else).
 */
#ifndef VP_ROW_BLOCK
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16      /* query rows per row block (the widest vector) */
#define BLOCK_KEYS 64 /* keys per block: values repacked once per block */
#define KEY_GROUP 8   /* keys whose scores are accumulated together (the max tree assumes 8) */
_Static_assert(KEY_GROUP == 8, "attend_block reduces a key group's max as a tree of 8");
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

/* Dimension held at position p of a repacked value row: unpacklo/hi_epi16 interleave words
 * 0-3 / 4-7 of each 128-bit lane of a 32-dimension chunk. */
static inline int value_dim(int p) {
    int chunk = p / 32, w = p % 32, half = w / 16, i = w % 16;
    return chunk * 32 + 8 * (i / 4) + 4 * half + i % 4;
}

/* One query row as bf16 pairs of dimensions, pre-scaled. */
static inline void q_row_bf16(const float *src, float scale, uint16_t *qbf, const int D) {
    float qrow[MAX_DIM] __attribute__((aligned(64)));
    for (int i = 0; i < D; i++) qrow[i] = src[i] * scale;
    for (int i = 0; i < D; i += 32) {
        __m512bh c = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qrow + i + 16), _mm512_loadu_ps(qrow + i));
        _mm512_store_si512((void *)(qbf + i), (__m512i)c);
    }
}

#define VP_ROW_BLOCK
#define W 16
#include __FILE__
#undef W
#define W 8
#include __FILE__
#undef W

static inline __attribute__((always_inline)) void run_item(const Args *a, Item it, const int D) {
    const int64_t group = a->h_q / a->h_kv, n = a->n_new, rows = group * n;
    const int64_t length = a->lengths[it.b], history = length - n;
    const int64_t *slots = a->slot_table + it.b * a->slot_stride;
    const int64_t nb = it.blocks;
    const int64_t pool_row = a->h_kv * D; /* elements per slot */
    const uint16_t *k_base = a->k_pool + it.h * D, *v_base = a->v_pool + it.h * D;

    /* Per row block rb, room for BLOCK lanes; a narrow block uses the start of its room. */
    uint32_t *qp = aligned_alloc(64, (size_t)nb * (D / 2) * BLOCK * 4);
    float *acc = aligned_alloc(64, (size_t)nb * D * BLOCK * 4);
    float *state = aligned_alloc(64, (size_t)nb * 2 * BLOCK * 4); /* max, sum per lane */
    int32_t *limit = aligned_alloc(64, (size_t)nb * BLOCK * 4);
    int64_t *last_key = malloc((size_t)nb * sizeof(int64_t));
    int8_t *narrow = malloc((size_t)nb);
    uint32_t *vp = aligned_alloc(64, (size_t)(BLOCK_KEYS / 2) * D * 4);
    float *scores = aligned_alloc(64, (size_t)BLOCK_KEYS * BLOCK * 4);
    uint32_t *pp = aligned_alloc(64, (size_t)(BLOCK_KEYS / 2) * BLOCK * 4);

    for (int64_t rb = 0; rb < nb; rb++) {
        const int64_t row0 = (it.first_block + rb) * BLOCK;
        narrow[rb] = rows - row0 <= 8;
        uint32_t *q = qp + rb * (D / 2) * BLOCK;
        int32_t *lim = limit + rb * BLOCK;
        float *st = state + rb * 2 * BLOCK;
        if (narrow[rb])
            last_key[rb] = pack_q_8(a, it, row0, q, lim, st, D);
        else
            last_key[rb] = pack_q_16(a, it, row0, q, lim, st, D);
    }
    memset(acc, 0, (size_t)nb * D * BLOCK * 4);

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
        const int64_t next = kb + BLOCK_KEYS, share = (BLOCK_KEYS + nb - 1) / nb;
        for (int64_t rb = 0; rb < nb; rb++) {
            /* The next key block's rows come from L3 or memory (each layer's history is read
             * once per forward): each row block asks for its share of them, into L2, so they
             * arrive while this block computes. Fetching them all at once, or only when read,
             * stalls: 10-40% slower at a 2000-token history. */
            const int64_t first = next + rb * share;
            const int64_t last = first + share < length ? first + share : length;
            for (int64_t k = first; k < last && k < next + BLOCK_KEYS; k++) {
                const int64_t off = slots[k] * pool_row;
                for (int c = 0; c < D; c += 32) {
                    _mm_prefetch((const char *)(k_base + off + c), _MM_HINT_T1);
                    _mm_prefetch((const char *)(v_base + off + c), _MM_HINT_T1);
                }
            }
            if (kb > last_key[rb]) continue; /* every row of the block is before these keys */
            const uint32_t *q = qp + rb * (D / 2) * BLOCK;
            const int32_t *lim = limit + rb * BLOCK;
            float *st = state + rb * 2 * BLOCK, *ac = acc + rb * D * BLOCK;
            if (narrow[rb])
                attend_block_8(q, krow, vp, nk, pairs, masked, kb, lim, st, ac, scores, pp, D);
            else
                attend_block_16(q, krow, vp, nk, pairs, masked, kb, lim, st, ac, scores, pp, D);
        }
    }

    for (int64_t rb = 0; rb < nb; rb++) {
        const int64_t row0 = (it.first_block + rb) * BLOCK;
        const float *st = state + rb * 2 * BLOCK, *ac = acc + rb * D * BLOCK;
        if (narrow[rb])
            write_out_8(a, it, row0, st, ac, D);
        else
            write_out_16(a, it, row0, st, ac, D);
    }
    free(qp);
    free(acc);
    free(state);
    free(limit);
    free(last_key);
    free(narrow);
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
    const int64_t blocks = (h_q / h_kv * n_new + BLOCK - 1) / BLOCK;
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
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

#else /* VP_ROW_BLOCK: the row-block functions for W lanes */

#if W == 16
#define VF __m512
#define VH __m512bh
#define VI __m512i
#define MK __mmask16
#define OP(name) _mm512_##name
#define LOADI(p) _mm512_load_si512((const void *)(p))
#define STOREI(p, x) _mm512_store_si512((void *)(p), x)
#define NAME(name) name##_16
#else
#define VF __m256
#define VH __m256bh
#define VI __m256i
#define MK __mmask8
#define OP(name) _mm256_##name
#define LOADI(p) _mm256_load_si256((const VI *)(p))
#define STOREI(p, x) _mm256_store_si256((VI *)(p), x)
#define NAME(name) name##_8
#endif

/* 2^x for x <= 0, exactly 0 below -126 (and for -inf), exactly 1 at 0. The polynomial's
 * relative error (1e-4) is far under the bf16 rounding the weights get before p . V. */
static inline VF NAME(exp2)(VF x) {
    MK live = OP(cmp_ps_mask)(x, OP(set1_ps)(-126.0f), _CMP_GE_OQ);
    VF n = OP(roundscale_ps)(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    VF f = OP(sub_ps)(x, n); /* [-0.5, 0.5] */
    VF p = OP(set1_ps)(5.50079383e-2f);
    p = OP(fmadd_ps)(p, f, OP(set1_ps)(2.42208749e-1f));
    p = OP(fmadd_ps)(p, f, OP(set1_ps)(6.93282783e-1f));
    p = OP(fmadd_ps)(p, f, OP(set1_ps)(1.0f));
    return OP(maskz_scalef_ps)(live, p, n);
}

/* Queries of rows row0 .. row0 + W - 1 as bf16 pairs, transposed so lanes are rows, with
 * each lane's last visible key and a fresh softmax state. Returns the block's last key. */
static inline __attribute__((always_inline)) int64_t NAME(pack_q)(
    const Args *a, Item it, int64_t row0, uint32_t *qp, int32_t *limit, float *state,
    const int D) {
    const int64_t group = a->h_q / a->h_kv, n = a->n_new, rows = group * n;
    const int64_t history = a->lengths[it.b] - n;
    int64_t last = -1;
    uint16_t qbf[MAX_DIM] __attribute__((aligned(64)));
    for (int r = 0; r < W; r++) {
        const int64_t row = row0 + r;
        uint32_t *dst = qp + r;
        if (row < rows) {
            const int64_t t = row / group, g = row % group;
            q_row_bf16(a->q + ((it.b * n + t) * a->h_q + it.h * group + g) * D, a->scale_log2,
                       qbf, D);
            const uint32_t *pairs = (const uint32_t *)qbf;
            for (int j = 0; j < D / 2; j++) dst[j * W] = pairs[j];
            limit[r] = (int32_t)(history + t);
            if (history + t > last) last = history + t;
        } else {
            for (int j = 0; j < D / 2; j++) dst[j * W] = 0;
            limit[r] = INT32_MAX; /* a padding lane sees everything: no NaN */
        }
    }
    OP(store_ps)(state, OP(set1_ps)(-INFINITY));
    OP(store_ps)(state + W, OP(setzero_ps)());
    return last;
}

/* One row block over one key block: scores, causal mask, online softmax, p . V. */
static inline __attribute__((always_inline)) void NAME(attend_block)(
    const uint32_t *q, const uint16_t *const *krow, const uint32_t *vp, int nk, int pairs,
    int masked, int64_t kb, const int32_t *limit, float *st, float *ac, float *scores,
    uint32_t *pp, const int D) {
    /* Scores, masked (the causal limit of each lane, -inf past the block's nk keys, so the odd
     * key of a last pair weighs 0) and reduced to the block's max on the way out: a tree per
     * key group, so the running max is a short dependency chain, not one max per key. */
    const VF neg_inf = OP(set1_ps)(-INFINITY);
    const VI lim = LOADI(limit);
    VF m_old = OP(load_ps)(st), top = m_old;
    for (int kg = 0; kg < nk; kg += KEY_GROUP) {
        VF s[KEY_GROUP];
        const uint32_t *kr[KEY_GROUP];
        for (int u = 0; u < KEY_GROUP; u++) {
            s[u] = OP(setzero_ps)();
            kr[u] = (const uint32_t *)krow[kg + u];
        }
        for (int j = 0; j < D / 2; j++) {
            VH qv = (VH)LOADI(q + j * W);
#pragma GCC unroll 8
            for (int u = 0; u < KEY_GROUP; u++)
                s[u] = OP(dpbf16_ps)(s[u], qv, (VH)OP(set1_epi32)((int)kr[u][j]));
        }
#pragma GCC unroll 8
        for (int u = 0; u < KEY_GROUP; u++) {
            if (kg + u >= nk) {
                s[u] = neg_inf;
            } else if (masked) {
                MK ok = OP(cmp_epi32_mask)(OP(set1_epi32)((int)(kb + kg + u)), lim, _MM_CMPINT_LE);
                s[u] = OP(mask_blend_ps)(ok, neg_inf, s[u]);
            }
            OP(store_ps)(scores + (kg + u) * W, s[u]);
        }
        VF m01 = OP(max_ps)(s[0], s[1]), m23 = OP(max_ps)(s[2], s[3]);
        VF m45 = OP(max_ps)(s[4], s[5]), m67 = OP(max_ps)(s[6], s[7]);
        top = OP(max_ps)(top, OP(max_ps)(OP(max_ps)(m01, m23), OP(max_ps)(m45, m67)));
    }
    /* Lanes whose max did not grow keep factor exactly 1: rescale only when one did. */
    const int grew = OP(cmp_ps_mask)(top, m_old, _CMP_GT_OQ) != 0;
    const VF alpha = NAME(exp2)(OP(sub_ps)(m_old, top));
    VF sum = OP(mul_ps)(OP(load_ps)(st + W), alpha), sum1 = OP(setzero_ps)();
    /* cvtne2ps_pbh(p1, p0) holds p0's W words then p1's: interleave them into (p0, p1) pairs. */
    static const int16_t interleave[2 * W] __attribute__((aligned(64))) = {
#if W == 16
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#else
        0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15
#endif
    };
    const VI order = LOADI(interleave);
    for (int kk = 0; kk < pairs; kk++) {
        VF p0 = NAME(exp2)(OP(sub_ps)(OP(load_ps)(scores + 2 * kk * W), top));
        VF p1 = NAME(exp2)(OP(sub_ps)(OP(load_ps)(scores + (2 * kk + 1) * W), top));
        sum = OP(add_ps)(sum, p0); /* two chains: each add waits only for its own */
        sum1 = OP(add_ps)(sum1, p1);
        VI both = (VI)OP(cvtne2ps_pbh)(p1, p0);
        STOREI(pp + kk * W, OP(permutexvar_epi16)(order, both));
    }
    OP(store_ps)(st, top);
    OP(store_ps)(st + W, OP(add_ps)(sum, sum1));
    for (int dc = 0; dc < D; dc += 16) {
        VF o[16];
#pragma GCC unroll 16
        for (int e = 0; e < 16; e++) {
            o[e] = OP(load_ps)(ac + (dc + e) * W);
            if (grew) o[e] = OP(mul_ps)(o[e], alpha);
        }
        for (int kk = 0; kk < pairs; kk++) {
            VH pv = (VH)LOADI(pp + kk * W);
            const uint32_t *v = vp + kk * D + dc;
#pragma GCC unroll 16
            for (int e = 0; e < 16; e++)
                o[e] = OP(dpbf16_ps)(o[e], pv, (VH)OP(set1_epi32)((int)v[e]));
        }
#pragma GCC unroll 16
        for (int e = 0; e < 16; e++) OP(store_ps)(ac + (dc + e) * W, o[e]);
    }
}

/* Normalize the block's rows and write them back in [token, head, dim] order. */
static inline __attribute__((always_inline)) void NAME(write_out)(
    const Args *a, Item it, int64_t row0, const float *state, const float *acc, const int D) {
    const int64_t group = a->h_q / a->h_kv, n = a->n_new, rows = group * n;
    const float *sum = state + W;
    for (int r = 0; r < W; r++) {
        const int64_t row = row0 + r;
        if (row >= rows) break;
        const int64_t t = row / group, g = row % group;
        float *dst = a->out + ((it.b * n + t) * a->h_q + it.h * group + g) * D;
        const float inv = 1.0f / sum[r];
        const float *ac = acc + r;
        for (int p = 0; p < D; p++) dst[value_dim(p)] = ac[p * W] * inv;
    }
}

#undef VF
#undef VH
#undef VI
#undef MK
#undef OP
#undef LOADI
#undef STOREI
#undef NAME
#endif /* VP_ROW_BLOCK */
