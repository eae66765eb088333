// One decoder step of a frozen model (transformer/model/frozen.py), run from C++ instead of Python.
//
// What _FrozenDecoder.step computes for one new position on the CPU (float32 or int8 weights), from the token
// embedding to the logits, with the same calls in the same order (this file's kernels where the Python step
// calls them too: products, attention, LayerNorm), so the two agree bit for bit: what this saves is the Python
// interpreter between the calls and the fixed cost of ATen's small calls (allocations, the threads' start),
// which at a few rows are a large part of a step. Built on demand by
// transformer/model/native.py with torch.utils.cpp_extension; Python keeps the KV cache (it grows the
// buffers; this writes the new position into them and into the histories' tables of rows) and the search,
// except greedy search, whose whole loop (DecoderStep.greedy: the steps, the candidates, the finished
// sentences leaving the batch) runs here where the step computes the logits.
//
// It also holds panel_linear, a product for the few rows of a decoder step (below): with the weights read
// once, in the order they lie in memory, it is 1.1-2.9x faster than MKL's and oneDNN's forms at 1-64 rows of
// the layers' shapes on the benchmark CPU (benchmarks/bench_micro.py --parts panels), where MKL's small-row
// products use a fraction of the memory bandwidth. And kernels for training: dropout_apply, the CPU dropout
// of transformer/model/dropout.py, its mask hashed from a seed where it is applied instead of stored; the loss's
// passes over the logits (exp_rows_, exp_rows_grad_; transformer/training/loss.py); the feed-forward network's
// ReLU with fc1's bias (bias_relu_, relu_grad_; transformer/model/layers.py); a post-norm sub-layer's end, its
// bias, dropout, residual and LayerNorm in one pass each way (add_norm_forward, add_norm_backward; the same
// file); and attention_forward / attention_backward, the attention of short sequences
// (transformer/model/attention.py).
//
// Shapes: N rows (batch x beams, one new position each), D model width, H heads, Dh = D / H, L cached
// positions before this step, S source length.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TRANSFORMER_X86 1
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define TRANSFORMER_AVX2 __attribute__((target("avx2,fma")))
#define TRANSFORMER_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define TRANSFORMER_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma")))
#else
#define TRANSFORMER_AVX2
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

using at::Tensor;

namespace {

// --- which instructions the kernels use ---------------------------------------------------------------------
//
// Every kernel here has an AVX2 + FMA form. Where the CPU has AVX-512 (F, BW, DQ, VL), the decoding products
// (panel_linear), training attention's products (small_gemm) and the exponentials of the loss (exp_rows_) and
// of the candidates (step_candidates) take 16-float registers, and where it also has AVX-512 VNNI the int8
// products (panel_linear_w8a8) take vpdpbusd; each computes the same operations per output in the same order
// as the AVX2 form, so the results are the same bits. set_cpu_level caps the level (tests run every form).

enum CpuLevel : int { kScalar = 0, kAvx2 = 2, kAvx512 = 3, kAvx512Vnni = 4 };

int detected_cpu_level() {
#ifdef TRANSFORMER_X86
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return kScalar;
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512dq") || !__builtin_cpu_supports("avx512vl"))
    return kAvx2;
  return __builtin_cpu_supports("avx512vnni") ? kAvx512Vnni : kAvx512;
#else
  return kScalar;
#endif
}

int g_cpu_cap = kAvx512Vnni;  // set_cpu_level's cap

int cpu_level() {
  static const int detected = detected_cpu_level();
  return std::min(detected, g_cpu_cap);
}

// Whether the CPU is Intel's (cpuid's vendor): some thresholds suit one vendor's CPUs and not the other's (the
// panels' prefetch, stream_panels below, on AMD's; the frozen decoder's product thresholds,
// transformer/model/frozen.py _tune_for_cpu, on Intel's)
bool cpu_is_intel() {
#ifdef TRANSFORMER_X86
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
#else
  return false;
#endif
}

// The level the kernels use from now on: min(what the CPU has, `cap`: 2 AVX2, 3 AVX-512, 4 AVX-512 VNNI);
// returns it. Not while kernels run.
int set_cpu_level(int64_t cap) {
  TORCH_CHECK(cap >= kAvx2 && cap <= kAvx512Vnni, "set_cpu_level: 2 (AVX2), 3 (AVX-512) or 4 (AVX-512 VNNI)");
  g_cpu_cap = static_cast<int>(cap);
  return cpu_level();
}

// --- panel_linear: y = x W^T + b for a few rows, W stored as column panels ----------------------------
//
// W (out, in) is stored as P = ceil(out / 16) panels, panel j holding W^T's columns 16j..16j+15 as a
// contiguous (in, 16) block (zeros past `out`), so a panel is one sequential stream of memory. A tile of
// up to 6 rows keeps 6 x 16 accumulators in 12 AVX2 registers, initialised with the bias: for each k it
// loads 16 weights, broadcasts x[r, k] and adds their products (FMA). Rows above 6 take further tiles over
// the same panel while it is in cache. The threads split the panels. Each output is the sum over k in
// order, from the bias, in float32.

constexpr int kPanel = 16;     // output columns per panel: two 8-float AVX registers
constexpr int kTileRows = 6;   // rows per tile: 12 accumulators, 2 weight registers, 1 broadcast
constexpr int kPrefetch = 1024;  // prefetch the panel this many bytes ahead, one cache line per 64 bytes

#ifdef TRANSFORMER_X86
// R rows of a tile's 16 outputs (columns 0-7 in lo, 8-15 in hi) into out (row stride ldo): all 16, or the first
// `columns` of them in the last panel, whose columns past `out` are not written
template <int R>
__attribute__((target("avx2,fma"))) inline void store_tile(const __m256 (&lo)[R], const __m256 (&hi)[R], float* out,
                                                          int64_t ldo, int columns) {
  alignas(32) float tail[R * kPanel];
  const bool full = columns == kPanel;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* dst = full ? out + r * ldo : tail + r * kPanel;
    _mm256_storeu_ps(dst, lo[r]);
    _mm256_storeu_ps(dst + 8, hi[r]);
  }
  if (!full) {
    for (int r = 0; r < R; ++r) std::memcpy(out + r * ldo, tail + r * kPanel, sizeof(float) * columns);
  }
}

// A tile of R rows over one float32 panel: the sums start from the bias. Stream: the panel is prefetched past
// the caches (read once), else into them.
template <int R, bool Stream = false>
__attribute__((target("avx2,fma"))) void panel_tile(const float* x, int64_t ldx, const float* panel, int64_t k_dim,
                                                   const float* bias, float* out, int64_t ldo, int columns) {
  constexpr int64_t kAhead = kPrefetch / (kPanel * sizeof(float));
  __m256 acc0[R], acc1[R];
  const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc0[r] = b0;
    acc1[r] = b1;
  }
  for (int64_t k = 0; k < k_dim; ++k) {  // one cache line (16 floats) per k
    const char* ahead = reinterpret_cast<const char*>(panel + (k + kAhead) * kPanel);
    if (Stream) {
      _mm_prefetch(ahead, _MM_HINT_NTA);
    } else {
      _mm_prefetch(ahead, _MM_HINT_T0);
    }
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel), w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      acc0[r] = _mm256_fmadd_ps(w0, xb, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(w1, xb, acc1[r]);
    }
  }
  store_tile<R>(acc0, acc1, out, ldo, columns);
}

// the tiles by number of rows (index 1..6)
using PanelTile = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int);
constexpr PanelTile kTiles[kTileRows + 1] = {nullptr,         panel_tile<1>, panel_tile<2>, panel_tile<3>,
                                             panel_tile<4>,   panel_tile<5>, panel_tile<6>};
// panels read once (one tile of rows): prefetched as a stream that passes the caches by (faster than a T0
// prefetch on the benchmark CPU: a one-row step in benchmarks/bench_step.py, BENCHMARKS.md session 12), where a
// step's 19 MB of float32 weights never stay in its 8 MB L3 anyway. Not for several tiles, which read a panel
// again.
constexpr PanelTile kStreamTiles[kTileRows + 1] = {nullptr,
                                                   panel_tile<1, true>,
                                                   panel_tile<2, true>,
                                                   panel_tile<3, true>,
                                                   panel_tile<4, true>,
                                                   panel_tile<5, true>,
                                                   panel_tile<6, true>};

// Whether a product of one tile of rows prefetches its panels as a stream (NTA, past the caches) rather than
// into them (T0): on AMD's Zen CPUs, where the stream was faster (session 12, above). On the Intel Xeon
// (Emerald Rapids, KVM) of session 27 it was more than twice as slow, warm and cold (ad-hoc timings,
// BENCHMARKS.md session 27).
bool stream_panels() {
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
}

// AVX-512: a panel's 16 columns in one register, so a tile keeps up to 8 rows' sums in 8 registers and each k
// takes one load of weights and one FMA per row (the AVX2 tile: two of each). Per output, the same FMAs in
// the same order from the bias: the same bits as panel_tile.
constexpr int kTileRows512 = 8;

template <int R, bool Stream = false>
TRANSFORMER_AVX512 void panel_tile512(const float* x, int64_t ldx, const float* panel, int64_t k_dim,
                                      const float* bias, float* out, int64_t ldo, int columns) {
  constexpr int64_t kAhead = kPrefetch / (kPanel * sizeof(float));
  __m512 acc[R];
  const __m512 b = _mm512_loadu_ps(bias);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = b;
  for (int64_t k = 0; k < k_dim; ++k) {
    const char* ahead = reinterpret_cast<const char*>(panel + (k + kAhead) * kPanel);
    if (Stream) {
      _mm_prefetch(ahead, _MM_HINT_NTA);
    } else {
      _mm_prefetch(ahead, _MM_HINT_T0);
    }
    const __m512 w = _mm512_loadu_ps(panel + k * kPanel);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[r * ldx + k]), acc[r]);
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << columns) - 1);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * ldo, keep, acc[r]);
}

constexpr PanelTile kTiles512[kTileRows512 + 1] = {
    nullptr,           panel_tile512<1>, panel_tile512<2>, panel_tile512<3>, panel_tile512<4>,
    panel_tile512<5>,  panel_tile512<6>, panel_tile512<7>, panel_tile512<8>};
constexpr PanelTile kStreamTiles512[kTileRows512 + 1] = {
    nullptr,                 panel_tile512<1, true>, panel_tile512<2, true>, panel_tile512<3, true>,
    panel_tile512<4, true>,  panel_tile512<5, true>, panel_tile512<6, true>, panel_tile512<7, true>,
    panel_tile512<8, true>};
#endif

bool panels_supported() { return cpu_level() >= kAvx2; }

// What both panel products check: float32 x; `panels` (P, ...) contiguous, of `dtype`; out_features within the
// last of the P panels; each of `vectors` (bias, scales, column sums) contiguous, one value per panel column
// (P * 16,), of its paired dtype
bool panel_operands_fit(const Tensor& x, const Tensor& panels, at::ScalarType dtype, int64_t out_features,
                        std::initializer_list<std::pair<Tensor, at::ScalarType>> vectors) {
  bool ok = x.scalar_type() == at::kFloat && panels.scalar_type() == dtype && panels.is_contiguous() &&
            out_features <= panels.size(0) * kPanel && out_features > (panels.size(0) - 1) * kPanel;
  for (const auto& [v, type] : vectors) {
    ok = ok && v.scalar_type() == type && v.is_contiguous() && v.numel() == panels.size(0) * kPanel;
  }
  return ok;
}

// x (N, in) float32; panels (P, in, 16) contiguous float32; bias contiguous float32 (P * 16,); out_features
// within the last panel
void check_panels(const Tensor& x, const Tensor& panels, const Tensor& bias, int64_t out_features) {
  TORCH_CHECK(panels_supported(), "panel_linear needs a CPU with AVX2 and FMA");
  TORCH_CHECK(x.dim() == 2 && panels.dim() == 3 && panels.size(2) == kPanel && x.size(1) == panels.size(1),
              "panel_linear: x (N, in), panels (P, in, 16)");
  TORCH_CHECK(panel_operands_fit(x, panels, at::kFloat, out_features, {{bias, at::kFloat}}),
              "panel_linear: float32 x, contiguous float32 panels, padded float32 bias");
}

// max(y, 0) over `rows` rows of `columns` outputs at y (row stride ld): a product's ReLU, applied to a panel's
// outputs while they are in cache (the same values as ATen's relu after the product)
void relu_block(float* y, int64_t rows, int64_t ld, int columns) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int c = 0; c < columns; ++c) y[r * ld + c] = std::max(y[r * ld + c], 0.f);
  }
}

// x (N, in) float32; panels (P, in, 16); bias (P * 16,) -> (N, out), then max(., 0) where `relu`
Tensor panel_linear(const Tensor& x_in, const Tensor& panels, const Tensor& bias, int64_t out_features,
                    bool relu = false) {
  check_panels(x_in, panels, bias, out_features);
  Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), k_dim = x.size(1), n_panels = panels.size(0);
  Tensor out = at::empty({rows, out_features}, x.options());
  if (rows == 0) return out;
#ifdef TRANSFORMER_X86
  const float* xp = x.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool wide = cpu_level() >= kAvx512;
  const int tile_rows = wide ? kTileRows512 : kTileRows;
  const PanelTile* tiles = wide ? kTiles512 : kTiles;
  const PanelTile* stream_tiles = stream_panels() ? (wide ? kStreamTiles512 : kStreamTiles) : tiles;
  at::parallel_for(0, n_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int columns = static_cast<int>(std::min<int64_t>(kPanel, out_features - j * kPanel));
      const float* panel = wp + j * k_dim * kPanel;
      if (rows <= tile_rows) {
        stream_tiles[rows](xp, k_dim, panel, k_dim, bp + j * kPanel, op + j * kPanel, out_features, columns);
      } else {
        for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {  // further tiles over the panel while it is in cache
          const int r = static_cast<int>(std::min<int64_t>(tile_rows, rows - r0));
          tiles[r](xp + r0 * k_dim, k_dim, panel, k_dim, bp + j * kPanel, op + r0 * out_features + j * kPanel,
                   out_features, columns);
        }
      }
      if (relu) relu_block(op + j * kPanel, rows, out_features, columns);
    }
  });
#endif
  return out;
}

// --- panel_linear_w8a8: int8 weights, 7-bit unsigned activations, int32 sums -----------------------------
//
// Each row of x is rounded with its own scale and zero point to unsigned values of 7 bits, u = clamp(round(x /
// sx) + z, 0, 127) with sx = (hi - lo) / 127 over the row's range [lo, hi] widened to hold 0 (so x ~ sx (u - z),
// and ReLU's zeros and the padding stay exact). The products u q by the int8 weights run in vpmaddubsw
// (unsigned by signed bytes) and vpmaddwd: 7 bits are what keeps them exact, because the 16-bit pair sums
// then stay below 2^15 (2 * 127 * 128), also for q = -128, which PyTorch's per-channel quantisation gives
// (fbgemm rounds to 7 bits for the same reason, with one scale for the whole batch; CTranslate2 rounds
// symmetrically to 8 bits). Per row, 32 multiply-adds take three instructions (vpmaddubsw, vpmaddwd, vpaddd)
// where float32 needs four FMAs; the sums are exact in int32, and each ends as (sum - z * colsum) * sx * s + b
// with the weight's column sums and per-channel scales s. A row's result depends on that row alone. Session
// 15's first form rounded x symmetrically to 8 bits and moved the signs with vpsignb (four instructions per 32
// multiply-adds): clearly slower from 32 rows, at the same BLEU (BENCHMARKS.md, session 15).
//
// The weights are "quad panels" (P, ceil(in / 4), 64) int8: panel j, group g holds Q[16j + c, 4g + i] at
// 4c + i (zeros past `in` and `out`), so one 32-byte load gives 8 columns x 4 consecutive k, what vpmaddubsw and
// vpmaddwd reduce into one int32 per column.

constexpr int kQuadRows = 3;  // rows per tile: 6 int32 accumulators, 2 weight registers, 1 broadcast

#ifdef TRANSFORMER_X86
// rows of x (N, in) float32 -> u = clamp(round(x / sx) + z, 0, 127) (N, k_pad) zero-padded, sx = (hi - lo) / 127
// and z = round(-lo / sx) per row, with lo = min(x, 0) and hi = max(x, 0) (0 is exact: the padding's and ReLU's
// zeros); x ~ sx (u - z). Rounding half to even, as torch.round; an all-zero row gives sx = 0, u = z = 0.
TRANSFORMER_AVX2 void quantize_rows(const float* x, int64_t rows, int64_t k_dim, int64_t k_pad, uint8_t* u,
                                    float* sx, int32_t* zero) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k_dim;
    uint8_t* ur = u + r * k_pad;
    __m256 vmin = _mm256_setzero_ps(), vmax = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= k_dim; k += 8) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      vmin = _mm256_min_ps(vmin, v);
      vmax = _mm256_max_ps(vmax, v);
    }
    alignas(32) float lows[8], highs[8];
    _mm256_store_ps(lows, vmin);
    _mm256_store_ps(highs, vmax);
    float lo = 0.f, hi = 0.f;
    for (int i = 0; i < 8; ++i) lo = std::min(lo, lows[i]), hi = std::max(hi, highs[i]);
    for (; k < k_dim; ++k) lo = std::min(lo, xr[k]), hi = std::max(hi, xr[k]);
    const float range = hi - lo;
    sx[r] = range / 127.f;
    const float inv = range > 0.f ? 127.f / range : 0.f;
    const bool tiny = !std::isfinite(inv);  // range below about 1e-37 (subnormal): x / range * 127 stays finite
    const int32_t z = static_cast<int32_t>(std::nearbyint(tiny ? -lo / range * 127.f : -lo * inv));
    zero[r] = z;
    k = 0;
    if (!tiny) {
      const __m256 vinv = _mm256_set1_ps(inv);
      const __m256i vz = _mm256_set1_epi32(z), v0 = _mm256_setzero_si256(), v127 = _mm256_set1_epi32(127);
      for (; k + 8 <= k_dim; k += 8) {
        __m256i v = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), vinv)), vz);
        v = _mm256_min_epi32(_mm256_max_epi32(v, v0), v127);
        const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(ur + k), _mm_packus_epi16(v16, v16));
      }
    }
    for (; k < k_dim; ++k) {
      const float scaled = tiny ? xr[k] / range * 127.f : xr[k] * inv;
      ur[k] = static_cast<uint8_t>(std::min(127, std::max(0, static_cast<int>(std::nearbyint(scaled)) + z)));
    }
    for (k = k_dim; k < k_pad; ++k) ur[k] = 0;
  }
}

