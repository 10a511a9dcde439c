// nf4_mma_kernel.cuh — tensor-core NF4 GEMMs (mma.sync.m16n8k16, bf16/fp16 operands, fp32 accumulate).
// Torch-free: included only by the per-dtype instantiation files nf4_mma_{bf16,fp16}.cu.
//
//   NT (forward):   y[M, N]  = x[M, K]  · deq(W)[N, K]ᵀ + s · u[M, r] · lora_B[N, r]ᵀ + bias[N]
//   NN (grad_x):    gx[M, K] = gy[M, N] · deq(W)[N, K]  +     gu[M, r] · lora_A[r, K]
// Both are one kernel, C[M, cols] = A[M, red] · Bop[red, cols] (+ low-rank) (+ bias):
//   NT: red = K, cols = N, Bop[k][n] = deq(W)[n][k]     NN: red = N, cols = K, Bop[n][k] = deq(W)[n][k]
//
// One CTA computes a 128 x 128 tile of C with 8 warps (2 along M x 4 along cols, 64 x 32 per warp =
// 4 x 4 mma tiles of 16 x 8). The reduction runs in tiles of 64, aligned to its end (tile 0 is the ragged one):
//   1. cp.async (3-stage ring) brings the activation tile A[128 x 64] (16-byte chunks) and the packed NF4
//      bytes of the W tile (4-byte words = 8 codes); only tile 0 has reduction bounds (zero-filled before the
//      start), rows / columns past M / N / K are redirected to in-range ones whose results nobody stores.
//   2. Every thread decodes 4 consecutive words of one W row in registers: level = NF4[code] (fp32, by a warp
//      shuffle), value = level * absmax_hat[b] (one fp32 multiply), ONE rounding to bf16/fp16 — exactly
//      dequantize_nf4's value — and stores each word's 8 values as a 16-byte chunk of the decoded tile Bd in
//      shared memory (never in global memory).
//   3. ldmatrix (A: plain; Bd: plain for NT, .trans for NN) feeds mma.sync.m16n8k16 into fp32 registers.
// The block scale is per 8-code word: a word starts at a flat index n*K + k with K % 8 == 0 and k % 8 == 0,
// and block boundaries are multiples of blocksize >= 32, so a word never straddles two blocks — this is
// what makes a scale change inside a 64-wide tile (blocksize 32, or K not a multiple of blocksize) exact.
// A thread's 4 words (32 codes) span at most two blocks; their scales for tile t+1 are loaded during tile t.
// After the NF4 tiles, the low-rank product runs as extra reduction steps over r (padded to 16 by zeros):
//   C += [s·u] · [lora_B]ᵀ (NT)   or   C += [gu] · [lora_A] (NN), s·u rounded once to the operand dtype.
// The epilogue adds bias in fp32 and rounds once to the output dtype.
//
// The steady-state loop (all but the last two tiles) is built to issue few instructions per mma — 4.6-4.7
// SASS instructions per HMMA on sm80 / sm90 (bench/sass_budget.py; 11.3-11.7 before): no bounds, no 64-bit
// index math (uniform tile origins bumped per tile + per-thread 32-bit offsets computed once), fragment
// addresses derived by XOR from one register, one shuffle per code. See nf4_mma_reduce.
//
// Requirements (checked by the launcher, which returns false otherwise): K % 8 == 0 (and N % 8 == 0 for
// NN), blocksize a power of two in [32, 4096], A 16-byte aligned with lda % 8 == 0, packed 4-byte aligned,
// lda and K below 2^24 (32-bit per-thread offsets), sm80 or newer.
#pragma once

#include <cstdint>

#include "device_ops.cuh"
#include "nf4_linear_params.h"

