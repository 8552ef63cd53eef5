// Routed-expert SwiGLU FFNs on the CPU, reading each selected expert IN PLACE in its stack.
//
// Why: XLA:CPU copies a dynamic slice of the expert stack into a new buffer before it can run
// a dot on it (docs/benchmarks.md, "CPU: experts read in place"), and a matrix-vector product
// of bfloat16 weights converts them to float32 first. This XLA FFI handler computes the same
// FFNs straight from the stack, bfloat16 weights widened in registers.
//
// One handler serves decode and prefill. It is given a list of (token, expert row, weight)
// contributions in the order they are summed, and computes, per token n,
//     acc[n] = (...((acc[n] + w1 * f1(x[n])) + w2 * f2(x[n])) ...)
// with f(x) = down @ (silu(x @ gate) * (x @ up)), in the order of the list. Decode lists a
// token's k experts in router order (acc starts at zero), prefill lists experts in ascending
// id order (acc is carried between groups of experts): the order moejax.model.moe defines.
// Rounding: every intermediate is rounded to the activation dtype where the jnp formulation has
// a tensor of that dtype (the two projections, silu, the product, the down projection, the
// weighted term, the sum); products are accumulated in float32.
//
// Shapes: x, acc [N, H] (f32 or bf16); stack [S, 3, H, I] (f32, bf16, or bf16 bits as u16):
// gate [H, I], up [H, I], down stored [H, I]; or quantized experts (attribute bits 8 or 4) as
// packed rows [S, B] uint8 in moejax.quant's layout, read in place (QExpert below: each scale
// multiplies the float32 sum of its group of integer weights times activations). Rows are
// clamped to [0, S) as XLA clamps a dynamic slice.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

struct Contribution {
  int32_t token;
  int32_t row;
  float weight;
};

// A thread's scratch buffer of at least n floats (grown, never shrunk); `slot` tells apart the
// buffers in use at once: 0-3 a task's, 4-5 a call's (its caller also runs tasks).
inline float* scratch(int slot, int64_t n) {
  thread_local std::vector<float> bufs[6];
  if (int64_t(bufs[slot].size()) < n) bufs[slot].resize(n);
  return bufs[slot].data();
}

// Rows per part: an expert's gate and up (and down) matrices are split into `parts` blocks of
// consecutive rows of H, so that one token's few experts, or a shared expert alone, still give
// every thread work, and each task streams contiguous memory. Fixed by the shapes, not by the
// thread count, so the summation order (gate and up: the parts' partial sums added in ascending
// order) never depends on the machine. At least two parts of equal size (a multiple of `align`:
// 8, or a quantized expert's scale group), at most kRows rows each: H = 192 gives 2 x 96 (was
// one part of 192, so a shared expert alone ran on one thread), H = 768 3 x 256.
constexpr int64_t kRows = 256;

inline int64_t part_rows(int64_t H, int64_t most, int64_t align) {
  const int64_t parts = std::max<int64_t>(2, (H + most - 1) / most);
  const int64_t rows = (H + parts - 1) / parts;
  return std::max<int64_t>(align, (rows + align - 1) / align * align);
}
// Tokens per group: a task reads its block of weights once for all of them.
constexpr int64_t kChunk = 16;

template <typename W>
inline float ld(W v) {
  if constexpr (sizeof(W) == 2) return bf16_to_f32(v); else return v;
}

// sum_i w(i) * a[i] over i < n: 16 lane sums, the remainder, then the lanes added in order (an
// order fixed by n alone). w(i): weight i as float32.
template <typename F>
inline float lane_dot(F w, const float* __restrict__ a, int64_t n) {
  constexpr int LANES = 16;
  float lane[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; ++l) lane[l] += w(i + l) * a[i + l];
  float s = 0.0f;
  for (; i < n; ++i) s = std::fma(w(i), a[i], s);  // explicit: GCC contracted some such loops, not others
  for (int l = 0; l < LANES; ++l) s += lane[l];
  return s;
}

// ---- register tiles for several tokens (prefill) ----------------------------------------------
// Several tokens share each weight they read. The plain loops keep their accumulators in memory
// (a load and a store per multiply-add: perf put the 266 M model's prefill at 85% in these
// loops); these tiles hold them in AVX2 registers. Each output is still summed in the
// plain loops' order (h ascending from zero for x @ w; lane_dot's 16 lanes, tail and lane sum for
// a dot product) with the same fused multiply-adds, so a tile's result is bit-identical to the
// plain loop's and a token's output does not depend on which tokens it is computed with.
#if defined(__AVX2__) && defined(__FMA__)
constexpr bool kTiles = true;

inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const uint16_t* w) {  // 8 bfloat16 -> float32
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// acc[t][j] = sum over h in [h0, h1), ascending, of x[t][h] * w[h][j] for t < 4, j < 8 * V (V = 3:
// 24 columns; 2 and 1 for what is left of a width, e.g. 16 of 64 columns); x rows at stride ldx,
// w rows at stride ldw, acc rows at stride lda (overwritten).
template <typename W, int V = 3>
inline void tile_xw(const W* __restrict__ w, int64_t ldw, int64_t h0, int64_t h1, const float* __restrict__ x,
                    int64_t ldx, float* __restrict__ acc, int64_t lda) {
  static_assert(V >= 1 && V <= 3);
  // Twelve named accumulators: GCC kept an array of them on the stack (a store per FMA).
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
  __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
  const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
  for (int64_t h = h0; h < h1; ++h) {
    const W* r = w + h * ldw;
    const __m256 w0 = load8(r), w1 = V > 1 ? load8(r + 8) : w0, w2 = V > 2 ? load8(r + 16) : w0;
    __m256 xv = _mm256_broadcast_ss(x0 + h);
    c00 = _mm256_fmadd_ps(xv, w0, c00);
    if constexpr (V > 1) c01 = _mm256_fmadd_ps(xv, w1, c01);
    if constexpr (V > 2) c02 = _mm256_fmadd_ps(xv, w2, c02);
    xv = _mm256_broadcast_ss(x1 + h);
    c10 = _mm256_fmadd_ps(xv, w0, c10);
    if constexpr (V > 1) c11 = _mm256_fmadd_ps(xv, w1, c11);
    if constexpr (V > 2) c12 = _mm256_fmadd_ps(xv, w2, c12);
    xv = _mm256_broadcast_ss(x2 + h);
    c20 = _mm256_fmadd_ps(xv, w0, c20);
    if constexpr (V > 1) c21 = _mm256_fmadd_ps(xv, w1, c21);
    if constexpr (V > 2) c22 = _mm256_fmadd_ps(xv, w2, c22);
    xv = _mm256_broadcast_ss(x3 + h);
    c30 = _mm256_fmadd_ps(xv, w0, c30);
    if constexpr (V > 1) c31 = _mm256_fmadd_ps(xv, w1, c31);
    if constexpr (V > 2) c32 = _mm256_fmadd_ps(xv, w2, c32);
  }
  const __m256 c[4][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22}, {c30, c31, c32}};
  for (int t = 0; t < 4; ++t)
    for (int k = 0; k < V; ++k) _mm256_storeu_ps(acc + t * lda + 8 * k, c[t][k]);
}

