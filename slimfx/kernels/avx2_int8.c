/* slimfx's AVX2 int8 linear and conv: unsigned activation codes times signed weight codes, int32 accumulation,
 * fp32 epilogue.
 *
 * Why a kernel of our own: on AVX2 (no VNNI) every int8 GEMM (MLAS, fbgemm, oneDNN) multiplies with
 * vpmaddubsw (u8 x s8 -> int16 pair sums) and widens each pair sum with vpmaddwd before adding it to int32: two
 * multiplier-port instructions per 32 products, the port that bounds them all. With 7-bit codes on both sides a
 * pair sum is at most 2 * 127 * 63 = 16002, so two of them add in int16 without overflow (32004 < 32767) and
 * one vpmaddwd widens 64 products: three multiplier instructions per 64 products instead of four. Measured on an
 * AVX2 EPYC: 1.25x MLAS's u8 x s8 GEMM (onnxruntime's), which itself is 1.1-1.2x fbgemm's. That is the "narrow"
 * path (codes <= 127, |w| <= 64). The "wide" path widens every pair sum (as MLAS does) and is exact whenever one
 * pair sum fits int16: 8-bit codes with |w| <= 64 (255 * 64 * 2 = 32640) or 7-bit codes with 8-bit weights
 * (127 * 128 * 2 = 32512); it runs the modes the narrow one cannot (per-token, ONNX's 8-bit dynamic codes) in the
 * same single parallel region. The "split" path makes 8-bit codes x 8-bit weights exact too: each weight is
 * split into nibbles, w = 16 * h + l (h = w >> 4 in [-8, 7], l = w & 15 in [0, 15]); one vpmaddubsw of the codes
 * (x0, x1, x0, x1) with (l0, l1, h0, h1) gives the l and h pair sums in neighbouring int16 lanes (at most 7650 and
 * 4080 in size), four of them add in int16 and one vpmaddwd with (1, 16) widens them to l + 16 h: five
 * multiplier instructions per 64 products (fp32 needs eight FMAs), on codes duplicated pairwise in memory.
 *
 * Layout: activation codes row-major [M, Kp] (Kp = K rounded up to 8; the padding's weights are 0), weights
 * packed once into panels of 16 output columns: per group of 4 k, 64 bytes = [cols 0-7 x 4 k][cols 8-15 x 4 k]
 * (the split path: twice that, see slimfx_pack_weights_split). The int32 accumulator holds sum_k (q - z) * w
 * exactly while it fits (partial sums may wrap, the zero-point correction undoes it); the caller refuses fan-ins
 * that could exceed it.
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

int slimfx_abi_version(void) { return 7; }

static int64_t panels_of(int64_t n) { return (n + NR - 1) / NR; }
static int64_t kpad_of(int64_t k) { return (k + 7) / 8 * 8; }

/* Bytes of the packed weight: split (nibble) packing takes twice the plain one. */
int64_t slimfx_packed_weight_bytes(int64_t n, int64_t k, int split) {
  return panels_of(n) * kpad_of(k) * NR * (split ? 2 : 1);
}

/* w: int8 [n, k] row-major -> out (slimfx_packed_weight_bytes(n, k, 0) bytes), for the narrow and wide paths. */
void slimfx_pack_weights(const int8_t *w, int64_t n, int64_t k, int8_t *out) {
  int64_t kp = kpad_of(k);
  memset(out, 0, (size_t)slimfx_packed_weight_bytes(n, k, 0));
  for (int64_t j = 0; j < n; j++) {
    int8_t *panel = out + (j / NR) * kp * NR;
    int64_t c = j % NR;
    for (int64_t i = 0; i < k; i++)
      panel[(i / 4) * 64 + (c / 8) * 32 + (c % 8) * 4 + (i % 4)] = w[j * k + i];
  }
}

/* Split packing: panels of 16 columns; per pair of k, 64 bytes = [cols 0-7 x (l0, l1, h0, h1)][cols 8-15 x ...]
 * with w = 16 * h + l, h = w >> 4, l = w & 15. */