namespace lowrank_ext {
namespace mma {

constexpr int kBM = 128;        // activation rows per CTA
constexpr int kBN = 128;        // output columns per CTA (N for NT, K for NN)
constexpr int kBK = 64;         // reduction depth of one main-loop tile
constexpr int kStages = 3;      // cp.async ring depth
constexpr int kThreads = 256;   // 8 warps: 2 (M) x 4 (cols)
constexpr int kWarpM = 64;      // warp tile 64 x 32 = kMI x kNI mma tiles of 16 x 8
constexpr int kWarpN = 32;
constexpr int kMI = kWarpM / 16;
constexpr int kNI = kWarpN / 8;
constexpr int kTileElems = kBM * kBK;          // 8192 elements: the A tile and the decoded W tile (kBN*kBK)
constexpr int kTileBytes = kTileElems * 2;     // 16 KB (bf16 / fp16)
constexpr int kWords = kBN * kBK / 8;          // 1024 packed 4-byte words (8 codes each) per W tile
constexpr int kWordsBytes = kWords * 4;        // 4 KB
constexpr int kWordsPerThread = kWords / kThreads;          // 4
constexpr int kChunksPerThread = kTileElems / 8 / kThreads;  // 4 sixteen-byte A chunks per thread per tile
constexpr int kSmemBytes = kStages * (kTileBytes + kWordsBytes)  // A ring + packed-W ring
                           + kTileBytes                          // decoded W tile Bd
                           + 256 * 4;                            // nested (double-quant) map: 78,848 B
// Two CTAs per SM (<= 128 registers per thread) where the shared memory holds two (sm80: 164 KB, sm90:
// 228 KB per SM); sm86/sm89 have 100 KB, one CTA fits anyway, so let ptxas use more registers there.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890)
constexpr int kMinBlocksPerSM = 1;
#else
constexpr int kMinBlocksPerSM = 2;
#endif
static_assert(kWords % kThreads == 0 && (kTileElems / 8) % kThreads == 0, "tile / thread mismatch");

// NF4 levels (code 0..15), read once per thread into the register the decode shuffles from; static: one
// copy per translation unit (no -rdc).
static __constant__ float kLevels[16] = LRX_NF4_CODEBOOK;

// ---- operand dtype traits ----------------------------------------------------------------------------
template <typename T>
struct Op;
template <>
struct Op<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {  // round each once (RN)
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);                     // .x = lo: the lower address
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Op<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

using dev::cp_async16;
using dev::cp_async4;
using dev::cp_async_commit;
using dev::cp_async_wait;
using dev::ldmatrix_x4;

// Shared tiles are rows of 16-byte chunks (8 elements); chunk c of row `row` is stored at chunk
// c ^ (row % 8) of that row (XOR swizzle): the 8 rows an ldmatrix phase reads, and the chunks a warp
// stores, fall in 8 different bank groups. Returns the element offset of the chunk.
__host__ __device__ __forceinline__ int swz(int row, int chunk, int chunks_per_row) {
  return row * chunks_per_row * 8 + ((chunk ^ (row & 7)) << 3);
}
// The A tile [128][64] permutes the XOR pattern of a row: chunk c of row `row` sits at c ^ a_perm(row % 8),
// a_perm = 0 2 4 6 1 3 5 7. Still 8 different chunks for the 8 rows an ldmatrix phase reads; and the copies
// (thread t: row t / 2, chunks t % 2 + 2j) also hit 8 different chunks per 8 lanes (4 rows x 2): a_perm of 4
// aligned rows differs in bits 1..2, the lanes' t % 2 in bit 0. (With row % 8 itself they would collide 2 by 2.)
__host__ __device__ __forceinline__ int a_perm(int row) { return ((row & 3) << 1) | ((row >> 2) & 1); }
__host__ __device__ __forceinline__ int swz_a(int row, int chunk) { return row * kBK + ((chunk ^ a_perm(row)) << 3); }

// ---- fragment addresses ---------------------------------------------------------------------------------
// Lane addresses (element offsets in the tiles) of the ldmatrix.x4 loads of k-step ks (16 deep).
//   A [128 rows][64 red]: matrices (rows 0-7, k 0-7) (rows 8-15, k 0-7) (rows 0-7, k 8-15) (rows 8-15, k 8-15)
//   = a0..a3 of mma tile mi (rows wm*64 + mi*16 ..): lane l gives row l % 16, chunk 2ks + l / 16.
__host__ __device__ __forceinline__ int a_frag_offset(int wm, int lane, int ks) {
  return swz_a(wm * kWarpM + (lane & 15), ks * 2 + (lane >> 4));
}
//   NT Bd [128 cols][64 red]: matrices (cols 2np, red 0-7) (cols 2np, red 8-15) (cols 2np+1, ..0-7) (.., 8-15)
//   NN Bd [64 red][128 cols] (.trans): matrices (red 0-7, cols 2np) (red 8-15, 2np) (red 0-7, 2np+1) (.., 8-15)
//   = b0, b1 of the mma tiles ni = 2np and 2np + 1 (8 columns each, warp cols wn*32 ..).
template <bool kNN>
__host__ __device__ __forceinline__ int b_frag_offset(int wn, int lane, int ks, int np) {
  const int mat = lane >> 3;
  if constexpr (kNN) return swz(ks * 16 + (mat & 1) * 8 + (lane & 7), wn * (kWarpN / 8) + np * 2 + (mat >> 1), kBN / 8);
  return swz(wn * kWarpN + np * 16 + (mat >> 1) * 8 + (lane & 7), ks * 2 + (mat & 1), kBK / 8);
}
// The main loop derives every fragment address from the ks = 0 (np = 0) one, without recomputing swz:
//  * 16 rows down keeps row % 8, so it adds 16 rows: the other mi of A (+kAStepMI), the other np of NT Bd
//    (+kBStepNP), the other ks of NN Bd (+kBStepKS) — constants, folded into the instructions' immediates;
//  * the other ks of A and NT Bd, and the other np of NN Bd, change the chunk: 2ks + h (or 4wn + 2np + h) has
//    disjoint bit fields, so (2ks + h) ^ r == (h ^ r) ^ 2ks for the row's swizzle value r (row % 8, or
//    a_perm(row) for A), and as the chunk sits in bits 3..6 of the element
//    offset above a row part in bits >= 6 (A, NT: 8 chunks) or >= 7 (NN: 16 chunks) that the XOR leaves alone:
//    offset(ks) == offset(0) ^ 16ks, offset(np) == offset(0) ^ 16np. Adding a stage base (a multiple of the
//    16 KB tile) commutes with that XOR.
constexpr int kAStepMI = 16 * kBK;
constexpr int kBStepNP = 16 * kBK;
constexpr int kBStepKS = 16 * kBN;
// The same in bytes (2-byte elements): what the main loop keeps, so no element -> byte scaling is left in it.
__host__ __device__ __forceinline__ int xor_chunk2(int offset0_bytes, int step) { return offset0_bytes ^ (32 * step); }
template <typename T>
__device__ __forceinline__ const T* at_byte(const T* base, int offset_bytes) {
  return reinterpret_cast<const T*>(reinterpret_cast<const unsigned char*>(base) + offset_bytes);
}

// Per-thread offsets that are computed once from threadIdx and the parameters and must stay in registers
// for the whole reduction. Left alone, the compiler recomputes such values (cheap integer math from
// registers it keeps anyway) at each use inside the main loop to shorten their live ranges: ~100 more
// instructions per tile. A value that went through a warp shuffle cannot be recomputed (the shuffle is a
// convergent warp collective), so this identity shuffle, run once per CTA, pins it.
template <typename V>
__device__ __forceinline__ V keep_in_register(V v, int lane) {
  return __shfl_sync(0xffffffffu, v, lane);
}

// The block scales of a thread's 4 words in one W tile. The words are consecutive in one row of W (32 codes,
// see Nf4Mma), and a block holds >= 32 codes, so they span at most two blocks: the block of word 0 ("lo")
// and the block of word 3 ("hi"; NN: of the group's last word inside W). Word j lies in the hi block iff
// rem + 8j >= blocksize, rem = the flat index of word 0 mod blocksize.
struct ScaleRaw {  // loaded during the mma of the tile before, finalized after it
  float a[2];      // absmax_f32[b], or absmax2[b / 256] when double-quantized (lo, hi)
  uint8_t q[2];    // qabsmax[b] (double quant)
  uint32_t rem;
};
struct Scales {
  float lo, hi;  // absmax_hat of the lo / hi block
  uint32_t rem;
};

// The per-CTA GEMM state and steps.
//
// Reduction tiles are aligned to the reduction's END: tile t (0 .. ktiles-1) covers [t*64 - skew, +64) with
// skew = ktiles*64 - red (0 <= skew < 64, a multiple of 8). Only tile 0 can reach outside (indices < 0: zero-
// filled copies, so A = 0 there) and it is loaded in the prologue: the main loop's copies and scale loads carry
// no bounds. The output-side bounds (rows >= M, cols >= N or K) are resolved once per thread by redirecting: a
// chunk / word outside the operand copies one inside instead — the chunk at the same reduction index in the
// CTA's first row (A), the word at the same reduction index in the CTA's first output column (NT W), or the
// row's last word inside W (NN W) — always in range. Output row m depends only on A row m and output column n
// only on Bd column n, so such rows and columns hold finite garbage that the epilogue never stores.
// Addresses: a tile's origins (A[m0][red0(t)], packed byte of flat index flat0(t)) are uniform pointers bumped
// per tile; a thread adds its fixed 32-bit offsets (a_off, w_off: the launcher keeps lda and K below 2^24, so
// 128 rows of either stay below 2^31).
template <typename T, bool kNN>
struct Nf4Mma {
  // Packed-W tile geometry: NT tile = W[c0 .. c0+128, r .. r+64]  -> 128 rows x 8 words
  //                         NN tile = W[r .. r+64, c0 .. c0+128]  ->  64 rows x 16 words
  // (rows of W in both; the decoded tile Bd has the same rows, one 16-byte chunk per word). Thread t copies
  // and decodes the 4 consecutive words 4t .. 4t+3: row 4t / kWordsPerRow, words w0 .. w0+3 of it.
  static constexpr int kWordsPerRow = kNN ? kBN / 8 : kBK / 8;
  static constexpr int kGroupsPerRow = kWordsPerRow / kWordsPerThread;
  static_assert(kChunksPerThread == 4 && kThreads == 2 * kBM, "A: 2 threads per row, 4 chunks each");
  static_assert(kWordsPerThread == 4, "the word group = 16 bytes = 32 codes, at most two scale blocks");