// R rows (u, row stride ldu, scales sx, zero points z) by one quad panel (groups, 64) with its column sums into
// out's 16 columns: (sum_k u q - z * colsum) * sx * s + b
template <int R>
TRANSFORMER_AVX2 void quad_tile(const uint8_t* u, int64_t ldu, const float* sx, const int32_t* zero,
                                const int8_t* panel, int64_t groups, const int32_t* colsum, const float* scale,
                                const float* bias, float* out, int64_t ldo, int columns) {
  __m256i acc0[R], acc1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < groups; ++g) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + (g + 16) * 64), _MM_HINT_T0);  // a cache line per group
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + g * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + g * 64 + 32));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t xu;
      std::memcpy(&xu, u + r * ldu + 4 * g, 4);
      const __m256i xb = _mm256_set1_epi32(xu);
      acc0[r] = _mm256_add_epi32(acc0[r], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w0), ones));
      acc1[r] = _mm256_add_epi32(acc1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(xb, w1), ones));
    }
  }
  const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum));
  const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + 8));
  const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
  const __m256 b0 = _mm256_loadu_ps(bias), b1 = _mm256_loadu_ps(bias + 8);
  __m256 y0[R], y1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 xr = _mm256_set1_ps(sx[r]);
    const __m256i zr = _mm256_set1_epi32(zero[r]);
    const __m256i i0 = _mm256_sub_epi32(acc0[r], _mm256_mullo_epi32(zr, c0));
    const __m256i i1 = _mm256_sub_epi32(acc1[r], _mm256_mullo_epi32(zr, c1));
    y0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(s0, xr), b0);
    y1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_mul_ps(s1, xr), b1);
  }
  store_tile<R>(y0, y1, out, ldo, columns);
}

using QuadTile = void (*)(const uint8_t*, int64_t, const float*, const int32_t*, const int8_t*, int64_t,
                          const int32_t*, const float*, const float*, float*, int64_t, int);
constexpr QuadTile kQuadTiles[kQuadRows + 1] = {nullptr, quad_tile<1>, quad_tile<2>, quad_tile<3>};

// AVX-512 VNNI: one vpdpbusd per row and group adds a group's 4 products for all 16 columns into int32 (the
// AVX2 tile: vpmaddubsw, vpmaddwd and vpaddd per 8 columns). The 7-bit u keep vpmaddubsw's 16-bit pair sums
// exact, so both forms sum the same integers exactly, and the epilogue is the same float32 arithmetic: the
// same bits as quad_tile. Up to 8 rows a tile.
constexpr int kQuadRowsVnni = 8;

template <int R>
TRANSFORMER_VNNI void quad_tile_vnni(const uint8_t* u, int64_t ldu, const float* sx, const int32_t* zero,
                                     const int8_t* panel, int64_t groups, const int32_t* colsum, const float* scale,
                                     const float* bias, float* out, int64_t ldo, int columns) {
  __m512i acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + (g + 16) * 64), _MM_HINT_T0);  // a cache line per group
    const __m512i w = _mm512_loadu_si512(panel + g * 64);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t xu;
      std::memcpy(&xu, u + r * ldu + 4 * g, 4);
      acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(xu), w);
    }
  }
  const __m512i c = _mm512_loadu_si512(colsum);
  const __m512 s = _mm512_loadu_ps(scale), b = _mm512_loadu_ps(bias);
  const __mmask16 keep = static_cast<__mmask16>((1u << columns) - 1);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512i i = _mm512_sub_epi32(acc[r], _mm512_mullo_epi32(_mm512_set1_epi32(zero[r]), c));
    const __m512 y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(s, _mm512_set1_ps(sx[r])), b);
    _mm512_mask_storeu_ps(out + r * ldo, keep, y);
  }
}

constexpr QuadTile kQuadTilesVnni[kQuadRowsVnni + 1] = {
    nullptr,            quad_tile_vnni<1>, quad_tile_vnni<2>, quad_tile_vnni<3>, quad_tile_vnni<4>,
    quad_tile_vnni<5>,  quad_tile_vnni<6>, quad_tile_vnni<7>, quad_tile_vnni<8>};
#endif

// x (N, in) float32; quad panels (P, ceil(in / 4), 64) int8; colsums (P * 16,) int32 (each column's sum of Q);
// scales, bias (P * 16,) float32 -> (N, out) = ((u - z) Q^T) * sx * s + b with u, z, sx per row from
// quantize_rows, then max(., 0) where `relu`
Tensor panel_linear_w8a8(const Tensor& x_in, const Tensor& panels, const Tensor& colsums, const Tensor& scales,
                         const Tensor& bias, int64_t out_features, bool relu = false) {
  TORCH_CHECK(panels_supported(), "panel_linear_w8a8 needs a CPU with AVX2 and FMA");
  TORCH_CHECK(x_in.dim() == 2 && panels.dim() == 3 && panels.size(2) == 4 * kPanel &&
                  panels.size(1) == (x_in.size(1) + 3) / 4,
              "panel_linear_w8a8: x (N, in), quad panels (P, ceil(in / 4), 64)");
  TORCH_CHECK(panel_operands_fit(x_in, panels, at::kChar, out_features,
                                 {{colsums, at::kInt}, {scales, at::kFloat}, {bias, at::kFloat}}),
              "panel_linear_w8a8: float32 x, contiguous int8 quad panels, padded int32 column sums, padded float32 "
              "bias and scales");
  Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), k_dim = x.size(1), groups = panels.size(1), n_panels = panels.size(0);
  Tensor out = at::empty({rows, out_features}, x.options());
  if (rows == 0) return out;
#ifdef TRANSFORMER_X86
  const int64_t k_pad = 4 * groups;
  std::unique_ptr<uint8_t[]> u(new uint8_t[rows * k_pad]);  // every byte written by quantize_rows, padding too
  std::vector<float> sx(rows);
  std::vector<int32_t> zero(rows);
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = panels.data_ptr<int8_t>();
  const int32_t* cp = colsums.data_ptr<int32_t>();
  const float* sp = scales.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto quantize = [&](int64_t begin, int64_t end) {
    quantize_rows(xp + begin * k_dim, end - begin, k_dim, k_pad, u.get() + begin * k_pad, sx.data() + begin,
                  zero.data() + begin);
  };
  const bool vnni = cpu_level() >= kAvx512Vnni;
  const int tile_rows = vnni ? kQuadRowsVnni : kQuadRows;
  const QuadTile* tiles = vnni ? kQuadTilesVnni : kQuadTiles;
  auto multiply = [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int columns = static_cast<int>(std::min<int64_t>(kPanel, out_features - j * kPanel));
      for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
        const int r = static_cast<int>(std::min<int64_t>(tile_rows, rows - r0));
        tiles[r](u.get() + r0 * k_pad, k_pad, sx.data() + r0, zero.data() + r0, wp + j * groups * 64, groups,
                      cp + j * kPanel, sp + j * kPanel, bp + j * kPanel, op + r0 * out_features + j * kPanel,
                      out_features, columns);
      }
      if (relu) relu_block(op + j * kPanel, rows, out_features, columns);
    }
  };
#ifdef _OPENMP
  // Both phases in one team of threads, a barrier between them: one start and one join of the threads per
  // product instead of two (each costs microseconds, as much as a decoder step's small products at 32 rows)
  const int threads = at::get_num_threads();
  if (threads > 1 && rows > 16 && !at::in_parallel_region()) {
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
      quantize(rows * t / team, rows * (t + 1) / team);
#pragma omp barrier
      multiply(n_panels * t / team, n_panels * (t + 1) / team);
    }
    return out;
  }
#endif
  at::parallel_for(0, rows, 16, quantize);
  at::parallel_for(0, n_panels, 1, multiply);
#endif
  return out;
}

// --- attention of one new position ------------------------------------------------------------------------
//
// A decoder step attends with one query per row and head over a few dozen keys; ATen's CPU attention
// (flash attention, blocked for long queries) costs 20-36 us a call at one row and 0.3-0.65 ms at 128 rows on
// the benchmark CPU for what is a few thousand multiply-adds per row (benchmarks/bench_micro.py --parts
// attention). Here: for each row and head, the scores q.k_j / sqrt(Dh) (keys where the mask is false left
// out), their softmax, and the weighted sum of the values, written straight into the (N, H * Dh) layout the
// output projection takes. Where Dh is a multiple of 8 the dot products and the weighted sum run 8 floats at
// a time (AVX2 FMA); otherwise one at a time. The threads split rows x heads.
//
// Rows may share keys and values: with `kv_rows` (N,), row r attends to the keys and values of row
// kv_rows[r] (beam search's beams of one sentence attend to that sentence's source keys, kept once); with
// `kv_rows` (N, L), row r's key j lies in row kv_rows[r, j] (a self-attention history that beam search
// reorders by this table instead of copying the keys: FasterTransformer's cache indirection).

#ifdef TRANSFORMER_X86
__attribute__((target("avx2,fma"))) inline float sum_8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// q . k for Dh a multiple of 8: two chains of 8-float FMAs, then their sum
__attribute__((target("avx2,fma"))) inline float dot_8(const float* q, const float* k, int64_t dh) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= dh; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_loadu_ps(k + d + 8), a1);
  }
  if (d < dh) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), a0);
  return sum_8(_mm256_add_ps(a0, a1));
}

// out[d0 .. d0 + 8C) = sum_j p_j v_j[d0 ..]: C registers of sums, one pass over the keys
template <int C>
__attribute__((target("avx2,fma"))) void weigh_values(const float* p, const float* v, int64_t v_stride,
                                                      const int64_t* rows, int64_t row_stride, int64_t length,
                                                      int64_t d0, float* out) {
  __m256 acc[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < length; ++j) {
    if (p[j] == 0.f) continue;
    const __m256 pj = _mm256_set1_ps(p[j]);
    const float* vj = v + j * v_stride + (rows ? rows[j] * row_stride : 0) + d0;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * c), acc[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + d0 + 8 * c, acc[c]);
}

using WeighValues = void (*)(const float*, const float*, int64_t, const int64_t*, int64_t, int64_t, int64_t, float*);
constexpr WeighValues kWeighValues[9] = {nullptr,          weigh_values<1>, weigh_values<2>,
                                         weigh_values<3>,  weigh_values<4>, weigh_values<5>,
                                         weigh_values<6>,  weigh_values<7>, weigh_values<8>};
#endif

// One row and head: q (Dh), keys k_j = k + j * k_stride (+ key_rows[j] * k_row_stride where key_rows is not
// null), values likewise, mask (L) or null; scores: (L) scratch
TRANSFORMER_AVX2 void attend_row(const float* q, const float* k, int64_t k_stride, const float* v,
                                 int64_t v_stride, const int64_t* key_rows, int64_t k_row_stride,
                                 int64_t v_row_stride, const bool* mask, int64_t length, int64_t dh, float scale,
                                 float* scores, float* out) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
#ifdef TRANSFORMER_X86
  const bool vector = dh % 8 == 0;
#else
  const bool vector = false;
#endif
  float top = kNone;
  for (int64_t j = 0; j < length; ++j) {
    float s = kNone;
    if (mask == nullptr || mask[j]) {
      const float* kj = k + j * k_stride + (key_rows ? key_rows[j] * k_row_stride : 0);
      float dot = 0.f;
#ifdef TRANSFORMER_X86
      if (vector) dot = dot_8(q, kj, dh);
#endif
      if (!vector) {
        for (int64_t d = 0; d < dh; ++d) dot += q[d] * kj[d];
      }
      s = dot * scale;
    }
    scores[j] = s;
    top = std::max(top, s);
  }
  if (top == kNone) {  // nothing to attend to: zeros
    for (int64_t d = 0; d < dh; ++d) out[d] = 0.f;
    return;
  }
  float total = 0.f;
  for (int64_t j = 0; j < length; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  for (int64_t j = 0; j < length; ++j) scores[j] /= total;  // the weights p_j
#ifdef TRANSFORMER_X86
  if (vector) {
    for (int64_t d0 = 0; d0 < dh; d0 += 64) {
      kWeighValues[std::min<int64_t>(8, (dh - d0) / 8)](scores, v, v_stride, key_rows, v_row_stride, length, d0,
                                                        out);
    }
    return;
  }
#endif
  for (int64_t d = 0; d < dh; ++d) out[d] = 0.f;
  for (int64_t j = 0; j < length; ++j) {
    const float p = scores[j];
    if (p == 0.f) continue;
    const float* vj = v + j * v_stride + (key_rows ? key_rows[j] * v_row_stride : 0);
    for (int64_t d = 0; d < dh; ++d) out[d] += p * vj[d];
  }
}

// q (N, H, 1, Dh); k, v (M, H, L, Dh), unit stride in Dh (views of the KV buffers); mask (N, 1, 1, L) bool, true
// where a key may be attended to, or none; kv_rows (N,) or (N, L) int64 in [0, M), or none (then M = N, row r's
// own keys) -> (N, H * Dh)
Tensor attend_one(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                  const std::optional<Tensor>& kv_rows) {
  TORCH_CHECK(panels_supported(), "attend_one needs a CPU with AVX2 and FMA");
  const bool shared = kv_rows.has_value() && kv_rows->defined();
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(2) == 1 &&
                  (shared || q.size(0) == k.size(0)) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "attend_one: q (N, H, 1, Dh), k and v (N, H, L, Dh), or (M, H, L, Dh) with kv_rows");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "attend_one: float32 tensors with unit stride in the last dimension");
  const int64_t n = q.size(0), h = q.size(1), length = k.size(2), dh = q.size(3);
  Tensor out = at::empty({n, h * dh}, q.options());
  Tensor m, rows;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == n * length, "attend_one: a (N, 1, 1, L) bool mask");
    m = mask->reshape({n, length}).contiguous();
  }
  if (shared) {
    TORCH_CHECK(kv_rows->scalar_type() == at::kLong && kv_rows->size(0) == n &&
                    (kv_rows->dim() == 1 || (kv_rows->dim() == 2 && kv_rows->size(1) == length)),
                "attend_one: kv_rows (N,) or (N, L) int64");
    rows = kv_rows->contiguous();
    const int64_t* r = rows.data_ptr<int64_t>();
    TORCH_CHECK(std::all_of(r, r + rows.numel(), [&](int64_t i) { return i >= 0 && i < k.size(0); }),
                // one std::string, not c10::str's stream of a number: streaming an int64 here crashed an
                // extension built by Ubuntu's gcc 13.3 against torch 2.11+cu130 (the GPU machine)
                "attend_one: kv_rows out of range for " + std::to_string(k.size(0)) + " rows of keys");
  }
  if (n == 0) return out;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  const int64_t* rp = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  const bool per_key = rows.defined() && rows.dim() == 2;
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, length * dh));  // >= 16k multiply-adds
  at::parallel_for(0, n * h, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(length);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / h, head = i % h, src = per_key ? 0 : (rp ? rp[r] : r);
      attend_row(qp + r * q.stride(0) + head * q.stride(1), kp + src * k.stride(0) + head * k.stride(1),
                 k.stride(2), vp + src * v.stride(0) + head * v.stride(1), v.stride(2),
                 per_key ? rp + r * length : nullptr, k.stride(0), v.stride(0), mp ? mp + r * length : nullptr,
                 length, dh, scale, scores.data(), op + r * h * dh + head * dh);
    }
  });
  return out;
}

// An encoder's self-attention over its real tokens only: qkv (N, 3D) holds the q, k, v of a batch's real
// source tokens, sentence after sentence (sentence b's tokens are rows starts[b] .. starts[b + 1] - 1), and
// each token attends to its own sentence's tokens, with attend_row. ATen's attention runs on the padded
// (B, S) layout instead: the padding's queries and keys too (about half of a Multi30k batch of 32), and the
// copies into and out of that layout. -> (N, D), the heads side by side, as the output projection takes them.
Tensor attend_spans(const Tensor& qkv_in, const Tensor& starts_in, int64_t heads) {
  TORCH_CHECK(panels_supported(), "attend_spans needs a CPU with AVX2 and FMA");
  TORCH_CHECK(qkv_in.dim() == 2 && qkv_in.scalar_type() == at::kFloat && heads > 0 && qkv_in.size(1) % (3 * heads) == 0,
              "attend_spans: float32 qkv (N, 3D) with D a multiple of the heads");
  TORCH_CHECK(starts_in.dim() == 1 && starts_in.scalar_type() == at::kLong && starts_in.numel() >= 1,
              "attend_spans: starts (B + 1,) int64");
  Tensor qkv = qkv_in.contiguous(), starts = starts_in.contiguous();
  const int64_t n = qkv.size(0), d = qkv.size(1) / 3, dh = d / heads, b = starts.numel() - 1;
  const int64_t* st = starts.data_ptr<int64_t>();
  TORCH_CHECK(st[0] == 0 && st[b] == n, "attend_spans: starts run from 0 to N");
  std::vector<int64_t> sentence(n);  // the sentence of each row
  int64_t longest = 0;
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(st[i] <= st[i + 1], "attend_spans: starts must not decrease");
    longest = std::max(longest, st[i + 1] - st[i]);
    for (int64_t r = st[i]; r < st[i + 1]; ++r) sentence[r] = i;
  }
  Tensor out = at::empty({n, d}, qkv.options());
  if (n == 0) return out;
  const float* qp = qkv.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, longest * dh));
  at::parallel_for(0, n * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / heads, head = i % heads, first = st[sentence[r]];
      const float* key0 = qp + first * 3 * d + head * dh;
      attend_row(qp + r * 3 * d + head * dh, key0 + d, 3 * d, key0 + 2 * d, 3 * d, nullptr, 0, 0, nullptr,
                 st[sentence[r] + 1] - first, dh, scale, scores.data(), op + r * d + head * dh);
    }
  });
  return out;
}

