/* Decoding on CPUs: matrix products, and whole transformer blocks for one token.
 *
 * 1. y = x @ W^T (* scale) (+ bias), x and y float32, W stored in tiles of TILE output
 * columns, each tile K x TILE contiguous, in one of five weight formats: float32, float16,
 * bfloat16, int8 (with one float32 scale per column), int4 (two codes per byte, with a
 * float32 scale and offset per column and group of GROUP rows of K: w = q scale + offset).
 *
 * Why: decoding one token multiplies one row by every weight matrix, so it is bound by
 * the speed at which the weights stream from memory. A tile is read front to back by one
 * thread, 32 (AVX-512), 16 (AVX2) or 8 (plain C) columns per step of K, into accumulators that stay
 * in registers; rows of x are taken four at a time, so a prefill reuses each tile from
 * the cache for every group of four rows. Narrow formats widen to float32 on load, so
 * every format computes in float32: the bytes shrink, the arithmetic stays exact.
 *
 * Built at run time by fastgpt/native_build.py with the system C compiler and
 * -march=native, so the vector width and the widening instructions are the CPU's own.
 * Threads: OpenMP, the runtime PyTorch itself uses (libgomp), so no second pool spins.
 *
 * 2. fastgpt_decode_blocks: every block of a GPT-2 for a few new tokens of each sequence of
 * a batch (a decode step, or a speculative verification), in one call and one OpenMP
 * parallel region: LayerNorm, the qkv product, the keys/values written into the cache, attention over
 * the cached positions (one token and head per thread at a time), the output projection
 * and residual, LayerNorm, fc + bias + GELU (tanh), the MLP projection and residual. A small model's token costs ~15 PyTorch calls per block from
 * Python, each a few microseconds of overhead against microseconds of work; here it costs
 * the arithmetic and a barrier per step. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The vector: VW floats, the CPU's register width (a wider generic vector would be split by
 * the compiler through memory). A tile is two vectors wide. */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX2__) && defined(__F16C__)
#define VW 8
#else
#define VW 4
#endif
#define VECTORS 2
#define TILE (VECTORS * VW)
#define ROWS 4 /* rows of x per pass over a tile: 4 x VECTORS accumulators */

typedef float vec __attribute__((vector_size(VW * 4)));

static inline vec load_f32(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store_f32(float *p, vec v) { memcpy(p, &v, sizeof v); }

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
#include <immintrin.h>
#endif

/* Widening loads: VW weights from memory -> VW floats. int4 (TILE / 2 bytes per step of K):
 * byte j holds column j in its low nibble and column j + TILE / 2 in its high one, so each
 * vector of the tile widens from one run of nibbles. */
#define GROUP 32
#if defined(__AVX512F__)
static inline vec from_ps(__m512 f) { vec v; memcpy(&v, &f, sizeof v); return v; }
static inline vec load_i8(const int8_t *p) {
    return from_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))));
}
static inline vec load_f16(const uint16_t *p) {
    return from_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)));
}
static inline vec load_bf16(const uint16_t *p) {
    __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return from_ps(_mm512_castsi512_ps(wide));
}
static inline void load_i4(const uint8_t *p, vec out[VECTORS]) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)p), mask = _mm_set1_epi8(0x0F);
    out[0] = from_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, mask))));
    out[1] = from_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask))));
}
#define HAVE_F16 1
#elif defined(__AVX2__) && defined(__F16C__)
static inline vec from_ps(__m256 f) { vec v; memcpy(&v, &f, sizeof v); return v; }
static inline vec load_i8(const int8_t *p) {
    return from_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))));
}
static inline vec load_f16(const uint16_t *p) { return from_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p))); }
static inline vec load_bf16(const uint16_t *p) {
    return from_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16)));
}
static inline void load_i4(const uint8_t *p, vec out[VECTORS]) {
    const __m128i bytes = _mm_loadl_epi64((const __m128i *)p), mask = _mm_set1_epi8(0x0F);
    out[0] = from_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(bytes, mask))));
    out[1] = from_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask))));
}
#define HAVE_F16 1
#else /* other CPUs: plain C, widened element by element (the compiler may vectorize it) */
static inline vec load_i8(const int8_t *p) {
    vec v; for (int i = 0; i < VW; i++) v[i] = (float)p[i]; return v;
}
static inline vec load_bf16(const uint16_t *p) {
    vec v; for (int i = 0; i < VW; i++) { uint32_t bits = (uint32_t)p[i] << 16; memcpy(&v[i], &bits, 4); } return v;
}
static inline void load_i4(const uint8_t *p, vec out[VECTORS]) {
    for (int i = 0; i < VW; i++) { out[0][i] = (float)(p[i] & 0x0F); out[1][i] = (float)(p[i] >> 4); }
}
#if defined(__FLT16_MAX__)
static inline vec load_f16(const uint16_t *p) {
    vec v; for (int i = 0; i < VW; i++) { _Float16 h; memcpy(&h, p + i, 2); v[i] = (float)h; } return v;
}
#define HAVE_F16 1
#endif
#endif

