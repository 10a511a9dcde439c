// nf4_mma_kernel.cuh — tensor-core NF4 GEMMs (mma.sync.m16n8k16, bf16/fp16 operands, fp32 accumulate).
// Torch-free: included only by the per-dtype instantiation files nf4_mma_{bf16,fp16}.cu.
//
//   NT (forward):   y[M, N]  = x[M, K]  · deq(W)[N, K]ᵀ + s · u[M, r] · lora_B[N, r]ᵀ + bias[N]
//   NN (grad_x):    gx[M, K] = gy[M, N] · deq(W)[N, K]  +     gu[M, r] · lora_A[r, K]
// Both are one kernel, C[M, cols] = A[M, red] · Bop[red, cols] (+ low-rank) (+ bias):
//   NT: red = K, cols = N, Bop[k][n] = deq(W)[n][k]     NN: red = N, cols = K, Bop[n][k] = deq(W)[n][k]
//
// One CTA computes a 128 x 128 tile of C with 8 warps (2 along M x 4 along cols, 64 x 32 per warp =
// 4 x 4 mma tiles of 16 x 8). The reduction runs in tiles of 64:
//   1. cp.async (3-stage ring) brings the activation tile A[128 x 64] (16-byte chunks, zero-filled past
//      M / red) and the packed NF4 bytes of the W tile (4-byte words = 8 codes, zero-filled past N / K).
//   2. Every thread decodes 4 words in registers: level = NF4[code] (fp32), value = level * absmax_hat[b]
//      (one fp32 multiply), ONE rounding to bf16/fp16 — exactly dequantize_nf4's value — and stores the
//      8 values as one 16-byte chunk of the decoded tile Bd in shared memory (never in global memory).
//   3. ldmatrix (A: plain; Bd: plain for NT, .trans for NN) feeds mma.sync.m16n8k16 into fp32 registers.
// The block scale is per 8-code word: a word starts at a flat index n*K + k with K % 8 == 0 and k % 8 == 0,
// and block boundaries are multiples of blocksize >= 32, so a word never straddles two blocks — this is
// what makes a scale change inside a 64-wide tile (blocksize 32, or K not a multiple of blocksize) exact.
// The scales' global loads for tile t+1 are issued while tile t is decoded and multiplied (registers).
// After the NF4 tiles, the low-rank product runs as extra reduction steps over r (padded to 16 by zeros):
//   C += [s·u] · [lora_B]ᵀ (NT)   or   C += [gu] · [lora_A] (NN), s·u rounded once to the operand dtype.
// The epilogue adds bias in fp32 and rounds once to the output dtype.
//
// Requirements (checked by the launcher, which returns false otherwise): K % 8 == 0 (and N % 8 == 0 for
// NN), blocksize a power of two in [32, 4096], A 16-byte aligned with lda % 8 == 0, packed 4-byte aligned,
// sm80 or newer.
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
                           + 16 * 4 + 256 * 4;                   // NF4 levels + nested (double-quant) map
// Two CTAs per SM (<= 128 registers per thread) where the shared memory holds two (sm80: 164 KB, sm90:
// 228 KB per SM); sm86/sm89 have 100 KB, one CTA fits anyway, so let ptxas use more registers there.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890)
constexpr int kMinBlocksPerSM = 1;
#else
constexpr int kMinBlocksPerSM = 2;
#endif
static_assert(kWords % kThreads == 0 && (kTileElems / 8) % kThreads == 0, "tile / thread mismatch");

// NF4 levels (code 0..15) for the shared-memory LUT; static: one copy per translation unit (no -rdc).
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
__device__ __forceinline__ int swz(int row, int chunk, int chunks_per_row) {
  return row * chunks_per_row * 8 + ((chunk ^ (row & 7)) << 3);
}

// Raw (not yet finalized) block scales of this thread's 4 words of one W tile, loaded one tile ahead.
struct ScaleRaw {
  float a[kWordsPerThread];  // absmax_f32[b], or absmax2[b / 256] when double-quantized
  int q[kWordsPerThread];    // qabsmax[b] (double quant), or -1 for a word outside W (scale 0)
};

template <typename T, bool kNN>
struct Nf4Mma {
  // Packed-W tile geometry: NT tile = W[n0 .. n0+128, k .. k+64]  -> 128 rows x 8 words
  //                         NN tile = W[n .. n+64, k0 .. k0+128]  ->  64 rows x 16 words
  // (rows of W in both; the decoded tile Bd has the same rows, one 16-byte chunk per word).
  static constexpr int kWordsPerRow = kNN ? kBN / 8 : kBK / 8;

  const NF4MatmulParams& p;
  int64_t m0, c0;  // first activation row / output column of this CTA
  int log2_bs;
  int tid;

  // W coordinates of word j (0..3) of this thread in reduction tile kt.
  __device__ __forceinline__ void word_coord(int kt, int j, int64_t& n, int64_t& k) const {
    const int w = tid + j * kThreads;
    const int row = w / kWordsPerRow, wc = w % kWordsPerRow;
    if constexpr (kNN) {
      n = int64_t(kt) * kBK + row;  // reduction index
      k = c0 + wc * 8;              // output column
    } else {
      n = c0 + row;                 // output column
      k = int64_t(kt) * kBK + wc * 8;
    }
  }