// The decoder's cross-attention keys and values of a source, from the one product over its real tokens:
// kv (N, L * 2 * D), row i the token at position positions[i] of the padded (B, S) layout (or, without
// positions, N = B * S in order) -> (L, 2, B, H, S, Dh) contiguous, zeros at the padding: what attend_one and
// ATen's attention read. One pass, where scattering into the padded layout and then permuting it is two
// copies and a fill.
Tensor source_heads(const Tensor& kv_in, const std::optional<Tensor>& positions, int64_t batch, int64_t length,
                    int64_t layers, int64_t heads) {
  TORCH_CHECK(kv_in.dim() == 2 && kv_in.scalar_type() == at::kFloat && layers > 0 && heads > 0 &&
                  kv_in.size(1) % (2 * layers * heads) == 0,
              "source_heads: float32 kv (N, L * 2 * D)");
  Tensor kv = kv_in.contiguous();
  const int64_t n = kv.size(0), width = kv.size(1), dh = width / (2 * layers * heads);
  std::vector<int64_t> row_of(batch * length, -1);  // the kv row of each (b, s), -1 at padding
  if (positions.has_value() && positions->defined()) {
    TORCH_CHECK(positions->dim() == 1 && positions->scalar_type() == at::kLong && positions->numel() == n,
                "source_heads: positions (N,) int64");
    Tensor p = positions->contiguous();
    const int64_t* pp = p.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(pp[i] >= 0 && pp[i] < batch * length, "source_heads: a position outside B x S");
      row_of[pp[i]] = i;
    }
  } else {
    TORCH_CHECK(n == batch * length, "source_heads: without positions, kv has B x S rows");
    for (int64_t i = 0; i < n; ++i) row_of[i] = i;
  }
  Tensor out = at::empty({layers, 2, batch, heads, length, dh}, kv.options());
  const float* src = kv.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // block (l, part, b, head): S rows of Dh, from columns ((l * 2 + part) * H + head) * Dh of kv
  at::parallel_for(0, layers * 2 * batch * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t head = block % heads, b = (block / heads) % batch, lp = block / (heads * batch);
      const int64_t column = (lp * heads + head) * dh;
      float* out_block = dst + block * length * dh;
      for (int64_t t = 0; t < length; ++t) {
        const int64_t row = row_of[b * length + t];
        if (row < 0) {
          std::memset(out_block + t * dh, 0, sizeof(float) * dh);
        } else {
          std::memcpy(out_block + t * dh, src + row * width + column, sizeof(float) * dh);
        }
      }
    }
  });
  return out;
}

// --- LayerNorm of a residual sum ---------------------------------------------------------------------
//
// A decoder step's sub-layers end in LayerNorm(x + sublayer(x)) (post-LN) or start with LayerNorm(x) (pre-LN):
// at a few rows ATen's add and layer_norm cost 3-20 us a call on the benchmark CPU, mostly the calls' own
// cost (allocations, the threads' start). Here the sum and its normalisation are one pass per row: the sum
// written out, its mean, the mean of its squared deviations (two passes over the row, in float32), then
// (v - mean) / sqrt(var + eps) * w + b. Rows are split among the threads from a few hundred on (an encoder's
// source tokens). The frozen Python layers call the same function (frozen._FrozenLayer), so the compiled
// step and the Python step agree bit for bit; against ATen's layer_norm it agrees to float32 rounding.

#ifdef TRANSFORMER_X86
// the sum of d floats, 8 lanes at a time (two chains), then the rest one at a time
__attribute__((target("avx2,fma"))) inline float row_sum(const float* v, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(v + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(v + i + 8));
  }
  if (i + 8 <= d) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(v + i));
    i += 8;
  }
  float total = sum_8(_mm256_add_ps(a0, a1));
  for (; i < d; ++i) total += v[i];
  return total;
}

// the sum of (v_i - mean)^2 likewise
__attribute__((target("avx2,fma"))) inline float row_squares(const float* v, int64_t d, float mean) {
  const __m256 m = _mm256_set1_ps(mean);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m256 e0 = _mm256_sub_ps(_mm256_loadu_ps(v + i), m), e1 = _mm256_sub_ps(_mm256_loadu_ps(v + i + 8), m);
    a0 = _mm256_fmadd_ps(e0, e0, a0);
    a1 = _mm256_fmadd_ps(e1, e1, a1);
  }
  if (i + 8 <= d) {
    const __m256 e0 = _mm256_sub_ps(_mm256_loadu_ps(v + i), m);
    a0 = _mm256_fmadd_ps(e0, e0, a0);
    i += 8;
  }
  float total = sum_8(_mm256_add_ps(a0, a1));
  for (; i < d; ++i) total += (v[i] - mean) * (v[i] - mean);
  return total;
}

// one row: out = LayerNorm(x + r) (r may be null)
__attribute__((target("avx2,fma"))) void norm_row(const float* x, const float* r, const float* w, const float* b,
                                                 float eps, int64_t d, float* out) {
  int64_t i = 0;
  if (r != nullptr) {
    for (; i + 8 <= d; i += 8) _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(r + i)));
    for (; i < d; ++i) out[i] = x[i] + r[i];
  } else {
    std::memcpy(out, x, sizeof(float) * d);
  }
  const float mean = row_sum(out, d) / static_cast<float>(d);
  const float rstd = 1.f / std::sqrt(row_squares(out, d, mean) / static_cast<float>(d) + eps);
  const __m256 m = _mm256_set1_ps(mean), s = _mm256_set1_ps(rstd);
  for (i = 0; i + 8 <= d; i += 8) {
    const __m256 y = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(out + i), m), s);
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(y, _mm256_loadu_ps(w + i), _mm256_loadu_ps(b + i)));
  }
  for (; i < d; ++i) out[i] = (out[i] - mean) * rstd * w[i] + b[i];
}
#endif

// x (N, D), residual (N, D) or none, weight, bias (D,) float32 -> LayerNorm(x + residual) (N, D)
Tensor add_layer_norm(const Tensor& x_in, const std::optional<Tensor>& residual, const Tensor& weight,
                      const Tensor& bias, double eps) {
  TORCH_CHECK(panels_supported(), "add_layer_norm needs a CPU with AVX2 and FMA");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat && weight.numel() == x_in.size(1) && bias.numel() == x_in.size(1),
              "add_layer_norm: float32 x (N, D), weight and bias (D,)");
  const bool has_residual = residual.has_value() && residual->defined();
  TORCH_CHECK(!has_residual || residual->sizes() == x_in.sizes(), "add_layer_norm: residual (N, D) like x");
  Tensor x = x_in.contiguous(), r = has_residual ? residual->contiguous() : Tensor();
  Tensor w = weight.contiguous(), b = bias.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  Tensor out = at::empty({n, d}, x.options());
#ifdef TRANSFORMER_X86
  const float* xp = x.data_ptr<float>();
  const float* rp = has_residual ? r.data_ptr<float>() : nullptr;
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, d)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) norm_row(xp + i * d, rp ? rp + i * d : nullptr, wp, bp, e, d, op + i * d);
  });
#endif
  return out;
}

// --- a search step's candidates -----------------------------------------------------------------------
//
// What a search does with a step's logits: log-softmax over the vocabulary, add each hypothesis's score, and
// take the best n continuations of each sentence (greedy search: n = 1 of one hypothesis). ATen does that in
// three passes over the (N, V) logits, each writing its result (log_softmax, add, topk: 1.7 ms a step at 70
// rows and V = 8000 on the benchmark CPU); here each row is read twice: once for its maximum and its n best
// tokens (a log-softmax keeps the order of a row), once for the sum of exponentials. Then each sentence's
// K rows' n best are merged.

#ifdef TRANSFORMER_X86
// e^x, 8 at a time (Cephes' expf: x = k ln2 + r, a degree-5 polynomial in r, then 2^k; about 1 ulp; -inf -> 0)
// Cephes' constants, shared by exp_8 and exp_16: the clamp, log2(e), ln 2 in two parts, the polynomial
constexpr float kExpLow = -87.33654f, kExpHigh = 88.3762626647949f, kLog2e = 1.44269504088896341f,
                kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

__attribute__((target("avx2,fma"))) inline __m256 exp_8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLow)), _mm256_set1_ps(kExpHigh));
  __m256 k = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
#pragma GCC unroll 5
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_k));
}

// exp_8's operations on 16 lanes (AVX-512): the same value per lane
TRANSFORMER_AVX512 inline __m512 exp_16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpLow)), _mm512_set1_ps(kExpHigh));
  __m512 k = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(0.5f)),
                                  _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kExpPoly[0]);
#pragma GCC unroll 5
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpPoly[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i two_k = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(two_k));
}

// sum_v e^(x_v - m) over a row, 16 at a time with exp_16, each written to out[v] where kStore; the sums added 8
// lanes at a time in the AVX2 loops' order (row_exps, row_candidates): the same bits
template <bool kStore>
TRANSFORMER_AVX512 float exps512(const float* x, int64_t vocab, float m, float* out) {
  const __m512 mv = _mm512_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int64_t v = 0;
  for (; v + 16 <= vocab; v += 16) {
    const __m512 e = exp_16(_mm512_sub_ps(_mm512_loadu_ps(x + v), mv));
    if (kStore) _mm512_storeu_ps(out + v, e);
    sum = _mm256_add_ps(_mm256_add_ps(sum, _mm512_castps512_ps256(e)), _mm512_extractf32x8_ps(e, 1));
  }
  if (v + 8 <= vocab) {
    const __m256 e = exp_8(_mm256_sub_ps(_mm256_loadu_ps(x + v), _mm256_set1_ps(m)));
    if (kStore) _mm256_storeu_ps(out + v, e);
    sum = _mm256_add_ps(sum, e);
    v += 8;
  }
  float total = sum_8(sum);
  for (; v < vocab; ++v) {
    const float e = std::exp(x[v] - m);
    if (kStore) out[v] = e;
    total += e;
  }
  return total;
}

// Keeps the n largest (value, token) seen, sorted descending; `floor` is the value a newcomer must exceed.
struct Best {
  std::vector<float> values;
  std::vector<int64_t> tokens;
  int64_t n;
  float floor = -std::numeric_limits<float>::infinity();
  explicit Best(int64_t n) : n(n) {}
  void offer(float value, int64_t token) {
    if (!(value > floor) && static_cast<int64_t>(values.size()) == n) return;
    if (std::isnan(value)) return;
    auto at = std::upper_bound(values.begin(), values.end(), value, std::greater<float>());
    const auto i = at - values.begin();
    values.insert(at, value);
    tokens.insert(tokens.begin() + i, token);
    if (static_cast<int64_t>(values.size()) > n) {
      values.pop_back();
      tokens.pop_back();
    }
    if (static_cast<int64_t>(values.size()) == n) floor = values.back();
  }
};

// One row of logits: its maximum m and log(sum_v e^(x_v - m)) (log_softmax(x) = (x - m) - that), and its n
// best non-banned tokens by logit
__attribute__((target("avx2,fma"))) std::pair<float, float> row_candidates(const float* x, int64_t vocab,
                                                                          const std::vector<bool>& banned, Best& best) {
  __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t v = 0;
  for (; v + 8 <= vocab; v += 8) {
    const __m256 xv = _mm256_loadu_ps(x + v);
    top = _mm256_max_ps(top, xv);
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(xv, _mm256_set1_ps(best.floor), _CMP_GT_OQ));
    if (static_cast<int64_t>(best.values.size()) < best.n) mask = 0xff;
    while (mask) {
      const int lane = __builtin_ctz(mask);
      mask &= mask - 1;
      if (!banned[v + lane]) best.offer(x[v + lane], v + lane);
    }
  }
  float m = -std::numeric_limits<float>::infinity();
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  for (float l : lanes) m = std::max(m, l);
  for (int64_t w = v; w < vocab; ++w) {
    m = std::max(m, x[w]);
    if (!banned[w]) best.offer(x[w], w);
  }
  if (m == -std::numeric_limits<float>::infinity()) return {m, 0.f};
  if (cpu_level() >= kAvx512) return {m, std::log(exps512<false>(x, vocab, m, nullptr))};
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  for (v = 0; v + 8 <= vocab; v += 8) sum = _mm256_add_ps(sum, exp_8(_mm256_sub_ps(_mm256_loadu_ps(x + v), mv)));
  float total = sum_8(sum);
  for (int64_t w = v; w < vocab; ++w) total += std::exp(x[w] - m);
  return {m, std::log(total)};
}
#endif

// logits (B * K, V) float32, scores (B, K) float32, n candidates per sentence, banned token ids, fill_token ->
// (candidate scores (B, n) float32 sorted descending, the row within the sentence each extends (B, n) int64, the
// token each appends (B, n) int64): the n best of scores[b, k] + log_softmax(logits[b * K + k])[v] over k and
// non-banned v. Where there are fewer than n, the rest are (-inf, 0, fill_token).
std::vector<Tensor> step_candidates(const Tensor& logits_in, const Tensor& scores_in, int64_t n,
                                    const std::vector<int64_t>& banned_ids, int64_t fill_token) {
  TORCH_CHECK(panels_supported(), "step_candidates needs a CPU with AVX2 and FMA");
  TORCH_CHECK(logits_in.dim() == 2 && scores_in.dim() == 2 && logits_in.scalar_type() == at::kFloat &&
                  scores_in.scalar_type() == at::kFloat && logits_in.size(0) == scores_in.numel() && n >= 1,
              "step_candidates: float32 logits (B * K, V), scores (B, K), n >= 1");
  Tensor logits = logits_in.contiguous(), scores = scores_in.contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1), sentences = scores.size(0), width = scores.size(1);
  Tensor cand_scores = at::full({sentences, n}, -std::numeric_limits<float>::infinity(), scores.options());
  Tensor cand_rows = at::zeros({sentences, n}, scores.options().dtype(at::kLong));
  Tensor cand_tokens = at::full({sentences, n}, fill_token, scores.options().dtype(at::kLong));
#ifdef TRANSFORMER_X86
  std::vector<bool> banned(vocab, false);
  for (int64_t id : banned_ids) {
    if (id >= 0 && id < vocab) banned[id] = true;
  }
  std::vector<Best> best(rows, Best(n));
  std::vector<std::pair<float, float>> norm(rows);  // per row: maximum, log of the sum of exponentials
  const float* lp = logits.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm[r] = row_candidates(lp + r * vocab, vocab, banned, best[r]);
  });
  const float* sp = scores.data_ptr<float>();
  float* cs = cand_scores.data_ptr<float>();
  int64_t* cr = cand_rows.data_ptr<int64_t>();
  int64_t* ct = cand_tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < sentences; ++b) {
    Best merged(n);
    // merged keeps (score, k * vocab + token)
    for (int64_t k = 0; k < width; ++k) {
      const int64_t r = b * width + k;
      for (size_t i = 0; i < best[r].values.size(); ++i) {
        const float logprob = (best[r].values[i] - norm[r].first) - norm[r].second;  // as ATen's log_softmax
        merged.offer(sp[r] + logprob, k * vocab + best[r].tokens[i]);
      }
    }
    for (size_t i = 0; i < merged.values.size(); ++i) {
      cs[b * n + i] = merged.values[i];
      cr[b * n + i] = merged.tokens[i] / vocab;
      ct[b * n + i] = merged.tokens[i] % vocab;
    }
  }
#endif
  return {cand_scores, cand_rows, cand_tokens};
}

// frozen._Dense's forms below oneDNN's threshold: up to panel_rows rows by panel_linear (where the weight has
// panels), one row as row blocks (baddbmm), 2..column_rows rows as the transposed product W x^T, otherwise
// x W_t. The bias is always defined (zeros where the model has none). An int8 map (frozen._Int8Panels) has
// quad panels, scales and column sums only, and runs panel_linear_w8a8 at every number of rows.
struct Dense {
  Tensor weight;       // (out, in)
  Tensor weight_t;     // (in, out)
  Tensor bias;         // (out,)
  Tensor bias_col;     // (out, 1)
  Tensor blocks_w;     // (P, out/P, in) or undefined
  Tensor blocks_b;     // (P, out/P, 1)
  Tensor panels;       // (ceil(out/16), in, 16) or undefined
  Tensor bias_panels;  // (ceil(out/16) * 16,)
  Tensor quad_panels;  // (ceil(out/16), ceil(in/4), 64) int8, or undefined
  Tensor scales;       // (ceil(out/16) * 16,)
  Tensor colsums;      // (ceil(out/16) * 16,) int32