/* One tile times `rows` (1..ROWS, a constant after inlining) rows of x: out[r][0..TILE). */
#define TILE_PRODUCT(FORMAT, WEIGHT)                                                           \
static inline __attribute__((always_inline)) void tile_##FORMAT(                               \
        const int rows, const float *x, int64_t ldx, int64_t K, const WEIGHT *w,              \
        const float *params, float out[ROWS][TILE]) {                                          \
    (void)params;                                                                              \
    vec acc[ROWS][VECTORS];                                                                    \
    for (int r = 0; r < rows; r++)                                                             \
        for (int v = 0; v < VECTORS; v++) acc[r][v] = (vec){0};                                \
    for (int64_t k = 0; k < K; k++) {                                                          \
        vec wv[VECTORS];                                                                       \
        for (int v = 0; v < VECTORS; v++) wv[v] = load_##FORMAT(w + k * TILE + VW * v);        \
        for (int r = 0; r < rows; r++) {                                                       \
            float xv = x[r * ldx + k];                                                         \
            for (int v = 0; v < VECTORS; v++) acc[r][v] += xv * wv[v];                         \
        }                                                                                      \
    }                                                                                          \
    for (int r = 0; r < rows; r++)                                                             \
        for (int v = 0; v < VECTORS; v++) store_f32(out[r] + VW * v, acc[r][v]);    \
}

/* int4: each group of GROUP steps of K sums x q (and x) apart, then adds scale * that
 * + offset * sum(x), the group's scale and offset per column (params: K / GROUP groups of a
 * TILE-wide scale row then a TILE-wide offset row). K is a multiple of GROUP. */
static inline __attribute__((always_inline)) void tile_i4(
        const int rows, const float *x, int64_t ldx, int64_t K, const uint8_t *w,
        const float *params, float out[ROWS][TILE]) {
    vec acc[ROWS][VECTORS];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < VECTORS; v++) acc[r][v] = (vec){0};
    for (int64_t g = 0; g < K / GROUP; g++) {
        vec part[ROWS][VECTORS];
        float xsum[ROWS];
        for (int r = 0; r < rows; r++) {
            xsum[r] = 0.0f;
            for (int v = 0; v < VECTORS; v++) part[r][v] = (vec){0};
        }
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k++) {
            vec wv[VECTORS];
            load_i4(w + k * (TILE / 2), wv);
            for (int r = 0; r < rows; r++) {
                const float xv = x[r * ldx + k];
                xsum[r] += xv;
                for (int v = 0; v < VECTORS; v++) part[r][v] += xv * wv[v];
            }
        }
        const float *scale = params + g * 2 * TILE, *offset = scale + TILE;
        for (int v = 0; v < VECTORS; v++) {
            const vec sv = load_f32(scale + VW * v), ov = load_f32(offset + VW * v);
            for (int r = 0; r < rows; r++) acc[r][v] += sv * part[r][v] + ov * xsum[r];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < VECTORS; v++) store_f32(out[r] + VW * v, acc[r][v]);
}