#else
constexpr bool kTiles = false;
template <typename W, int V = 3>
inline void tile_xw(const W*, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t) {}
#endif

// The down projection's dot products, `dot8` order: over n elements, 8 lane sums (i ascending in
// steps of 8, fused multiply-adds from zero), the lanes added as the tree
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), then the tail (the elements after the last
// multiple of 8) by fused multiply-adds. AVX2 computes eight such trees at once (horizontal
// additions that transpose as they add), where lane_dot's 16 lanes added one by one made a decode
// call's down projection slower than its gate and up projections with twice the arithmetic.
inline float tree8(const float l[8]) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

// out[r * T + t] = dot8(w row r, a row t) for r < R, t < T (R * T <= 8; rows at strides ldw, lda).
template <typename W, int R, int T>
inline void dots(const W* __restrict__ w, int64_t ldw, const float* __restrict__ a, int64_t lda, int64_t n,
                 float* __restrict__ out) {
  static_assert(R >= 1 && T >= 1 && R * T <= 8);
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  // Eight named accumulators (k = r * T + t), as in tile_xw.
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  for (; i + 8 <= n; i += 8) {
    __m256 av[T], wv[R];
    for (int t = 0; t < T; ++t) av[t] = _mm256_loadu_ps(a + t * lda + i);
    for (int r = 0; r < R; ++r) wv[r] = load8(w + r * ldw + i);
#define MOEJAX_DOT(k) \
  if constexpr (k < R * T) c##k = _mm256_fmadd_ps(wv[k / T], av[k % T], c##k);
    MOEJAX_DOT(0) MOEJAX_DOT(1) MOEJAX_DOT(2) MOEJAX_DOT(3) MOEJAX_DOT(4) MOEJAX_DOT(5) MOEJAX_DOT(6) MOEJAX_DOT(7)
#undef MOEJAX_DOT
  }
  // Lane k of the result is tree8 of c_k: hadd(a, b) = (a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, ...).
  const __m256 t0 = _mm256_hadd_ps(c0, c1), t1 = _mm256_hadd_ps(c2, c3);
  const __m256 t2 = _mm256_hadd_ps(c4, c5), t3 = _mm256_hadd_ps(c6, c7);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  float sums[8];
  _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
  float lanes[8][8] = {};
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < R * T; ++k)
      for (int l = 0; l < 8; ++l)
        lanes[k][l] = std::fma(ld(w[(k / T) * ldw + i + l]), a[(k % T) * lda + i + l], lanes[k][l]);
  float sums[8];
  for (int k = 0; k < R * T; ++k) sums[k] = tree8(lanes[k]);
#endif
  for (int k = 0; k < R * T; ++k) {
    float s = sums[k];
    for (int64_t j = i; j < n; ++j) s = std::fma(ld(w[(k / T) * ldw + j]), a[(k % T) * lda + j], s);
    out[k] = s;
  }
}

// acc[t][j] += sum over h in [h0, h1), ascending, of x[t][h] * w[h][j], for tokens [t0, t1) and
// columns [j0, j1): the plain loop (accumulators in memory).
template <typename W>
void plain_xw(const W* __restrict__ w, int64_t ldw, int64_t h0, int64_t h1, const float* __restrict__ x, int64_t ldx,
              int64_t t0, int64_t t1, int64_t j0, int64_t j1, float* __restrict__ acc, int64_t lda) {
  for (int64_t h = h0; h < h1; ++h) {
    const W* __restrict__ r = w + h * ldw;
    for (int64_t t = t0; t < t1; ++t) {
      const float xv = x[t * ldx + h];
      float* __restrict__ at = acc + t * lda;
      for (int64_t j = j0; j < j1; ++j) at[j] = std::fma(xv, ld(r[j]), at[j]);  // explicit, as the tiles
    }
  }
}

// acc [n][m] (zeros on entry; row stride lda) += x [n][h0:h1] @ w[h0:h1][0:m]: 4 x 24 tiles where
// they fit (from 4 tokens up), then 4 x 16 and 4 x 8 tiles for the columns left (an expert of
// width 64: 24 + 24 + 16, where the last 16 went through the plain loop), the plain loop for
// the rest.
template <typename W>
void xw(const W* __restrict__ w, int64_t ldw, int64_t h0, int64_t h1, const float* __restrict__ x, int64_t ldx,
        int64_t n, int64_t m, float* __restrict__ acc, int64_t lda) {
  const int64_t nt = kTiles ? n / 4 * 4 : 0;
  int64_t mt = kTiles && nt ? m / 24 * 24 : 0;
  for (int64_t j = 0; j < mt; j += 24)
    for (int64_t t = 0; t < nt; t += 4) tile_xw(w + j, ldw, h0, h1, x + t * ldx, ldx, acc + t * lda + j, lda);
  if (nt && m - mt >= 16) {
    for (int64_t t = 0; t < nt; t += 4) tile_xw<W, 2>(w + mt, ldw, h0, h1, x + t * ldx, ldx, acc + t * lda + mt, lda);
    mt += 16;
  }
  if (nt && m - mt >= 8) {
    for (int64_t t = 0; t < nt; t += 4) tile_xw<W, 1>(w + mt, ldw, h0, h1, x + t * ldx, ldx, acc + t * lda + mt, lda);
    mt += 8;
  }
  plain_xw(w, ldw, h0, h1, x, ldx, 0, nt, mt, m, acc, lda);
  plain_xw(w, ldw, h0, h1, x, ldx, nt, n, 0, m, acc, lda);
}