  const NF4MatmulParams& p;
  int64_t m0, c0;  // first activation row / output column of this CTA
  int log2_bs;
  int tid;
  int ktiles, skew;
  int a_row, a_c0;  // this thread's A row in the tile and its first chunk: it copies chunks a_c0 + 2j
  int w_row, w0;    // this thread's W row in the tile and its first word in that row
  // Fixed per thread for the whole reduction (pinned in registers):
  uint32_t a_off;                    // A chunk 0: row * lda + 8 a_c0 elements; chunk j: + 16j
  uint32_t w_off0;                   // W word 0: (row * K + 8 * word) / 2 bytes; word j: w_off0 + 4j
  uint32_t w_last;                   // the group's last word inside W (NT: always w_off0 + 12)
  int a_dst;                         // A chunk 0 in a stage, bytes; chunk j: a_dst ^ 32j (see xor_chunk2)
  int w_idx;                         // W word 0 in a stage (= 4 tid); word j is the next one
  int b_dst;                         // Bd byte offset of decoded word 0; word j: b_dst ^ 16j (see xor_chunk2)

  __device__ __forceinline__ Nf4Mma(const NF4MatmulParams& p_, int64_t m0_, int64_t c0_, int log2_bs_, int tid_)
      : p(p_), m0(m0_), c0(c0_), log2_bs(log2_bs_), tid(tid_) {
    const int64_t red = kNN ? p.w.N : p.w.K;
    ktiles = static_cast<int>((red + kBK - 1) / kBK);
    skew = static_cast<int>(int64_t(ktiles) * kBK - red);
    const int lane = tid & 31;
    a_row = tid >> 1;
    a_c0 = tid & 1;
    const int64_t row_in = m0 + a_row < p.M ? a_row : 0;  // redirect rows >= M to the CTA's first row
    a_off = keep_in_register(static_cast<uint32_t>(row_in * p.lda + 8 * a_c0), lane);
    w_row = tid / kGroupsPerRow;
    w0 = (tid % kGroupsPerRow) * kWordsPerThread;
    if constexpr (kNN) {  // row = reduction index, words along the output columns k = c0 + 8 (w0 + j)
      // Words at k >= K are not copied (zero-filled): a group past the row's end restarts at its first word.
      const int64_t last = (p.w.K - c0) / 8 - 1;  // the row's last word inside W (c0 < K, K % 8 == 0)
      const int64_t first = w0 <= last ? w0 : 0;
      const int64_t end = first + 3 < last ? first + 3 : last;
      w_off0 = keep_in_register(static_cast<uint32_t>((w_row * p.w.K + 8 * first) / 2), lane);
      w_last = keep_in_register(static_cast<uint32_t>((w_row * p.w.K + 8 * end) / 2), lane);
    } else {  // row = output column n = c0 + row, words along the reduction
      const int64_t n = c0 + w_row < p.w.N ? w_row : 0;
      w_off0 = keep_in_register(static_cast<uint32_t>((n * p.w.K + 8 * w0) / 2), lane);
      w_last = w_off0 + 4 * (kWordsPerThread - 1);  // an immediate, not a register
    }
    a_dst = keep_in_register(2 * swz_a(a_row, a_c0), lane);
    w_idx = keep_in_register(tid * kWordsPerThread, lane);
    b_dst = keep_in_register(2 * swz(w_row, w0, kWordsPerRow), lane);
  }