void slimfx_pack_weights_split(const int8_t *w, int64_t n, int64_t k, int8_t *out) {
  int64_t kp = kpad_of(k);
  memset(out, 0, (size_t)slimfx_packed_weight_bytes(n, k, 1));
  for (int64_t j = 0; j < n; j++) {
    int8_t *panel = out + (j / NR) * kp * NR * 2;
    int64_t c = j % NR;
    for (int64_t i = 0; i < k; i++) {
      const int v = w[j * k + i];
      int8_t *slot = panel + (i / 2) * 64 + (c / 8) * 32 + (c % 8) * 4 + (i % 2);
      slot[0] = (int8_t)(v & 15);
      slot[2] = (int8_t)(v >> 4); /* arithmetic shift: floor(v / 16) */
    }
  }
}

/* codes2[i] = codes[i] with every pair of k duplicated, (c0, c1, c0, c1), the split path's operand layout. */
static void duplicate_pairs(const uint8_t *codes, int64_t m, int64_t kp, uint8_t *codes2) {
#pragma omp for schedule(static)
  for (int64_t i = 0; i < m; i++) {
    const uint8_t *src = codes + i * kp;
    uint8_t *dst = codes2 + i * 2 * kp;
    int64_t j = 0;
    for (; j + 16 <= kp; j += 16) {
      const __m128i v = _mm_loadu_si128((const __m128i *)(src + j));
      _mm_storeu_si128((__m128i *)(dst + 2 * j), _mm_unpacklo_epi16(v, v));
      _mm_storeu_si128((__m128i *)(dst + 2 * j + 16), _mm_unpackhi_epi16(v, v));
    }
    for (; j < kp; j += 2) {
      dst[2 * j] = dst[2 * j + 2] = src[j];
      dst[2 * j + 1] = dst[2 * j + 3] = src[j + 1];
    }
  }
}

/* codes[i, j] = clamp(round_half_even(x[i, j] (/ or *) s_i) + zp, qmin, qmax) for j < k, 0 for k <= j < kp, with
 * s_i = row_s[i] when row_s is given, else s. A NaN input gets code qmin. Rows are shared among the threads of
 * the enclosing parallel region (orphaned omp for). */
static void quantize_rows(const float *x, int64_t m, int64_t k, int64_t ldx, float s, const float *row_s, int divide,
                          int zp, int qmin, int qmax, uint8_t *codes, int64_t kp) {
#pragma omp for schedule(static)
  for (int64_t i = 0; i < m; i++) {
    const float *xr = x + i * ldx;
    uint8_t *o = codes + i * kp;
    if (row_s) s = row_s[i];
    const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps((float)zp), lo = _mm256_set1_ps((float)qmin),
                 hi = _mm256_set1_ps((float)qmax);
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
      __m256 a = _mm256_loadu_ps(xr + j), b = _mm256_loadu_ps(xr + j + 8);
      a = divide ? _mm256_div_ps(a, sv) : _mm256_mul_ps(a, sv);
      b = divide ? _mm256_div_ps(b, sv) : _mm256_mul_ps(b, sv);
      a = _mm256_add_ps(_mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zv);
      b = _mm256_add_ps(_mm256_round_ps(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zv);
      a = _mm256_min_ps(_mm256_max_ps(a, lo), hi); /* max(NaN, qmin) is qmin */
      b = _mm256_min_ps(_mm256_max_ps(b, lo), hi);
      __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
      p = _mm256_permute4x64_epi64(p, 0xD8);
      _mm_storeu_si128((__m128i *)(o + j),
                       _mm_packus_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1)));
    }
    for (; j < k; j++) {
      float v = divide ? xr[j] / s : xr[j] * s;
      v = nearbyintf(v) + (float)zp;
      o[j] = (uint8_t)(!(v >= (float)qmin) ? (float)qmin : (v > (float)qmax ? (float)qmax : v));
    }
    for (; j < kp; j++) o[j] = 0;
  }
}

void slimfx_quantize_u7(const float *x, int64_t m, int64_t k, int64_t ldx, float s, int divide, int zp, int qmax,
                        uint8_t *codes, int64_t kp, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (m * k >= 65536)
  quantize_rows(x, m, k, ldx, s, NULL, divide, zp, 0, qmax, codes, kp);
}