// Phase 1, rows [h0, h1) of gate and up for n tokens x [n][H] -> partial g, u [n][I].
template <typename W>
void gate_up_part(const W* __restrict__ gate, const W* __restrict__ up, int64_t H, int64_t I, int64_t h0, int64_t h1,
                  const float* __restrict__ x, int n, float* __restrict__ g, float* __restrict__ u) {
  if (n >= 4) {  // prefill: register tiles
    std::fill(g, g + n * I, 0.0f);
    std::fill(u, u + n * I, 0.0f);
    xw(gate, I, h0, h1, x, H, n, I, g, I);
    xw(up, I, h0, h1, x, H, n, I, u, I);
    return;
  }
  std::fill(g, g + n * I, 0.0f);
  std::fill(u, u + n * I, 0.0f);
  for (int64_t h = h0; h < h1; ++h) {  // decode: both matrices streamed together, row by row
    const W* __restrict__ gr = gate + h * I;
    const W* __restrict__ ur = up + h * I;
    for (int t = 0; t < n; ++t) {
      const float xv = x[t * H + h];
      float* __restrict__ gt = g + t * I;
      float* __restrict__ ut = u + t * I;
      for (int64_t i = 0; i < I; ++i) gt[i] = std::fma(xv, ld(gr[i]), gt[i]), ut[i] = std::fma(xv, ld(ur[i]), ut[i]);
    }
  }
}

// Phase 2, rows [h0, h1) of down: y[t][h] = dot8(down[h], a[t]), a [n][I] -> y [n][H]. 4 rows x 2
// tokens share their loads; a token alone takes 8 rows at once.
template <typename W, bool BF16>
void down_part(const W* __restrict__ down, int64_t H, int64_t I, int64_t h0, int64_t h1, const float* __restrict__ a,
               int n, float* __restrict__ y) {
  float o[8];
  auto put = [&](int t, int64_t h, float v) { y[t * H + h] = BF16 ? round_bf16(v) : v; };
  int t = 0;
  for (; t + 2 <= n; t += 2) {
    int64_t h = h0;
    for (; h + 4 <= h1; h += 4) {
      dots<W, 4, 2>(down + h * I, I, a + t * I, I, I, o);
      for (int r = 0; r < 4; ++r) put(t, h + r, o[2 * r]), put(t + 1, h + r, o[2 * r + 1]);
    }
    for (; h < h1; ++h) {
      dots<W, 1, 2>(down + h * I, I, a + t * I, I, I, o);
      put(t, h, o[0]), put(t + 1, h, o[1]);
    }
  }
  for (; t < n; ++t) {
    int64_t h = h0;
    for (; h + 8 <= h1; h += 8) {
      dots<W, 8, 1>(down + h * I, I, a + t * I, I, I, o);
      for (int r = 0; r < 8; ++r) put(t, h + r, o[r]);
    }
    for (; h < h1; ++h) {
      dots<W, 1, 1>(down + h * I, I, a + t * I, I, I, o);
      put(t, h, o[0]);
    }
  }
}

// A quantized expert's layout (moejax.quant.Quant): bits 8 or 4, scale groups gH (gate, up:
// along H) and gI (down: along I), and the bytes of its weights (the scales follow them).
struct Quant {
  int64_t bits = 0, gH = 0, gI = 0, wbytes = 0;
  int64_t row_bytes(int64_t H, int64_t I) const {  // one packed expert: weights, then bf16 scales
    return wbytes + 2 * (2 * (H / gH) * I + H * (I / gI));
  }
};

inline float scale_at(const uint8_t* s, int64_t j) {  // bf16 bits, possibly unaligned
  uint16_t b;
  std::memcpy(&b, s + 2 * j, 2);
  return bf16_to_f32(b);
}

// The integer weight i of a packed row r: KIND 0: int8; 1, 2: the low or high nibble of int4
// (two's complement), as float.
template <int KIND>
inline float qv(const int8_t* __restrict__ r, int64_t i) {
  if constexpr (KIND == 0) return float(r[i]);
  else if constexpr (KIND == 1) return float(int8_t(uint8_t(r[i]) << 4) >> 4);
  else return float(r[i] >> 4);
}

template <typename F>
void by_kind(int kind, F f) {  // f(std::integral_constant<int, kind>)
  if (kind == 0) f(std::integral_constant<int, 0>());
  else if (kind == 1) f(std::integral_constant<int, 1>());
  else f(std::integral_constant<int, 2>());
}

// Quantized experts: integer weights are summed against the activations in float32 and each
// scale multiplies the sum of its group (as a quantized matmul does, and llama.cpp's q8_0),
// instead of dequantizing every weight first: one conversion per weight and no rounding of
// weights, which made the kernel compute-bound at half the bf16 kernel's speed. This is the
// CPU kernel's arithmetic for every path (resident and both engines), so alpha 0 stays exact;
// it differs from the jnp formulation (q * scale rounded to the activation dtype, then dots)
// by rounding, like the float kernels.
struct QExpert {
  const uint8_t* e;
  const Quant& q;
  int64_t H, I;

  const int8_t* row(int m, int64_t h, int& kind) const {  // int4: byte row h % (H/2), nibble h >= H/2
    if (q.bits == 8) return kind = 0, reinterpret_cast<const int8_t*>(e) + (m * H + h) * I;
    const int64_t H2 = H / 2;
    return kind = h < H2 ? 1 : 2, reinterpret_cast<const int8_t*>(e) + (m * H2 + h % H2) * I;
  }
  float scale(int64_t j) const { return scale_at(e + q.wbytes, j); }

  // Phase 1, rows [h0, h1) of gate and up for n tokens -> partial g, u [n][I]: per scale group
  // of rows, the raw sums tg, tu, then g += scale * tg.
  void gate_up(int64_t h0, int64_t h1, const float* __restrict__ x, int n, float* __restrict__ g,
               float* __restrict__ u) const {
    std::fill(g, g + n * I, 0.0f);
    std::fill(u, u + n * I, 0.0f);
    float *tg = scratch(3, 2 * n * I), *tu = tg + n * I;  // slots 0-2: run_task's
    for (int64_t h = h0; h < h1;) {
      const int64_t grp = h / q.gH, end = std::min(h1, (grp + 1) * q.gH);
      std::fill(tg, tg + 2 * n * I, 0.0f);
      for (; h < end; ++h) {
        int kind;
        const int8_t *gq = row(0, h, kind), *uq = row(1, h, kind);
        by_kind(kind, [&](auto K) {
          for (int t = 0; t < n; ++t) {
            const float xv = x[t * H + h];
            float* __restrict__ gt = tg + t * I;
            float* __restrict__ ut = tu + t * I;
            for (int64_t i = 0; i < I; ++i) {
              gt[i] += xv * qv<decltype(K)::value>(gq, i);
              ut[i] += xv * qv<decltype(K)::value>(uq, i);
            }
          }
        });
      }
      const int64_t sg = grp * I, su = (H / q.gH + grp) * I;  // scales [2, H/gH, I]
      for (int64_t i = 0; i < I; ++i) {
        const float a = scale(sg + i), b = scale(su + i);
        for (int t = 0; t < n; ++t) g[t * I + i] += a * tg[t * I + i], u[t * I + i] += b * tu[t * I + i];
      }
    }
  }

