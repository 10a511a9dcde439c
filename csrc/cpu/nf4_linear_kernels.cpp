// cpu/nf4_linear_kernels.cpp — NF4 tile decode, streaming NF4 GEMV and row norms on CPU (AVX2 + FMA).
//
//   decode: out[n, k]   = NF4[code(n*K + k)] * scale(block)           (fp32 tile, caller-sized)
//   gemv:   y[m, n]     = Σ_blocks scale(b) · Σ_{k in b} NF4[code] · x[m, k]    (fp32 accumulate)
//   sqnorm: sq[n]       = Σ_k deq(W)[n, k]²
// W flat row-major [N, K], two codes per byte (even flat index in the high nibble). A row of W may
// start on an odd flat index (odd K) and blocks may straddle rows (K not a multiple of blocksize):
// every loop walks "segments" = the part of one block inside one row, with a scalar head/tail.
// Only ATen/Parallel.h from torch: this file compiles fast.

#include "nf4_linear_kernels.h"

#include <ATen/Parallel.h>

#include "cpu_isa.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LRX_CPU_AVX2 1
#endif

namespace lowrank_ext {
namespace cpu {
namespace {

#if LRX_CPU_AVX2
// The 8 codes of 4 consecutive bytes (little-endian word): element e is byte e/2, high nibble first.
inline __m256i codes8(uint32_t word) {
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
  return _mm256_and_si256(v, _mm256_set1_epi32(0x0F));
}

// 16-entry fp32 lookup held in two registers: permute by the low 3 bits, pick the half by bit 3
// (shifted into the sign bit for blendv).
inline __m256 lut16(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}
#endif

// Decode flat elements [i0, i1) into out[0, i1 - i0).
template <typename T>
void decode_span(const NF4Matrix& w, int64_t i0, int64_t i1, T* out) {
  int64_t i = i0;
  while (i < i1) {
    const int64_t b = block_of(w, i);
    const int64_t end = std::min(i1, (b + 1) * w.blocksize);
    const float s = block_scale(w.scales, b);
    float lut[16];  // NF4[c] * scale: the exact fp32 product of the format
    for (int c = 0; c < 16; ++c) lut[c] = kNF4Codebook[c] * s;
    T* o = out + (i - i0);
    int64_t j = i;
    if (j & 1) *o++ = static_cast<T>(lut[code_at(w.packed, j++)]);
#if LRX_CPU_AVX2
    if constexpr (sizeof(T) == sizeof(float)) {
      const __m256 lo = _mm256_loadu_ps(lut), hi = _mm256_loadu_ps(lut + 8);
      for (; j + 8 <= end; j += 8, o += 8) _mm256_storeu_ps(o, lut16(codes8(load_u32(w.packed + (j >> 1))), lo, hi));
    }
#endif
    for (; j < end; ++j) *o++ = static_cast<T>(lut[code_at(w.packed, j)]);
    i = end;
  }
}

template <typename T, typename Span>
void decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, T* out, int64_t ld,
                 Span span) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, k1 - k0));
  at::parallel_for(n0, n1, grain, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) span(w, n * w.K + k0, n * w.K + k1, out + (n - n0) * ld);
  });
}

// MB rows of x (1..4) against rows [n0, n1) of W. Per segment (one block inside one row):
//   acc[m] = Σ_k NF4[code_k] · x[m, k]   (two vector accumulators per m, 16 codes per step)
//   tot[m] += scale · acc[m]             (one multiply per block instead of one per element)
constexpr int64_t kPrefetchBytes = 1024;  // ~2K codes ahead of the decode

