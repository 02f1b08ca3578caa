/* slimfx's AVX2 int8 linear for 7-bit codes: unsigned activation codes in [0, 127] times signed weight codes in
 * [-63, 63], int32 accumulation, fp32 epilogue.
 *
 * Why a kernel of our own: on AVX2 (no VNNI) every int8 GEMM (MLAS, fbgemm, oneDNN) multiplies with
 * vpmaddubsw (u8 x s8 -> int16 pair sums) and widens each pair sum with vpmaddwd before adding it to int32: two
 * multiplier-port instructions per 32 products, the port that bounds them all. With 7-bit codes on both sides a
 * pair sum is at most 2 * 127 * 63 = 16002, so two of them add in int16 without overflow (32004 < 32767) and
 * one vpmaddwd widens 64 products: three multiplier instructions per 64 products instead of four. Measured on an
 * AVX2 EPYC: 1.25x MLAS's u8 x s8 GEMM (onnxruntime's), which itself is 1.1-1.2x fbgemm's.
 *
 * Layout: activation codes row-major [M, Kp] (Kp = K rounded up to 8; the padding's weights are 0), weights
 * packed once into panels of 16 output columns: per group of 4 k, 64 bytes = [cols 0-7 x 4 k][cols 8-15 x 4 k].
 * Compiled at first use by slimfx.kernels.native (gcc -O3 -mavx2 -fopenmp); no -ffast-math: the quantizer's
 * fp32 division / product and round-half-even must be the specification's bit for bit.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 4          /* rows per micro-tile */
#define NR 16         /* columns per panel (two ymm of int32) */
#ifndef KC
#define KC 1024       /* k per cache block (multiple of 8): a 4 x KC activation block stays in L1 */
#endif
#ifndef MC
#define MC 64         /* rows per thread tile */
#endif
#ifndef NCP_MAX
#define NCP_MAX 16    /* panels per thread tile: 256 columns x KC bytes of weights stay in L2 */
#endif

int slimfx_abi_version(void) { return 1; }

static int64_t panels_of(int64_t n) { return (n + NR - 1) / NR; }
static int64_t kpad_of(int64_t k) { return (k + 7) / 8 * 8; }

int64_t slimfx_packed_weight_bytes(int64_t n, int64_t k) { return panels_of(n) * kpad_of(k) * NR; }

/* w: int8 [n, k] row-major (codes in [-63, 63]) -> out (slimfx_packed_weight_bytes bytes). */
void slimfx_pack_weights(const int8_t *w, int64_t n, int64_t k, int8_t *out) {
  int64_t kp = kpad_of(k);
  memset(out, 0, (size_t)slimfx_packed_weight_bytes(n, k));
  for (int64_t j = 0; j < n; j++) {
    int8_t *panel = out + (j / NR) * kp * NR;
    int64_t c = j % NR;
    for (int64_t i = 0; i < k; i++)
      panel[(i / 4) * 64 + (c / 8) * 32 + (c % 8) * 4 + (i % 4)] = w[j * k + i];
  }
}

/* codes[i, j] = clamp(round_half_even(x[i, j] (/ or *) s) + zp, 0, qmax) for j < k, 0 for k <= j < kp. A NaN
 * input gets code 0. */