/* torch's ChooseQuantizationParams(min, max, 0, qmax) (fbgemm's dynamic quantization with reduce_range) in the
 * same double arithmetic as slimfx.kernels.cpu_kernels.choose_per_tensor_qparams, the spec: bit for bit. */
void slimfx_choose_qparams(double lo, double hi, int qmax, float *scale_out, int *zp_out) {
  lo = lo < 0.0 ? lo : 0.0;
  hi = hi > 0.0 ? hi : 0.0;
  double scale = (hi - lo) / qmax;
  if ((float)scale == 0.0f || isinf(1.0 / scale)) scale = 0.1;
  const double small = 6.1e-5; /* torch's SMALL_SCALE_THRESHOLD */
  if (scale < small) {
    const double amplifier = small / scale;
    scale = small;
    if (lo == 0.0)
      hi = scale * qmax;
    else if (hi == 0.0)
      lo = -scale * qmax;
    else {
      lo = lo * amplifier;
      hi = hi * amplifier;
    }
  }
  const double from_min = 0 - lo / scale, from_max = qmax - hi / scale;
  const double err_min = 0 - fabs(lo / scale), err_max = qmax - fabs(hi / scale);
  const double initial = err_min < err_max ? from_min : from_max;
  *zp_out = initial < 0 ? 0 : (initial > qmax ? qmax : (int)nearbyint(initial));
  *scale_out = (float)scale;
}

typedef struct {
  const int32_t *colsum; /* sum_k w[n, k], per output column */
  const float *w_scale;
  const float *bias;     /* or NULL */
  const float *row_scale; /* per-row activation scales, or NULL: a_scale for every row */
  float a_scale;
  int32_t zp;
  float *out;
  int64_t ldo;
  int64_t n;
} epilogue_t;

/* acc[MR x NR] (+)= A[rows x kc] * B-panel; on the last k block, out = (acc - zp * colsum) * a_scale * w_scale +
 * bias for the panel's columns [col0, col0 + 16) that exist. NARROW: two pair sums added in int16 before
 * widening (codes <= 127, |w| <= 64); WIDE: each widened (one pair sum must fit int16); SPLIT: nibble weights on
 * pairwise-duplicated codes (a holds 2 bytes per k), four steps added in int16, widened with (1, 16). */
enum { WIDE = 0, NARROW = 1, SPLIT = 2 };

/* The 4 bytes at p (4 codes, or 2 codes duplicated) in every 32-bit lane. */
static inline __m256i bcast4(const uint8_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

static inline void micro_tile(const uint8_t *a, int64_t lda, int rows, const int8_t *b, int64_t kc, int32_t *acc,
                              int first, int last, const epilogue_t *ep, int64_t row0, int64_t col0, int path) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00;
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t *a0 = a, *a1 = rows > 1 ? a + lda : a, *a2 = rows > 2 ? a + 2 * lda : a,
                *a3 = rows > 3 ? a + 3 * lda : a;
  /* the weights as memory operands of vpmaddubsw (re-read from L1 per row) free four registers: the eight
   * accumulators then never spill (measured 2-3% faster than holding the weights in registers) */
#define B_AT(off) _mm256_loadu_si256((const __m256i *)(b + (off)))
#define SLIMFX_NARROW_ROW(ap, cl, ch)                                                                  \
  {                                                                                                   \
    const __m256i x0 = bcast4(ap + k), x1 = bcast4(ap + k + 4);                                       \
    __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(x0, B_AT(0)), _mm256_maddubs_epi16(x1, B_AT(64))); \
    cl = _mm256_add_epi32(cl, _mm256_madd_epi16(t, ones));                                            \
    t = _mm256_add_epi16(_mm256_maddubs_epi16(x0, B_AT(32)), _mm256_maddubs_epi16(x1, B_AT(96)));     \
    ch = _mm256_add_epi32(ch, _mm256_madd_epi16(t, ones));                                            \
  }