template <int MB>
void gemv_rows(const NF4Matrix& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K = w.K, bs = w.blocksize;
#if LRX_CPU_AVX2
  const __m256 lo = _mm256_loadu_ps(kNF4Codebook), hi = _mm256_loadu_ps(kNF4Codebook + 8);
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t r0 = n * K, r1 = r0 + K;  // flat range of row n
    float tot_s[MB] = {};
#if LRX_CPU_AVX2
    __m256 tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
#endif
    for (int64_t i = r0; i < r1;) {
      const int64_t b = block_of(w, i);
      const int64_t end = std::min(r1, (b + 1) * bs);
      const float s = block_scale(w.scales, b);
      float sc[MB] = {};  // scalar head/tail part of this segment
      int64_t j = i;
      if (j & 1) {
        const float c = kNF4Codebook[code_at(w.packed, j)];
        for (int m = 0; m < MB; ++m) sc[m] += c * x[m * ldx + (j - r0)];
        ++j;
      }
#if LRX_CPU_AVX2
      __m256 a0[MB], a1[MB];
      for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
      for (; j + 16 <= end; j += 16) {
        const uint8_t* p = w.packed + (j >> 1);
        // stream ahead: a decode step is short enough that the hardware prefetcher alone lags DRAM
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
        const __m256 d0 = lut16(codes8(load_u32(p)), lo, hi);
        const __m256 d1 = lut16(codes8(load_u32(p + 4)), lo, hi);
        const float* xk = x + (j - r0);
        for (int m = 0; m < MB; ++m) {
          a0[m] = _mm256_fmadd_ps(d0, _mm256_loadu_ps(xk + m * ldx), a0[m]);
          a1[m] = _mm256_fmadd_ps(d1, _mm256_loadu_ps(xk + m * ldx + 8), a1[m]);
        }
      }
      for (; j + 8 <= end; j += 8) {
        const __m256 d0 = lut16(codes8(load_u32(w.packed + (j >> 1))), lo, hi);
        for (int m = 0; m < MB; ++m) a0[m] = _mm256_fmadd_ps(d0, _mm256_loadu_ps(x + m * ldx + (j - r0)), a0[m]);
      }
      const __m256 sv = _mm256_set1_ps(s);
      for (int m = 0; m < MB; ++m) tot[m] = _mm256_fmadd_ps(_mm256_add_ps(a0[m], a1[m]), sv, tot[m]);
#endif
      for (; j < end; ++j) {
        const float c = kNF4Codebook[code_at(w.packed, j)];
        for (int m = 0; m < MB; ++m) sc[m] += c * x[m * ldx + (j - r0)];
      }
      for (int m = 0; m < MB; ++m) tot_s[m] += sc[m] * s;
      i = end;
    }
    for (int m = 0; m < MB; ++m) {
#if LRX_CPU_AVX2
      y[m * ldy + (n - n0)] = hsum(tot[m]) + tot_s[m];
#else
      y[m * ldy + (n - n0)] = tot_s[m];
#endif
    }
  }
}

#if LRX_CPU_AVX2
// The blocked GEMV on AVX2: rows of W start on block boundaries (K % blocksize == 0), so every 16 bytes of W are
// one group of 32 codes. Decoding by byte shuffles (vpshufb indexes a 16-byte table with a 4-bit code, 32 codes per
// instruction): the four bytes of each fp32 NF4 level are four 16-byte tables ("planes"), looked up by the same
// 32 codes, then byte-interleaved back into fp32 — per 32 codes 3 ops to make the indices, 4 vpshufb and 8 unpacks
// (the vpermps + blendv LUT takes 2 permutes + a blend + a shift per 8 codes: ~20 shuffle-port ops per 32 codes).
// The unpacks work inside 128-bit lanes, so the 32 values come out in a fixed order other than the flat one;
// x is reordered once to match (nf4_reorder_x_avx2) instead of reordering the decoded values in every group.
//
// Order of one group: the index vector holds, in lane 0, the low nibbles of bytes 0..15 (flat elements 2j + 1)
// and in lane 1 the high nibbles (elements 2j). After unpacking, decoded vector q (0..3) holds
//   lane 0: elements 8q+1, 8q+3, 8q+5, 8q+7     lane 1: elements 8q, 8q+2, 8q+4, 8q+6
// i.e. within every 8 consecutive elements the odd ones first, then the even ones.
struct PlaneLUT {
  __m256i plane[4];  // plane[p] byte c (both lanes) = byte p of the fp32 bits of NF4[c]
  PlaneLUT() {
    alignas(32) uint8_t bytes[4][32];
    for (int c = 0; c < 16; ++c) {
      uint32_t bits;
      std::memcpy(&bits, &kNF4Codebook[c], 4);
      for (int p = 0; p < 4; ++p) bytes[p][c] = bytes[p][c + 16] = static_cast<uint8_t>(bits >> (8 * p));
    }
    for (int p = 0; p < 4; ++p) plane[p] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[p]));
  }
};