  // Phase 2, rows [h0, h1) of down: y[t][h] = sum over column groups of scale * (q . a[t]).
  template <bool BF16>
  void down(int64_t h0, int64_t h1, const float* __restrict__ a, int n, float* __restrict__ y) const {
    const int64_t G = I / q.gI, base = 2 * (H / q.gH) * I;
    for (int64_t h = h0; h < h1; ++h) {
      int kind;
      const int8_t* r = row(2, h, kind);
      by_kind(kind, [&](auto K) {
        for (int t = 0; t < n; ++t) {
          float s = 0.0f;
          for (int64_t gi = 0; gi < G; ++gi) {
            const int8_t* rg = r + gi * q.gI;
            const float d =
                lane_dot([&](int64_t i) { return qv<decltype(K)::value>(rg, i); }, a + t * I + gi * q.gI, q.gI);
            s += scale(base + h * G + gi) * d;
          }
          y[t * H + h] = BF16 ? round_bf16(s) : s;
        }
      });
    }
  }
};

// The work of one call: contributions grouped by expert row into groups of at most kChunk
// tokens; phase 1 runs a task per (group, row part), phase 2 likewise.
struct Job {
  const void* stack;
  int64_t H, I, parts, rows;            // rows of H per part
  Quant q;                             // q.bits 0: stack [S, 3, H, I] of W
  int64_t row_bytes;                   // bytes of one expert in the stack
  const float* x;  // [N, H] float32
  std::vector<Contribution> list;
  std::vector<int32_t> order;          // indices into list, grouped by row
  std::vector<int64_t> group_begin;    // groups: order[group_begin[t] .. group_begin[t + 1])
  std::vector<float> gp, up;           // [parts, list.size(), I] partial gate and up (phase 1)
  std::vector<float> act;              // [list.size(), I] silu(gate) * up, in `order` (phase 1's end)
  std::unique_ptr<std::atomic<int>[]> finished;  // per group: its phase-1 parts done
  int64_t finished_size = 0;
  std::vector<float> y;                // [list.size(), H] expert outputs (phase 2)
  std::atomic<int64_t> next[2] = {0, 0}, done[2] = {0, 0};  // per phase
  int64_t tasks() const { return (int64_t(group_begin.size()) - 1) * parts; }
  void reset() {  // for the next call; the buffers keep their capacity
    list.clear(), order.clear(), group_begin.clear();
    for (auto* c : {&next[0], &next[1], &done[0], &done[1]}) c->store(0, std::memory_order_relaxed);
  }
};

// A job (or linear layer) object for the next call: one that no other thread still holds (a
// helper, or a late pool thread, keeps its shared_ptr until it leaves the job), so that its
// buffers keep their capacity and a decode step's kernel calls allocate nothing once warm
// (malloc and free, from every caller in the process, were ~6% of a bundled decode step's
// samples in perf; the kernels made a few dozen allocations per call).
template <typename J>
std::shared_ptr<J> reuse() {
  thread_local std::vector<std::shared_ptr<J>> pool;
  for (auto& j : pool)
    if (j.use_count() == 1) {
      std::atomic_thread_fence(std::memory_order_acquire);
      j->reset();
      return j;
    }
  pool.push_back(std::make_shared<J>());
  return pool.back();
}

// W: the weights' element type; Q: packed quantized experts (rows dequantized into float buffers).
template <typename W, bool BF16, int PHASE, bool Q>
void run_task(Job& job, int64_t task) {
  const int64_t grp = task / job.parts, part = task % job.parts;
  const int64_t b = job.group_begin[grp], e = job.group_begin[grp + 1];
  const int n = int(e - b);
  const int64_t H = job.H, I = job.I, P = int64_t(job.list.size());
  const int64_t h0 = part * job.rows, h1 = std::min(H, h0 + job.rows);
  const uint8_t* ex = static_cast<const uint8_t*>(job.stack) + int64_t(job.list[job.order[b]].row) * job.row_bytes;
  const W* w = reinterpret_cast<const W*>(ex);
  if (PHASE == 1) {
    float *xs = scratch(0, n * H), *g = scratch(1, n * I), *u = scratch(2, n * I);
    for (int k = 0; k < n; ++k)
      std::memcpy(&xs[k * H], job.x + int64_t(job.list[job.order[b + k]].token) * H, H * sizeof(float));
    if constexpr (Q) {
      QExpert{ex, job.q, H, I}.gate_up(h0, h1, xs, n, g, u);
    } else {
      gate_up_part<W>(w, w + H * I, H, I, h0, h1, xs, n, g, u);
    }
    for (int k = 0; k < n; ++k) {
      std::memcpy(&job.gp[(part * P + job.order[b + k]) * I], &g[k * I], I * sizeof(float));
      std::memcpy(&job.up[(part * P + job.order[b + k]) * I], &u[k * I], I * sizeof(float));
    }
    // The group's last part to finish computes its activations once (each part of phase 2
    // recomputed them: twice the exponentials with two parts); the parts are summed in order
    // whichever thread does it.
    if (job.finished[grp].fetch_add(1, std::memory_order_acq_rel) + 1 < job.parts) return;
    for (int k = 0; k < n; ++k) {  // a = silu(g) * u, the parts summed in order, rounded as jnp rounds
      const int64_t p = job.order[b + k];
      float* a = &job.act[(b + k) * I];
      for (int64_t i = 0; i < I; ++i) {
        float gv = job.gp[p * I + i], uv = job.up[p * I + i];
        for (int64_t q = 1; q < job.parts; ++q) gv += job.gp[(q * P + p) * I + i], uv += job.up[(q * P + p) * I + i];
        if (BF16) { gv = round_bf16(gv); uv = round_bf16(uv); }
        float sv = gv / (1.0f + std::exp(-gv));
        if (BF16) sv = round_bf16(sv);
        a[i] = BF16 ? round_bf16(sv * uv) : sv * uv;
      }
    }
  } else {
    const float* a = &job.act[b * I];  // [n, I], this group's tokens in order
    float* ys = scratch(0, n * H);
    if constexpr (Q) {
      QExpert{ex, job.q, H, I}.down<BF16>(h0, h1, a, n, ys);
    } else {
      down_part<W, BF16>(w + 2 * H * I, H, I, h0, h1, a, n, ys);
    }
    for (int k = 0; k < n; ++k)
      std::memcpy(&job.y[int64_t(job.order[b + k]) * H + h0], &ys[k * H + h0], (h1 - h0) * sizeof(float));
  }
}