#define SLIMFX_WIDE_ROW(ap, cl, ch)                                                                    \
  {                                                                                                   \
    const __m256i x0 = bcast4(ap + k), x1 = bcast4(ap + k + 4);                                       \
    cl = _mm256_add_epi32(cl, _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(x0, B_AT(0)), ones), \
                                               _mm256_madd_epi16(_mm256_maddubs_epi16(x1, B_AT(64)), ones))); \
    ch = _mm256_add_epi32(ch, _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(x0, B_AT(32)), ones), \
                                               _mm256_madd_epi16(_mm256_maddubs_epi16(x1, B_AT(96)), ones))); \
  }
#define SLIMFX_SPLIT_ROW(ap, cl, ch)                                                                   \
  {                                                                                                   \
    const __m256i x0 = bcast4(ap + 2 * k), x1 = bcast4(ap + 2 * k + 4), x2 = bcast4(ap + 2 * k + 8),  \
                  x3 = bcast4(ap + 2 * k + 12);                                                       \
    __m256i t = _mm256_add_epi16(                                                                     \
        _mm256_add_epi16(_mm256_maddubs_epi16(x0, B_AT(0)), _mm256_maddubs_epi16(x1, B_AT(64))),      \
        _mm256_add_epi16(_mm256_maddubs_epi16(x2, B_AT(128)), _mm256_maddubs_epi16(x3, B_AT(192))));  \
    cl = _mm256_add_epi32(cl, _mm256_madd_epi16(t, mix));                                             \
    t = _mm256_add_epi16(                                                                             \
        _mm256_add_epi16(_mm256_maddubs_epi16(x0, B_AT(32)), _mm256_maddubs_epi16(x1, B_AT(96))),     \
        _mm256_add_epi16(_mm256_maddubs_epi16(x2, B_AT(160)), _mm256_maddubs_epi16(x3, B_AT(224))));  \
    ch = _mm256_add_epi32(ch, _mm256_madd_epi16(t, mix));                                             \
  }
#define SLIMFX_FOUR_ROWS(ROW) { ROW(a0, c00, c01) ROW(a1, c10, c11) ROW(a2, c20, c21) ROW(a3, c30, c31) }
  if (path == SPLIT) {
    const __m256i mix = _mm256_set1_epi32(1 | (16 << 16)); /* (l, h) int16 lanes -> l + 16 h */
    for (int64_t k = 0; k < kc; k += 8, b += 256) SLIMFX_FOUR_ROWS(SLIMFX_SPLIT_ROW)
  } else if (path == NARROW) {
    for (int64_t k = 0; k < kc; k += 8, b += 128) SLIMFX_FOUR_ROWS(SLIMFX_NARROW_ROW)
  } else {
    for (int64_t k = 0; k < kc; k += 8, b += 128) SLIMFX_FOUR_ROWS(SLIMFX_WIDE_ROW)
  }
#undef SLIMFX_NARROW_ROW
#undef SLIMFX_WIDE_ROW
#undef SLIMFX_SPLIT_ROW
#undef SLIMFX_FOUR_ROWS
#undef B_AT
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
  for (int h = 0; h < 2; h++) {
    const __m256i corr = _mm256_mullo_epi32(zpv, _mm256_loadu_si256((const __m256i *)(cs_pad + 8 * h)));
    const __m256 wsv = _mm256_loadu_ps(ws_pad + 8 * h);
    const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(ep->a_scale), wsv);
    const __m256 bv = _mm256_loadu_ps(b_pad + 8 * h);
    const int64_t left = cols - 8 * h;
    if (left <= 0) break;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int r = 0; r < rows; r++) {
      const __m256 rs = ep->row_scale ? _mm256_mul_ps(_mm256_set1_ps(ep->row_scale[row0 + r]), wsv) : scale;
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(cs[2 * r + h], corr)), rs);
      if (ep->bias) y = _mm256_add_ps(y, bv);
      float *o = ep->out + (row0 + r) * ep->ldo + col0 + 8 * h;
      if (left >= 8)
        _mm256_storeu_ps(o, y);
      else
        _mm256_maskstore_ps(o, mask, y);
    }
  }
}

typedef struct {
  int64_t np, mt, nt, ncp, nkb, tiles;
} tiling_t;