// 16 bytes of W (32 codes) -> 4 vectors of NF4 levels in the group order above.
inline void decode_group_avx2(const uint8_t* p, const PlaneLUT& lut, __m256& d0, __m256& d1, __m256& d2, __m256& d3) {
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  // lane 0 shifted by 0 (low nibbles), lane 1 by 4 (high nibbles), then the 4 bits of each byte kept
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(b, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                       _mm256_set1_epi8(0x0F));
  const __m256i p0 = _mm256_shuffle_epi8(lut.plane[0], idx), p1 = _mm256_shuffle_epi8(lut.plane[1], idx);
  const __m256i p2 = _mm256_shuffle_epi8(lut.plane[2], idx), p3 = _mm256_shuffle_epi8(lut.plane[3], idx);
  const __m256i lo01 = _mm256_unpacklo_epi8(p0, p1), hi01 = _mm256_unpackhi_epi8(p0, p1);  // bytes 0,1 of codes
  const __m256i lo23 = _mm256_unpacklo_epi8(p2, p3), hi23 = _mm256_unpackhi_epi8(p2, p3);  // bytes 2,3
  d0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));  // codes j = 0..3 of each lane
  d1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));  // j = 4..7
  d2 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));  // j = 8..11
  d3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));  // j = 12..15
}

// One block for MB rows of x (x in the group order; G = blocksize / 32, 0: read at run time):
//   acc[q] = Σ_groups NF4 · x          (4 independent FMA chains per row of x)
//   tot[0] += scale · (acc0 + acc1),  tot[1] += scale · (acc2 + acc3)
// Two tot vectors per row, and the caller alternates two pairs over even / odd blocks: 32 fp32 partial sums of
// K / 32 block terms each (as many and as short as the AVX-512 kernel's), which is what keeps the result within
// bitsandbytes' fp32 GEMV bound (tests/test_linear.py::test_gemv_matches_bitsandbytes_bound).
template <int MB, int G>
inline void block_avx2(const uint8_t* p, const float* xb, int64_t K, int64_t groups, const PlaneLUT& lut, float scale,
                       __m256 (*tot)[2]) {
  __m256 acc[MB][4];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm256_setzero_ps();
  const int64_t ng = G > 0 ? G : groups;
#pragma GCC unroll 4
  for (int64_t g = 0; g < ng; ++g) {
    __m256 d[4];
    decode_group_avx2(p + 16 * g, lut, d[0], d[1], d[2], d[3]);
    const float* xg = xb + 32 * g;
    for (int m = 0; m < MB; ++m)
      for (int q = 0; q < 4; ++q) acc[m][q] = _mm256_fmadd_ps(d[q], _mm256_loadu_ps(xg + m * K + 8 * q), acc[m][q]);
  }
  const __m256 sv = _mm256_set1_ps(scale);
  for (int m = 0; m < MB; ++m) {
    tot[m][0] = _mm256_fmadd_ps(_mm256_add_ps(acc[m][0], acc[m][1]), sv, tot[m][0]);
    tot[m][1] = _mm256_fmadd_ps(_mm256_add_ps(acc[m][2], acc[m][3]), sv, tot[m][1]);
  }
}