  // First reduction index of tile t, and the flat W index of its packed tile's origin (row 0, word 0):
  // word j of the thread has flat index flat0(t) + 2 * (w_off0 + 4j).
  __device__ __forceinline__ int64_t red0(int t) const { return int64_t(t) * kBK - skew; }
  __device__ __forceinline__ int64_t flat0(int t) const { return kNN ? red0(t) * p.w.K + c0 : c0 * p.w.K + red0(t); }
  __device__ __forceinline__ int64_t flat_step() const { return kNN ? int64_t(kBK) * p.w.K : kBK; }  // per tile
  __device__ __forceinline__ const T* a_origin(int t) const { return static_cast<const T*>(p.a) + m0 * p.lda + red0(t); }
  __device__ __forceinline__ const uint8_t* w_origin(int t) const { return p.w.packed + flat0(t) / 2; }
  // Reduction-side validity in tile 0, the only tile that can start before index 0.
  __device__ __forceinline__ bool a_red_ok0(int j) const { return 8 * (a_c0 + 2 * j) >= skew; }
  __device__ __forceinline__ bool w_red_ok0(int j) const { return kNN ? w_row >= skew : 8 * (w0 + j) >= skew; }

  // Issue the async copies of the tile with origins a_t / w_t into ring stage `st` (kFirst: tile 0, with its
  // reduction bounds; every other tile is whole).
  template <bool kFirst>
  __device__ __forceinline__ void load_tile(T* sA, uint32_t* sW, int st, const T* a_t, const uint8_t* w_t) const {
    unsigned char* dstA = reinterpret_cast<unsigned char*>(sA) + st * kTileBytes;
#pragma unroll
    for (int j = 0; j < kChunksPerThread; ++j) {
      // chunk a_c0 + 2j: (a_c0 + 2j) ^ perm == (a_c0 ^ perm) ^ 2j, 16 bytes per chunk
      cp_async16(dstA + (a_dst ^ (32 * j)), a_t + a_off + 16 * j, !kFirst || a_red_ok0(j));  // !ok: zero-filled
    }
    uint32_t* dstW = sW + st * kWords + w_idx;
    const uint8_t* src = w_t + w_off0;  // word j at src + 4j: an immediate offset
#pragma unroll
    for (int j = 0; j < kWordsPerThread; ++j) {
      const bool ok = (!kNN || j == 0 || w_off0 + 4 * j <= w_last) && (!kFirst || w_red_ok0(j));
      cp_async4(dstW + j, src + 4 * j, ok);  // !ok: zero-filled, the source (maybe outside W) is not read
    }
  }