  // (N, in) -> (N, out); then max(., 0) where `relu` (in the panels' epilogue where they run it)
  Tensor operator()(const Tensor& x, int64_t column_rows, int64_t panel_rows, bool relu = false) const {
    const int64_t rows = x.size(0);
    if (quad_panels.defined()) {
      return panel_linear_w8a8(x, quad_panels, colsums, scales, bias_panels, bias.size(0), relu);
    }
    if (rows <= panel_rows && panels.defined()) {
      return panel_linear(x, panels, bias_panels, bias.size(0), relu);
    }
    Tensor y;
    if (rows == 1 && blocks_w.defined()) {
      const int64_t p = blocks_w.size(0);
      y = at::baddbmm(blocks_b, blocks_w, x.t().expand({p, -1, 1})).view({1, -1});
    } else if (rows >= 2 && rows <= column_rows) {
      y = at::addmm(bias_col, weight, x.t()).t();  // (out, N) -> (N, out), a transposed view
    } else {
      y = at::addmm(bias, x, weight_t);
    }
    return relu ? at::relu(y) : y;
  }
};

// LayerNorm(x [+ residual]): add_layer_norm where `fast` (a CPU with AVX2 and FMA; frozen.py's layers then
// call it too), else ATen's add and layer_norm (the Python step's calls then)
struct Norm {
  Tensor weight, bias;
  double eps = 1e-5;
  bool fast = false;
  Tensor operator()(const Tensor& x, const std::optional<Tensor>& residual = std::nullopt) const {
    if (fast) return add_layer_norm(x, residual, weight, bias, eps);
    return at::layer_norm(residual ? x + *residual : x, {weight.size(0)}, weight, bias, eps);
  }
};

struct Layer {
  Dense qkv, self_out, cross_q, cross_out, fc1, fc2;
  Norm self_norm, cross_norm, ffn_norm;
  bool cross = false;
};

// weight, weight_t, bias, bias_col, blocks_w, blocks_b, panels, bias_panels, quad_panels, scales, colsums: an
// empty tensor where the map has no such form (an int8 map: bias, bias_panels, quad_panels, scales, colsums only)
Dense make_dense(const std::vector<Tensor>& t) {
  TORCH_CHECK(t.size() == 11, "a dense map takes 11 tensors");
  auto maybe = [](const Tensor& x) { return x.numel() > 0 ? x : Tensor(); };
  return Dense{maybe(t[0]), maybe(t[1]), t[2], maybe(t[3]), maybe(t[4]),
               maybe(t[5]), maybe(t[6]), maybe(t[7]), maybe(t[8]), maybe(t[9]), maybe(t[10])};
}

// --- dropout for training: masks from a counter-based hash of (seed, element) ----------------------------
//
// transformer/model/dropout.py draws one 64-bit seed per call from torch's generator; element i is kept when
// 16 bits of a hash of (seed, i) are at least `dropped`, and kept elements are scaled by `scale`. The mask is
// a function of (seed, i) alone, so it is computed where it is applied, forward and backward, and never
// stored. The hash is two rounds of "lowbias32" (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
// x *= 0x846ca68b; x ^= x >> 16), 32-bit multiplies that AVX2 does 8 at a time: word k = 8 * (i / 16) + i % 8
// is hashed as lowbias32(lowbias32(k ^ seed_lo) + seed_hi), and element i takes its low 16 bits when
// i % 16 < 8, its high 16 bits otherwise. The scalar form below computes the same bits (the tail, other CPUs).

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline uint32_t dropout_bits(int64_t i, uint32_t seed_lo, uint32_t seed_hi) {
  const uint32_t word = static_cast<uint32_t>(8 * (i / 16) + i % 8);
  return (lowbias32(lowbias32(word ^ seed_lo) + seed_hi) >> (16 * ((i % 16) / 8))) & 0xffffU;
}

// out[i] = residual[i] (if any) + x[i] * (bits(i) >= dropped ? scale : 0), elements begin .. end - 1
template <bool kResidual>
void dropout_scalar(const float* x, const float* residual, float* out, int64_t begin, int64_t end,
                    uint32_t seed_lo, uint32_t seed_hi, uint32_t dropped, float scale) {
  for (int64_t i = begin; i < end; ++i) {
    const float v = x[i] * (dropout_bits(i, seed_lo, seed_hi) >= dropped ? scale : 0.0f);
    out[i] = kResidual ? residual[i] + v : v;
  }
}

#ifdef TRANSFORMER_X86
TRANSFORMER_AVX2 inline __m256i lowbias32_x8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// The mask of elements 16 b .. 16 b + 15: scale where kept, else 0, in two registers (the first 8 elements' and
// the last 8's); kept where bits >= dropped, as bits > dropped - 1 (both within 0 .. 65536 as signed 32-bit values)
struct Keep16 {
  __m256i lo, hi, below, low16, lanes;
  __m256 kept;
  TRANSFORMER_AVX2 Keep16(uint32_t seed_lo, uint32_t seed_hi, uint32_t dropped, float scale)
      : lo(_mm256_set1_epi32(static_cast<int>(seed_lo))), hi(_mm256_set1_epi32(static_cast<int>(seed_hi))),
        below(_mm256_set1_epi32(static_cast<int>(dropped) - 1)), low16(_mm256_set1_epi32(0xffff)),
        lanes(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), kept(_mm256_set1_ps(scale)) {}
  TRANSFORMER_AVX2 inline void block(int64_t b, __m256& first, __m256& second) const {
    const __m256i word = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(8 * b))), lanes);
    const __m256i h = lowbias32_x8(_mm256_add_epi32(lowbias32_x8(_mm256_xor_si256(word, lo)), hi));
    first = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_and_si256(h, low16), below)), kept);
    second = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_srli_epi32(h, 16), below)), kept);
  }
};

// the same for blocks of 16 elements, begin .. end - 1
template <bool kResidual>
TRANSFORMER_AVX2 void dropout_blocks(const float* x, const float* residual, float* out, int64_t begin, int64_t end,
                                     uint32_t seed_lo, uint32_t seed_hi, uint32_t dropped, float scale) {
  const Keep16 mask(seed_lo, seed_hi, dropped, scale);
  for (int64_t b = begin; b < end; ++b) {
    __m256 keep_lo, keep_hi;
    mask.block(b, keep_lo, keep_hi);
    const int64_t i = 16 * b;
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(x + i), keep_lo);
    __m256 c = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8), keep_hi);
    if (kResidual) {
      a = _mm256_add_ps(a, _mm256_loadu_ps(residual + i));
      c = _mm256_add_ps(c, _mm256_loadu_ps(residual + i + 8));
    }
    _mm256_storeu_ps(out + i, a);
    _mm256_storeu_ps(out + i + 8, c);
  }
}
#endif

// x (any shape) float32 -> (residual +) x * mask(seed), same shape; dropped in 0 .. 65536
Tensor dropout_apply(const Tensor& x, const std::optional<Tensor>& residual, int64_t seed, int64_t dropped,
                     double scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "dropout_apply: float32 CPU tensors");
  TORCH_CHECK(dropped >= 0 && dropped <= 65536, "dropout_apply: dropped lanes in 0 .. 65536");
  const Tensor xc = x.contiguous();
  Tensor rc;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == at::kFloat,
                "dropout_apply: residual shaped as x, float32");
    rc = residual->contiguous();
  }
  Tensor out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* rp = rc.defined() ? rc.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t n = xc.numel();
  const auto s = static_cast<uint64_t>(seed);
  const auto seed_lo = static_cast<uint32_t>(s), seed_hi = static_cast<uint32_t>(s >> 32);
  const auto d = static_cast<uint32_t>(dropped);
  const auto sc = static_cast<float>(scale);
  int64_t done = 0;
#ifdef TRANSFORMER_X86
  if (panels_supported()) {
    done = 16 * (n / 16);
    at::parallel_for(0, n / 16, 2048, [&](int64_t begin, int64_t end) {
      if (rp != nullptr) {
        dropout_blocks<true>(xp, rp, op, begin, end, seed_lo, seed_hi, d, sc);
      } else {
        dropout_blocks<false>(xp, rp, op, begin, end, seed_lo, seed_hi, d, sc);
      }
    });
  }
#endif
  if (rp != nullptr) {
    dropout_scalar<true>(xp, rp, op, done, n, seed_lo, seed_hi, d, sc);
  } else {
    dropout_scalar<false>(xp, rp, op, done, n, seed_lo, seed_hi, d, sc);
  }
  return out;
}

// --- the training loss: rows of logits turned into their exponentials in place ---------------------------
//
// transformer/training/loss.py's label-smoothed cross-entropy needs three numbers per row of float32 logits z
// (its maximum m, the sum of exp(z - m) and the mean of z) and, for the backward pass, exp(z - m) itself,
// which it keeps in the logits' storage. ATen does that in five passes over each block of rows (mean, amax,
// subtract, exp, sum); here each row is read twice: once for its maximum and sum, once to write exp(z - m)
// and add them up. The backward pass is one pass too: grad = e * scale - offset, and -a at the gold token.

#ifdef TRANSFORMER_X86
// (max, sum) of one row
TRANSFORMER_AVX2 std::pair<float, float> row_max_sum(const float* x, int64_t vocab) {
  __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), sum = _mm256_setzero_ps();
  int64_t v = 0;
  for (; v + 8 <= vocab; v += 8) {
    const __m256 xv = _mm256_loadu_ps(x + v);
    top = _mm256_max_ps(top, xv);
    sum = _mm256_add_ps(sum, xv);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  float m = -std::numeric_limits<float>::infinity();
  for (float l : lanes) m = std::max(m, l);
  float total = sum_8(sum);
  for (; v < vocab; ++v) {
    m = std::max(m, x[v]);
    total += x[v];
  }
  return {m, total};
}

// x <- exp(x - m) in place; returns their sum
TRANSFORMER_AVX2 float row_exps(float* x, int64_t vocab, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int64_t v = 0;
  for (; v + 8 <= vocab; v += 8) {
    const __m256 e = exp_8(_mm256_sub_ps(_mm256_loadu_ps(x + v), mv));
    _mm256_storeu_ps(x + v, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = sum_8(sum);
  for (; v < vocab; ++v) total += (x[v] = std::exp(x[v] - m));
  return total;
}

// row_max_sum with 16 floats a load (AVX-512): the sums still add 8 lanes at a time in the same order, so the
// results are the same bits (exps512 is row_exps' AVX-512 form)
TRANSFORMER_AVX512 std::pair<float, float> row_max_sum512(const float* x, int64_t vocab) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 sum = _mm256_setzero_ps();
  int64_t v = 0;
  for (; v + 16 <= vocab; v += 16) {
    const __m512 xv = _mm512_loadu_ps(x + v);
    top = _mm512_max_ps(top, xv);
    sum = _mm256_add_ps(_mm256_add_ps(sum, _mm512_castps512_ps256(xv)), _mm512_extractf32x8_ps(xv, 1));
  }
  float m = _mm512_reduce_max_ps(top);
  if (v + 8 <= vocab) {
    const __m256 xv = _mm256_loadu_ps(x + v);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, xv);
    for (float l : lanes) m = std::max(m, l);
    sum = _mm256_add_ps(sum, xv);
    v += 8;
  }
  float total = sum_8(sum);
  for (; v < vocab; ++v) {
    m = std::max(m, x[v]);
    total += x[v];
  }
  return {m, total};
}

// x <- x * scale - offset in place
TRANSFORMER_AVX2 void row_scale_shift(float* x, int64_t vocab, float scale, float offset) {
  const __m256 sv = _mm256_set1_ps(scale), ov = _mm256_set1_ps(offset);
  int64_t v = 0;
  for (; v + 8 <= vocab; v += 8) _mm256_storeu_ps(x + v, _mm256_fmsub_ps(_mm256_loadu_ps(x + v), sv, ov));
  for (; v < vocab; ++v) x[v] = x[v] * scale - offset;
}
#endif

// What the row kernels of training (the loss's, the feed-forward network's) check of each (N, C) operand
void check_rows(const Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(), what,
              ": a contiguous (N, C) float32 CPU tensor");
}

// The data of an (N, C) operand that a kernel overwrites, checked, its version bumped as an in-place ATen op's
// would be, so that autograd refuses a copy of it saved by an earlier op
float* rows_in_place(Tensor& t, const char* what) {
  check_rows(t, what);
  t.unsafeGetTensorImpl()->bump_version();
  return t.data_ptr<float>();
}

// logits (N, V) float32, overwritten with exp(z - max) per row -> (3, N): each row's max, sum of exp(z - max)
// and mean of z
Tensor exp_rows_(Tensor& logits) {
  float* x = rows_in_place(logits, "exp_rows_: logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  Tensor stats = at::empty({3, n}, logits.options());
  float *top = stats.data_ptr<float>(), *total = top + n, *mean = top + 2 * n;
  const bool avx2 = panels_supported(), wide = cpu_level() >= kAvx512;
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = x + r * vocab;
      float m = -std::numeric_limits<float>::infinity(), sum = 0.f, exps = 0.f;
#ifdef TRANSFORMER_X86
      if (wide) {
        std::tie(m, sum) = row_max_sum512(row, vocab);
        exps = exps512<true>(row, vocab, m, row);
      } else if (avx2) {
        std::tie(m, sum) = row_max_sum(row, vocab);
        exps = row_exps(row, vocab, m);
      }
#endif
      if (!avx2) {
        for (int64_t v = 0; v < vocab; ++v) {
          m = std::max(m, row[v]);
          sum += row[v];
        }
        for (int64_t v = 0; v < vocab; ++v) exps += (row[v] = std::exp(row[v] - m));
      }
      top[r] = m;
      total[r] = exps;
      mean[r] = sum / static_cast<float>(vocab);
    }
  });
  return stats;
}

// grad (N, V) float32 holding exp(z - max) per row, overwritten with grad * scale[r] - offset[r], and minus
// gold_weight[r] at column gold[r] (scale, offset, gold_weight (N,) float32, gold (N,) int64)
void exp_rows_grad_(Tensor& grad, const Tensor& scale_in, const Tensor& offset_in, const Tensor& gold_in,
                    const Tensor& gold_weight_in) {
  float* x = rows_in_place(grad, "exp_rows_grad_: grad");
  const int64_t n = grad.size(0), vocab = grad.size(1);
  const Tensor scale = scale_in.contiguous(), offset = offset_in.contiguous(), gold = gold_in.contiguous(),
               gold_weight = gold_weight_in.contiguous();
  TORCH_CHECK(scale.numel() == n && offset.numel() == n && gold.numel() == n && gold_weight.numel() == n &&
              scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
              gold_weight.scalar_type() == at::kFloat && gold.scalar_type() == at::kLong,
              "exp_rows_grad_: scale, offset, gold_weight (N,) float32 and gold (N,) int64");
  const float *sp = scale.data_ptr<float>(), *op = offset.data_ptr<float>(), *wp = gold_weight.data_ptr<float>();
  const int64_t* gp = gold.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) TORCH_CHECK(gp[r] >= 0 && gp[r] < vocab, "exp_rows_grad_: gold id out of range");
  const bool avx2 = panels_supported();
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = x + r * vocab;
#ifdef TRANSFORMER_X86
      if (avx2) row_scale_shift(row, vocab, sp[r], op[r]);
#endif
      if (!avx2) {
        for (int64_t v = 0; v < vocab; ++v) row[v] = row[v] * sp[r] - op[r];
      }
      row[gp[r]] -= wp[r];
    }
  });
}

// --- the feed-forward network's ReLU for training, fused with fc1's bias ---------------------------------
//
// transformer/model/layers.py's FeedForward on the CPU: forward h = relu(x W1^T + b1) as one product and one
// pass (bias_relu_, in place) instead of addmm's copy of the bias, the product, and relu's pass into a new
// tensor; backward the gradient through the ReLU in place with fc1's bias gradient (its column sums) in the
// same pass (relu_grad_), instead of threshold_backward into a new tensor and a separate sum.

constexpr int64_t kRowChunk = 64;  // rows per task of relu_grad_, each with its own partial column sums

#ifdef TRANSFORMER_X86
TRANSFORMER_AVX2 void bias_relu_row(float* h, const float* b, int64_t cols) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8)
    _mm256_storeu_ps(h + j, _mm256_max_ps(_mm256_add_ps(_mm256_loadu_ps(h + j), _mm256_loadu_ps(b + j)), zero));
  for (; j < cols; ++j) h[j] = std::max(h[j] + b[j], 0.f);
}

TRANSFORMER_AVX2 void relu_grad_row(float* g, const float* h, float* sums, int64_t cols) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    const __m256 kept = _mm256_and_ps(_mm256_loadu_ps(g + j), _mm256_cmp_ps(_mm256_loadu_ps(h + j), zero, _CMP_GT_OQ));
    _mm256_storeu_ps(g + j, kept);
    _mm256_storeu_ps(sums + j, _mm256_add_ps(_mm256_loadu_ps(sums + j), kept));
  }
  for (; j < cols; ++j) {
    g[j] = h[j] > 0.f ? g[j] : 0.f;
    sums[j] += g[j];
  }
}
#endif

// h (N, F) float32 <- relu(h + b) in place, b (F,)
void bias_relu_(Tensor& h, const Tensor& b_in) {
  float* hp = rows_in_place(h, "bias_relu_: h");
  const int64_t n = h.size(0), cols = h.size(1);
  const Tensor b = b_in.contiguous();
  TORCH_CHECK(b.numel() == cols && b.scalar_type() == at::kFloat, "bias_relu_: b (F,) float32");
  const float* bp = b.data_ptr<float>();
  const bool avx2 = panels_supported();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = hp + r * cols;
#ifdef TRANSFORMER_X86
      if (avx2) bias_relu_row(row, bp, cols);
#endif
      if (!avx2) {
        for (int64_t j = 0; j < cols; ++j) row[j] = std::max(row[j] + bp[j], 0.f);
      }
    }
  });
}