template <int MB, int G>
void gemv_rows_blocked(const NF4Matrix& w, const float* xp, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K = w.K, bs = w.blocksize, groups = bs / 32, nblk = K / bs, half = bs / 2;
  const PlaneLUT lut;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = w.packed + (n * K >> 1);
    const float* xb = xp;
    int64_t b = n * nblk;
    __m256 t0[MB][2], t1[MB][2];  // even / odd blocks
    for (int m = 0; m < MB; ++m) t0[m][0] = t0[m][1] = t1[m][0] = t1[m][1] = _mm256_setzero_ps();
    int64_t kb = 0;
    for (; kb + 2 <= nblk; kb += 2, b += 2, p += 2 * half, xb += 2 * bs) {
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
      block_avx2<MB, G>(p, xb, K, groups, lut, block_scale(w.scales, b), t0);
      block_avx2<MB, G>(p + half, xb + bs, K, groups, lut, block_scale(w.scales, b + 1), t1);
    }
    if (kb < nblk) block_avx2<MB, G>(p, xb, K, groups, lut, block_scale(w.scales, b), t0);
    for (int m = 0; m < MB; ++m)
      y[m * ldy + (n - n0)] = hsum(_mm256_add_ps(_mm256_add_ps(t0[m][0], t1[m][0]), _mm256_add_ps(t0[m][1], t1[m][1])));
  }
}

template <int MB>
void gemv_rows_blocked_bs(const NF4Matrix& w, const float* xp, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  switch (w.blocksize) {
    case 32: gemv_rows_blocked<MB, 1>(w, xp, y, ldy, n0, n1); break;
    case 64: gemv_rows_blocked<MB, 2>(w, xp, y, ldy, n0, n1); break;
    case 128: gemv_rows_blocked<MB, 4>(w, xp, y, ldy, n0, n1); break;
    default: gemv_rows_blocked<MB, 0>(w, xp, y, ldy, n0, n1); break;
  }
}

void gemv_blocked_avx2(int MB, const NF4Matrix& w, const float* xp, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  switch (MB) {
    case 1: gemv_rows_blocked_bs<1>(w, xp, y, ldy, n0, n1); break;
    case 2: gemv_rows_blocked_bs<2>(w, xp, y, ldy, n0, n1); break;
    case 3: gemv_rows_blocked_bs<3>(w, xp, y, ldy, n0, n1); break;
    default: gemv_rows_blocked_bs<4>(w, xp, y, ldy, n0, n1); break;
  }
}
// x in the AVX2 blocked kernel's group order (decode_group_avx2): within every 8 consecutive elements, the 4 odd
// ones, then the 4 even ones. xp[m*K + 8c + i] = x[m*ldx + 8c + 2i + 1], xp[m*K + 8c + 4 + i] = x[m*ldx + 8c + 2i].
void reorder_x_avx2(const float* x, int64_t M, int64_t ldx, int64_t K, float* xp) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += 8)
      for (int i = 0; i < 4; ++i) {
        xp[m * K + c + i] = x[m * ldx + c + 2 * i + 1];
        xp[m * K + c + 4 + i] = x[m * ldx + c + 2 * i];
      }
}
#endif