  // The scale blocks of a tile with flat origin F: a word at byte offset w (w_off0 for "lo", w_last for
  // "hi") is in block b = (F + 2w) >> log2_bs = B + ((e + 2w) >> log2_bs) with B = F >> log2_bs and
  // e = F mod blocksize, so the per-thread math is 32-bit: x = (e + 2w) >> log2_bs, then absmax[B + x] (or
  // qabsmax[B + x] and absmax2[(B + x) / 256]). B is kept as pointers (absmax + B, qabsmax + B) and its low
  // 32 bits (the nested index wraps back into range: B + x >= 0 for every word inside W).
  struct ScaleOrigin {
    const float* absmax;  // absmax_f32 + B (plain scales)
    const uint8_t* q;     // qabsmax + B (double quant)
    uint32_t b;           // B mod 2^32
    uint32_t e;           // F mod blocksize
  };
  __device__ __forceinline__ ScaleOrigin scale_origin(int64_t F) const {
    const int64_t B = F >> log2_bs;  // floor, also for tile 0's negative origin
    return {p.w.scales.absmax_f32 + B, p.w.scales.qabsmax + B, static_cast<uint32_t>(B),
            static_cast<uint32_t>(F - (B << log2_bs))};
  }

  // Issue the global loads of the lo / hi block scales of this thread's words in the tile of origin o
  // (consumed one tile later).
  template <bool kDq>
  __device__ __forceinline__ void load_scales(ScaleRaw& s, const ScaleOrigin& o) const {
    const uint32_t f_lo = o.e + 2 * w_off0, f_hi = o.e + 2 * w_last;  // minus B * bs
    s.rem = f_lo & ((1u << log2_bs) - 1);
    const uint32_t x[2] = {f_lo >> log2_bs, f_hi >> log2_bs};  // blocks relative to B
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (kDq) {
        s.q[h] = __ldg(o.q + x[h]);
        s.a[h] = __ldg(p.w.scales.absmax2 + ((o.b + x[h]) >> 8));  // nested blocks of kNestedBlocksize = 256
      } else {
        s.a[h] = __ldg(o.absmax + x[h]);
      }
    }
  }
  // Tile 0 (the prologue): its words before the reduction's start are zero-filled (and A is 0 there), any
  // finite scale does; their blocks may lie before block 0, so the indices are clamped at 0.
  template <bool kDq>
  __device__ __forceinline__ void load_scales_first(ScaleRaw& s) const {
    const NF4Scales& sc = p.w.scales;
    const int64_t f_lo = flat0(0) + 2 * int64_t(w_off0), f_hi = flat0(0) + 2 * int64_t(w_last);
    s.rem = static_cast<uint32_t>(f_lo) & ((1u << log2_bs) - 1);  // f mod blocksize, also for f < 0
    const int64_t b[2] = {f_lo >> log2_bs, f_hi >> log2_bs};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t bh = b[h] < 0 ? 0 : b[h];
      if constexpr (kDq) {
        s.q[h] = __ldg(sc.qabsmax + bh);
        s.a[h] = __ldg(sc.absmax2 + bh / kNestedBlocksize);
      } else {
        s.a[h] = __ldg(sc.absmax_f32 + bh);
      }
    }
  }

  // absmax_hat = map[q] * absmax2 + offset (two roundings, as NF4Scales::block_scale), or absmax.
  template <bool kDq>
  __device__ __forceinline__ void finalize_scales(Scales& out, const ScaleRaw& s, const float* sMap, float offset) const {
    out.lo = kDq ? add_rn(mul_rn(sMap[s.q[0]], s.a[0]), offset) : s.a[0];
    out.hi = kDq ? add_rn(mul_rn(sMap[s.q[1]], s.a[1]), offset) : s.a[1];
    out.rem = s.rem;
  }