template <typename W, bool BF16, int PHASE, bool Q>
void work(const std::shared_ptr<Job>& job) {
  const int64_t tasks = job->tasks();
  for (int64_t t; (t = job->next[PHASE - 1].fetch_add(1)) < tasks;) {
    run_task<W, BF16, PHASE, Q>(*job, t);
    job->done[PHASE - 1].fetch_add(1, std::memory_order_release);
  }
}

int64_t min_parallel_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("MOEJAX_KERNEL_PARALLEL_BYTES");
    return e ? std::atoll(e) : int64_t(16) << 10;
  }();
  return v;
}

// Helper threads of the kernels' own that spin between calls. A decode step makes ~50 kernel
// calls a few microseconds to tens of microseconds apart; a pool thread woken for each one
// (a futex wake, on a VM an idle vCPU's halt exit) arrives late, after the caller has done
// most of the tasks. These threads instead watch a sequence number for MOEJAX_KERNEL_SPIN_US
// (default 200) after their last job, yielding the core between checks, then sleep until the
// next call. One caller at a time uses them (XLA may run two independent kernel calls at once);
// another finds them busy and uses XLA's pool instead.
class Team {
 public:
  explicit Team(int n) {
    const char* e = std::getenv("MOEJAX_KERNEL_SPIN_US");
    spin_ = std::chrono::microseconds(e ? std::atoll(e) : 200);
    for (int i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();
  }
  // Runs f on every helper unless another caller holds them: then false.
  bool start(std::function<void()> f) {
    if (busy_.exchange(true, std::memory_order_acquire)) return false;
    {
      std::lock_guard<std::mutex> lock(m_);
      fn_ = std::move(f);
      seq_.fetch_add(1, std::memory_order_release);
      if (sleeping_) cv_.notify_all();
    }
    return true;
  }
  void finish() { busy_.store(false, std::memory_order_release); }

 private:
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 1; seq_.load(std::memory_order_acquire) == seen; ++i) {
        if (i % 64 == 0) {
          std::this_thread::yield();
          if (std::chrono::steady_clock::now() - t0 > spin_) {
            std::unique_lock<std::mutex> lock(m_);
            ++sleeping_;
            cv_.wait(lock, [&] { return seq_.load(std::memory_order_relaxed) != seen; });
            --sleeping_;
          }
        }
#if defined(__AVX2__)
        _mm_pause();
#endif
      }
      std::function<void()> f;
      {
        std::lock_guard<std::mutex> lock(m_);
        f = fn_;
        seen = seq_.load(std::memory_order_relaxed);
      }
      f();
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> seq_{0};
  std::atomic<bool> busy_{false};
  std::function<void()> fn_;
  int sleeping_ = 0;
  std::chrono::microseconds spin_;
};

bool use_team() {  // MOEJAX_KERNEL_TEAM=0: wake XLA's pool threads instead (the A/B in docs/benchmarks.md)
  static const bool v = [] {
    const char* e = std::getenv("MOEJAX_KERNEL_TEAM");
    return !e || e[0] != '0';
  }();
  return v;
}

Team& team(int helpers) {
  static Team* t = new Team(helpers);  // never destroyed: its threads outlive static destructors
  return *t;
}

// Run `tasks` tasks of `work` (which takes them from a counter and counts them in `done`) on
// the caller and up to `threads - 1` helpers: the calling thread is XLA's, outside the pool,
// so it and all the pool's threads would be one more thread than XLA sizes the pool for (the
// cores); on 2 cores one helper was 6% faster than two on the 266M model's decode step and 21%
// on the bundled model's (docs/benchmarks.md). Late helpers find nothing left to do; the
// caller waits only for tasks that were taken: it spins briefly (a task takes microseconds),
// then yields, so that on a loaded machine a descheduled helper gets the core back
// instead of the caller spinning through its time slice.
template <typename J, typename F>
void parallel(ffi::ThreadPool& pool, const std::shared_ptr<J>& job, int64_t tasks, bool wide, F work,
              const std::atomic<int64_t>& done) {
  const int64_t helpers = wide ? std::max<int64_t>(0, std::min<int64_t>(pool.num_threads() - 1, tasks - 1)) : 0;
  Team* teamed = nullptr;
  if (helpers > 0 && use_team()) {
    Team& t = team(int(pool.num_threads() - 1));
    if (t.start([job, work] { work(job); })) teamed = &t;
  }
  if (!teamed)
    for (int64_t k = 0; k < helpers; ++k) pool.Schedule([job, work] { work(job); });
  work(job);
  for (int spins = 0; done.load(std::memory_order_acquire) < tasks; ++spins)
    if (spins >= 4096) std::this_thread::yield();
  if (teamed) teamed->finish();
}

template <typename W, bool BF16, bool Q = false>
void phases(ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, bool wide) {
  const int64_t tasks = job->tasks();
  parallel(pool, job, tasks, wide, work<W, BF16, 1, Q>, job->done[0]);
  parallel(pool, job, tasks, wide, work<W, BF16, 2, Q>, job->done[1]);
}