// ---- the GEMV's split over threads ------------------------------------------------------------------------------
// Why not at::parallel_for: it hands each OpenMP thread a fixed half of the rows, and the region ends with a
// barrier that waits for every thread to arrive. When the cores are shared with other busy processes, one of
// our threads is often descheduled for a whole time slice (milliseconds) — before it starts or inside its half —
// and the call waits for it: a 0.5 ms GEMV took 7-12 ms (bench/bench_linear.py --under-load).
// Instead the rows are cut into units (kGemvChunkCodes codes, a few µs of work) with a state each:
//   free -> claimed (by a helper) -> committing -> done
// Helpers (torch's inter-op pool, at::launch: persistent threads woken per call, no OpenMP barrier) claim free
// units (each its own region first: claim_and_run), compute each into a private buffer, and commit it to y only if the unit is still theirs.
// The caller claims units the same way; when none is free, it computes every unit not yet done itself — also one
// a helper holds (a helper descheduled mid-unit is simply overtaken) — and commits it the same way. Whoever
// commits first writes y; the loser drops its copy (both computed the same values). So the caller never waits
// for a thread that is not running, except for one inside its commit (a copy of a few floats); at worst it does
// all the rows alone. A helper that starts after the call returned finds no free unit (it reads only the states)
// and leaves without touching the call's data. A helper overtaken mid-unit goes on reading its inputs after the call returned, so everything
// body reads is owned by the job (a shared_ptr the helpers hold): the body's captures are values, x's copy is in
// the body, and `owner` keeps W's tensors alive (nf4_gemv_nt's caller passes them).
constexpr int64_t kGemvChunkCodes = 32768;  // 16 KB of NF4 per unit
// Below this many multiply-adds the caller works alone: waking a pool thread takes ~30-90 µs (measured here,
// longer under load), about the time of this much work on one core, so a helper would rarely get a unit.
constexpr int64_t kGemvThreadedMacs = int64_t{1} << 20;

// body(n0, n1, out, ld): outputs of rows [n0, n1) to out[m * ld + (n - n0)].
using RowsBody = std::function<void(int64_t, int64_t, float*, int64_t)>;

struct RowJob {
  enum : uint8_t { kFree, kClaimed, kCommitting, kDone };
  int64_t units = 0, unit_rows = 0, rows = 0, M = 0;
  float* y = nullptr;  // the call's output [M, ldy]: written only in a commit, i.e. before the unit is done
  int64_t ldy = 0;
  RowsBody body;                        // self-contained: captures by value
  std::shared_ptr<const void> owner;    // keeps the memory W's pointers point into alive
  int64_t threads = 1;
  std::unique_ptr<std::atomic<uint8_t>[]> state;  // per unit

  // Compute unit u into buf, then write it to y if `from` (the state this thread saw) still holds.
  bool run(int64_t u, uint8_t from, std::vector<float>& buf) {
    const int64_t n0 = u * unit_rows, n1 = std::min(rows, n0 + unit_rows), len = n1 - n0;
    body(n0, n1, buf.data(), len);
    if (!state[u].compare_exchange_strong(from, kCommitting, std::memory_order_acq_rel)) return false;
    for (int64_t m = 0; m < M; ++m) std::memcpy(y + m * ldy + n0, buf.data() + m * len, len * sizeof(float));
    state[u].store(kDone, std::memory_order_release);  // publishes the rows to the caller
    return true;
  }

  void try_claim(int64_t u, std::vector<float>& buf) {
    uint8_t free = kFree;
    if (state[u].load(std::memory_order_relaxed) == kFree &&
        state[u].compare_exchange_strong(free, kClaimed, std::memory_order_acq_rel))
      run(u, kClaimed, buf);
  }

  int64_t region_start(int64_t t) const { return t * units / threads; }

  // Thread t (0: the caller) claims the free units of its own region [start(t), start(t+1)) front to back, then
  // the other free units back to front from start(t) - 1 (wrapping): for two threads, each then takes the other's
  // region from its far end. So the threads meet once instead of alternating units, whose states share cache
  // lines (one line transfer per claim made the split ~10% slower than OpenMP's halves).
  void claim_and_run(int64_t t, std::vector<float>& buf) {
    const int64_t start = region_start(t), own = region_start(t + 1) - start;
    for (int64_t i = 0; i < own; ++i) try_claim(start + i, buf);
    for (int64_t i = 1; i <= units - own; ++i) try_claim((start - i + units) % units, buf);
  }