// grad (N, F) float32 <- grad where h > 0, else 0, in place (h (N, F): the ReLU's output) -> its column sums (F,)
Tensor relu_grad_(Tensor& grad, const Tensor& h) {
  float* gp = rows_in_place(grad, "relu_grad_: grad");
  check_rows(h, "relu_grad_: h");
  TORCH_CHECK(h.sizes() == grad.sizes(), "relu_grad_: h shaped as grad");
  const int64_t n = grad.size(0), cols = grad.size(1);
  const int64_t chunks = std::max<int64_t>(1, (n + kRowChunk - 1) / kRowChunk);
  Tensor partial = at::zeros({chunks, cols}, grad.options());
  const float* hp = h.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const bool avx2 = panels_supported();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float* sums = pp + c * cols;
      for (int64_t r = c * kRowChunk; r < std::min(n, (c + 1) * kRowChunk); ++r) {
        float* g = gp + r * cols;
        const float* hr = hp + r * cols;
#ifdef TRANSFORMER_X86
        if (avx2) relu_grad_row(g, hr, sums, cols);
#endif
        if (!avx2) {
          for (int64_t j = 0; j < cols; ++j) {
            g[j] = hr[j] > 0.f ? g[j] : 0.f;
            sums[j] += g[j];
          }
        }
      }
    }
  });
  return partial.sum(0);
}

// --- a post-norm sub-layer's end for training: LayerNorm(residual + dropout(s + b)) --------------------------
//
// transformer/model/layers.py's post-norm layers (the paper's) on the CPU: the sub-layer's last product (the
// attention's output projection, the feed-forward network's fc2) runs without its bias, and one pass per row
// adds the bias, applies the dropout mask (hashed from the seed as dropout_apply does, the same bits for the
// same element index), adds the residual and normalises, where ATen made addmm copy the bias into its output,
// then dropout_apply's pass, then layer_norm's. The forward pass keeps the normalised rows (x_hat, N x D) and
// 1/std per row for the backward pass, which is one pass too: LayerNorm's gradient (the residual's), the same
// mask applied to it (the sub-layer's), and the column sums for the LayerNorm's weight and bias and the
// sub-layer's bias, each task of kRowChunk rows with its own partial sums.

// keep[j] = scale where element start + j is kept, else 0, j < cols (the mask of dropout_apply), one at a time
void dropout_keep_scalar(float* keep, int64_t start, int64_t cols, uint32_t seed_lo, uint32_t seed_hi,
                         uint32_t dropped, float scale) {
  for (int64_t j = 0; j < cols; ++j) keep[j] = dropout_bits(start + j, seed_lo, seed_hi) >= dropped ? scale : 0.f;
}

// one row: z = r + (s + b) * keep (b may be null) -> x_hat = (z - mean) / std, y = x_hat * w + lb; returns 1/std
float add_norm_scalar(const float* s, const float* b, const float* r, const float* keep, const float* w,
                      const float* lb, float eps, int64_t d, float* x_hat, float* y) {
  float total = 0.f, squares = 0.f;
  for (int64_t j = 0; j < d; ++j) total += (x_hat[j] = r[j] + (s[j] + (b != nullptr ? b[j] : 0.f)) * keep[j]);
  const float mean = total / static_cast<float>(d);
  for (int64_t j = 0; j < d; ++j) squares += (x_hat[j] - mean) * (x_hat[j] - mean);
  const float rstd = 1.f / std::sqrt(squares / static_cast<float>(d) + eps);
  for (int64_t j = 0; j < d; ++j) {
    x_hat[j] = (x_hat[j] - mean) * rstd;
    y[j] = x_hat[j] * w[j] + lb[j];
  }
  return rstd;
}

// one row of the backward pass: g_r = LayerNorm's input gradient, g_s = g_r * keep; sums += (gy x_hat, gy, g_s)
void add_norm_grad_scalar(const float* gy, const float* x_hat, float rstd, const float* w, const float* keep,
                          int64_t d, float* g_r, float* g_s, float* sums) {
  float a = 0.f, c = 0.f;  // sums of gy w and of gy w x_hat
  for (int64_t j = 0; j < d; ++j) {
    const float gw = gy[j] * w[j];
    a += gw;
    c += gw * x_hat[j];
    sums[j] += gy[j] * x_hat[j];
    sums[d + j] += gy[j];
  }
  const float mean_a = a / static_cast<float>(d), mean_c = c / static_cast<float>(d);
  for (int64_t j = 0; j < d; ++j) {
    g_r[j] = (gy[j] * w[j] - mean_a - x_hat[j] * mean_c) * rstd;
    g_s[j] = g_r[j] * keep[j];
    sums[2 * d + j] += g_s[j];
  }
}

#ifdef TRANSFORMER_X86
// the same three with AVX2 and FMA (the mask's bits 16 elements at a time where the index is a multiple of 16)
TRANSFORMER_AVX2 void dropout_keep_avx2(float* keep, int64_t start, int64_t cols, uint32_t seed_lo, uint32_t seed_hi,
                                        uint32_t dropped, float scale) {
  const Keep16 mask(seed_lo, seed_hi, dropped, scale);
  const int64_t head = std::min(cols, (16 - start % 16) % 16);  // elements before the first multiple of 16
  dropout_keep_scalar(keep, start, head, seed_lo, seed_hi, dropped, scale);
  int64_t j = head;
  for (; j + 16 <= cols; j += 16) {
    __m256 first, second;
    mask.block((start + j) / 16, first, second);
    _mm256_storeu_ps(keep + j, first);
    _mm256_storeu_ps(keep + j + 8, second);
  }
  dropout_keep_scalar(keep + j, start + j, cols - j, seed_lo, seed_hi, dropped, scale);
}

// With `keep` null, the row starts at element 16 * block0 and d is a multiple of 16: the mask is computed in
// registers (`mask`), not read from `keep`
TRANSFORMER_AVX2 float add_norm_avx2(const float* s, const float* b, const float* r, const float* keep,
                                     const Keep16& mask, int64_t block0, const float* w, const float* lb, float eps,
                                     int64_t d, float* x_hat, float* y) {
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  int64_t j = 0;
  if (keep == nullptr) {
    for (; j + 16 <= d; j += 16) {
      __m256 k0, k1;
      mask.block(block0 + j / 16, k0, k1);
      __m256 v0 = _mm256_loadu_ps(s + j), v1 = _mm256_loadu_ps(s + j + 8);
      if (b != nullptr) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(b + j));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(b + j + 8));
      }
      v0 = _mm256_fmadd_ps(v0, k0, _mm256_loadu_ps(r + j));
      v1 = _mm256_fmadd_ps(v1, k1, _mm256_loadu_ps(r + j + 8));
      _mm256_storeu_ps(x_hat + j, v0);
      _mm256_storeu_ps(x_hat + j + 8, v1);
      sum0 = _mm256_add_ps(sum0, v0);
      sum1 = _mm256_add_ps(sum1, v1);
    }
  } else {
    for (; j + 8 <= d; j += 8) {
      __m256 v = _mm256_loadu_ps(s + j);
      if (b != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(b + j));
      v = _mm256_fmadd_ps(v, _mm256_loadu_ps(keep + j), _mm256_loadu_ps(r + j));
      _mm256_storeu_ps(x_hat + j, v);
      sum0 = _mm256_add_ps(sum0, v);
    }
  }
  float total = sum_8(_mm256_add_ps(sum0, sum1));
  for (; j < d; ++j) total += (x_hat[j] = r[j] + (s[j] + (b != nullptr ? b[j] : 0.f)) * keep[j]);
  const float mean = total / static_cast<float>(d);
  const float rstd = 1.f / std::sqrt(row_squares(x_hat, d, mean) / static_cast<float>(d) + eps);
  const __m256 m = _mm256_set1_ps(mean), sd = _mm256_set1_ps(rstd);
  for (j = 0; j + 8 <= d; j += 8) {
    const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x_hat + j), m), sd);
    _mm256_storeu_ps(x_hat + j, xh);
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(xh, _mm256_loadu_ps(w + j), _mm256_loadu_ps(lb + j)));
  }
  for (; j < d; ++j) {
    x_hat[j] = (x_hat[j] - mean) * rstd;
    y[j] = x_hat[j] * w[j] + lb[j];
  }
  return rstd;
}

TRANSFORMER_AVX2 void add_norm_grad_avx2(const float* gy, const float* x_hat, float rstd, const float* w,
                                         const float* keep, const Keep16& mask, int64_t block0, int64_t d, float* g_r,
                                         float* g_s, float* sums) {
  float* sum_w = sums;
  float* sum_lb = sums + d;
  float* sum_b = sums + 2 * d;
  __m256 av = _mm256_setzero_ps(), cv = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const __m256 g = _mm256_loadu_ps(gy + j), xh = _mm256_loadu_ps(x_hat + j);
    const __m256 gw = _mm256_mul_ps(g, _mm256_loadu_ps(w + j));
    av = _mm256_add_ps(av, gw);
    cv = _mm256_fmadd_ps(gw, xh, cv);
    _mm256_storeu_ps(sum_w + j, _mm256_fmadd_ps(g, xh, _mm256_loadu_ps(sum_w + j)));
    _mm256_storeu_ps(sum_lb + j, _mm256_add_ps(g, _mm256_loadu_ps(sum_lb + j)));
  }
  float a = sum_8(av), c = sum_8(cv);  // sums of gy w and of gy w x_hat
  for (int64_t t = j; t < d; ++t) {
    const float gw = gy[t] * w[t];
    a += gw;
    c += gw * x_hat[t];
    sum_w[t] += gy[t] * x_hat[t];
    sum_lb[t] += gy[t];
  }
  const float mean_a = a / static_cast<float>(d), mean_c = c / static_cast<float>(d);
  const __m256 ma = _mm256_set1_ps(mean_a), mc = _mm256_set1_ps(mean_c), sd = _mm256_set1_ps(rstd);
  auto one = [&](int64_t at, __m256 k) TRANSFORMER_AVX2 {
    const __m256 gw = _mm256_mul_ps(_mm256_loadu_ps(gy + at), _mm256_loadu_ps(w + at));
    const __m256 gr = _mm256_mul_ps(_mm256_fnmadd_ps(_mm256_loadu_ps(x_hat + at), mc, _mm256_sub_ps(gw, ma)), sd);
    const __m256 gs = _mm256_mul_ps(gr, k);
    _mm256_storeu_ps(g_r + at, gr);
    _mm256_storeu_ps(g_s + at, gs);
    _mm256_storeu_ps(sum_b + at, _mm256_add_ps(gs, _mm256_loadu_ps(sum_b + at)));
  };
  j = 0;
  if (keep == nullptr) {
    for (; j + 16 <= d; j += 16) {
      __m256 k0, k1;
      mask.block(block0 + j / 16, k0, k1);
      one(j, k0);
      one(j + 8, k1);
    }
  } else {
    for (; j + 8 <= d; j += 8) one(j, _mm256_loadu_ps(keep + j));
  }
  for (; j < d; ++j) {
    g_r[j] = (gy[j] * w[j] - mean_a - x_hat[j] * mean_c) * rstd;
    g_s[j] = g_r[j] * keep[j];
    sum_b[j] += g_s[j];
  }
}
#endif

// The dropout mask's arguments as the row kernels take them; with `in_registers` (AVX2, some dropout, rows of a
// multiple of 16) the mask is computed in registers where it is applied, else into a row buffer first
struct HashedMask {
  uint32_t seed_lo, seed_hi, dropped;
  float scale;
  bool avx2, in_registers;
  HashedMask(int64_t seed, int64_t dropped_lanes, double keep_scale, int64_t d)
      : seed_lo(static_cast<uint32_t>(static_cast<uint64_t>(seed))),
        seed_hi(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)),
        dropped(static_cast<uint32_t>(dropped_lanes)), scale(static_cast<float>(keep_scale)),
        avx2(panels_supported()), in_registers(avx2 && dropped_lanes != 0 && d % 16 == 0) {
    TORCH_CHECK(dropped_lanes >= 0 && dropped_lanes < 65536, "add_norm: dropped lanes in 0 .. 65535");
  }
};

// the mask of one row, AVX2 where the CPU has it
void dropout_keep_row(float* keep, int64_t start, int64_t cols, const HashedMask& m) {
  if (m.dropped == 0) {
    std::fill(keep, keep + cols, m.scale);
    return;
  }
#ifdef TRANSFORMER_X86
  if (m.avx2) return dropout_keep_avx2(keep, start, cols, m.seed_lo, m.seed_hi, m.dropped, m.scale);
#endif
  dropout_keep_scalar(keep, start, cols, m.seed_lo, m.seed_hi, m.dropped, m.scale);
}

// A contiguous (..., D) float32 CPU tensor of n rows of d
void check_add_norm(const Tensor& t, int64_t n, int64_t d, const char* what) {
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == d && t.numel() == n * d && t.scalar_type() == at::kFloat &&
                  t.device().is_cpu() && t.is_contiguous(), what, ": a contiguous (..., D) float32 CPU tensor of the "
                  "sub-layer's shape");
}

void check_vector(const Tensor& t, int64_t d, const char* what) {
  TORCH_CHECK(t.numel() == d && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(), what,
              ": a contiguous (D,) float32 CPU tensor");
}

// s (..., D): the sub-layer's product without its bias, N rows; bias (D,) or none; residual shaped as s; the
// mask's seed, dropped lanes (0 .. 65535; 0: no dropout) and scale; LayerNorm weight, bias (D,), eps
// -> y = LayerNorm(residual + dropout(s + bias)) and x_hat, both shaped as s, and 1/std (N,). The outputs come
// in the caller's shape, not as views of (N, D) ones: autograd adds a gradient into a tensor in place, not a view
std::vector<Tensor> add_norm_forward(const Tensor& s, const std::optional<Tensor>& bias, const Tensor& residual,
                                     int64_t seed, int64_t dropped, double scale, const Tensor& weight,
                                     const Tensor& norm_bias, double eps) {
  TORCH_CHECK(s.dim() >= 1 && s.size(-1) > 0, "add_norm_forward: s (..., D)");
  const int64_t d = s.size(-1), n = s.numel() / d;
  check_add_norm(s, n, d, "add_norm_forward: s");
  check_add_norm(residual, n, d, "add_norm_forward: residual");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_vector(*bias, d, "add_norm_forward: bias");
  check_vector(weight, d, "add_norm_forward: weight");
  check_vector(norm_bias, d, "add_norm_forward: norm_bias");
  Tensor y = at::empty_like(s), x_hat = at::empty_like(s), rstd = at::empty({n}, s.options());
  const float* sp = s.data_ptr<float>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  const float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* lbp = norm_bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* xp = x_hat.data_ptr<float>();
  float* dp = rstd.data_ptr<float>();
  const HashedMask hm(seed, dropped, scale, d);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> keep(d);
#ifdef TRANSFORMER_X86
    const Keep16 mask(hm.seed_lo, hm.seed_hi, hm.dropped, hm.scale);
#endif
    for (int64_t i = begin; i < end; ++i) {
      if (!hm.in_registers) dropout_keep_row(keep.data(), i * d, d, hm);
#ifdef TRANSFORMER_X86
      if (hm.avx2) {
        dp[i] = add_norm_avx2(sp + i * d, bp, rp + i * d, hm.in_registers ? nullptr : keep.data(), mask, i * d / 16,
                              wp, lbp, e, d, xp + i * d, yp + i * d);
        continue;
      }
#endif
      dp[i] = add_norm_scalar(sp + i * d, bp, rp + i * d, keep.data(), wp, lbp, e, d, xp + i * d, yp + i * d);
    }
  });
  return {y, x_hat, rstd};
}

// grad_y, x_hat (..., D) and 1/std (N,) of the forward pass, its LayerNorm weight (D,) and mask -> the
// residual's gradient and the sub-layer output's, shaped as x_hat, and the column sums (3, D): the LayerNorm
// weight's gradient, its bias's, and the sub-layer bias's
std::vector<Tensor> add_norm_backward(const Tensor& grad_y, const Tensor& x_hat, const Tensor& rstd,
                                      const Tensor& weight, int64_t seed, int64_t dropped, double scale) {
  TORCH_CHECK(x_hat.dim() >= 1 && x_hat.size(-1) > 0, "add_norm_backward: x_hat (..., D)");
  const int64_t d = x_hat.size(-1), n = x_hat.numel() / d;
  TORCH_CHECK(grad_y.sizes() == x_hat.sizes(), "add_norm_backward: grad_y shaped as x_hat");
  const Tensor gy = grad_y.contiguous();
  check_add_norm(gy, n, d, "add_norm_backward: grad_y");
  check_add_norm(x_hat, n, d, "add_norm_backward: x_hat");
  check_vector(rstd, n, "add_norm_backward: rstd");
  check_vector(weight, d, "add_norm_backward: weight");
  Tensor g_r = at::empty_like(x_hat), g_s = at::empty_like(x_hat);
  const int64_t chunks = std::max<int64_t>(1, (n + kRowChunk - 1) / kRowChunk);
  Tensor partial = at::zeros({chunks, 3, d}, x_hat.options());
  const float* gp = gy.data_ptr<float>();
  const float* xp = x_hat.data_ptr<float>();
  const float* dp = rstd.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* grp = g_r.data_ptr<float>();
  float* gsp = g_s.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const HashedMask hm(seed, dropped, scale, d);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keep(d);
#ifdef TRANSFORMER_X86
    const Keep16 mask(hm.seed_lo, hm.seed_hi, hm.dropped, hm.scale);
#endif
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t i = c * kRowChunk; i < std::min(n, (c + 1) * kRowChunk); ++i) {
        if (!hm.in_registers) dropout_keep_row(keep.data(), i * d, d, hm);
#ifdef TRANSFORMER_X86
        if (hm.avx2) {
          add_norm_grad_avx2(gp + i * d, xp + i * d, dp[i], wp, hm.in_registers ? nullptr : keep.data(), mask,
                             i * d / 16, d, grp + i * d, gsp + i * d, pp + c * 3 * d);
          continue;
        }
#endif
        add_norm_grad_scalar(gp + i * d, xp + i * d, dp[i], wp, keep.data(), d, grp + i * d, gsp + i * d,
                             pp + c * 3 * d);
      }
    }
  });
  // the chunks' partial sums added up, each its own (D,) tensor (not views of one: autograd accumulates in place)
  return {g_r, g_s, partial.select(1, 0).sum(0), partial.select(1, 1).sum(0), partial.select(1, 2).sum(0)};
}