  // Issue the async copies of reduction tile kt into ring stage `st`.
  __device__ __forceinline__ void load_tile(T* sA, uint32_t* sW, int st, int kt) const {
    const int64_t red = kNN ? p.w.N : p.w.K;
    const T* a = static_cast<const T*>(p.a);
    T* dstA = sA + st * kTileElems;
#pragma unroll
    for (int j = 0; j < kChunksPerThread; ++j) {  // A[m0 + row][kt*64 + 8c .. +8]: 8 chunks per row
      const int id = tid + j * kThreads, row = id >> 3, c = id & 7;
      const int64_t m = m0 + row, kk = int64_t(kt) * kBK + c * 8;
      const bool ok = m < p.M && kk < red;  // red % 8 == 0: a chunk is all in or all out
      cp_async16(dstA + swz(row, c, kBK / 8), ok ? a + m * p.lda + kk : a, ok);
    }
    uint32_t* dstW = sW + st * kWords;
#pragma unroll
    for (int j = 0; j < kWordsPerThread; ++j) {  // packed byte of flat index f is f / 2
      int64_t n, k;
      word_coord(kt, j, n, k);
      const bool ok = n < p.w.N && k < p.w.K;
      cp_async4(dstW + tid + j * kThreads, ok ? p.w.packed + (n * p.w.K + k) / 2 : p.w.packed, ok);
    }
  }

  // Issue the global loads of the 4 block scales of this thread's words in tile kt (not consumed yet).
  __device__ __forceinline__ void load_scales(ScaleRaw& s, int kt) const {
    const NF4Scales& sc = p.w.scales;
#pragma unroll
    for (int j = 0; j < kWordsPerThread; ++j) {
      int64_t n, k;
      word_coord(kt, j, n, k);
      s.a[j] = 0.f;
      s.q[j] = -1;
      if (n < p.w.N && k < p.w.K) {
        const int64_t b = (n * p.w.K + k) >> log2_bs;  // block of the word's first (= every) code
        if (sc.qabsmax != nullptr) {
          s.q[j] = __ldg(sc.qabsmax + b);
          s.a[j] = __ldg(sc.absmax2 + (b >> 8));  // nested blocks of kNestedBlocksize = 256
        } else {
          s.a[j] = __ldg(sc.absmax_f32 + b);
          s.q[j] = 0;
        }
      }
    }
  }

  // absmax_hat = map[q] * absmax2 + offset (two roundings, as NF4Scales::block_scale), or absmax; 0 outside W.
  __device__ __forceinline__ void finalize_scales(float (&out)[kWordsPerThread], const ScaleRaw& s,
                                                  const float* sMap, float offset, bool dq) const {
#pragma unroll
    for (int j = 0; j < kWordsPerThread; ++j) {
      out[j] = s.q[j] < 0 ? 0.f : (dq ? add_rn(mul_rn(sMap[s.q[j]], s.a[j]), offset) : s.a[j]);
    }
  }

  // Decode this thread's 4 packed words of stage `st` into Bd: value = NF4[code] * scale, rounded once.
  // Byte i of a word holds codes 2i (high nibble) and 2i+1 (low nibble) of its 8 consecutive elements.
  __device__ __forceinline__ void decode(T* sB, const uint32_t* sW, int st, const float (&scale)[kWordsPerThread],
                                         const float* sLut) const {
#pragma unroll
    for (int j = 0; j < kWordsPerThread; ++j) {
      const int w = tid + j * kThreads;
      const uint32_t word = sW[st * kWords + w];
      uint32_t v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float e0 = sLut[(word >> (8 * i + 4)) & 15u] * scale[j];  // element 2i: high nibble
        const float e1 = sLut[(word >> (8 * i)) & 15u] * scale[j];      // element 2i + 1: low nibble
        v[i] = Op<T>::pack(e0, e1);                                     // e0 at the lower address
      }
      const int row = w / kWordsPerRow, wc = w % kWordsPerRow;
      *reinterpret_cast<uint4*>(sB + swz(row, wc, kWordsPerRow)) = make_uint4(v[0], v[1], v[2], v[3]);
    }
  }

  // acc += A_tile[warp rows, 16*ksteps] · Bop_tile[16*ksteps, warp cols] from shared memory.
  //   A tile [128][64] row-major;  Bd: NT [128 cols][64 red] (ldmatrix), NN [64 red][128 cols] (.trans).
  __device__ __forceinline__ void mma_steps(float (&acc)[kMI][kNI][4], const T* sA, const T* sB, int ksteps,
                                            int wm, int wn, int lane) const {
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      if (ks >= ksteps) break;
      uint32_t a[kMI][4], b[kNI][2];
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi) {
        // matrices: (rows 0-7, k 0-7) (rows 8-15, k 0-7) (rows 0-7, k 8-15) (rows 8-15, k 8-15) = a0..a3
        const int row = wm * kWarpM + mi * 16 + (lane & 15);
        ldmatrix_x4<false>(a[mi], sA + swz(row, ks * 2 + (lane >> 4), kBK / 8));
      }