// job: from reuse(), its list filled by the caller.
ffi::Error Run(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer stack, const Quant& q, int64_t inter,
               std::shared_ptr<Job> job, const void* acc_in, ffi::Result<ffi::AnyBuffer> out) {
  const auto xd = x.dimensions(), sd = stack.dimensions();
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  if (!bf16 && x.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("moejax experts: x must be float32 or bfloat16");
  const auto st = stack.element_type();
  const bool wide = st == ffi::DataType::F32;
  if (xd.size() != 2) return ffi::Error::InvalidArgument("moejax experts: x [N, H] expected");
  const int64_t N = xd[0], H = xd[1], S = sd[0], I = q.bits ? inter : (sd.size() == 4 ? sd[3] : 0);
  if (q.bits) {
    if ((q.bits != 8 && q.bits != 4) || q.gH < 1 || q.gI < 1 || H % q.gH || I % q.gI || (q.bits == 4 && H % 2) ||
        sd.size() != 2 || st != ffi::DataType::U8 || sd[1] != q.row_bytes(H, I))
      return ffi::Error::InvalidArgument("moejax experts: quantized stack [S, B] uint8 does not match its layout");
  } else {
    if (sd.size() != 4 || sd[1] != 3 || sd[2] != H)
      return ffi::Error::InvalidArgument("moejax experts: x [N, H] and stack [S, 3, H, I] expected");
    if (!wide && st != ffi::DataType::BF16 && st != ffi::DataType::U16)
      return ffi::Error::InvalidArgument("moejax experts: stack must be float32, bfloat16 or uint16 bits");
  }

  job->stack = stack.untyped_data();
  job->H = H, job->I = I, job->q = q;
  job->rows = part_rows(H, kRows, q.bits ? q.gH : 8);
  job->parts = (H + job->rows - 1) / job->rows;
  job->row_bytes = q.bits ? q.row_bytes(H, I) : 3 * H * I * (wide ? 4 : 2);
  float* xf = scratch(4, N * H);
  if (bf16) {
    const uint16_t* xb = static_cast<const uint16_t*>(x.untyped_data());
    for (int64_t j = 0; j < N * H; ++j) xf[j] = bf16_to_f32(xb[j]);
  } else {
    std::memcpy(xf, x.untyped_data(), N * H * sizeof(float));
  }
  job->x = xf;
  for (auto& c : job->list) c.row = std::clamp<int32_t>(c.row, 0, int32_t(S - 1));
  const int64_t P = int64_t(job->list.size());
  job->order.resize(P);
  for (int64_t p = 0; p < P; ++p) job->order[p] = int32_t(p);
  std::stable_sort(job->order.begin(), job->order.end(),
                   [&](int32_t a, int32_t b) { return job->list[a].row < job->list[b].row; });
  for (int64_t p = 0; p < P; ++p)
    if (p == 0 || job->list[job->order[p]].row != job->list[job->order[p - 1]].row ||
        p - job->group_begin.back() == kChunk)
      job->group_begin.push_back(p);
  job->group_begin.push_back(P);
  job->gp.resize(job->parts * P * I);
  job->up.resize(job->parts * P * I);
  job->act.resize(P * I);
  const int64_t groups = int64_t(job->group_begin.size());
  if (job->finished_size < groups) job->finished.reset(new std::atomic<int>[groups]), job->finished_size = groups;
  for (int64_t k = 0; k < groups; ++k) job->finished[k].store(0, std::memory_order_relaxed);
  job->y.resize(P * H);
  if (P > 0) {
    const bool par = (int64_t(job->group_begin.size()) - 1) * job->row_bytes >= min_parallel_bytes();
    if (q.bits && bf16) phases<float, true, true>(pool, job, par);
    else if (q.bits) phases<float, false, true>(pool, job, par);
    else if (wide) phases<float, false>(pool, job, par);
    else if (bf16) phases<uint16_t, true>(pool, job, par);
    else phases<uint16_t, false>(pool, job, par);
  }

  // Sum the contributions in list order, rounding as the jnp graph does.
  float* acc = scratch(5, N * H);
  if (acc_in == nullptr) {
    std::fill(acc, acc + N * H, 0.0f);
  } else if (bf16) {
    const uint16_t* ab = static_cast<const uint16_t*>(acc_in);
    for (int64_t j = 0; j < N * H; ++j) acc[j] = bf16_to_f32(ab[j]);
  } else {
    std::memcpy(acc, acc_in, N * H * sizeof(float));
  }
  for (int64_t p = 0; p < P; ++p) {
    const Contribution& c = job->list[p];
    float* a = &acc[int64_t(c.token) * H];
    const float w = bf16 ? round_bf16(c.weight) : c.weight;
    for (int64_t h = 0; h < H; ++h) {
      const float y = job->y[p * H + h];
      float term = bf16 ? round_bf16(y * w) : y * w;
      a[h] = bf16 ? round_bf16(a[h] + term) : a[h] + term;
    }
  }
  if (bf16) {
    uint16_t* ob = static_cast<uint16_t*>(out->untyped_data());
    for (int64_t j = 0; j < N * H; ++j) ob[j] = f32_to_bf16(acc[j]);
  } else {
    std::memcpy(out->untyped_data(), acc, N * H * sizeof(float));
  }
  return ffi::Error::Success();
}

// Decode: ids, weights [N, k]; token n's experts summed in router order from zero.
// Attributes (both handlers): bits (0: stack [S, 3, H, I] of floats; 8, 4: packed rows [S, B]),
// group_h, group_i (scale groups, quantized only), inter (I, quantized only).
Quant quant_of(int64_t bits, int64_t group_h, int64_t group_i, int64_t H, int64_t I) {
  Quant q;
  q.bits = bits, q.gH = group_h, q.gI = group_i;
  q.wbytes = bits == 8 ? 3 * H * I : 3 * (H / 2) * I;
  return q;
}

ffi::Error Decode(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer stack, ffi::Buffer<ffi::S32> ids,
                  ffi::Buffer<ffi::F32> weights, ffi::Result<ffi::AnyBuffer> out, int64_t bits, int64_t group_h,
                  int64_t group_i, int64_t inter) {
  const auto d = ids.dimensions();
  if (d.size() != 2 || weights.dimensions().size() != 2 || weights.dimensions()[0] != d[0] ||
      weights.dimensions()[1] != d[1] || x.dimensions().size() != 2 || x.dimensions()[0] != d[0])
    return ffi::Error::InvalidArgument("moejax experts decode: ids, weights [N, k] and x [N, H] expected");
  auto job = reuse<Job>();
  // A term of weight 0 adds exactly zero to a finite sum, so it is left out: the engine's
  // prediction of the next layer computes only its hits (the misses weigh 0), and the skip
  // baseline's dropped experts cost nothing.
  for (int64_t n = 0; n < d[0]; ++n)
    for (int64_t j = 0; j < d[1]; ++j)
      if (weights.typed_data()[n * d[1] + j] != 0.0f)
        job->list.push_back({int32_t(n), ids.typed_data()[n * d[1] + j], weights.typed_data()[n * d[1] + j]});
  const Quant q = quant_of(bits, group_h, group_i, x.dimensions()[1], inter);
  return Run(pool, x, stack, q, inter, std::move(job), nullptr, out);
}

// Prefill: for each position p in order with ok[p], every token routed (idx) to expert ids[p]
// adds its weight times the FFN of stack row rows[p] to acc.
ffi::Error Ordered(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer stack, ffi::Buffer<ffi::S32> rows,
                   ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::PRED> ok, ffi::Buffer<ffi::S32> idx,
                   ffi::Buffer<ffi::F32> weights, ffi::AnyBuffer acc, ffi::Result<ffi::AnyBuffer> out, int64_t bits,
                   int64_t group_h, int64_t group_i, int64_t inter) {
  const int64_t G = rows.element_count();
  const auto d = idx.dimensions();
  if (ids.element_count() != G || ok.element_count() != G || d.size() != 2 || x.dimensions().size() != 2 ||
      x.dimensions()[0] != d[0] || weights.element_count() != d[0] * d[1] || acc.element_type() != x.element_type())
    return ffi::Error::InvalidArgument("moejax experts ordered: shapes do not agree");
  const int64_t N = d[0], k = d[1];
  auto job = reuse<Job>();
  const bool* okp = ok.typed_data();
  for (int64_t p = 0; p < G; ++p) {
    if (!okp[p]) continue;
    const int32_t e = ids.typed_data()[p];
    for (int64_t n = 0; n < N; ++n) {
      float w = 0.0f;
      bool hit = false;
      for (int64_t j = 0; j < k; ++j)
        if (idx.typed_data()[n * k + j] == e) w += weights.typed_data()[n * k + j], hit = true;
      if (hit) job->list.push_back({int32_t(n), rows.typed_data()[p], w});
    }
  }
  const Quant q = quant_of(bits, group_h, group_i, x.dimensions()[1], inter);
  return Run(pool, x, stack, q, inter, std::move(job), acc.untyped_data(), out);
}

// ---- linear layers: y [N, O] = x [N, H] @ w [H, O] (or w stored [O, H], transposed) ---------
// Each output column is computed by one task, summing over h in ascending order (h-major
// accumulation for w [H, O]; lanes of 16 then their sum for w [O, H]), so the result does not
// depend on the number of threads.

// w [H, O] is split into parts of at most kRowsLinear consecutive rows, at least two of equal
// size (part_rows: fixed by H, so the order in which the parts' partial sums are added never
// depends on the machine); each task streams one contiguous block of rows. w [O, H]
// (transposed) is split into blocks of output rows.
constexpr int64_t kRowsLinear = 128;

struct Linear {
  const float* x;  // [N, H] float32
  const void* w;
  int64_t N, H, O;
  std::vector<float> y;  // [parts, N, O]: partial sums (w [H, O]), or [1, N, O] (transposed)
  int64_t block;         // rows of w per task
  std::atomic<int64_t> next{0}, done{0};
  void reset() { next.store(0, std::memory_order_relaxed), done.store(0, std::memory_order_relaxed); }
};

template <typename W>
void linear_part(Linear& L, int64_t q) {  // w [H, O]: rows [h0, h1), h-major into partial q
  const W* w = static_cast<const W*>(L.w);
  const int64_t h0 = q * L.block, h1 = std::min(L.H, h0 + L.block), O = L.O;
  float* __restrict__ acc = L.y.data() + q * L.N * O;
  // Decode (a few tokens) streams whole rows of its block of w from start to end (column chunks
  // of a wide w read short runs at a stride, which halved the bandwidth); more tokens go through
  // xw's register tiles, a block of columns at a time so that its slab of w stays in cache.
  if (L.N < 4) return plain_xw(w, O, h0, h1, L.x, L.H, 0, L.N, 0, O, acc, O);
  constexpr int64_t OC = 96;
  for (int64_t o0 = 0; o0 < O; o0 += OC) xw(w + o0, O, h0, h1, L.x, L.H, L.N, std::min(OC, O - o0), acc + o0, O);
}

template <typename W>
void linear_rows(Linear& L, int64_t q) {  // w stored [O, H]: outputs [o0, o1), a dot product each
  const W* w = static_cast<const W*>(L.w);
  const int64_t o0 = q * L.block, o1 = std::min(L.O, o0 + L.block);
  for (int64_t o = o0; o < o1; ++o) {
    const W* __restrict__ wr = w + o * L.H;
    for (int64_t t = 0; t < L.N; ++t)
      L.y[t * L.O + o] = lane_dot([&](int64_t h) { return ld(wr[h]); }, L.x + t * L.H, L.H);
  }
}

template <typename W, bool T>
void linear_work(const std::shared_ptr<Linear>& L) {
  const int64_t tasks = ((T ? L->O : L->H) + L->block - 1) / L->block;
  for (int64_t t; (t = L->next.fetch_add(1)) < tasks;) {
    if (T) linear_rows<W>(*L, t); else linear_part<W>(*L, t);
    L->done.fetch_add(1, std::memory_order_release);
  }
}

// -> the result [N, O] in L->y (float32).
template <typename W, bool T>
void linear_run(ffi::ThreadPool& pool, std::shared_ptr<Linear> L) {
  const bool wide = L->H * L->O * int64_t(sizeof(W)) >= min_parallel_bytes();
  const int64_t threads = wide ? std::max<int64_t>(1, pool.num_threads()) : 1;
  L->block = T ? std::max<int64_t>(16, (L->O + 4 * threads - 1) / (4 * threads)) : part_rows(L->H, kRowsLinear, 8);
  const int64_t tasks = ((T ? L->O : L->H) + L->block - 1) / L->block;
  L->y.assign((T ? 1 : tasks) * L->N * L->O, 0.0f);
  parallel(pool, L, tasks, wide, linear_work<W, T>, L->done);
  if (!T) {
    const int64_t n = L->N * L->O;
    for (int64_t q = 1; q < tasks; ++q)
      for (int64_t j = 0; j < n; ++j) L->y[j] += L->y[q * n + j];
  }
}

template <bool T>
ffi::Error LinearImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || (T ? wd[1] : wd[0]) != xd[1])
    return ffi::Error::InvalidArgument("moejax linear: x [N, H] and w [H, O] (or [O, H]) expected");
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  if (!bf16 && x.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("moejax linear: x must be float32 or bfloat16");
  const auto wt = w.element_type();
  if (wt != ffi::DataType::F32 && wt != ffi::DataType::BF16 && wt != ffi::DataType::U16)
    return ffi::Error::InvalidArgument("moejax linear: w must be float32, bfloat16 or uint16 bits");
  auto L = reuse<Linear>();
  L->N = xd[0], L->H = xd[1], L->O = T ? wd[0] : wd[1];
  float* xf = scratch(4, L->N * L->H);
  if (bf16) {
    const uint16_t* xb = static_cast<const uint16_t*>(x.untyped_data());
    for (int64_t j = 0; j < L->N * L->H; ++j) xf[j] = bf16_to_f32(xb[j]);
  } else {
    std::memcpy(xf, x.untyped_data(), L->N * L->H * sizeof(float));
  }
  L->x = xf, L->w = w.untyped_data();
  const int64_t n = L->N * L->O;
  if (n > 0) {
    if (wt == ffi::DataType::F32) linear_run<float, T>(pool, L);
    else linear_run<uint16_t, T>(pool, L);
  }
  if (bf16) {
    uint16_t* ob = static_cast<uint16_t*>(out->untyped_data());
    for (int64_t j = 0; j < n; ++j) ob[j] = f32_to_bf16(L->y[j]);
  } else if (n > 0) {
    std::memcpy(out->untyped_data(), L->y.data(), n * sizeof(float));
  }
  return ffi::Error::Success();
}