// --- attention for training: short sequences, forward and backward in one task per (sentence, head) -------
//
// scaled_dot_product_attention's CPU kernels (flash attention) tile for long sequences; at the lengths of
// sentence-level translation (tens of positions) a (sentence, head) pair's whole problem fits in the L1
// cache: Q (T x Dh), K and V (S x Dh), the scores (T x S). Here one task per pair runs its products as
// register-tiled loops (gemm_tile: rows of B in registers, elements of A broadcast) over those operands where
// they lie, but for the K^T and V^T of Q K^T and dO V^T, transposed into a buffer first (8 x 8 blocks: a few
// percent of the products' time, where products of rows with hadd reductions lost a quarter); the softmax with
// exp_8; and keeps the probabilities P (B, H, T, S rounded up to 8) for the backward pass, which so needs no
// exponential. With a causal mask the products skip, by tiles, what the mask zeroes (about half):
//   forward   S = Q K^T scale, masked to -inf;  P = softmax(S);  O = P V
//   backward  dV = P^T dO;  dP = dO V^T;  dS = P * (dP - rowsum(P * dP)) * scale;  dQ = dS K;  dK = dS^T Q.
// Masks: none, a key mask (B, S) (True = may attend) and/or causal (query i sees keys j <= i). A query that
// sees no key gives zeros, and zero gradients. O and dQ are written as (B, T, H, Dh), dK and dV as
// (B, S, H, Dh): contiguous once the heads are merged back, as the projections read them.

#ifdef TRANSFORMER_X86
// C (R x 8 NC) = A (R x K) B (K x 8 NC): A's element (r, k) at a[r * a_rs + k * a_ks] (so A may be a
// transposed view), B's rows ldb apart, C's rows ldc apart.
template <int R, int NC>
TRANSFORMER_AVX2 void gemm_tile(const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb,
                                int64_t k_dim, float* c, int64_t ldc) {
  __m256 acc[R][NC];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_dim; ++k) {
    __m256 bv[NC];
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) bv[j] = _mm256_loadu_ps(b + k * ldb + 8 * j);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * a_rs + k * a_ks);
#pragma GCC unroll 8
      for (int j = 0; j < NC; ++j) acc[r][j] = _mm256_fmadd_ps(av, bv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) _mm256_storeu_ps(c + r * ldc + 8 * j, acc[r][j]);
}

using GemmTile = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t);
constexpr int kGemmRows = 4, kGemmChunks = 3;  // 12 accumulators, 3 registers of B, 1 broadcast
constexpr GemmTile kGemmTiles[kGemmRows][kGemmChunks] = {
    {gemm_tile<1, 1>, gemm_tile<1, 2>, gemm_tile<1, 3>},
    {gemm_tile<2, 1>, gemm_tile<2, 2>, gemm_tile<2, 3>},
    {gemm_tile<3, 1>, gemm_tile<3, 2>, gemm_tile<3, 3>},
    {gemm_tile<4, 1>, gemm_tile<4, 2>, gemm_tile<4, 3>}};

// Which part of a product causal attention needs (query i sees keys j <= i): all of it; only C's columns j
// <= i of each row i (Q K^T, dO V^T: the rest is left unwritten); only k <= i in row i's sum (P V, dS K: A is
// zero past the diagonal); only k >= i (P^T dO, dS^T Q: A^T is zero before it). Tiles of 4 rows round each
// bound up (or down) to their block, so they compute a few products of zeros, never skip a needed one.
enum class Causal { kNone, kColumns, kSumBelow, kSumAbove };

// gemm_tile with 16-float registers (AVX-512): C (R x 16 NC, the last chunk only 8 wide where Half) = A B. Per
// output, the same FMAs in the same order from zero: the same bits as gemm_tile.
template <int R, int NC, bool Half>
TRANSFORMER_AVX512 void gemm_tile512(const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb,
                                     int64_t k_dim, float* c, int64_t ldc) {
  constexpr __mmask16 kLast = Half ? 0x00FF : 0xFFFF;
  __m512 acc[R][NC];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_dim; ++k) {
    __m512 bv[NC];
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j)
      bv[j] = j + 1 < NC ? _mm512_loadu_ps(b + k * ldb + 16 * j) : _mm512_maskz_loadu_ps(kLast, b + k * ldb + 16 * j);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * a_rs + k * a_ks]);
#pragma GCC unroll 8
      for (int j = 0; j < NC; ++j) acc[r][j] = _mm512_fmadd_ps(av, bv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) {
      if (j + 1 < NC) {
        _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
      } else {
        _mm512_mask_storeu_ps(c + r * ldc + 16 * j, kLast, acc[r][j]);
      }
    }
}

constexpr int kGemmChunks512 = 4;  // up to 4 rows x 64 columns: 16 accumulators, 4 registers of B, 1 broadcast
template <int R>
constexpr GemmTile kGemmRow512[2][kGemmChunks512] = {
    {gemm_tile512<R, 1, false>, gemm_tile512<R, 2, false>, gemm_tile512<R, 3, false>, gemm_tile512<R, 4, false>},
    {gemm_tile512<R, 1, true>, gemm_tile512<R, 2, true>, gemm_tile512<R, 3, true>, gemm_tile512<R, 4, true>}};
const GemmTile (*const kGemmTiles512[kGemmRows])[kGemmChunks512] = {kGemmRow512<1>, kGemmRow512<2>, kGemmRow512<3>,
                                                                     kGemmRow512<4>};

// C (M x N) = A (M x K) B (K x N), N a multiple of 8; strides as gemm_tile's; `causal` as above.
void small_gemm(const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb, int64_t m, int64_t n,
                int64_t k_dim, float* c, int64_t ldc, Causal causal = Causal::kNone) {
  const bool wide = cpu_level() >= kAvx512;
  for (int64_t i0 = 0; i0 < m; i0 += kGemmRows) {
    const int r = static_cast<int>(std::min<int64_t>(kGemmRows, m - i0));
    int64_t n_used = n, k0 = 0, k1 = k_dim;
    if (causal == Causal::kColumns) n_used = std::min<int64_t>(n, (i0 + r + 7) / 8 * 8);
    if (causal == Causal::kSumBelow) k1 = std::min<int64_t>(k_dim, i0 + r);
    if (causal == Causal::kSumAbove) k0 = std::min<int64_t>(k_dim, i0);
    if (wide) {  // chunks of 16 columns, the last one 8 wide where n_used is an odd multiple of 8
      const int64_t chunks = (n_used + 15) / 16;
      for (int64_t j0 = 0; j0 < chunks;) {
        const int nc = static_cast<int>(std::min<int64_t>(kGemmChunks512, chunks - j0));
        const bool half = j0 + nc == chunks && n_used % 16 != 0;
        kGemmTiles512[r - 1][half][nc - 1](a + i0 * a_rs + k0 * a_ks, a_rs, a_ks, b + k0 * ldb + 16 * j0, ldb, k1 - k0,
                                           c + i0 * ldc + 16 * j0, ldc);
        j0 += nc;
      }
      continue;
    }
    const int64_t chunks = n_used / 8;
    for (int64_t j0 = 0; j0 < chunks;) {
      // 3 chunks a tile, but 4 as 2 + 2: a tile of one chunk has 4 accumulators, too few to hide the FMA latency
      const int64_t left = chunks - j0;
      const int nc = static_cast<int>(left == 4 ? 2 : std::min<int64_t>(kGemmChunks, left));
      kGemmTiles[r - 1][nc - 1](a + i0 * a_rs + k0 * a_ks, a_rs, a_ks, b + k0 * ldb + 8 * j0, ldb, k1 - k0,
                                c + i0 * ldc + 8 * j0, ldc);
      j0 += nc;
    }
  }
}

// bt (Dh x rows_pad) = B^T for B (rows x Dh), its rows ldb apart, Dh a multiple of 8; bt is zero past `rows`.
TRANSFORMER_AVX2 void transpose_rows(const float* b, int64_t ldb, int64_t rows, int64_t dh, float* bt,
                                     int64_t rows_pad) {
  const int64_t full = rows / 8 * 8;
  for (int64_t r0 = 0; r0 < full; r0 += 8) {
    for (int64_t d0 = 0; d0 < dh; d0 += 8) {  // an 8 x 8 block: unpack, shuffle, swap halves
      __m256 x[8], t[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(b + (r0 + i) * ldb + d0);
#pragma GCC unroll 4
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
      }
#pragma GCC unroll 2
      for (int i = 0; i < 8; i += 4) {
        x[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        x[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        x[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        x[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(bt + (d0 + i) * rows_pad + r0, _mm256_permute2f128_ps(x[i], x[i + 4], 0x20));
        _mm256_storeu_ps(bt + (d0 + i + 4) * rows_pad + r0, _mm256_permute2f128_ps(x[i], x[i + 4], 0x31));
      }
    }
  }
  for (int64_t d = 0; d < dh; ++d) {
    float* row = bt + d * rows_pad;
    for (int64_t r = full; r < rows; ++r) row[r] = b[r * ldb + d];
    std::fill(row + rows, row + rows_pad, 0.f);
  }
}

#endif

inline int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

void check_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be (B, H, T|S, Dh)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "attention: float32 only");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention: Dh must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "attention: mismatched shapes");
  TORCH_CHECK(q.size(3) % 8 == 0, "attention: Dh must be a multiple of 8");
}

#ifdef TRANSFORMER_X86
// One row of scores (s_pad wide) -> probabilities in place: scaled, plus `bias` (0 or -inf per key, -inf
// past S), keys from `visible` on at -inf (causal), exponentiated and normalised; masked keys end as exactly
// 0, and a row that sees no key as zeros.
TRANSFORMER_AVX2 void softmax_row(float* row, int64_t s_pad, float scale, const float* bias, int64_t visible) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  const __m256 sv = _mm256_set1_ps(scale), none = _mm256_set1_ps(kNone);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vis = _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(visible, s_pad)));
  __m256 top = none;
  for (int64_t j = 0; j < s_pad; j += 8) {
    __m256 x = _mm256_fmadd_ps(_mm256_loadu_ps(row + j), sv, _mm256_loadu_ps(bias + j));
    const __m256i idx = _mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int32_t>(j)));
    x = _mm256_blendv_ps(none, x, _mm256_castsi256_ps(_mm256_cmpgt_epi32(vis, idx)));  // j < visible
    _mm256_storeu_ps(row + j, x);
    top = _mm256_max_ps(top, x);
  }
  top = _mm256_max_ps(top, _mm256_permute2f128_ps(top, top, 1));
  top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, _MM_SHUFFLE(1, 0, 3, 2)));
  top = _mm256_max_ps(top, _mm256_shuffle_ps(top, top, _MM_SHUFFLE(2, 3, 0, 1)));
  if (_mm256_cvtss_f32(top) == kNone) {
    std::fill(row, row + s_pad, 0.f);
    return;
  }
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < s_pad; j += 8) {
    const __m256 x = _mm256_loadu_ps(row + j);  // exp_8 takes -inf to 2^-126: masked keys are set to 0
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, none, _CMP_EQ_OQ), exp_8(_mm256_sub_ps(x, top)));
    _mm256_storeu_ps(row + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  const __m256 inv = _mm256_set1_ps(1.f / sum_8(sum));
  for (int64_t j = 0; j < s_pad; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), inv));
}

// dS = P * (dP - sum_j P dP) * scale for one row, in place of dP (s_pad wide; P is 0 past S).
TRANSFORMER_AVX2 void softmax_grad_row(const float* p, float* d, int64_t s_pad, float scale) {
  __m256 dot = _mm256_setzero_ps();
  for (int64_t j = 0; j < s_pad; j += 8) dot = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(d + j), dot);
  const __m256 dv = _mm256_set1_ps(sum_8(dot)), sv = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < s_pad; j += 8) {
    const __m256 pv = _mm256_loadu_ps(p + j);
    _mm256_storeu_ps(d + j, _mm256_mul_ps(_mm256_mul_ps(pv, _mm256_sub_ps(_mm256_loadu_ps(d + j), dv)), sv));
  }
}

#endif

// (out (B, H, T, Dh) as a view of (B, T, H, Dh), probs (B, H, T, S_pad))
std::vector<Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const std::optional<Tensor>& key_mask_in, bool causal, double scale_in) {
  check_attention(q, k, v);
  const int64_t batch = q.size(0), heads = q.size(1), t = q.size(2), s = k.size(2), dh = q.size(3);
  const int64_t s_pad = round8(s);
  // per sentence, 0 or -inf per key (-inf past S)
  Tensor bias = at::full({batch, s_pad}, -std::numeric_limits<float>::infinity(), q.options());
  if (key_mask_in.has_value() && key_mask_in->defined()) {
    const Tensor& m = *key_mask_in;
    TORCH_CHECK(m.dim() == 2 && m.size(0) == batch && m.size(1) == s && m.scalar_type() == at::kBool,
                "attention: key_mask must be (B, S) bool");
    bias.narrow(1, 0, s).masked_fill_(m, 0.f);
  } else {
    bias.narrow(1, 0, s).zero_();
  }
  Tensor out = at::empty({batch, t, heads, dh}, q.options());
  Tensor probs = at::empty({batch, heads, t, s_pad}, q.options());
  const float scale = static_cast<float>(scale_in);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float *op = out.data_ptr<float>(), *pp = probs.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2), ks0 = k.stride(0), ks1 = k.stride(1),
                ks2 = k.stride(2), vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  TORCH_CHECK(panels_supported(), "attention_forward: needs a CPU with AVX2 and FMA");
#ifdef TRANSFORMER_X86
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(dh * s_pad);  // K^T (Dh, S_pad)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const float* qb = qp + b * qs0 + h * qs1;
      const float* kb = kp + b * ks0 + h * ks1;
      const float* vb = vp + b * vs0 + h * vs1;
      float* pb = pp + task * t * s_pad;
      transpose_rows(kb, ks2, s, dh, kt.data(), s_pad);
      small_gemm(qb, qs2, 1, kt.data(), s_pad, t, s_pad, dh, pb, s_pad,
                 causal ? Causal::kColumns : Causal::kNone);  // Q K^T (T, S_pad), unscaled
      for (int64_t i = 0; i < t; ++i) softmax_row(pb + i * s_pad, s_pad, scale, bp + b * s_pad, causal ? i + 1 : s);
      small_gemm(pb, s_pad, 1, vb, vs2, t, dh, s, op + (b * t * heads + h) * dh, heads * dh,
                 causal ? Causal::kSumBelow : Causal::kNone);  // P V
    }
  });
#endif
  return {out.transpose(1, 2), probs};
}

// "[2, 5, 3]": a shape in one std::string for a check's message. c10::str streams numbers, which crashed the
// extension as built on the GPU machine (Ubuntu's gcc 13.3 against torch 2.11+cu130; see attend_one)
std::string shape_text(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "]";
}

// An output of attention_backward: the given tensor (B, H, N, Dh), Dh contiguous, where the caller wants the
// gradient written (a view of a buffer that packs q, k and v, say), else a new (B, N, H, Dh) seen as (B, H, N, Dh).
Tensor gradient_out(const std::optional<Tensor>& given, const Tensor& like, const char* what) {
  if (!given.has_value() || !given->defined())
    return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options()).transpose(1, 2);
  const Tensor& out = *given;
  TORCH_CHECK(out.sizes() == like.sizes() && out.scalar_type() == at::kFloat && out.device() == like.device() &&
              out.stride(3) == 1, "attention_backward: " + std::string(what) + " must be float32 " +
              shape_text(like.sizes()) + " with Dh contiguous");
  return out;
}

// (dq (B, H, T, Dh), dk, dv (B, H, S, Dh): the given tensors, or views of new (B, T|S, H, Dh))
std::vector<Tensor> attention_backward(const Tensor& grad_in, const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& probs, bool causal, double scale_in,
                                       const std::optional<Tensor>& dq_out, const std::optional<Tensor>& dk_out,
                                       const std::optional<Tensor>& dv_out) {
  check_attention(q, k, v);
  const Tensor grad = grad_in.stride(3) == 1 ? grad_in : grad_in.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), t = q.size(2), s = k.size(2), dh = q.size(3);
  const int64_t s_pad = round8(s);
  TORCH_CHECK(grad.sizes() == q.sizes() && probs.is_contiguous() && probs.size(0) == batch &&
              probs.size(1) == heads && probs.size(2) == t && probs.size(3) == s_pad,
              "attention_backward: mismatched shapes");
  Tensor dq = gradient_out(dq_out, q, "dq"), dk = gradient_out(dk_out, k, "dk"), dv = gradient_out(dv_out, v, "dv");
  const float scale = static_cast<float>(scale_in);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *gp = grad.data_ptr<float>(), *pp = probs.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2), ks0 = k.stride(0), ks1 = k.stride(1),
                ks2 = k.stride(2), vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2), gs0 = grad.stride(0),
                gs1 = grad.stride(1), gs2 = grad.stride(2);
  const int64_t dqs0 = dq.stride(0), dqs1 = dq.stride(1), dqs2 = dq.stride(2), dks0 = dk.stride(0),
                dks1 = dk.stride(1), dks2 = dk.stride(2), dvs0 = dv.stride(0), dvs1 = dv.stride(1), dvs2 = dv.stride(2);
  TORCH_CHECK(panels_supported(), "attention_backward: needs a CPU with AVX2 and FMA");
