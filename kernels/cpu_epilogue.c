/* Fused CPU epilogues of the chunked head step (dsoft_dist.kernels.cpu loads this file).
 *
 * The torch chunked path (dsoft_dist/head/local.py) runs each chunk's GEMMs through torch
 * and, between them, several elementwise passes over the (k, B) logit block: scale, shift,
 * mask, max, exp2, sum in forward; scale, shift, exp2, target coefficient, 1/|w| and the
 * radial sum in backward; and the SGD tail over the (k, D) rows. Each of these functions
 * is one pass instead: it reads the block once while it is still in cache. Blocks are
 * row-major (k, B): row r is class row r of the chunk, column b is batch row b. Every
 * function splits its rows over the OpenMP threads of the process (torch's runtime).
 *
 * exp2 here flushes results below 2^-126.5 to 0; the forward's fixed shift keeps every
 * dropped term under 2^-24 of its row's sum (see _forward_chunks in head/local.py).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 2^x for x <= 128 (relative error below 1e-7); 0 below 2^-126.5 and for -inf. */
static inline float exp2_flush(float x) {
    x = x < -127.0f ? -127.0f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: x + magic holds round(x) in its low mantissa bits */
    float t = x + magic;
    float n = t - magic;
    float y = (x - n) * 0.69314718f; /* (x - n) ln 2, |y| <= 0.35: 2^x = 2^n e^y */
    float p = 1.0f + y * (1.0f + y * (0.5f + y * (1.0f / 6 + y * (1.0f / 24 + y * (1.0f / 120
              + y * (1.0f / 720 + y * (1.0f / 5040)))))));
    int32_t ti;
    memcpy(&ti, &t, 4);
    int32_t bits = (ti - 0x4B400000 + 127) << 23; /* the float 2^n */
    float s;
    memcpy(&s, &bits, 4);
    return p * s; /* x < -126.5: n = -127, s = 0 */
}

#define ROWS 8 /* forward: rows per visit of the per-thread partials (register blocking) */

/* Rows [r0, r0 + nr) of the forward into the partial max mx (B,) and sum sm (B,); nr is ROWS or 1,
 * each a constant after inlining, so the row loop unrolls inside the vectorized column loop. */
static inline __attribute__((always_inline)) void forward_rows(
        const float *L, const float *inv, const float *neg_shift, const int32_t *chunk_id, const int32_t *offset,
        int32_t chunk, float *mx, float *sm, int64_t r0, const int nr, int64_t B) {
    #pragma omp simd
    for (int64_t b = 0; b < B; b++) {
        float m = mx[b], sum = sm[b], nsb = neg_shift[b];
        int32_t own = chunk_id[b] == chunk ? offset[b] : -1;
        _Pragma("GCC unroll 8")
        for (int i = 0; i < nr; i++) {
            float x = L[(r0 + i) * B + b] * inv[r0 + i] + nsb;
            x = own == (int32_t)(r0 + i) ? -INFINITY : x;
            m = x > m ? x : m;
            sum += exp2_flush(x);
        }
        mx[b] = m;
        sm[b] = sum;
    }
}

/* Forward, fixed shift. x_rb = L_rb * inv_r + neg_shift_b for every entry but the batch row's
 * target (chunk_id_b == chunk and offset_b == r, skipped); run_max_b = max(run_max_b, max_r x_rb),
 * run_sum_b += sum_r 2^x_rb. L (k, B), inv (k,), neg_shift (B,), chunk_id and offset (B,). */
int dsoft_forward_fixed(const float *L, const float *inv, const float *neg_shift, const int32_t *chunk_id,
                        const int32_t *offset, int32_t chunk, float *run_max, float *run_sum, int64_t k,
                        int64_t B) {
    if (k <= 0 || B <= 0)
        return 0;
    int nt = omp_get_max_threads();
    float *part = malloc(sizeof(float) * 2 * (size_t)nt * (size_t)B); /* per thread: max (B), sum (B) */
    if (part == NULL)
        return 1;
    int used = 1;
    #pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        #pragma omp single
        used = omp_get_num_threads(); /* the barrier after single publishes it */
        float *mx = part + (size_t)2 * t * B, *sm = mx + B;
        for (int64_t b = 0; b < B; b++) {
            mx[b] = -INFINITY;
            sm[b] = 0.0f;
        }
        int64_t r_lo = k * t / used, r_hi = k * (t + 1) / used; /* this thread's rows */
        for (int64_t r0 = r_lo; r0 < r_hi; r0 += ROWS) {
            if (r_hi - r0 >= ROWS)
                forward_rows(L, inv, neg_shift, chunk_id, offset, chunk, mx, sm, r0, ROWS, B);
            else
                for (int64_t r = r0; r < r_hi; r++)
                    forward_rows(L, inv, neg_shift, chunk_id, offset, chunk, mx, sm, r, 1, B);
        }
    }
    for (int t = 0; t < used; t++) {
        const float *mx = part + (size_t)2 * t * B, *sm = mx + B;
        for (int64_t b = 0; b < B; b++) {
            run_max[b] = mx[b] > run_max[b] ? mx[b] : run_max[b];
            run_sum[b] += sm[b];
        }
    }
    free(part);
    return 0;
}

/* Backward block of normalized rows, in place. L (k, B) holds raw-row logits on entry and the block on
 * return: with e_rb = 2^(L_rb * inv_r + neg_shift_b), or coef_b at the batch row's target,
 * block_rb = e_rb * inv_r, and minus_radial_r = inv_sq_r * sum_b sign_ln2_b * L_rb * block_rb
 * (L_rb the logit on entry). inv, inv_sq, minus_radial (k,); neg_shift, coef, sign_ln2 (B,). */
int dsoft_backward_block(float *L, const float *inv, const float *inv_sq, const float *neg_shift,
                         const int32_t *chunk_id, const int32_t *offset, int32_t chunk, const float *coef,
                         const float *sign_ln2, float *minus_radial, int64_t k, int64_t B) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < k; r++) {
        float *row = L + r * B;
        float iv = inv[r], acc = 0.0f;
        int32_t ri = (int32_t)r;
        #pragma omp simd reduction(+ : acc)
        for (int64_t b = 0; b < B; b++) {
            float x = row[b];
            float e = exp2_flush(x * iv + neg_shift[b]);
            e = (chunk_id[b] == chunk) & (offset[b] == ri) ? coef[b] : e;
            e *= iv;
            row[b] = e;
            acc += sign_ln2[b] * x * e;
        }
        minus_radial[r] = acc * inv_sq[r];
    }
    return 0;
}

/* SGD tail of rows w (k, D) with momentum buf (k, D) that already holds m b + lhs @ rhs:
 * buf_r += coef_r w_r; w_r -= lr buf_r (both in place, one pass). */
int dsoft_sgd_tail(float *w, float *buf, const float *coef, float lr, int64_t k, int64_t D) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < k; r++) {
        float c = coef[r];
        float *wr = w + r * D, *br = buf + r * D;
        #pragma omp simd
        for (int64_t d = 0; d < D; d++) {
            float v = br[d] + c * wr[d];
            br[d] = v;
            wr[d] -= lr * v;
        }
    }
    return 0;
}