ffi::Error LinearHO(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out) {
  return LinearImpl<false>(pool, x, w, out);
}

ffi::Error LinearOH(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out) {
  return LinearImpl<true>(pool, x, w, out);
}

// ---- decode attention: one query token per row over a static-size KV cache -------------------
// moejax.model.layers.attend for T = 1 in one call, where XLA:CPU ran ~12 thunks per layer
// (layout copies of the cache, two dots, the softmax's reductions), each with its fixed cost.
// The same arithmetic as the jnp formulation: scores q . k summed in float32 and rounded to the
// activation dtype (the einsum's output), times scale in float32; keys past the query's position
// are left out (the jnp softmax gives them exactly zero weight); softmax in float32
// (max, exp(x - max), their sum, division); probabilities rounded to the activation dtype;
// out = probs . v summed in float32 and rounded. Only the summation order differs from XLA's
// dots, so the result differs from the jnp formulation by rounding; every path (resident and
// both engines) decodes through this function, so they agree exactly.

struct Attend {
  const void *q, *k, *v;  // q [B, Q, D]; k, v [B, S, K, D]
  int64_t B, Q, K, S, D, last;  // last: the query's position, clamped to S - 1
  float scale;
  void* out;  // [B, Q * D]
  std::atomic<int64_t> next{0}, done{0};
};