  // Decode this thread's 4 packed words of one stage into Bd: value = NF4[code] * scale, rounded once.
  // Byte i of a word holds elements 2i (high nibble) and 2i+1 (low nibble) of its 8 consecutive elements.
  // The level lookup is a warp shuffle: lane l holds NF4[l % 16] in `lut`, and the shuffle's source lane is
  // its index mod 32 (CUDA: "srcLane modulo width"; PTX shfl.sync.idx reads bits 0..4), so the word shifted
  // to put the code in bits 0..3 is the index as it is — bit 4 (the next code's lowest bit) picks lane
  // l or l + 16, which hold the same level. One shift and one shuffle per code, no shared-memory table and
  // no bank conflicts (a shuffle moves 32 lanes' values per instruction whatever the codes).
  __device__ __forceinline__ void decode(T* sB, const uint32_t* sW_stage, const Scales& sc, float lut) const {
    const uint4 words = *reinterpret_cast<const uint4*>(sW_stage + w_idx);
    const uint32_t word[4] = {words.x, words.y, words.z, words.w};
    const uint32_t bs = 1u << log2_bs;
#pragma unroll
    for (int j = 0; j < kWordsPerThread; ++j) {
      const float scale = sc.rem >= bs - 8 * j ? sc.hi : sc.lo;  // word j's block (see ScaleRaw); j = 0: lo
      uint32_t v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float e0 = __shfl_sync(0xffffffffu, lut, static_cast<int>(word[j] >> (8 * i + 4))) * scale;
        const float e1 = __shfl_sync(0xffffffffu, lut, static_cast<int>(word[j] >> (8 * i))) * scale;
        v[i] = Op<T>::pack(e0, e1);  // element 2i (e0) at the lower address
      }
      // word j's chunk is chunk w0 + j: (w0 + j) ^ r == (w0 ^ r) ^ j (w0 % 4 == 0), 16 bytes per chunk
      *reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(sB) + (b_dst ^ (16 * j))) =
          make_uint4(v[0], v[1], v[2], v[3]);
      // A warp-synchronous point halfway: the compiler would otherwise issue all 32 shuffles of the 4 words
      // at once to hide their latency, and at 2 CTAs per SM (128 registers) spill. Costs one instruction.
      if (j == kWordsPerThread / 2 - 1) __syncwarp();
    }
  }

  // acc += one 16-deep k-step: the warp's A rows (lane address sA_lane) times its Bd columns (lane addresses
  // sB_lane[np] of the ldmatrix.x4 for mma tiles 2np, 2np + 1).
  __device__ __forceinline__ void mma_kstep(float (&acc)[kMI][kNI][4], const T* sA_lane, const T* const (&sB_lane)[2]) const {
    uint32_t b[kNI][2];
#pragma unroll
    for (int np = 0; np < kNI / 2; ++np) {
      uint32_t r[4];
      if constexpr (kNN) {
        ldmatrix_x4<true>(r, sB_lane[np]);
      } else {
        ldmatrix_x4<false>(r, sB_lane[np]);
      }
      b[2 * np][0] = r[0];
      b[2 * np][1] = r[1];
      b[2 * np + 1][0] = r[2];
      b[2 * np + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < kMI; ++mi) {  // one A fragment at a time: fewer registers live
      uint32_t a[4];
      ldmatrix_x4<false>(a, sA_lane + mi * kAStepMI);
#pragma unroll
      for (int ni = 0; ni < kNI; ++ni) dev::mma_m16n8k16<T>(acc[mi][ni], a, b[ni]);
    }
  }

  // acc += A_tile[warp rows, 16*ksteps] · Bop_tile[16*ksteps, warp cols] (the low-rank steps: a loop of
  // k-steps, not unrolled; the NF4 main loop unrolls its four k-steps in nf4_mma_reduce instead).
  __device__ __forceinline__ void mma_steps(float (&acc)[kMI][kNI][4], const T* sA, const T* sB, int ksteps,
                                            int wm, int wn, int lane) const {
#pragma unroll 1
    for (int ks = 0; ks < ksteps; ++ks) {
      const T* const b_lane[2] = {sB + b_frag_offset<kNN>(wn, lane, ks, 0), sB + b_frag_offset<kNN>(wn, lane, ks, 1)};
      mma_kstep(acc, sA + a_frag_offset(wm, lane, ks), b_lane);
    }
  }

  // Low-rank chunk r0 .. r0+64 (zero past r): A tile <- s · lowrank[m0.., r0..] (rounded once),
  // Bd <- lora_B[c0.., r0..] (NT, as [col][red]) or lora_A[r0.., c0..] (NN, as [red][col]).
  // Plain element loads: once per CTA per 64 ranks, and r need not be a multiple of 8.
  __device__ __forceinline__ void load_lowrank_chunk(T* sA, T* sB, int r0) const {
    const T* u = static_cast<const T*>(p.lowrank);
    const T* lw = static_cast<const T*>(p.lowrank_w);
    const int64_t cols = kNN ? p.w.K : p.w.N;
    for (int idx = tid; idx < kTileElems; idx += kThreads) {
      const int row = idx >> 6, c = idx & 63;  // A tile [128][64]
      const int64_t m = m0 + row;
      const int rr = r0 + c;
      const float v = (m < p.M && rr < p.r) ? p.scaling * Op<T>::to_float(u[m * p.ld_lowrank + rr]) : 0.f;
      sA[swz_a(row, c >> 3) + (c & 7)] = Op<T>::from_float(v);
    }
    for (int idx = tid; idx < kTileElems; idx += kThreads) {
      if constexpr (kNN) {
        const int row = idx >> 7, c = idx & 127;  // Bd [64 ranks][128 cols]
        const int rr = r0 + row;
        const int64_t k = c0 + c;
        sB[swz(row, c >> 3, kBN / 8) + (c & 7)] =
            (rr < p.r && k < cols) ? lw[int64_t(rr) * p.ld_lowrank_w + k] : Op<T>::from_float(0.f);
      } else {
        const int row = idx >> 6, c = idx & 63;  // Bd [128 cols][64 ranks]
        const int64_t n = c0 + row;
        const int rr = r0 + c;
        sB[swz(row, c >> 3, kBK / 8) + (c & 7)] =
            (n < cols && rr < p.r) ? lw[n * p.ld_lowrank_w + rr] : Op<T>::from_float(0.f);
      }
    }
  }
};