#ifdef TRANSFORMER_X86
  const Causal below = causal ? Causal::kSumBelow : Causal::kNone, above = causal ? Causal::kSumAbove : Causal::kNone;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ds(t * s_pad);   // dP, then dS in place (T, S_pad); 0 where causal skips it
    std::vector<float> vt(dh * s_pad);  // V^T (Dh, S_pad)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const float* qb = qp + b * qs0 + h * qs1;
      const float* kb = kp + b * ks0 + h * ks1;
      const float* vb = vp + b * vs0 + h * vs1;
      const float* gb = gp + b * gs0 + h * gs1;
      const float* pb = pp + task * t * s_pad;
      float* dqb = dqp + b * dqs0 + h * dqs1;
      float* dkb = dkp + b * dks0 + h * dks1;
      float* dvb = dvp + b * dvs0 + h * dvs1;
      small_gemm(pb, 1, s_pad, gb, gs2, s, dh, t, dvb, dvs2, above);  // dV = P^T dO
      if (causal) std::fill(ds.begin(), ds.end(), 0.f);
      transpose_rows(vb, vs2, s, dh, vt.data(), s_pad);
      small_gemm(gb, gs2, 1, vt.data(), s_pad, t, s_pad, dh, ds.data(), s_pad,
                 causal ? Causal::kColumns : Causal::kNone);  // dP = dO V^T
      for (int64_t i = 0; i < t; ++i) softmax_grad_row(pb + i * s_pad, ds.data() + i * s_pad, s_pad, scale);
      small_gemm(ds.data(), s_pad, 1, kb, ks2, t, dh, s, dqb, dqs2, below);  // dQ = dS K
      small_gemm(ds.data(), 1, s_pad, qb, qs2, s, dh, t, dkb, dks2, above);  // dK = dS^T Q
    }
  });
#endif
  return {dq, dk, dv};
}

}  // namespace

class DecoderStep {
 public:
  // fast_attention: attend_one, add_layer_norm and the KV cache's writes by rows instead of ATen's attention,
  // add, layer_norm and copy_ (frozen.py passes panels_supported(), and its Python layers then use the same)
  DecoderStep(int64_t n_heads, bool norm_first, bool gelu, bool fast_attention)
      : n_heads_(n_heads), norm_first_(norm_first), gelu_(gelu), fast_attention_(fast_attention) {}

  void add_layer(const std::vector<std::vector<Tensor>>& dense, const std::vector<Tensor>& norms,
                 const std::vector<double>& eps) {
    // dense: qkv, self_out, fc1, fc2[, cross_q, cross_out]; norms: (weight, bias) of self, ffn[, cross]
    Layer l;
    l.qkv = make_dense(dense.at(0));
    l.self_out = make_dense(dense.at(1));
    l.fc1 = make_dense(dense.at(2));
    l.fc2 = make_dense(dense.at(3));
    l.self_norm = Norm{norms.at(0), norms.at(1), eps.at(0), fast_attention_};
    l.ffn_norm = Norm{norms.at(2), norms.at(3), eps.at(1), fast_attention_};
    l.cross = dense.size() == 6;
    if (l.cross) {
      l.cross_q = make_dense(dense.at(4));
      l.cross_out = make_dense(dense.at(5));
      l.cross_norm = Norm{norms.at(4), norms.at(5), eps.at(2), fast_attention_};
    }
    layers_.push_back(std::move(l));
  }

  // What comes before and after the layers: the token embedding (V, D) scaled by `scale`, the positions (P, D),
  // the final LayerNorm (pre-LN; empty tensors where there is none), the output map and its extra bias (empty
  // where there is none)
  void set_ends(const Tensor& embed, double scale, const Tensor& positions, const std::vector<Tensor>& final_norm,
                double eps, const std::vector<Tensor>& output, const Tensor& logits_bias) {
    embed_ = embed;
    scale_ = scale;
    positions_ = positions;
    has_final_norm_ = final_norm.at(0).numel() > 0;
    final_norm_ = Norm{final_norm.at(0), final_norm.at(1), eps, fast_attention_};
    output_ = make_dense(output);
    logits_bias_ = logits_bias.numel() > 0 ? logits_bias : Tensor();
  }