#pragma unroll
      for (int np = 0; np < kNI / 2; ++np) {  // two 8-column mma tiles per ldmatrix.x4
        uint32_t r[4];
        const int mat = lane >> 3;
        if constexpr (kNN) {
          // Bd[red][col]: matrices (red 0-7, cols 2np) (red 8-15, cols 2np) (red 0-7, 2np+1) (red 8-15, 2np+1)
          const int row = ks * 16 + (mat & 1) * 8 + (lane & 7);
          ldmatrix_x4<true>(r, sB + swz(row, wn * (kWarpN / 8) + np * 2 + (mat >> 1), kBN / 8));
        } else {
          // Bd[col][red]: matrices (cols 2np, red 0-7) (cols 2np, red 8-15) (cols 2np+1, red 0-7) (.., 8-15)
          const int row = wn * kWarpN + np * 16 + (mat >> 1) * 8 + (lane & 7);
          ldmatrix_x4<false>(r, sB + swz(row, ks * 2 + (mat & 1), kBK / 8));
        }
        b[2 * np][0] = r[0];
        b[2 * np][1] = r[1];
        b[2 * np + 1][0] = r[2];
        b[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
        for (int ni = 0; ni < kNI; ++ni) dev::mma_m16n8k16<T>(acc[mi][ni], a[mi], b[ni]);
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
      sA[swz(row, c >> 3, kBK / 8) + (c & 7)] = Op<T>::from_float(v);
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

template <typename T, bool kNN>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) nf4_mma_kernel(const __grid_constant__ NF4MatmulParams p,
                                                                int log2_blocksize) {
  LRX_DYNAMIC_SMEM(smem);
  T* sA = reinterpret_cast<T*>(smem);                                                   // [kStages][128*64]
  uint32_t* sW = reinterpret_cast<uint32_t*>(smem + kStages * kTileBytes);              // [kStages][1024]
  T* sB = reinterpret_cast<T*>(smem + kStages * (kTileBytes + kWordsBytes));            // [128*64]
  float* sLut = reinterpret_cast<float*>(smem + kStages * (kTileBytes + kWordsBytes) + kTileBytes);  // [16]
  float* sMap = sLut + 16;                                                              // [256]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;  // warp tile: rows wm*64 .. +64, cols wn*32 .. +32
  Nf4Mma<T, kNN> g{p, int64_t(blockIdx.y) * kBM, int64_t(blockIdx.x) * kBN, log2_blocksize, tid};
  const int64_t red = kNN ? p.w.N : p.w.K, cols = kNN ? p.w.K : p.w.N;
  const int ktiles = static_cast<int>((red + kBK - 1) / kBK);

  const bool dq = p.w.scales.qabsmax != nullptr;
  if (tid < 16) sLut[tid] = kLevels[tid];
  if (dq) sMap[tid] = __ldg(p.w.scales.nested_map + tid);  // kThreads == 256 map entries
  const float offset = dq ? __ldg(p.w.scales.offset) : 0.f;

  float acc[kMI][kNI][4];
#pragma unroll
  for (int mi = 0; mi < kMI; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  // Prologue: scales of tile 0 (finalized after the barrier that publishes sMap), tiles 0 .. kStages-2.
  ScaleRaw raw;
  g.load_scales(raw, 0);
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < ktiles) g.load_tile(sA, sW, st, st);
    cp_async_commit();  // always commit (maybe empty): group index == tile index
  }
  __syncthreads();  // sLut, sMap written
  float scale[kWordsPerThread];
  g.finalize_scales(scale, raw, sMap, offset, dq);

  for (int kt = 0; kt < ktiles; ++kt) {
    const int st = kt % kStages;
    // Committed groups: kStages-1 + kt; allowing kStages-2 pending leaves groups kt+1 .. kt+kStages-2
    // in flight, so this thread's copies of tile kt (group kt) have landed.
    cp_async_wait<kStages - 2>();
    // (1) publishes every thread's copies of tile kt; (2) every warp has finished iteration kt-1: its
    // mma reads of Bd and of ring stage (kt-1) % kStages and its decode of that stage's words.
    __syncthreads();
    // Refill the stage freed by tile kt-1 ((kt + kStages - 1) % kStages == (kt - 1) % kStages).
    if (kt + kStages - 1 < ktiles) g.load_tile(sA, sW, (kt + kStages - 1) % kStages, kt + kStages - 1);
    cp_async_commit();
    if (kt + 1 < ktiles) g.load_scales(raw, kt + 1);  // in flight during this tile's decode + mma
    g.decode(sB, sW, st, scale, sLut);                 // Bd is free: barrier above
    __syncthreads();                                   // Bd complete before any warp reads it
    g.mma_steps(acc, sA + st * kTileElems, sB, kBK / 16, wm, wn, lane);
    if (kt + 1 < ktiles) g.finalize_scales(scale, raw, sMap, offset, dq);
  }
  cp_async_wait<0>();  // only empty groups can remain; drain them before reusing shared memory
  __syncthreads();     // every warp is done with the last tile's A stage and Bd

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