// The NF4 reduction of one CTA: prologue (tile 0 with its bounds, tile 1), then the steady-state loop, whose
// body holds no bounds and no 64-bit index math: per tile, uniform origins bumped by a constant plus the
// pinned per-thread 32-bit offsets. kDq: the block scales are double-quantized (code + nested absmax + map).
template <bool kDq, typename T, bool kNN>
__device__ __forceinline__ void nf4_mma_reduce(const Nf4Mma<T, kNN>& g, float (&acc)[kMI][kNI][4], T* sA,
                                               uint32_t* sW, T* sB, const float* sMap,
                                               float offset, int wm, int wn, int lane) {
  const int ktiles = g.ktiles;
  const float lut = keep_in_register(kLevels[lane & 15], lane);  // lane l: NF4[l % 16], see decode
  ScaleRaw raw;
  g.template load_scales_first<kDq>(raw);
  g.template load_tile<true>(sA, sW, 0, g.a_origin(0), g.w_origin(0));
  cp_async_commit();
  if (ktiles > 1) g.template load_tile<false>(sA, sW, 1, g.a_origin(1), g.w_origin(1));
  cp_async_commit();  // always commit (maybe empty): group index == tile index
  __syncthreads();    // sMap written
  Scales scale;
  g.template finalize_scales<kDq>(scale, raw, sMap, offset);

  // Lane addresses (bytes) of k-step 0, fixed for the whole loop (the A stage adds st * kTileBytes); see
  // xor_chunk2.
  const int a_lane0 = keep_in_register(a_frag_offset(wm, lane, 0) * 2, lane);
  const int b_lane0 = keep_in_register(b_frag_offset<kNN>(wn, lane, 0, 0) * 2, lane);
  // Loop-carried tile origins: of tile kt+2 (copies) and of tile kt+1 (scales; computed an iteration ahead
  // from f_next, so that the per-word offsets add to a ready base).
  const T* a_next = g.a_origin(kStages - 1);
  const uint8_t* w_next = g.w_origin(kStages - 1);
  auto s_next = g.scale_origin(g.flat0(1));
  int64_t f_next = g.flat0(2);
  int st = 0;  // ring stage of the current tile kt

  // One tile kt. kCopy: tile kt+2 exists (its copies are issued); kScale: tile kt+1 exists (its scales are
  // loaded). The loop runs the tiles that have both; the last two are peeled, so the loop body has no tests.
  auto tile = [&]<bool kCopy, bool kScale>() {
    // Committed groups: kStages-1 + kt; allowing kStages-2 pending leaves groups kt+1 .. kt+kStages-2
    // in flight, so this thread's copies of tile kt (group kt) have landed.
    cp_async_wait<kStages - 2>();
    // (1) publishes every thread's copies of tile kt; (2) every warp has finished iteration kt-1: its
    // mma reads of Bd and of ring stage (kt-1) % kStages and its decode of that stage's words.
    __syncthreads();
    // Refill the stage freed by tile kt-1 ((kt + kStages - 1) % kStages == (kt - 1) % kStages).
    if constexpr (kCopy) {
      g.template load_tile<false>(sA, sW, st == 0 ? kStages - 1 : st - 1, a_next, w_next);
      a_next += kBK;
      w_next += g.flat_step() / 2;
    }
    cp_async_commit();  // maybe empty: keeps group index == tile index
    g.decode(sB, sW + st * kWords, scale, lut);  // Bd is free: barrier above
    __syncthreads();                             // Bd complete before any warp reads it
    // The next tile's scales: loaded now, in flight during the mma, finalized after it (the decode, where
    // the registers are scarcest, holds neither the loads nor their results).
    if constexpr (kScale) {
      g.template load_scales<kDq>(raw, s_next);
      s_next = g.scale_origin(f_next);
      f_next += g.flat_step();
    }
    const int a_st = st * kTileBytes + a_lane0;
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      const T* const b_lane[2] = {
          kNN ? at_byte(sB, b_lane0 + ks * kBStepKS * 2) : at_byte(sB, xor_chunk2(b_lane0, ks)),
          kNN ? at_byte(sB, xor_chunk2(b_lane0, 1) + ks * kBStepKS * 2) : at_byte(sB, xor_chunk2(b_lane0, ks) + kBStepNP * 2)};
      g.mma_kstep(acc, at_byte(sA, xor_chunk2(a_st, ks)), b_lane);
    }
    if constexpr (kScale) g.template finalize_scales<kDq>(scale, raw, sMap, offset);
    st = st == kStages - 1 ? 0 : st + 1;
  };
  // The steady state: tiles 0 .. ktiles-3 (a down-counter: a loop-carried value the compiler cannot
  // recompute from the parameters at every test).
  for (int left = ktiles - 2; left > 0; --left) tile.template operator()<true, true>();
  if (ktiles >= 2) tile.template operator()<false, true>();  // tile ktiles-2
  tile.template operator()<false, false>();                  // tile ktiles-1
  cp_async_wait<0>();  // only empty groups can remain; drain them before reusing shared memory
  __syncthreads();     // every warp is done with the last tile's A stage and Bd
}