static inline float gelu_tanh(float u) {
    return 0.5f * u * (1.0f + tanhf(0.7978845608028654f * (u + 0.044715f * u * u * u)));
}

/* y (M, N, row stride ldy) = x (M, K, row stride ldx) @ W^T, W packed as ceil(N / TILE)
 * tiles of K x TILE; scale (N) multiplies column n when given, bias (N) is added when given,
 * then GELU when `gelu`. Work items: (tile, block of BLOCK_ROWS rows), shared out by an
 * OpenMP `for` among the threads of the enclosing parallel region (one thread outside one). */
#define BLOCK_ROWS 64
#define PRODUCT(FORMAT, WEIGHT, GROUPED)                                                       \
static void gemm_##FORMAT(const float *x, int64_t M, int64_t ldx, int64_t K, const void *weights, \
                          int64_t N, const float *scale, const float *bias, float *y,        \
                          int64_t ldy, int gelu) {                                            \
    const WEIGHT *packed = (const WEIGHT *)weights;                                            \
    const int64_t tiles = (N + TILE - 1) / TILE, blocks = (M + BLOCK_ROWS - 1) / BLOCK_ROWS;  \
    _Pragma("omp for schedule(static)")                                                        \
    for (int64_t item = 0; item < tiles * blocks; item++) {                                    \
        const int64_t t = item / blocks, first = (item % blocks) * BLOCK_ROWS;                 \
        const int64_t last = first + BLOCK_ROWS < M ? first + BLOCK_ROWS : M;                  \
        const int64_t n0 = t * TILE, width = N - n0 < TILE ? N - n0 : TILE;                    \
        const WEIGHT *w = packed + t * K * (GROUPED ? TILE / 2 : TILE);                        \
        const float *params = GROUPED ? scale + t * (K / GROUP) * 2 * TILE : 0;               \
        for (int64_t m = first; m < last; m += ROWS) {                                         \
            float out[ROWS][TILE];                                                             \
            const int rows = last - m < ROWS ? (int)(last - m) : ROWS;                         \
            const float *xs = x + m * ldx;                                                     \
            switch (rows) {                                                                    \
                case 1: tile_##FORMAT(1, xs, ldx, K, w, params, out); break;                           \
                case 2: tile_##FORMAT(2, xs, ldx, K, w, params, out); break;                           \
                case 3: tile_##FORMAT(3, xs, ldx, K, w, params, out); break;                           \
                default: tile_##FORMAT(ROWS, xs, ldx, K, w, params, out);                              \
            }                                                                                  \
            for (int r = 0; r < rows; r++) {                                                   \
                float *yr = y + (m + r) * ldy + n0;                                            \
                for (int64_t j = 0; j < width; j++) {                                          \
                    float value = out[r][j];                                                   \
                    if (scale && !GROUPED) value *= scale[n0 + j];                             \
                    if (bias) value += bias[n0 + j];                                           \
                    yr[j] = gelu ? gelu_tanh(value) : value;                                   \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
void fastgpt_gemm_##FORMAT(const float *x, int64_t M, int64_t ldx, int64_t K,                  \
                           const WEIGHT *packed, int64_t N, const float *scale,               \
                           const float *bias, float *y, int64_t ldy, int threads) {          \
    _Pragma("omp parallel num_threads(threads)")                                               \
    gemm_##FORMAT(x, M, ldx, K, packed, N, scale, bias, y, ldy, 0);                            \
}

TILE_PRODUCT(f32, float)
TILE_PRODUCT(i8, int8_t)
PRODUCT(f32, float, 0)
PRODUCT(i8, int8_t, 0)
PRODUCT(i4, uint8_t, 1)

#if defined(__AVX512BF16__)
/* bf16 on CPUs with bf16 dot products (AVX512-BF16): the activations are rounded to bf16
 * too (as oneDNN's bf16 matmuls do) and each instruction multiplies and adds two steps of
 * K, twice the fp32 arithmetic rate: what prompts and batches need, which are compute
 * bound. Tiles hold pairs of K: (K / 2, TILE, 2), column j's weights for k = 2p and 2p + 1
 * side by side (K padded to even with a zero row). Every row count takes this path, so a
 * row's result never depends on the rows computed beside it. */
#define BF16_PAIRS 1
static inline __attribute__((always_inline)) void tile_bf16(
        const int rows, const uint16_t *x, int64_t ldx, int64_t pairs, const uint16_t *w,
        float out[ROWS][TILE]) {
    __m512 acc[ROWS][VECTORS];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < VECTORS; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512i wv[VECTORS];
        for (int v = 0; v < VECTORS; v++) wv[v] = _mm512_loadu_si512((const void *)(w + (p * TILE + VW * v) * 2));
        for (int r = 0; r < rows; r++) {
            uint32_t pair;
            memcpy(&pair, x + r * ldx + 2 * p, 4);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int v = 0; v < VECTORS; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv, (__m512bh)wv[v]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < VECTORS; v++) _mm512_storeu_ps(out[r] + VW * v, acc[r][v]);
}

/* x (M, K) float32 -> bf16 rows of length 2 * pairs (round to nearest even, a zero pad). */
static void rows_to_bf16(const float *x, int64_t M, int64_t ldx, int64_t K, int64_t pairs, uint16_t *out) {
    for (int64_t m = 0; m < M; m++) {
        uint16_t *row = out + m * 2 * pairs;
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + m * ldx + k));
            memcpy(row + k, &h, 32);
        }
        for (; k < K; k++) {
            __m128bh h = _mm_cvtneps_pbh(_mm_set1_ps(x[m * ldx + k]));
            memcpy(row + k, &h, 2);
        }
        if (K % 2) row[K] = 0;
    }
}

static void gemm_bf16(const float *x, int64_t M, int64_t ldx, int64_t K, const void *weights, int64_t N,
                      const float *scale, const float *bias, float *y, int64_t ldy, int gelu) {
    (void)scale;
    const uint16_t *packed = (const uint16_t *)weights;
    const int64_t pairs = (K + 1) / 2, tiles = (N + TILE - 1) / TILE, blocks = (M + BLOCK_ROWS - 1) / BLOCK_ROWS;
    /* each thread rounds the rows it reads into its own buffer: no state shared between calls */
    uint16_t *xb = (uint16_t *)malloc((size_t)(M * 2 * pairs) * sizeof(uint16_t));
    if (!xb) abort();
    rows_to_bf16(x, M, ldx, K, pairs, xb);
    #pragma omp for schedule(static)
    for (int64_t item = 0; item < tiles * blocks; item++) {
        const int64_t t = item / blocks, first = (item % blocks) * BLOCK_ROWS;
        const int64_t last = first + BLOCK_ROWS < M ? first + BLOCK_ROWS : M;
        const int64_t n0 = t * TILE, width = N - n0 < TILE ? N - n0 : TILE;
        const uint16_t *w = packed + t * pairs * TILE * 2;
        for (int64_t m = first; m < last; m += ROWS) {
            float out[ROWS][TILE];
            const int rows = last - m < ROWS ? (int)(last - m) : ROWS;
            const uint16_t *xs = xb + m * 2 * pairs;
            switch (rows) {
                case 1: tile_bf16(1, xs, 2 * pairs, pairs, w, out); break;
                case 2: tile_bf16(2, xs, 2 * pairs, pairs, w, out); break;
                case 3: tile_bf16(3, xs, 2 * pairs, pairs, w, out); break;
                default: tile_bf16(ROWS, xs, 2 * pairs, pairs, w, out);
            }
            for (int r = 0; r < rows; r++) {
                float *yr = y + (m + r) * ldy + n0;
                for (int64_t j = 0; j < width; j++) {
                    float value = out[r][j];
                    if (bias) value += bias[n0 + j];
                    yr[j] = gelu ? gelu_tanh(value) : value;
                }
            }
        }
    }
    free(xb);
}

void fastgpt_gemm_bf16(const float *x, int64_t M, int64_t ldx, int64_t K, const uint16_t *packed, int64_t N,
                       const float *scale, const float *bias, float *y, int64_t ldy, int threads) {
    #pragma omp parallel num_threads(threads)
    gemm_bf16(x, M, ldx, K, packed, N, scale, bias, y, ldy, 0);
}
#else
#define BF16_PAIRS 0
TILE_PRODUCT(bf16, uint16_t)
PRODUCT(bf16, uint16_t, 0)
#endif
#if defined(HAVE_F16)
TILE_PRODUCT(f16, uint16_t)
PRODUCT(f16, uint16_t, 0)
#endif

/* The tile width the packing must use (it depends on the instructions compiled in). */
int fastgpt_tile_width(void) { return TILE; }

/* Floats per vector: 16 (AVX-512), 8 (AVX2 + F16C), 4 (plain C, whose widening loads are
 * scalar code: fastgpt uses that build only when asked, see native_linear.available). */
int fastgpt_vector_width(void) { return VW; }

/* 1 when bf16 tiles hold pairs of K and bf16 products round the activations to bf16 (see gemm_bf16). */
int fastgpt_bf16_pairs(void) { return BF16_PAIRS; }

/* ---------------------------------------------------------------- whole blocks, one token */
typedef void (*gemm_fn)(const float *, int64_t, int64_t, int64_t, const void *, int64_t,
                        const float *, const float *, float *, int64_t, int);

/* One block's parameters. Matrices: 0 qkv (C -> 3C), 1 attention output (C -> C),
 * 2 MLP fc (C -> 4C), 3 MLP projection (4C -> C), all in the same format. */
typedef struct {
    const float *ln1_weight, *ln1_bias, *ln2_weight, *ln2_bias;
    const void *matrix[4];
    const float *scale[4];  /* per output column (int8), per group and column (int4), else NULL */
    const float *bias[4];   /* or NULL */
} fastgpt_block;

/* Called by one thread: out = LayerNorm(x) over C values (two passes, in double). */
static void layer_norm(const float *x, int64_t C, const float *weight, const float *bias,
                       float eps, float *out) {
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < C; i++) mean += x[i];
    mean /= (double)C;
    for (int64_t i = 0; i < C; i++) { double d = x[i] - mean; var += d * d; }
    const float inv = (float)(1.0 / sqrt(var / (double)C + eps));
    for (int64_t i = 0; i < C; i++) out[i] = ((float)(x[i] - mean)) * inv * weight[i] + bias[i];
}