  // tokens (N, 1) int64: each row's new token, at position `length` (the cached positions before it).
  // k_cache[i], v_cache[i]: layer i's buffers (N, H, C, Dh), C > length; this step's keys/values go to position
  // `length`. With tables (one per layer, each (N, C') int64, C' > length), the buffers are (M, H, C, Dh),
  // M >= N: row r's position j lies in buffer row tables[i][r, j]; this step writes tables[i][r, length] = r and
  // its keys/values to buffer rows 0..N-1. cross_k[i], cross_v[i]: (N, H, S, Dh), or (M, H, S, Dh) with
  // cross_rows (N,): row r's source keys are row cross_rows[r]. memory_mask: (N, 1, 1, S) bool, true where a
  // source token is real, or none. column_rows, panel_rows: the layers' product forms (frozen.py's COLUMN_ROWS and
  // PANEL_ROWS for the decoder), output_panel_rows: the output map's. Returns the logits (N, V).
  Tensor step(const Tensor& tokens, const std::vector<Tensor>& k_cache, const std::vector<Tensor>& v_cache,
              int64_t length, const std::vector<Tensor>& tables, const std::vector<Tensor>& cross_k,
              const std::vector<Tensor>& cross_v, const std::optional<Tensor>& memory_mask,
              const std::optional<Tensor>& cross_rows, int64_t column_rows, int64_t panel_rows,
              int64_t output_panel_rows) const {
    at::NoGradGuard no_grad;
    TORCH_CHECK(embed_.defined(), "DecoderStep.step: set_ends first");
    TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == 1 && length < positions_.size(0),
                "DecoderStep.step: tokens (N, 1) at a position within the model's positions");
    const int64_t n = tokens.size(0);
    // TokenEmbedding + PositionalEncoding, the Python step's ops: (N, 1, D) * scale + (1, D)
    Tensor x = (at::embedding(embed_, tokens) * scale_ + positions_.narrow(0, length, 1)).view({n, -1});
    std::vector<Tensor> rows;
    for (const Tensor& t : tables) {
      TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kLong && t.size(0) == n && t.size(1) > length,
                  "DecoderStep.step: tables (N, C) int64 with room for this position");
      int64_t* tp = t.data_ptr<int64_t>();
      for (int64_t r = 0; r < n; ++r) tp[r * t.stride(0) + length * t.stride(1)] = r;
      rows.push_back(t.narrow(1, 0, length + 1));
    }
    x = forward(x, k_cache, v_cache, length, rows, cross_k, cross_v, memory_mask, cross_rows, column_rows,
                panel_rows);
    if (has_final_norm_) x = final_norm_(x);
    Tensor logits = output_(x, 0, output_panel_rows);
    return logits_bias_.defined() ? logits + logits_bias_ : logits;
  }

  // Greedy search from BOS over B sentences, the loop of decoding/greedy.py's greedy_search with its steps and
  // its bookkeeping in C++ (no Python between steps: about a seventh of an int8 search at 32 sentences was the
  // interpreter's). The same calls in the same order, so the same tokens and the same float32 sums: a step's
  // logits by step(); where no sentence is at its length limit, step_candidates (1 best of each row, `banned`
  // left out, `pad` where none is left); from the first limit on, ATen's log_softmax, -inf at the banned ids
  // and at every token but EOS in the rows at their limits, and max. Finished sentences leave the batch (their
  // tables' rows, mask rows and source rows dropped). limit (B,) int64 >= 1: each sentence's most output tokens,
  // EOS included; cross_k, cross_v per layer (M, H, S, Dh); src_mask (B, S) bool or none (no padding);
  // cross_rows (B,) int64 or none (row b's source is row b). Needs the step's own attention (fast_attention: the
  // histories as tables of rows). Returns the tokens (B, max(limit)) int64, EOS past each sentence's end, and
  // each sentence's summed log-probability (B,) float32.
  std::vector<Tensor> greedy(const Tensor& limit_in, const std::vector<Tensor>& cross_k,
                             const std::vector<Tensor>& cross_v, const std::optional<Tensor>& src_mask,
                             const std::optional<Tensor>& cross_rows, int64_t bos, int64_t eos, int64_t pad,
                             const std::vector<int64_t>& banned, int64_t column_rows, int64_t panel_rows,
                             int64_t output_panel_rows) const {
    at::NoGradGuard no_grad;
    const Tensor limit = search_limits(limit_in, "greedy");
    const int64_t batch = limit.size(0);
    const int64_t* lim = limit.data_ptr<int64_t>();
    const int64_t longest = *std::max_element(lim, lim + batch);
    const auto options = embed_.options();
    Tensor tokens_out = at::full({batch, longest}, eos, options.dtype(at::kLong));
    Tensor logprob_out = at::zeros({batch}, options.dtype(at::kFloat));
    int64_t* out = tokens_out.data_ptr<int64_t>();
    float* sums = logprob_out.data_ptr<float>();
    std::vector<Tensor> ks, vs, tables;  // each layer's (B, H, C, Dh) buffers and (B, C) table, C = longest
    search_buffers(batch, batch, longest, ks, vs, tables);
    std::optional<Tensor> mask = search_mask(src_mask), rows = cross_rows;  // (B, 1, 1, S) or none
    std::vector<int64_t> active(batch);  // the sentence of each row
    std::iota(active.begin(), active.end(), 0);
    auto first_limit = [&]() {
      int64_t m = longest;
      for (int64_t a : active) m = std::min(m, lim[a]);
      return m;
    };
    int64_t first = first_limit();  // no row reaches its limit before this step
    Tensor last = at::full({batch, 1}, bos, options.dtype(at::kLong));  // (N, 1)
    for (int64_t position = 0; position < longest; ++position) {
      const int64_t n = static_cast<int64_t>(active.size());
      Tensor logits = step(last, ks, vs, position, tables, cross_k, cross_v, mask, rows, column_rows, panel_rows,
                           output_panel_rows);  // (N, V)
      Tensor best, best_logprob;  // (N,) int64, (N,) float32
      std::vector<char> at_limit(n, 0);
      if (position + 1 < first) {
        std::vector<Tensor> c = step_candidates(logits, at::zeros({n, 1}, options.dtype(at::kFloat)), 1, banned, pad);
        best_logprob = c[0].select(1, 0).contiguous();
        best = c[2].select(1, 0).contiguous();
      } else {  // greedy_search's ATen branch: next_token_logprobs, eos_only_where, max
        for (int64_t r = 0; r < n; ++r) at_limit[r] = position + 1 >= lim[active[r]];
        auto [values, indices] = limited_logprobs(logits, at_limit, 1, banned, eos).max(-1);
        best_logprob = values.contiguous();
        best = indices.contiguous();
      }
      const int64_t* tp = best.data_ptr<int64_t>();
      const float* vp = best_logprob.data_ptr<float>();
      std::vector<int64_t> keep;
      for (int64_t r = 0; r < n; ++r) {
        out[active[r] * longest + position] = tp[r];
        sums[active[r]] += vp[r];
        if (tp[r] != eos && !at_limit[r]) keep.push_back(r);
      }
      if (keep.empty()) break;
      if (static_cast<int64_t>(keep.size()) < n) {  // finished rows leave: the tables', mask's and sources' rows
        Tensor index = at::tensor(keep, options.dtype(at::kLong));
        for (Tensor& t : tables) t = t.index_select(0, index);
        if (mask.has_value()) mask = mask->index_select(0, index);
        rows = rows.has_value() && rows->defined() ? rows->index_select(0, index) : index;
        best = best.index_select(0, index);
        std::vector<int64_t> kept;
        for (int64_t r : keep) kept.push_back(active[r]);
        active.swap(kept);
        first = first_limit();
      }
      last = best.view({-1, 1});
    }
    return {tokens_out, logprob_out};
  }

  // Beam search from BOS over B sentences with `beam` (K) hypotheses each: the loop of decoding/beam.py's
  // beam_search with its steps and its bookkeeping in C++ (at one sentence a step, about two fifths of the Python
  // loop's time was outside the step). The same calls in the same order, so the same hypotheses and the same
  // float32 sums: a step's logits by step() over the n x w active rows (w = 1 at the first step, then K); where no
  // sentence is at its length limit, step_candidates (the 2K best continuations of each sentence, `banned` left
  // out, `pad` where none is left); from the first limit on, ATen's log_softmax, -inf at the banned ids and at
  // every token but EOS in the sentences at their limits, and beam_search's top-k (one over (n, w V) where w = 1
  // or 2K >= V, else each row's 2K best, then the sentence's). EOS candidates among a sentence's K best finish
  // (at most K per sentence, in rank order); the K best others continue. A sentence stops with K finished
  // hypotheses or at its limit and leaves the batch. limit (B,) int64 >= 1, cross_k, cross_v, src_mask,
  // cross_rows as greedy's. Returns the finished hypotheses in the order they finished: their sentence (F,)
  // int64, their summed log-probability (F,) float32 (EOS included), their number of tokens (F,) int64 (EOS
  // not included) and those tokens one after another (sum of the numbers,) int64. The length penalty and the
  // ranking are left to the caller.
  std::vector<Tensor> beam(const Tensor& limit_in, int64_t beam, const std::vector<Tensor>& cross_k,
                           const std::vector<Tensor>& cross_v, const std::optional<Tensor>& src_mask,
                           const std::optional<Tensor>& cross_rows, int64_t bos, int64_t eos, int64_t pad,
                           const std::vector<int64_t>& banned, int64_t column_rows, int64_t panel_rows,
                           int64_t output_panel_rows) const {
    at::NoGradGuard no_grad;
    TORCH_CHECK(beam >= 1, "DecoderStep.beam: beam >= 1");
    const Tensor limit = search_limits(limit_in, "beam");
    const int64_t batch = limit.size(0), n_cand = 2 * beam;
    const int64_t* lim = limit.data_ptr<int64_t>();
    const int64_t longest = *std::max_element(lim, lim + batch);
    const auto options = embed_.options();
    const auto as_long = options.dtype(at::kLong);
    const float neg_inf = -std::numeric_limits<float>::infinity();
    std::vector<Tensor> ks, vs, tables;  // each layer's (B K, H, C, Dh) buffers and (n w, C) table, C = longest
    search_buffers(batch * beam, batch, longest, ks, vs, tables);
    std::optional<Tensor> mask = search_mask(src_mask), rows = cross_rows;  // (B, 1, 1, S) or none
    std::vector<int64_t> sent(batch);  // the sentence of each active sentence's rows
    std::iota(sent.begin(), sent.end(), 0);
    int64_t width = 1;
    Tensor scores = at::zeros({batch, 1}, options.dtype(at::kFloat));  // (n, w)
    Tensor newest = at::full({batch, 1}, bos, as_long);                // (n w, 1)
    std::vector<std::vector<int64_t>> prefixes(batch);                  // per row: its tokens after BOS
    std::vector<int64_t> n_finished(batch, 0);
    std::vector<int64_t> fin_sent, fin_len, fin_tokens;
    std::vector<float> fin_logprob;
    for (int64_t position = 0; position < longest; ++position) {
      const int64_t n = static_cast<int64_t>(sent.size());
      Tensor logits = step(newest, ks, vs, position, tables, cross_k, cross_v, mask, rows, column_rows, panel_rows,
                           output_panel_rows);  // (n w, V)
      const int64_t vocab = logits.size(1);
      std::vector<char> at_limit(n);
      bool any_at_limit = false;
      for (int64_t i = 0; i < n; ++i) any_at_limit |= (at_limit[i] = position + 1 >= lim[sent[i]]);
      Tensor cand_scores, cand_flat;  // (n, 2K) float32; (n, 2K) int64: beam * V + token
      if (!any_at_limit) {
        std::vector<Tensor> c = step_candidates(logits, scores, n_cand, banned, pad);
        cand_scores = c[0];
        cand_flat = c[1] * vocab + c[2];
      } else {  // beam_search's ATen branch: next_token_logprobs, eos_only_where, _top_continuations
        Tensor logprobs = limited_logprobs(logits, at_limit, width, banned, eos).view({n, width, vocab});
        if (width == 1 || n_cand >= vocab) {
          Tensor total = (scores.unsqueeze(2) + logprobs).view({n, width * vocab});
          auto [values, flat] = total.topk(std::min(n_cand, width * vocab), 1);
          cand_scores = values;
          cand_flat = flat;
        } else {
          auto [own_best, own_tokens] = logprobs.topk(n_cand, 2);  // (n, w, 2K) each
          Tensor total = (scores.unsqueeze(2) + own_best).view({n, width * n_cand});
          auto [values, flat] = total.topk(n_cand, 1);
          Tensor tokens = own_tokens.view({n, width * n_cand}).gather(1, flat);
          cand_scores = values;
          cand_flat = at::div(flat, n_cand, "floor") * vocab + tokens;
        }
        const int64_t missing = n_cand - cand_scores.size(1);
        if (missing > 0) {  // fewer continuations than 2K (a tiny vocabulary): empty slots (-inf, beam 0, pad)
          cand_scores = at::cat({cand_scores, at::full({n, missing}, neg_inf, cand_scores.options())}, 1);
          cand_flat = at::cat({cand_flat, at::full({n, missing}, pad, as_long)}, 1);
        }
      }
      cand_scores = cand_scores.contiguous();
      cand_flat = cand_flat.contiguous();
      const float* cs = cand_scores.data_ptr<float>();
      const int64_t* cf = cand_flat.data_ptr<int64_t>();
      auto is_eos = [&](int64_t i, int64_t j) { return cf[i * n_cand + j] % vocab == eos; };

      // Finish the EOS candidates that rank among the K best
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < beam; ++j) {
          const float score = cs[i * n_cand + j];
          if (!is_eos(i, j) || !std::isfinite(score) || n_finished[sent[i]] >= beam) continue;
          const std::vector<int64_t>& prefix = prefixes[i * width + cf[i * n_cand + j] / vocab];
          fin_sent.push_back(sent[i]);
          fin_logprob.push_back(score);
          fin_len.push_back(static_cast<int64_t>(prefix.size()));
          fin_tokens.insert(fin_tokens.end(), prefix.begin(), prefix.end());
          ++n_finished[sent[i]];
        }
      }
      // Sentences still searching: not at their limit and fewer than K finished hypotheses
      std::vector<int64_t> kept;
      for (int64_t i = 0; i < n; ++i) {
        if (!at_limit[i] && n_finished[sent[i]] < beam) kept.push_back(i);
      }
      if (kept.empty()) break;
      const int64_t n_kept = static_cast<int64_t>(kept.size());
      const bool pruned = n_kept < n;
      // The K best non-EOS candidates continue (EOS candidates after all others, in rank order)
      Tensor next = at::empty({2, n_kept * beam}, as_long);  // the rows extended, the tokens appended
      Tensor next_scores = at::empty({n_kept, beam}, options.dtype(at::kFloat));
      int64_t* next_rows = next.data_ptr<int64_t>();
      int64_t* next_tokens = next_rows + n_kept * beam;
      float* ns = next_scores.data_ptr<float>();
      std::vector<std::vector<int64_t>> next_prefixes(n_kept * beam);
      for (int64_t a = 0; a < n_kept; ++a) {
        const int64_t i = kept[a];
        int64_t k = 0;
        for (int pass = 0; pass < 2 && k < beam; ++pass) {
          for (int64_t j = 0; j < n_cand && k < beam; ++j) {
            if (is_eos(i, j) != (pass == 1)) continue;
            const int64_t r = a * beam + k++;
            next_rows[r] = i * width + cf[i * n_cand + j] / vocab;
            next_tokens[r] = cf[i * n_cand + j] % vocab;
            ns[r] = cs[i * n_cand + j];
            next_prefixes[r] = prefixes[next_rows[r]];
            next_prefixes[r].push_back(next_tokens[r]);
          }
        }
      }
      Tensor row_index = next[0];
      for (Tensor& t : tables) t = t.index_select(0, row_index);
      if (pruned || width < beam) {  // the sources' rows: a sentence's beams share its source
        Tensor source = at::empty({n_kept * beam}, as_long);
        int64_t* sp = source.data_ptr<int64_t>();
        for (int64_t a = 0; a < n_kept; ++a) {
          for (int64_t k = 0; k < beam; ++k) sp[a * beam + k] = kept[a] * width;
        }
        if (mask.has_value()) mask = mask->index_select(0, source);
        rows = rows.has_value() && rows->defined() ? rows->index_select(0, source) : source;
        std::vector<int64_t> kept_sent;
        for (int64_t i : kept) kept_sent.push_back(sent[i]);
        sent.swap(kept_sent);
      }
      prefixes.swap(next_prefixes);
      newest = next[1].view({-1, 1});
      scores = next_scores;
      width = beam;
    }
    return {at::tensor(fin_sent, as_long), at::tensor(fin_logprob, options.dtype(at::kFloat)),
            at::tensor(fin_len, as_long), at::tensor(fin_tokens, as_long)};
  }

  // x (N, D): the embedded new position of each row; the rest as step's (self_rows: the tables, (N, length + 1),
  // already written). Returns (N, D), before the final LayerNorm.
  Tensor forward(Tensor x, const std::vector<Tensor>& k_cache, const std::vector<Tensor>& v_cache, int64_t length,
                 const std::vector<Tensor>& self_rows, const std::vector<Tensor>& cross_k,
                 const std::vector<Tensor>& cross_v, const std::optional<Tensor>& memory_mask,
                 const std::optional<Tensor>& cross_rows, int64_t column_rows, int64_t panel_rows) const {
    at::NoGradGuard no_grad;
    const int64_t n = x.size(0), d = x.size(1), h = n_heads_, dh = d / h;
    TORCH_CHECK(fast_attention_ || (!(cross_rows.has_value() && cross_rows->defined()) && self_rows.empty()),
                "shared keys (self_rows, cross_rows) need the step's own attention (fast_attention)");
    TORCH_CHECK(k_cache.size() == layers_.size() && v_cache.size() == layers_.size() &&
                    (self_rows.empty() || self_rows.size() == layers_.size()),
                "one cache (and one self_rows table) per layer");
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      // self-attention
      Tensor y = norm_first_ ? l.self_norm(x) : x;
      Tensor qkv = l.qkv(y, column_rows, panel_rows).contiguous();  // (N, 3D): q, k, v of each head
      write_position(qkv, 1, k_cache[i], length);
      write_position(qkv, 2, v_cache[i], length);
      Tensor q = qkv.view({n, 1, 3, h, dh}).permute({2, 0, 3, 1, 4})[0];  // (N, H, 1, Dh)
      Tensor keys = k_cache[i].narrow(2, 0, length + 1), values = v_cache[i].narrow(2, 0, length + 1);
      std::optional<Tensor> rows = self_rows.empty() ? std::nullopt : std::optional<Tensor>(self_rows[i]);
      Tensor a = fast_attention_ ? attend_one(q, keys, values, std::nullopt, rows)  // (N, D)
                                 : at::scaled_dot_product_attention(q, keys, values).transpose(1, 2).reshape({n, d});
      Tensor s = l.self_out(a, column_rows, panel_rows);
      if (norm_first_) {
        x = x + s;
      } else {
        x = l.self_norm(x, s);
      }
      // cross-attention
      if (l.cross) {
        y = norm_first_ ? l.cross_norm(x) : x;
        Tensor cq = l.cross_q(y, column_rows, panel_rows).contiguous().view({n, 1, h, dh}).transpose(1, 2);
        // cq: (N, H, 1, Dh)
        Tensor c = fast_attention_
                       ? attend_one(cq, cross_k.at(i), cross_v.at(i), memory_mask, cross_rows)  // (N, D)
                       : at::scaled_dot_product_attention(cq, cross_k.at(i), cross_v.at(i), memory_mask)
                             .transpose(1, 2)
                             .reshape({n, d});
        s = l.cross_out(c, column_rows, panel_rows);
        if (norm_first_) {
          x = x + s;
        } else {
          x = l.cross_norm(x, s);
        }
      }
      // feed-forward
      y = norm_first_ ? l.ffn_norm(x) : x;
      Tensor f = gelu_ ? at::gelu(l.fc1(y, column_rows, panel_rows)) : l.fc1(y, column_rows, panel_rows, true);
      s = l.fc2(f, column_rows, panel_rows);
      if (norm_first_) {
        x = x + s;
      } else {
        x = l.ffn_norm(x, s);
      }
    }
    return x;
  }

 private:
  // A search's limits (B,) int64, each from 1 to the model's positions -> contiguous; `name`: the search's, for errors
  Tensor search_limits(const Tensor& limit_in, const char* name) const {
    TORCH_CHECK(fast_attention_, "DecoderStep.", name, " needs the step's own attention (fast_attention)");
    TORCH_CHECK(embed_.defined() && !layers_.empty(), "DecoderStep.", name, ": add_layer and set_ends first");
    TORCH_CHECK(limit_in.dim() == 1 && limit_in.size(0) > 0 && limit_in.scalar_type() == at::kLong,
                "DecoderStep.", name, ": limit (B,) int64");
    Tensor limit = limit_in.contiguous();
    const int64_t* lim = limit.data_ptr<int64_t>();
    const int64_t batch = limit.size(0);
    TORCH_CHECK(*std::min_element(lim, lim + batch) >= 1 && *std::max_element(lim, lim + batch) <= positions_.size(0),
                "DecoderStep.", name, ": limits from 1 to the model's positions");
    return limit;
  }

  // each layer's key and value buffers (rows, H, C, Dh) and its history's table of rows (table_rows, C), C = longest
  void search_buffers(int64_t rows, int64_t table_rows, int64_t longest, std::vector<Tensor>& ks,
                      std::vector<Tensor>& vs, std::vector<Tensor>& tables) const {
    const int64_t h = n_heads_, dh = embed_.size(1) / h;
    const auto options = embed_.options();
    for (size_t i = 0; i < layers_.size(); ++i) {
      ks.push_back(at::empty({rows, h, longest, dh}, options));
      vs.push_back(at::empty({rows, h, longest, dh}, options));
      tables.push_back(at::zeros({table_rows, longest}, options.dtype(at::kLong)));
    }
  }

  // src_mask (B, S) bool or none -> (B, 1, 1, S) or none, what step() takes
  static std::optional<Tensor> search_mask(const std::optional<Tensor>& src_mask) {
    if (src_mask.has_value() && src_mask->defined()) return src_mask->unsqueeze(1).unsqueeze(1);
    return std::nullopt;
  }

  // decoding/common.py's next_token_logprobs and eos_only_where: logits (N, V) -> log_softmax in float32, -inf at
  // the banned ids and, in rows r with at_limit[r / per] (`per` rows a sentence), at every token but EOS
  static Tensor limited_logprobs(const Tensor& logits, const std::vector<char>& at_limit, int64_t per,
                                 const std::vector<int64_t>& banned, int64_t eos) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    Tensor logprobs = at::log_softmax(logits.to(at::kFloat), -1);
    for (int64_t id : banned) logprobs.select(1, id).fill_(neg_inf);
    const int64_t n = logprobs.size(0);
    Tensor limited = at::empty({n}, logprobs.options().dtype(at::kBool));
    bool* lp = limited.data_ptr<bool>();
    for (int64_t r = 0; r < n; ++r) lp[r] = at_limit[r / per];
    Tensor eos_only = at::full_like(logprobs, neg_inf);
    eos_only.select(1, eos).copy_(logprobs.select(1, eos));
    return at::where(limited.view({-1, 1}), eos_only, logprobs);
  }

  // this position's keys (part 1) or values (part 2) of qkv (N, 3D) -> buffer rows 0..N-1 of cache (M, H, C, Dh)
  // at position `length`
  void write_position(const Tensor& qkv, int64_t part, const Tensor& cache, int64_t length) const {
    const int64_t n = qkv.size(0), h = n_heads_, dh = qkv.size(1) / 3 / h;
    TORCH_CHECK(cache.dim() == 4 && cache.size(0) >= n && cache.size(1) == h && cache.size(2) > length &&
                    cache.size(3) == dh && cache.stride(3) == 1 && cache.scalar_type() == at::kFloat,
                "DecoderStep: KV buffers (M >= N, H, C > length, Dh) float32");
    const float* src = qkv.data_ptr<float>() + part * h * dh;
    float* dst = cache.data_ptr<float>() + length * cache.stride(2);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t head = 0; head < h; ++head) {
        std::memcpy(dst + r * cache.stride(0) + head * cache.stride(1), src + r * qkv.stride(0) + head * dh,
                    sizeof(float) * dh);
      }
    }
  }

  int64_t n_heads_;
  bool norm_first_, gelu_, fast_attention_;
  std::vector<Layer> layers_;
  Tensor embed_, positions_, logits_bias_;
  double scale_ = 1.0;
  bool has_final_norm_ = false;
  Norm final_norm_;
  Dense output_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecoderStep>(m, "DecoderStep")
      .def(pybind11::init<int64_t, bool, bool, bool>())
      .def("add_layer", &DecoderStep::add_layer)
      .def("set_ends", &DecoderStep::set_ends)
      .def("step", &DecoderStep::step)
      .def("greedy", &DecoderStep::greedy, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("beam", &DecoderStep::beam, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("forward", &DecoderStep::forward);
  m.def("panel_linear", &panel_linear, "x (N, in) @ W^T + b with W as (P, in, 16) column panels -> (N, out)",
        pybind11::arg("x"), pybind11::arg("panels"), pybind11::arg("bias"), pybind11::arg("out_features"),
        pybind11::arg("relu") = false);
  m.def("panel_linear_w8a8", &panel_linear_w8a8,
        "((u - z) @ Q^T) * sx * s + b: x (N, in) rounded per row to 7-bit unsigned u with scale sx and zero point z, "
        "int8 Q as (P, ceil(in / 4), 64) quad panels with column sums, s per output -> (N, out)",
        pybind11::arg("x"), pybind11::arg("panels"), pybind11::arg("colsums"), pybind11::arg("scales"),
        pybind11::arg("bias"), pybind11::arg("out_features"), pybind11::arg("relu") = false);
  m.def("attend_spans", &attend_spans, "an encoder's self-attention over real tokens: qkv (N, 3D), sentence b "
        "in rows starts[b] .. starts[b + 1] - 1, heads -> (N, D)");
  m.def("source_heads", &source_heads, "kv (N, L*2*D) of the real tokens at positions (N,) of B x S (or None: "
        "all) -> (L, 2, B, H, S, Dh), zeros at the padding", pybind11::arg("kv"), pybind11::arg("positions"),
        pybind11::arg("batch"), pybind11::arg("length"), pybind11::arg("layers"), pybind11::arg("heads"));
  m.def("add_layer_norm", &add_layer_norm, "LayerNorm(x (N, D) + residual (N, D) or None) with weight, bias (D,)",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("eps"));
  m.def("attend_one", &attend_one, "attention of one query per row and head: q (N, H, 1, Dh), k, v (N, H, L, Dh), "
        "mask (N, 1, 1, L) or None; with kv_rows (N,), row r attends to k[kv_rows[r]], v[kv_rows[r]] -> (N, H * Dh)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("mask") = pybind11::none(),
        pybind11::arg("kv_rows") = pybind11::none());
  m.def("step_candidates", &step_candidates,
        "the n best continuations of each sentence: scores (B, K) + log_softmax(logits (B*K, V)), banned ids left "
        "out -> (scores (B, n), rows (B, n), tokens (B, n))");
  m.def("panels_supported", &panels_supported, "whether this CPU runs panel_linear (AVX2 and FMA)");
  m.def("cpu_level", &cpu_level, "the instructions the kernels use: 0 none (no AVX2), 2 AVX2, 3 AVX-512, "
        "4 AVX-512 VNNI");
  m.def("cpu_is_intel", &cpu_is_intel, "whether the CPU is Intel's (cpuid's vendor)");
  m.def("set_cpu_level", &set_cpu_level, "cap the kernels' instructions at 2 (AVX2), 3 (AVX-512) or 4 (AVX-512 "
        "VNNI), within what the CPU has -> the level now (the results are the same bits at every level)",
        pybind11::arg("cap"));
  m.def("dropout_apply", &dropout_apply,
        "training dropout: (residual +) x * mask, element i kept when 16 bits of a hash of (seed, i) are >= "
        "dropped, kept elements scaled by scale", pybind11::arg("x"), pybind11::arg("residual"),
        pybind11::arg("seed"), pybind11::arg("dropped"), pybind11::arg("scale"));
  m.def("exp_rows_", &exp_rows_,
        "training loss: logits (N, V) float32 overwritten with exp(z - max) per row -> (3, N): max, sum of the "
        "exponentials, mean of z", pybind11::arg("logits"));
  m.def("exp_rows_grad_", &exp_rows_grad_,
        "training loss's gradient, in place: grad (N, V) holding exp(z - max) -> grad * scale - offset, minus "
        "gold_weight at gold, per row", pybind11::arg("grad"), pybind11::arg("scale"), pybind11::arg("offset"),
        pybind11::arg("gold"), pybind11::arg("gold_weight"));
  m.def("bias_relu_", &bias_relu_, "training feed-forward: h (N, F) <- relu(h + b) in place, b (F,)",
        pybind11::arg("h"), pybind11::arg("b"));
  m.def("add_norm_forward", &add_norm_forward,
        "post-norm sub-layer end: LayerNorm(residual + dropout(s + bias)) -> y, x_hat (..., D), 1/std (N,)");
  m.def("add_norm_backward", &add_norm_backward,
        "its backward pass: grad_y, x_hat, 1/std, weight, the mask -> the residual's and s's gradients, and the "
        "LayerNorm weight's, its bias's and the sub-layer bias's (D,)");
  m.def("relu_grad_", &relu_grad_,
        "training feed-forward: grad (N, F) <- grad where h > 0 else 0, in place -> its column sums (F,)",
        pybind11::arg("grad"), pybind11::arg("h"));
  m.def("attention_forward", &attention_forward,
        "training attention of short sequences: q (B, H, T, Dh), k, v (B, H, S, Dh), key_mask (B, S) bool or None, "
        "causal, scale -> (out (B, H, T, Dh), probabilities (B, H, T, S rounded up to 8))",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("key_mask"),
        pybind11::arg("causal"), pybind11::arg("scale"));
  m.def("attention_backward", &attention_backward,
        "the gradients (dq, dk, dv) of attention_forward from grad_out (B, H, T, Dh) and its probabilities, each "
        "written into the given tensor (B, H, T|S, Dh), Dh contiguous, or a new one",
        pybind11::arg("grad_out"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("probs"), pybind11::arg("causal"), pybind11::arg("scale"), pybind11::arg("dq") = pybind11::none(),
        pybind11::arg("dk") = pybind11::none(), pybind11::arg("dv") = pybind11::none());
}