static tiling_t tiling_of(int64_t m, int64_t n, int64_t kp, int nthreads) {
  tiling_t t;
  t.np = panels_of(n);
  t.mt = (m + MC - 1) / MC;
  t.nkb = kp > 0 ? (kp + KC - 1) / KC : 1; /* K = 0: one empty block, so the epilogue still writes the bias */
  const int64_t want = 2 * (int64_t)nthreads, per_row = (want + t.mt - 1) / t.mt;
  int64_t ncp = (t.np + per_row - 1) / per_row;
  t.ncp = ncp < 1 ? 1 : (ncp > NCP_MAX ? NCP_MAX : ncp);
  t.nt = (t.np + t.ncp - 1) / t.ncp;
  t.tiles = t.mt * t.nt;
  return t;
}

static int worth_threads(int64_t m, int64_t n, int64_t kp, int nthreads) {
  return nthreads > 1 && m * n * kp >= (1 << 20);
}

/* The GEMM's row x column tiles, shared among the threads of the enclosing parallel region. */
static void gemm_tiles(const uint8_t *codes, int64_t m, int64_t kp, const int8_t *packed, const epilogue_t *ep,
                       tiling_t tl, int path) {
  const int64_t widen = path == SPLIT ? 2 : 1; /* bytes per k of the codes and of a panel column */
  int32_t *acc = tl.nkb > 1 ? (int32_t *)malloc((size_t)MC * tl.ncp * NR * sizeof(int32_t)) : NULL;
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tl.tiles; t++) {
    const int64_t r0 = (t / tl.nt) * MC, r1 = r0 + MC < m ? r0 + MC : m;
    const int64_t p0 = (t % tl.nt) * tl.ncp, p1 = p0 + tl.ncp < tl.np ? p0 + tl.ncp : tl.np;
    for (int64_t kb = 0; kb < tl.nkb; kb++) {
      const int64_t k0 = kb * KC, kc = kp - k0 < KC ? kp - k0 : KC;
      for (int64_t r = r0; r < r1; r += MR) {
        const int rows = (int)(r1 - r < MR ? r1 - r : MR);
        for (int64_t p = p0; p < p1; p++) {
          int32_t *tile_acc = acc ? acc + ((r - r0) * tl.ncp + (p - p0) * MR) * NR : NULL;
          micro_tile(codes + (r * kp + k0) * widen, kp * widen, rows, packed + (p * kp + k0) * NR * widen, kc,
                     tile_acc, kb == 0, kb == tl.nkb - 1, ep, r, p * NR, path);
        }
      }
    }
  }
  free(acc);
}

/* Activation modes of slimfx_linear_fused (slimfx.kernels.cpu_kernels spells out each one's numerics). */
enum { STATIC = 0, DYNAMIC_TORCH = 1, DYNAMIC_ONNX = 2, PER_TOKEN = 3 };

/* The whole int8 linear in one parallel region (one wake-up of the OpenMP threads per call):
 * - STATIC: the given scale / zero point, codes by the division, clamped to [0, qmax];
 * - DYNAMIC_TORCH: the input's range, torch's qparams (slimfx_choose_qparams, qmax 127), codes by the product with
 *   the fp32 reciprocal of the scale;
 * - DYNAMIC_ONNX: the range, ONNX DynamicQuantizeLinear's fp32 qparams (scale = (hi - lo) / 255, 1 for an empty
 *   range; zero point = round(clamp(-lo / scale, 0, 255))), codes by the division;
 * - PER_TOKEN: per row s = max(absmax / 127, 1e-8) (fp32), codes clamp(round(x / s), -127, 127) + 128 (zero point
 *   128); a row holding NaN / inf gets a non-finite scale and so a non-finite output row, as the spec's;
 * then the codes and the GEMM with its epilogue. The dynamic per-tensor modes return 1 without writing out when the
 * input holds NaN or inf (report = its range, NaN for NaN), else report = {scale, zero point}. Returns 0, 1, or 2
 * when out of memory. */