void slimfx_quantize_u7(const float *x, int64_t m, int64_t k, int64_t ldx, float s, int divide, int zp, int qmax,
                        uint8_t *codes, int64_t kp, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m * k >= 65536)
  for (int64_t i = 0; i < m; i++) {
    const float *xr = x + i * ldx;
    uint8_t *o = codes + i * kp;
    const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps((float)zp), lo = _mm256_setzero_ps(),
                 hi = _mm256_set1_ps((float)qmax);
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
      __m256 a = _mm256_loadu_ps(xr + j), b = _mm256_loadu_ps(xr + j + 8);
      a = divide ? _mm256_div_ps(a, sv) : _mm256_mul_ps(a, sv);
      b = divide ? _mm256_div_ps(b, sv) : _mm256_mul_ps(b, sv);
      a = _mm256_add_ps(_mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zv);
      b = _mm256_add_ps(_mm256_round_ps(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zv);
      a = _mm256_min_ps(_mm256_max_ps(a, lo), hi); /* max(NaN, 0) is 0 */
      b = _mm256_min_ps(_mm256_max_ps(b, lo), hi);
      __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
      p = _mm256_permute4x64_epi64(p, 0xD8);
      _mm_storeu_si128((__m128i *)(o + j),
                       _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
    }
    for (; j < k; j++) {
      float v = divide ? xr[j] / s : xr[j] * s;
      v = nearbyintf(v) + (float)zp;
      o[j] = (uint8_t)(!(v >= 0.0f) ? 0.0f : (v > (float)qmax ? (float)qmax : v));
    }
    for (; j < kp; j++) o[j] = 0;
  }
}

typedef struct {
  const int32_t *colsum; /* sum_k w[n, k], per output column */
  const float *w_scale;
  const float *bias;     /* or NULL */
  float a_scale;
  int32_t zp;
  float *out;
  int64_t ldo;
  int64_t n;
} epilogue_t;

/* acc[MR x NR] (+)= A[rows x kc] * B-panel; on the last k block, out = (acc - zp * colsum) * a_scale * w_scale +
 * bias for the panel's columns [col0, col0 + 16) that exist. */
static inline void micro_tile(const uint8_t *a, int64_t lda, int rows, const int8_t *b, int64_t kc, int32_t *acc,
                              int first, int last, const epilogue_t *ep, int64_t row0, int64_t col0) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00;
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t *a0 = a, *a1 = rows > 1 ? a + lda : a, *a2 = rows > 2 ? a + 2 * lda : a,
                *a3 = rows > 3 ? a + 3 * lda : a;
  for (int64_t k = 0; k < kc; k += 8) {
    /* the weights as memory operands of vpmaddubsw (re-read from L1 per row) free four registers: the eight
     * accumulators then never spill (measured 2-3% faster than holding the weights in registers) */
#define B_AT(off) _mm256_loadu_si256((const __m256i *)(b + (off)))
#define SLIMFX_ROW(ap, cl, ch)                                                                       \
  {                                                                                                 \
    int32_t w0, w1;                                                                                 \
    memcpy(&w0, ap + k, 4);                                                                         \
    memcpy(&w1, ap + k + 4, 4);                                                                     \
    const __m256i x0 = _mm256_set1_epi32(w0), x1 = _mm256_set1_epi32(w1);                           \
    __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(x0, B_AT(0)), _mm256_maddubs_epi16(x1, B_AT(64))); \
    cl = _mm256_add_epi32(cl, _mm256_madd_epi16(t, ones));                                          \
    t = _mm256_add_epi16(_mm256_maddubs_epi16(x0, B_AT(32)), _mm256_maddubs_epi16(x1, B_AT(96)));   \
    ch = _mm256_add_epi32(ch, _mm256_madd_epi16(t, ones));                                          \
  }
    SLIMFX_ROW(a0, c00, c01)
    SLIMFX_ROW(a1, c10, c11)
    SLIMFX_ROW(a2, c20, c21)
    SLIMFX_ROW(a3, c30, c31)