template <typename T, bool BF16>
void attend_row(Attend& A, int64_t row) {  // row = b * Q + head
  const int64_t b = row / A.Q, h = row % A.Q, kh = h / (A.Q / A.K), D = A.D, n = A.last + 1;
  const T* q = static_cast<const T*>(A.q) + row * D;
  float qf[512];
  for (int64_t d = 0; d < D; ++d) qf[d] = ld(q[d]);
  thread_local std::vector<float> p;  // scores, then weights: one buffer per thread, not per row
  p.resize(n);
  float m = -INFINITY;
  for (int64_t s = 0; s < n; ++s) {
    const T* k = static_cast<const T*>(A.k) + ((b * A.S + s) * A.K + kh) * D;
    const float acc = lane_dot([&](int64_t d) { return ld(k[d]); }, qf, D);
    p[s] = (BF16 ? round_bf16(acc) : acc) * A.scale;
    m = std::max(m, p[s]);
  }
  float sum = 0.0f;
  for (int64_t s = 0; s < n; ++s) sum += (p[s] = std::exp(p[s] - m));
  float o[512] = {0};
  for (int64_t s = 0; s < n; ++s) {
    const float w = BF16 ? round_bf16(p[s] / sum) : p[s] / sum;
    const T* v = static_cast<const T*>(A.v) + ((b * A.S + s) * A.K + kh) * D;
    for (int64_t d = 0; d < D; ++d) o[d] += w * ld(v[d]);
  }
  T* out = static_cast<T*>(A.out) + row * D;
  for (int64_t d = 0; d < D; ++d) {
    if constexpr (BF16) out[d] = f32_to_bf16(o[d]); else out[d] = o[d];
  }
}

template <typename T, bool BF16>
void attend_work(const std::shared_ptr<Attend>& A) {
  for (int64_t r; (r = A->next.fetch_add(1)) < A->B * A->Q;) {
    attend_row<T, BF16>(*A, r);
    A->done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error AttendDecode(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::Buffer<ffi::S32> pos, ffi::Result<ffi::AnyBuffer> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin()) ||
      kd[0] != qd[0] || kd[3] != qd[2] ||
      qd[2] > 512 || kd[2] == 0 || qd[1] % kd[2] != 0 || pos.element_count() != 1)
    return ffi::Error::InvalidArgument("moejax attend: q [B, Q, D], k and v [B, S, K, D] (D <= 512), one position");
  const auto t = q.element_type();
  const bool bf16 = t == ffi::DataType::BF16;
  const auto kt = bf16 && k.element_type() == ffi::DataType::U16 ? t : k.element_type();  // bf16 bits
  if ((!bf16 && t != ffi::DataType::F32) || kt != t || v.element_type() != k.element_type())
    return ffi::Error::InvalidArgument("moejax attend: q, k and v must all be float32 or all bfloat16");
  auto A = std::make_shared<Attend>();
  A->q = q.untyped_data(), A->k = k.untyped_data(), A->v = v.untyped_data(), A->out = out->untyped_data();
  A->B = qd[0], A->Q = qd[1], A->D = qd[2], A->S = kd[1], A->K = kd[2], A->scale = scale;
  A->last = std::min<int64_t>(std::max<int32_t>(pos.typed_data()[0], 0), A->S - 1);
  const int64_t rows = A->B * A->Q;
  const bool wide = rows * (A->last + 1) * A->D * 2 * (bf16 ? 2 : 4) >= min_parallel_bytes();
  if (bf16) parallel(pool, A, rows, wide, attend_work<uint16_t, true>, A->done);
  else parallel(pool, A, rows, wide, attend_work<float, false>, A->done);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxLinear, LinearHO,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxLinearT, LinearOH,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxExpertsDecode, Decode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_h")
                                  .Attr<int64_t>("group_i")
                                  .Attr<int64_t>("inter"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxExpertsOrdered, Ordered,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_h")
                                  .Attr<int64_t>("group_i")
                                  .Attr<int64_t>("inter"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxAttendDecode, AttendDecode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));