/* dot(a, b) over n values, VW at a time. */
static inline float dot(const float *a, const float *b, int64_t n) {
    vec acc = {0};
    int64_t i = 0;
    for (; i + VW <= n; i += VW) acc += load_f32(a + i) * load_f32(b + i);
    float total = 0.0f;
    for (int v = 0; v < VW; v++) total += acc[v];
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* y += alpha x over n values. */
static inline void axpy(float alpha, const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + VW <= n; i += VW) store_f32(y + i, load_f32(y + i) + alpha * load_f32(x + i));
    for (; i < n; i++) y[i] += alpha * x[i];
}

/* One head of attention for the token at `pos`, its key and value already in the cache:
 * out = softmax(q . K[0..pos] / sqrt(D)) V[0..pos]. k_cache, v_cache: this head's (S, D). */
static void attend(const float *q, const float *k_cache, const float *v_cache, int64_t pos, int64_t D,
                   float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)D);
    float top = -INFINITY;
    for (int64_t j = 0; j <= pos; j++) {
        scores[j] = dot(q, k_cache + j * D, D) * scale;
        top = scores[j] > top ? scores[j] : top;
    }
    float total = 0.0f;
    for (int64_t j = 0; j <= pos; j++) { scores[j] = expf(scores[j] - top); total += scores[j]; }
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t j = 0; j <= pos; j++) axpy(scores[j] / total, v_cache + j * D, out, D);
}