  // The caller's second phase: every unit not done is run here (overtaking a helper that holds it).
  void finish(std::vector<float>& buf) {
    for (int64_t u = 0; u < units; ++u) {
      for (uint8_t s; (s = state[u].load(std::memory_order_acquire)) != kDone;) {
        if (s == kCommitting) continue;  // a helper is copying its rows in: a few ns
        if (run(u, s, buf)) break;       // lost the race: the state moved on, look again
      }
    }
  }
};

// A woken thread is often queued on its waker's CPU (Linux's wake-affine placement), most of all when the other
// cores are busy — even with a nice-19 compile: then the helper only time-shares the caller's core and never helps.
// A helper that finds itself on the caller's CPU moves off it: a mask without that CPU migrates it at once, and
// putting the old mask back right away leaves it where it landed (no lasting pinning of the pool's threads; its
// next wake-up prefers that CPU). Linux only; elsewhere a no-op.
void move_off_cpu(int cpu) {
#if defined(__linux__)
  if (cpu < 0 || sched_getcpu() != cpu) return;
  cpu_set_t mask;
  if (sched_getaffinity(0, sizeof(mask), &mask) != 0 || CPU_COUNT(&mask) < 2 || !CPU_ISSET(cpu, &mask)) return;
  cpu_set_t others = mask;
  CPU_CLR(cpu, &others);
  if (sched_setaffinity(0, sizeof(others), &others) == 0) sched_setaffinity(0, sizeof(mask), &mask);
#else
  (void)cpu;
#endif
}

int current_cpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

// body over rows [0, rows) into y[m * ldy + n] (m < M), on up to at::get_num_threads() threads.
// body must capture by value only (helpers may run it after the call returned; see above).
void split_rows(int64_t rows, int64_t unit_rows, int64_t M, int64_t macs, float* y, int64_t ldy, RowsBody body,
                std::shared_ptr<const void> owner) {
  const int64_t units = (rows + unit_rows - 1) / unit_rows;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), units);
  // small, one unit, one thread, or already inside a parallel region: the caller alone
  if (macs < kGemvThreadedMacs || threads <= 1 || at::in_parallel_region()) {
    if (rows > 0) body(0, rows, y, ldy);
    return;
  }
  auto job = std::make_shared<RowJob>();
  job->units = units;
  job->unit_rows = unit_rows;
  job->rows = rows;
  job->M = M;
  job->threads = threads;
  job->y = y;
  job->ldy = ldy;
  job->body = std::move(body);
  job->owner = std::move(owner);
  job->state.reset(new std::atomic<uint8_t>[units]);
  for (int64_t u = 0; u < units; ++u) job->state[u].store(RowJob::kFree, std::memory_order_relaxed);
  const size_t buf_floats = static_cast<size_t>(M * unit_rows);
  const int caller_cpu = current_cpu();
  for (int64_t t = 1; t < threads; ++t) {
    at::launch([job, buf_floats, caller_cpu, t] {
      // late (the caller already took the first unit of this helper's region): no move, only a scan of states
      if (job->state[job->region_start(t)].load(std::memory_order_relaxed) == RowJob::kFree) move_off_cpu(caller_cpu);
      std::vector<float> buf(buf_floats);
      job->claim_and_run(t, buf);
    });
  }
  std::vector<float> buf(buf_floats);
  job->claim_and_run(0, buf);
  job->finish(buf);
}

}  // namespace

void nf4_decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out, int64_t ld) {
  decode_tile(w, n0, n1, k0, k1, out, ld, decode_span<float>);
}

void nf4_decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, double* out, int64_t ld) {
  decode_tile(w, n0, n1, k0, k1, out, ld, decode_span<double>);
}

// bf16 panels are only taken where cpu_isa() >= avx512bf16 (nf4_linear.cpp), so the AVX-512 decoder is the only one.
void nf4_decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, uint16_t* out, int64_t ld) {
  decode_tile(w, n0, n1, k0, k1, out, ld, nf4_decode_span_bf16_avx512);
}

