/* Matrix products for decoding on CPUs: y = x @ W^T (* scale) (+ bias), x and y float32,
 * W stored in tiles of TILE output columns, each tile K x TILE contiguous, in one of four
 * weight formats: float32, float16, bfloat16, int8 (with one float32 scale per column).
 *
 * Why: decoding one token multiplies one row by every weight matrix, so it is bound by
 * the speed at which the weights stream from memory. A tile is read front to back by one
 * thread, 32 (AVX-512) or 16 (AVX2) columns per step of K, into accumulators that stay
 * in registers; rows of x are taken four at a time, so a prefill reuses each tile from
 * the cache for every group of four rows. Narrow formats widen to float32 on load, so
 * every format computes in float32: the bytes shrink, the arithmetic stays exact.
 *
 * Built at run time by fastgpt/native_build.py with the system C compiler and
 * -march=native, so the vector width and the widening instructions are the CPU's own.
 * Threads: OpenMP, the runtime PyTorch itself uses (libgomp), so no second pool spins. */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define TILE 32
#else
#define TILE 16
#endif
#define VECTORS (TILE / 16)
#define ROWS 4 /* rows of x per pass over a tile: 4 x VECTORS accumulators */

typedef float v16 __attribute__((vector_size(64), aligned(4)));

static inline v16 load_f32(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
static inline v16 from_m512(__m512 f) { v16 v; memcpy(&v, &f, sizeof v); return v; }
static inline v16 load_i8(const int8_t *p) {
    return from_m512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))));
}
static inline v16 load_f16(const uint16_t *p) {
    return from_m512(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)));
}
static inline v16 load_bf16(const uint16_t *p) {
    __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return from_m512(_mm512_castsi512_ps(wide));
}
#elif defined(__AVX2__) && defined(__F16C__)
static inline v16 from_halves(__m256 lo, __m256 hi) {
    v16 v; memcpy(&v, &lo, 32); memcpy((char *)&v + 32, &hi, 32); return v;
}
static inline __m256 i8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline v16 load_i8(const int8_t *p) { return from_halves(i8x8(p), i8x8(p + 8)); }
static inline v16 load_f16(const uint16_t *p) {
    return from_halves(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
                       _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8))));
}
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline v16 load_bf16(const uint16_t *p) { return from_halves(bf16x8(p), bf16x8(p + 8)); }
#else /* other CPUs: plain C, widened element by element (the compiler may vectorize it) */
static inline v16 load_i8(const int8_t *p) {
    v16 v; for (int i = 0; i < 16; i++) v[i] = (float)p[i]; return v;
}
static inline v16 load_bf16(const uint16_t *p) {
    v16 v; for (int i = 0; i < 16; i++) { uint32_t bits = (uint32_t)p[i] << 16; memcpy(&v[i], &bits, 4); } return v;
}
#if defined(__FLT16_MAX__)
static inline v16 load_f16(const uint16_t *p) {
    v16 v; for (int i = 0; i < 16; i++) { _Float16 h; memcpy(&h, p + i, 2); v[i] = (float)h; } return v;
}
#define HAVE_F16 1
#endif
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
#define HAVE_F16 1
#endif

/* One tile times `rows` (1..ROWS, a constant after inlining) rows of x: out[r][0..TILE). */
#define TILE_PRODUCT(FORMAT, WEIGHT)                                                           \
static inline __attribute__((always_inline)) void tile_##FORMAT(                               \
        const int rows, const float *x, int64_t ldx, int64_t K, const WEIGHT *w,              \
        float out[ROWS][TILE]) {                                                               \
    v16 acc[ROWS][VECTORS];                                                                    \
    for (int r = 0; r < rows; r++)                                                             \
        for (int v = 0; v < VECTORS; v++) acc[r][v] = (v16){0};                                \
    for (int64_t k = 0; k < K; k++) {                                                          \
        v16 wv[VECTORS];                                                                       \
        for (int v = 0; v < VECTORS; v++) wv[v] = load_##FORMAT(w + k * TILE + 16 * v);        \
        for (int r = 0; r < rows; r++) {                                                       \
            float xv = x[r * ldx + k];                                                         \
            for (int v = 0; v < VECTORS; v++) acc[r][v] += xv * wv[v];                         \
        }                                                                                      \
    }                                                                                          \
    for (int r = 0; r < rows; r++)                                                             \
        for (int v = 0; v < VECTORS; v++) memcpy(out[r] + 16 * v, &acc[r][v], sizeof(v16));    \
}

/* y (M, N, row stride ldy) = x (M, K, row stride ldx) @ W^T, W packed as ceil(N / TILE)
 * tiles of K x TILE; scale (N) multiplies column n when given, bias (N) is added when given.
 * Work items: (tile, block of BLOCK_ROWS rows), spread over `threads` OpenMP threads. */
#define BLOCK_ROWS 64
#define PRODUCT(FORMAT, WEIGHT)                                                                \
TILE_PRODUCT(FORMAT, WEIGHT)                                                                   \
void fastgpt_gemm_##FORMAT(const float *x, int64_t M, int64_t ldx, int64_t K,                  \
                           const WEIGHT *packed, int64_t N, const float *scale,               \
                           const float *bias, float *y, int64_t ldy, int threads) {          \
    const int64_t tiles = (N + TILE - 1) / TILE, blocks = (M + BLOCK_ROWS - 1) / BLOCK_ROWS;  \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                          \
    for (int64_t item = 0; item < tiles * blocks; item++) {                                    \
        const int64_t t = item / blocks, first = (item % blocks) * BLOCK_ROWS;                 \
        const int64_t last = first + BLOCK_ROWS < M ? first + BLOCK_ROWS : M;                  \
        const int64_t n0 = t * TILE, width = N - n0 < TILE ? N - n0 : TILE;                    \
        const WEIGHT *w = packed + t * K * TILE;                                               \
        for (int64_t m = first; m < last; m += ROWS) {                                         \
            float out[ROWS][TILE];                                                             \
            const int rows = last - m < ROWS ? (int)(last - m) : ROWS;                         \
            const float *xs = x + m * ldx;                                                     \
            switch (rows) {                                                                    \
                case 1: tile_##FORMAT(1, xs, ldx, K, w, out); break;                           \
                case 2: tile_##FORMAT(2, xs, ldx, K, w, out); break;                           \
                case 3: tile_##FORMAT(3, xs, ldx, K, w, out); break;                           \
                default: tile_##FORMAT(ROWS, xs, ldx, K, w, out);                              \
            }                                                                                  \
            for (int r = 0; r < rows; r++) {                                                   \
                float *yr = y + (m + r) * ldy + n0;                                            \
                for (int64_t j = 0; j < width; j++) {                                          \
                    float value = out[r][j];                                                   \
                    if (scale) value *= scale[n0 + j];                                         \
                    if (bias) value += bias[n0 + j];                                           \
                    yr[j] = value;                                                             \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

PRODUCT(f32, float)
PRODUCT(i8, int8_t)
PRODUCT(bf16, uint16_t)
#if defined(HAVE_F16)
PRODUCT(f16, uint16_t)
#endif

/* The tile width the packing must use (it depends on the instructions compiled in). */
int fastgpt_tile_width(void) { return TILE; }