int slimfx_linear_fused(const float *x, int64_t m, int64_t k, int64_t ldx, int mode, float s, int zp, int qmax,
                        int path, const int8_t *packed, int64_t n, const int32_t *colsum, const float *w_scale,
                        const float *bias, float *out, int64_t ldo, int nthreads, float *report) {
  const int64_t kp = kpad_of(k);
  const int dynamic = mode == DYNAMIC_TORCH || mode == DYNAMIC_ONNX;
  uint8_t *codes = (uint8_t *)malloc((size_t)(m * kp > 0 ? m * kp : 1));
  float *row_scale = mode == PER_TOKEN ? (float *)malloc((size_t)(m > 0 ? m : 1) * sizeof(float)) : NULL;
  uint8_t *codes2 = path == SPLIT ? (uint8_t *)malloc((size_t)(m * kp > 0 ? 2 * m * kp : 1)) : NULL;
  if (!codes || (mode == PER_TOKEN && !row_scale) || (path == SPLIT && !codes2)) {
    free(codes);
    free(row_scale);
    free(codes2);
    return 2;
  }
  float lo = 0.0f, hi = 0.0f;
  int bad = 0, status = 0;
  epilogue_t ep = {colsum, w_scale, bias, row_scale, s, mode == PER_TOKEN ? 128 : zp, out, ldo, n};
  const tiling_t tl = tiling_of(m, n, kp, nthreads);
#pragma omp parallel num_threads(nthreads) if (worth_threads(m, n, kp, nthreads))
  {
    if (dynamic) {
#pragma omp for schedule(static) reduction(min : lo) reduction(max : hi) reduction(| : bad)
      for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * ldx;
        __m256 vlo = _mm256_setzero_ps(), vhi = vlo, vnan = vlo;
        int64_t j = 0;
        for (; j + 8 <= k; j += 8) {
          const __m256 v = _mm256_loadu_ps(xr + j);
          vlo = _mm256_min_ps(vlo, v);
          vhi = _mm256_max_ps(vhi, v);
          vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float l[8], h[8];
        _mm256_storeu_ps(l, vlo);
        _mm256_storeu_ps(h, vhi);
        int row_bad = _mm256_movemask_ps(vnan) != 0;
        for (int c = 0; c < 8; c++) {
          lo = l[c] < lo ? l[c] : lo;
          hi = h[c] > hi ? h[c] : hi;
        }
        for (; j < k; j++) {
          row_bad |= xr[j] != xr[j];
          lo = xr[j] < lo ? xr[j] : lo;
          hi = xr[j] > hi ? xr[j] : hi;
        }
        bad |= row_bad;
      }
#pragma omp single
      {
        if (bad || isinf(lo) || isinf(hi)) {
          status = 1;
          report[0] = bad ? NAN : lo;
          report[1] = bad ? NAN : hi;
        } else if (mode == DYNAMIC_TORCH) {
          float scale;
          int z;
          slimfx_choose_qparams((double)lo, (double)hi, qmax, &scale, &z);
          ep.a_scale = scale;
          ep.zp = z;
        } else { /* lo <= 0 <= hi already */
          float scale = hi != lo ? (hi - lo) / 255.0f : 1.0f;
          if (scale == 0.0f) scale = 1.0f; /* the range underflowed: the empty range's qparams, as the spec */
          float z = -lo / scale;
          z = z < 0.0f ? 0.0f : (z > 255.0f ? 255.0f : z);
          ep.a_scale = scale;
          ep.zp = (int)nearbyintf(z);
        }
        if (!status) {
          report[0] = ep.a_scale;
          report[1] = (float)ep.zp;
        }
      } /* implicit barrier: every thread sees status and the qparams */
    }
    if (mode == PER_TOKEN) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * ldx;
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 vmax = _mm256_setzero_ps(), vnan = vmax;
        int64_t j = 0;
        for (; j + 8 <= k; j += 8) {
          const __m256 v = _mm256_loadu_ps(xr + j);
          vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
          vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float t[8], top = 0.0f;
        _mm256_storeu_ps(t, vmax);
        int row_nan = _mm256_movemask_ps(vnan) != 0;
        for (int c = 0; c < 8; c++) top = t[c] > top ? t[c] : top;
        for (; j < k; j++) {
          row_nan |= xr[j] != xr[j];
          top = fabsf(xr[j]) > top ? fabsf(xr[j]) : top;
        }
        const float scale = row_nan ? NAN : top / 127.0f;
        row_scale[i] = scale < 1e-8f ? 1e-8f : scale; /* NaN stays NaN, like torch's clamp_min */
      }
    }
    if (status == 0) {
      if (mode == PER_TOKEN)
        quantize_rows(x, m, k, ldx, 0.0f, row_scale, 1, 128, 1, 255, codes, kp);
      else
        quantize_rows(x, m, k, ldx, mode == DYNAMIC_TORCH ? (float)(1.0 / (double)ep.a_scale) : ep.a_scale, NULL,
                      mode != DYNAMIC_TORCH, ep.zp, 0, mode == DYNAMIC_ONNX ? 255 : qmax, codes, kp);
      if (path == SPLIT) duplicate_pairs(codes, m, kp, codes2);
      gemm_tiles(path == SPLIT ? codes2 : codes, m, kp, packed, &ep, tl, path);
    }
  }
  free(codes);
  free(row_scale);
  free(codes2);
  return status;
}