const char* nf4_gemv_nt(const NF4Matrix& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy,
                        std::shared_ptr<const void> owner) {
  const bool avx512 = cpu_isa() >= CpuIsa::kAvx512;
  // Rows of W are independent: split over threads in units taken at run time (split_rows). The bodies capture
  // by value (w is a struct of pointers kept alive by owner; x's copy is shared by the body's copies).
  const int64_t unit_rows = std::max<int64_t>(1, kGemvChunkCodes / std::max<int64_t>(1, w.K));
  const NF4Matrix wv = w;
#if LRX_CPU_AVX2
  if (w.K % w.blocksize == 0) {  // every row starts on a block: the blocked kernels
    // x reordered for the kernel: AVX-512 de-interleaved per group, AVX2 in its shuffle order
    auto xp = std::make_shared<std::vector<float>>(static_cast<size_t>(M * w.K));
    if (avx512) {
      nf4_deinterleave_x(x, M, ldx, w.K, xp->data());
    } else {
      reorder_x_avx2(x, M, ldx, w.K, xp->data());
    }
    split_rows(w.N, unit_rows, M, M * w.N * w.K, y, ldy, [wv, xp, M, avx512](int64_t n0, int64_t n1, float* out, int64_t ld) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = static_cast<int>(std::min<int64_t>(4, M - m0));
        if (avx512) {
          nf4_gemv_rows_blocked_avx512(mb, wv, xp->data() + m0 * wv.K, out + m0 * ld, ld, n0, n1);
        } else {
          gemv_blocked_avx2(mb, wv, xp->data() + m0 * wv.K, out + m0 * ld, ld, n0, n1);
        }
      }
    }, std::move(owner));
    return avx512 ? "gemv-avx512-blocked" : "gemv-avx2-blocked";
  }
#endif
  auto xc = std::make_shared<std::vector<float>>(static_cast<size_t>(M * w.K));  // x, rows packed (ld K)
  for (int64_t m = 0; m < M; ++m) std::memcpy(xc->data() + m * w.K, x + m * ldx, w.K * sizeof(float));
  split_rows(w.N, unit_rows, M, M * w.N * w.K, y, ldy, [wv, xc, M, avx512](int64_t n0, int64_t n1, float* out, int64_t ld) {
    const int64_t K = wv.K;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* xm = xc->data() + m0 * K;
      float* ym = out + m0 * ld;
      if (avx512) {
        nf4_gemv_rows_avx512(static_cast<int>(std::min<int64_t>(4, M - m0)), wv, xm, K, ym, ld, n0, n1);
        continue;
      }
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: gemv_rows<1>(wv, xm, K, ym, ld, n0, n1); break;
        case 2: gemv_rows<2>(wv, xm, K, ym, ld, n0, n1); break;
        case 3: gemv_rows<3>(wv, xm, K, ym, ld, n0, n1); break;
        default: gemv_rows<4>(wv, xm, K, ym, ld, n0, n1); break;
      }
    }
  }, std::move(owner));
#if LRX_CPU_AVX2
  return avx512 ? "gemv-avx512" : "gemv-avx2";
#else
  return avx512 ? "gemv-avx512" : "gemv-scalar";
#endif
}

void nf4_row_sqnorm(const NF4Matrix& w, float* out) {
  at::parallel_for(0, w.N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      double acc = 0.0;
      for (int64_t i = n * w.K, r1 = i + w.K; i < r1;) {
        const int64_t b = block_of(w, i);
        const int64_t end = std::min(r1, (b + 1) * w.blocksize);
        const float s = block_scale(w.scales, b);
        for (; i < end; ++i) {
          const double v = static_cast<double>(kNF4Codebook[code_at(w.packed, i)] * s);  // fp32 deq value
          acc += v * v;
        }
      }
      out[n] = static_cast<float>(acc);
    }
  });
}

}  // namespace cpu
}  // namespace lowrank_ext