template <typename T, bool kNN>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) nf4_mma_kernel(const __grid_constant__ NF4MatmulParams p,
                                                                int log2_blocksize) {
  LRX_DYNAMIC_SMEM(smem);
  T* sA = reinterpret_cast<T*>(smem);                                                   // [kStages][128*64]
  uint32_t* sW = reinterpret_cast<uint32_t*>(smem + kStages * kTileBytes);              // [kStages][1024]
  T* sB = reinterpret_cast<T*>(smem + kStages * (kTileBytes + kWordsBytes));            // [128*64]
  float* sMap = reinterpret_cast<float*>(smem + kStages * (kTileBytes + kWordsBytes) + kTileBytes);  // [256]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile: rows wm*64 .. +64, cols wn*32 .. +32
  const Nf4Mma<T, kNN> g(p, int64_t(blockIdx.y) * kBM, int64_t(blockIdx.x) * kBN, log2_blocksize, tid);
  const int64_t cols = kNN ? p.w.K : p.w.N;

  const bool dq = p.w.scales.qabsmax != nullptr;
  if (dq) sMap[tid] = __ldg(p.w.scales.nested_map + tid);          // kThreads == 256 map entries
  const float offset = dq ? __ldg(p.w.scales.offset) : 0.f;

  float acc[kMI][kNI][4];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  // Two copies of the pipeline: the scale math differs (one fp32 load, or code + nested absmax + map).
  if (dq) {
    nf4_mma_reduce<true>(g, acc, sA, sW, sB, sMap, offset, wm, wn, lane);
  } else {
    nf4_mma_reduce<false>(g, acc, sA, sW, sB, sMap, offset, wm, wn, lane);
  }

  // Low-rank steps appended to the reduction: r padded to 16 by zeros, 64 ranks per chunk.
  if (p.lowrank != nullptr) {
    for (int r0 = 0; r0 < p.r; r0 += kBK) {
      g.load_lowrank_chunk(sA, sB, r0);
      __syncthreads();  // chunk stored
      const int ksteps = min(kBK / 16, (p.r - r0 + 15) / 16);
      g.mma_steps(acc, sA, sB, ksteps, wm, wn, lane);
      __syncthreads();  // all reads done before the next chunk overwrites
    }
  }

  // Epilogue: accumulator element e of tile (mi, ni) is row g + 8*(e/2), col 2q + e%2 (g = lane/4, q = lane%4).
  T* out = static_cast<T*>(p.out);
  const T* bias = kNN ? nullptr : static_cast<const T*>(p.bias);
  const bool pair_ok = (p.ld_out % 2 == 0) && (reinterpret_cast<uintptr_t>(out) % 4 == 0);
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < kNI; ++ni) {
      const int64_t col = g.c0 + wn * kWarpN + ni * 8 + 2 * (lane & 3);
      float b0 = 0.f, b1 = 0.f;
      if (bias != nullptr) {
        if (col < cols) b0 = Op<T>::to_float(bias[col]);
        if (col + 1 < cols) b1 = Op<T>::to_float(bias[col + 1]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = g.m0 + wm * kWarpM + mi * 16 + (lane >> 2) + 8 * h;
        if (row >= p.M) continue;
        T* o = out + row * p.ld_out + col;
        const float v0 = acc[mi][ni][2 * h] + b0, v1 = acc[mi][ni][2 * h + 1] + b1;
        if (pair_ok && col + 1 < cols) {
          *reinterpret_cast<uint32_t*>(o) = Op<T>::pack(v0, v1);
        } else {
          if (col < cols) o[0] = Op<T>::from_float(v0);
          if (col + 1 < cols) o[1] = Op<T>::from_float(v1);
        }
      }
    }
  }
}

// Launch geometry, shared by the launcher (nf4_mma_launch.cuh) and the simulator: one CTA per 128 x 128
// tile of C; the kernel takes log2(blocksize) (a power of two, checked by the launcher).
template <bool kNN>
inline dim3 grid_of(const NF4MatmulParams& p) {
  const int64_t cols = kNN ? p.w.K : p.w.N;
  return dim3(static_cast<unsigned>((cols + kBN - 1) / kBN), static_cast<unsigned>((p.M + kBM - 1) / kBM));
}
inline int log2_blocksize(const NF4MatmulParams& p) { return __builtin_ctz(static_cast<unsigned>(p.w.blocksize)); }

}  // namespace mma
}  // namespace lowrank_ext