#undef SLIMFX_ROW
#undef B_AT
    b += 128;
  }
  __m256i cs[2 * MR] = {c00, c01, c10, c11, c20, c21, c30, c31};
  if (!first)
    for (int r = 0; r < rows; r++)
      for (int h = 0; h < 2; h++)
        cs[2 * r + h] = _mm256_add_epi32(cs[2 * r + h], _mm256_loadu_si256((const __m256i *)(acc + r * NR + 8 * h)));
  if (!last) {
    for (int r = 0; r < rows; r++)
      for (int h = 0; h < 2; h++) _mm256_storeu_si256((__m256i *)(acc + r * NR + 8 * h), cs[2 * r + h]);
    return;
  }
  const int64_t cols = ep->n - col0 < NR ? ep->n - col0 : NR;
  int32_t cs_pad[NR];
  float ws_pad[NR], b_pad[NR];
  for (int c = 0; c < NR; c++) {
    cs_pad[c] = c < cols ? ep->colsum[col0 + c] : 0;
    ws_pad[c] = c < cols ? ep->w_scale[col0 + c] : 0.0f;
    b_pad[c] = (c < cols && ep->bias) ? ep->bias[col0 + c] : 0.0f;
  }
  const __m256i zpv = _mm256_set1_epi32(ep->zp);
  const __m256 asv = _mm256_set1_ps(ep->a_scale);
  for (int h = 0; h < 2; h++) {
    const __m256i corr = _mm256_mullo_epi32(zpv, _mm256_loadu_si256((const __m256i *)(cs_pad + 8 * h)));
    const __m256 scale = _mm256_mul_ps(asv, _mm256_loadu_ps(ws_pad + 8 * h));
    const __m256 bv = _mm256_loadu_ps(b_pad + 8 * h);
    const int64_t left = cols - 8 * h;
    if (left <= 0) break;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int r = 0; r < rows; r++) {
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(cs[2 * r + h], corr)), scale);
      if (ep->bias) y = _mm256_add_ps(y, bv);
      float *o = ep->out + (row0 + r) * ep->ldo + col0 + 8 * h;
      if (left >= 8)
        _mm256_storeu_ps(o, y);
      else
        _mm256_maskstore_ps(o, mask, y);
    }
  }
}

/* out[m, n] (row stride ldo) = (codes @ w^T - zp * colsum) * a_scale * w_scale + bias, with codes [m, kp] from
 * slimfx_quantize_u7 and w packed by slimfx_pack_weights. Threads split the output into row x column tiles. */
void slimfx_linear_u7s7(const uint8_t *codes, int64_t m, int64_t kp, const int8_t *packed, int64_t n,
                        const int32_t *colsum, int zp, float a_scale, const float *w_scale, const float *bias,
                        float *out, int64_t ldo, int nthreads) {
  const epilogue_t ep = {colsum, w_scale, bias, a_scale, zp, out, ldo, n};
  const int64_t np = panels_of(n), mt = (m + MC - 1) / MC, nkb = (kp + KC - 1) / KC;
  const int64_t want = 2 * (int64_t)nthreads, per_row = (want + mt - 1) / mt;
  int64_t ncp = (np + per_row - 1) / per_row;
  ncp = ncp < 1 ? 1 : (ncp > NCP_MAX ? NCP_MAX : ncp);
  const int64_t nt = (np + ncp - 1) / ncp, tiles = mt * nt;
  const int parallel = nthreads > 1 && tiles > 1 && m * n * kp >= (1 << 20);
#pragma omp parallel num_threads(nthreads) if (parallel)
  {
    int32_t *acc = nkb > 1 ? (int32_t *)malloc((size_t)MC * ncp * NR * sizeof(int32_t)) : NULL;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
      const int64_t r0 = (t / nt) * MC, r1 = r0 + MC < m ? r0 + MC : m;
      const int64_t p0 = (t % nt) * ncp, p1 = p0 + ncp < np ? p0 + ncp : np;
      for (int64_t kb = 0; kb < nkb; kb++) {
        const int64_t k0 = kb * KC, kc = kp - k0 < KC ? kp - k0 : KC;
        for (int64_t r = r0; r < r1; r += MR) {
          const int rows = (int)(r1 - r < MR ? r1 - r : MR);
          for (int64_t p = p0; p < p1; p++) {
            int32_t *tile_acc = acc ? acc + ((r - r0) * ncp + (p - p0) * MR) * NR : NULL;
            micro_tile(codes + r * kp + k0, kp, rows, packed + p * kp * NR + k0 * NR, kc, tile_acc, kb == 0,
                       kb == nkb - 1, &ep, r, p * NR);
          }
        }
      }
    }
    free(acc);
  }
}
