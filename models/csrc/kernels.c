/* Fused CPU kernels of the simulation (models/native.py builds and calls them). Each works on T steps [T, n] of
 * contiguous float32 tensors, in blocks of about BLOCK elements that run all T steps while their state stays in
 * the L1 cache, so each step reads its input and writes its output once. Blocks are shared out among ``threads``
 * OpenMP threads (built with -fopenmp; torch's own OpenMP runtime where torch loaded one). Every operation is one
 * IEEE float32 rounding in the eager path's order (built with -ffp-contract=off, no fast math), so the results
 * are bitwise the eager path's.
 *
 * if_sequence: the integrate-and-fire update, with threshold theta[i % period] for element i,
 *
 *     u <- u + x / theta   (fresh: u starts at v_init);  k = clamp(floor(u), lo, hi);  u <- u - k;  out = k theta
 *
 * running_sums: S(t) = S(t-1) + x(t) from S(0) = before (or S(1) = x(1)), written as S(t), or as S(t) / (t0 + t)
 * (the running means of expectation compensation) with ``divide``; ``last`` (if given; it may be ``before``)
 * receives S(T).
 *
 * step_differences, in place: y(t) <- z(t) - z(t-1) with z(t) = y(t) * (t0 + t), or y(t) / (t0 + t) with
 * ``divide``, and z(0) = before (or no subtraction at the first step where before is NULL): the outputs of
 * expectation compensation and of spike products from their totals; ``last`` (if given; it may be ``before``,
 * each element is read before it is written) receives z(T), the total a next step subtracts. */
#include <stdint.h>
#include <math.h>

#define BLOCK 4096
#define MIN_ROW 256 /* a shorter threshold period is repeated up to this length, so the inner loop vectorises */

void if_sequence(const float *restrict xs, float *restrict u, float *restrict out, const float *restrict theta,
                 int64_t steps, int64_t n, int64_t period, int32_t fresh, float v_init, float lo, float hi,
                 int32_t threads) {
    float repeated[2 * MIN_ROW];
    int64_t row = period;
    if (period < MIN_ROW) {
        row = (MIN_ROW + period - 1) / period * period;
        for (int64_t i = 0; i < row; i++)
            repeated[i] = theta[i % period];
        theta = repeated;
    }
    int64_t block = row < BLOCK ? BLOCK / row * row : row;
    int64_t blocks = (n + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * block;
        int64_t size = n - start < block ? n - start : block;
        float *restrict ub = u + start;
        if (fresh)
            for (int64_t i = 0; i < size; i++)
                ub[i] = v_init;
        for (int64_t t = 0; t < steps; t++) {
            const float *restrict xb = xs + t * n + start;
            float *restrict ob = out + t * n + start;
            for (int64_t r = 0; r < size; r += row) {
                int64_t len = size - r < row ? size - r : row;
                for (int64_t j = 0; j < len; j++) {
                    float v = ub[r + j] + xb[r + j] / theta[j];
                    float k = floorf(v);
                    k = k < lo ? lo : k;
                    k = k > hi ? hi : k;
                    ub[r + j] = v - k;
                    ob[r + j] = k * theta[j];
                }
            }
        }
    }
}

void running_sums(const float *restrict xs, const float *before, float *restrict out, float *last,
                  int64_t steps, int64_t n, int64_t t0, int32_t divide, int32_t threads) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * BLOCK;
        int64_t size = n - start < BLOCK ? n - start : BLOCK;
        float sum[BLOCK];
        for (int64_t i = 0; i < size; i++)
            sum[i] = before ? xs[start + i] + before[start + i] : xs[start + i];
        for (int64_t t = 0; t < steps; t++) {
            const float *restrict xb = xs + t * n + start;
            float *restrict ob = out + t * n + start;
            if (t > 0)
                for (int64_t i = 0; i < size; i++)
                    sum[i] = sum[i] + xb[i];
            if (divide) {
                float count = (float)(t0 + t + 1);
                for (int64_t i = 0; i < size; i++)
                    ob[i] = sum[i] / count;
            } else {
                for (int64_t i = 0; i < size; i++)
                    ob[i] = sum[i];
            }
        }
        if (last)
            for (int64_t i = 0; i < size; i++)
                last[start + i] = sum[i];
    }
}

void step_differences(float *y, const float *before, float *last, int64_t steps, int64_t n, int64_t t0,
                      int32_t divide, int32_t threads) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t start = b * BLOCK;
        int64_t size = n - start < BLOCK ? n - start : BLOCK;
        float prev[BLOCK];
        for (int64_t t = 0; t < steps; t++) {
            float *yb = y + t * n + start;
            float count = (float)(t0 + t + 1);
            for (int64_t i = 0; i < size; i++) {
                float z = divide ? yb[i] / count : yb[i] * count;
                if (t > 0)
                    yb[i] = z - prev[i];
                else
                    yb[i] = before ? z - before[start + i] : z;
                prev[i] = z;
            }
        }
        if (last)
            for (int64_t i = 0; i < size; i++)
                last[start + i] = prev[i];
    }
}