/* x (B T, C): T new tokens of each of B sequences, sequence b's at positions
 * positions[b] .. positions[b] + T - 1, embedded, in; the last block's output (the residual
 * stream) out. Token t of sequence b attends to positions 0 .. positions[b] + t of its own
 * cache (earlier entries and its new tokens before it). k_cache, v_cache: (n_layer, B, H, S,
 * D) with the given strides between layers, sequences and heads (positions D floats apart),
 * positions[b] + T <= S. `format`: 0 f32, 1 i8, 2 bf16, 3 f16, 4 i4. work: at least
 * 10 B T C + threads * span floats, span = max_b positions[b] + T. Returns 0, or -1 for an
 * unknown format. Each row's result depends on its own sequence only: the products treat
 * rows alike whatever their number, and everything else is per row. */
int fastgpt_decode_blocks(int format, int64_t n_layer, const fastgpt_block *blocks, int64_t C,
                          int64_t H, int64_t B, int64_t T, const int64_t *positions,
                          float *k_cache, float *v_cache, int64_t layer_stride, int64_t batch_stride,
                          int64_t head_stride, float eps, float *x, float *work, int threads) {
    gemm_fn gemm;
    switch (format) {
        case 0: gemm = gemm_f32; break;
        case 1: gemm = gemm_i8; break;
        case 2: gemm = gemm_bf16; break;
        case 4: gemm = gemm_i4; break;
#if defined(HAVE_F16)
        case 3: gemm = gemm_f16; break;
#endif
        default: return -1;
    }
    const int64_t D = C / H, R = B * T;
    int64_t span = 0;
    for (int64_t b = 0; b < B; b++) span = positions[b] + T > span ? positions[b] + T : span;
    float *normed = work, *qkv = normed + R * C, *heads = qkv + 3 * R * C, *delta = heads + R * C;
    float *hidden = delta + R * C, *scratch = hidden + 4 * R * C;
    #pragma omp parallel num_threads(threads)
    {
        float *scores = scratch + (int64_t)omp_get_thread_num() * span;
        for (int64_t l = 0; l < n_layer; l++) {
            const fastgpt_block *blk = blocks + l;
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++)
                layer_norm(x + r * C, C, blk->ln1_weight, blk->ln1_bias, eps, normed + r * C);
            gemm(normed, R, C, C, blk->matrix[0], 3 * C, blk->scale[0], blk->bias[0], qkv, 3 * C, 0);
            #pragma omp for schedule(static)
            for (int64_t item = 0; item < R * H; item++) {  /* every new key and value into the cache */
                const int64_t r = item / H, h = item % H, b = r / T, pos = positions[b] + r % T;
                const int64_t at = l * layer_stride + b * batch_stride + h * head_stride + pos * D;
                memcpy(k_cache + at, qkv + r * 3 * C + C + h * D, D * sizeof(float));
                memcpy(v_cache + at, qkv + r * 3 * C + 2 * C + h * D, D * sizeof(float));
            }
            #pragma omp for schedule(static)
            for (int64_t item = 0; item < R * H; item++) {
                const int64_t r = item / H, h = item % H, b = r / T, pos = positions[b] + r % T;
                const int64_t at = l * layer_stride + b * batch_stride + h * head_stride;
                attend(qkv + r * 3 * C + h * D, k_cache + at, v_cache + at, pos, D, scores, heads + r * C + h * D);
            }
            gemm(heads, R, C, C, blk->matrix[1], C, blk->scale[1], blk->bias[1], delta, C, 0);
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++) {
                for (int64_t i = 0; i < C; i++) x[r * C + i] += delta[r * C + i];
                layer_norm(x + r * C, C, blk->ln2_weight, blk->ln2_bias, eps, normed + r * C);
            }
            gemm(normed, R, C, C, blk->matrix[2], 4 * C, blk->scale[2], blk->bias[2], hidden, 4 * C, 1);
            gemm(hidden, R, 4 * C, 4 * C, blk->matrix[3], C, blk->scale[3], blk->bias[3], delta, C, 0);
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < R; r++)
                for (int64_t i = 0; i < C; i++) x[r * C + i] += delta[r * C + i];
        }
    }
    return 0;
}