/* A 2-d convolution (groups 1) of a channels-last (NHWC) fp32 input with static codes (the division, as above;
 * path as for the linear):
 * the input quantized once into an image of codes (zero padding is the zero point's code), gathered into rows of
 * kh * kw * c codes in (i, j, channel) order (im2col on bytes, a quarter of the fp32 traffic; 1x1 stride-1
 * unpadded convs skip it: their codes are the GEMM operand as they are), then the GEMM with its epilogue into out
 * [n * oh * ow, o], channels-last. The weight is packed from [o, kh, kw, c]. One parallel region. Returns 0, or 2
 * when out of memory. */
int slimfx_conv2d(const float *x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh, int64_t kw, int64_t sh,
                  int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t oh, int64_t ow, float s, int zp,
                  int qmax, int path, const int8_t *packed, int64_t o, const int32_t *colsum, const float *w_scale,
                  const float *bias, float *out, int nthreads) {
  const int64_t k = kh * kw * c, kp = kpad_of(k), rows = n * oh * ow;
  const int direct = kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  uint8_t *image = direct ? NULL : (uint8_t *)malloc((size_t)(n * h * w * c > 0 ? n * h * w * c : 1));
  uint8_t *codes = (uint8_t *)malloc((size_t)(rows * kp > 0 ? rows * kp : 1));
  uint8_t *codes2 = path == SPLIT ? (uint8_t *)malloc((size_t)(rows * kp > 0 ? 2 * rows * kp : 1)) : NULL;
  if (!codes || (!direct && !image) || (path == SPLIT && !codes2)) {
    free(image);
    free(codes);
    free(codes2);
    return 2;
  }
  const epilogue_t ep = {colsum, w_scale, bias, NULL, s, zp, out, o, o};
  const tiling_t tl = tiling_of(rows, o, kp, nthreads);
#pragma omp parallel num_threads(nthreads) if (worth_threads(rows, o, kp, nthreads))
  {
    if (direct) {
      quantize_rows(x, rows, c, c, s, NULL, 1, zp, 0, qmax, codes, kp);
    } else {
      quantize_rows(x, n * h * w, c, c, s, NULL, 1, zp, 0, qmax, image, c);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; r++) {
        const int64_t b = r / (oh * ow), y = (r / ow) % oh, xo = r % ow;
        uint8_t *dst = codes + r * kp;
        for (int64_t i = 0; i < kh; i++) {
          const int64_t iy = y * sh - ph + i * dh;
          for (int64_t j = 0; j < kw; j++, dst += c) {
            const int64_t ix = xo * sw - pw + j * dw;
            if (iy < 0 || iy >= h || ix < 0 || ix >= w)
              memset(dst, zp, (size_t)c);
            else
              memcpy(dst, image + ((b * h + iy) * w + ix) * c, (size_t)c);
          }
        }
        memset(dst, 0, (size_t)(kp - k)); /* the padding multiplies zero weights */
      }
    }
    if (path == SPLIT) duplicate_pairs(codes, rows, kp, codes2);
    gemm_tiles(path == SPLIT ? codes2 : codes, rows, kp, packed, &ep, tl, path);
  }
  free(image);
  free(codes);
  free(codes2);
  return 0;
}
