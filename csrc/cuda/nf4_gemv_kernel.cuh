// nf4_gemv_kernel.cuh — small-M (M <= 16) NF4 "GEMV" for fp16/bf16 activations. Torch-free.
//
//   y[M, N] = x[M, K] · deq(W)[N, K]ᵀ (+ scaling · u[M, r] · lora_B[N, r]ᵀ) (+ bias[N])     M <= 16
//
// Memory-bound: every packed byte of W is read once with 128-bit loads, x is staged per CTA in shared memory.
// The multiply runs on tensor cores (mma.sync m16n8k16, fp32 accumulators) as yᵀ = W · xᵀ: the decoded W is
// the 16-row A operand (16 output features), xᵀ the 16 x 8 B operand (8 rows of x; two B tiles when M > 8).
// At M <= 8 every mma does useful work (x as A would waste rows 8..15).
//
// The k permutation. A quad of lanes (q = lane % 4, g = lane / 4) reads 4 x 16 contiguous bytes of one
// row of W: lane q holds the 32 codes k = 32q .. 32q+31 of a 128-wide chunk. The mma's fragments want lane
// (g, q) to hold k = 2q + {0,1} and 2q + 8 + {0,1} of a 16-wide step (A: rows g and g+8; B: column g); a dot
// product does not care about the order of k, so mma step s (0..7) of the chunk maps its virtual k onto
// real k as
//     virtual 2q + {0,1}  ->  real 32q + 4s + {0,1}        virtual 2q + 8 + {0,1} -> real 32q + 4s + {2,3}
// (the same map for every g, as A and B must agree). So each step consumes bytes 2s, 2s+1 of the lane's 16
// bytes of each row and x[g, 32q + 4s .. 32q + 4s + 3] (8 contiguous bytes: the B fragment as it lies in
// shared memory) — no data exchange between lanes at all.
//
// Decode: one shared-memory load per packed byte. A 256-entry table maps a byte to the NF4 levels of its two
// codes (even k in the high nibble: {NF4[byte >> 4], NF4[byte & 15]}, fp32); each level times the block scale
// (fp32 multiply) is rounded once to bf16/fp16 (one packed convert per byte): exactly the dequantized W. All 32
// codes of a lane share one block (K % 32 == 0, blocksize >= 32), so one scale per lane, row and chunk.
// The table is replicated 16 times, interleaved: entry (byte, copy) at byte offset 128 byte + 8 copy, and lane
// l reads copy l % 16. The bank pair of an entry is its copy, so each bank pair is read by exactly two lanes
// (l and l + 16, different half warps): an LDS.64 takes the minimum two wavefronts (256 B) for any bytes.
// One unreplicated 2 KB table would put 16 random bytes per half warp on 16 bank pairs: ~3 deep on average,
// 3x the shared-memory time.
// Per 2 KB of weights (one warp chunk: 32 rows x 128 codes) a lane does 64 x {shift, and-or, LDS.64, 2 FMUL,
// 1 F2FP} and 16 HMMA (32 when M > 8); the x fragments (4 or 8 LDS.128), the next chunk's W and scale loads
// and the piece bookkeeping come on top (bench/sass_budget.py counts the loop).
//
// Grid: blockIdx.x = group of 128 output features (4 warps x 32 rows = 2 mma row tiles of 16 per warp);
// blockIdx.y = split of K (gemv_plan.h: any slice length). The CTA walks its slice in pieces of 256 k: x
// pieces go to two shared buffers with cp.async, the next piece in flight while the current one is used (one
// __syncthreads per piece). x is staged as 8 rows (16 when M > 8) with zeros past M and past the slice end,
// which lets the last chunk run unpredicated: a lane past the slice multiplies finite W (the slice's last
// codes) by zeros. Rows of W >= N read row N - 1 (never stored). Each warp fetches the next chunk's W bytes
// and scale ingredients one chunk ahead (two register buffers, alternating statically: a piece is two chunks).
// With several splits, each CTA writes fp32 partials [split, M, N]; the last CTA of a row group (atomic
// counter) sums them in split order (deterministic), runs the epilogue (LoRA, bias, rounding) and resets its
// counter to 0. <= 128 registers, 48 KB of static shared memory, 4 CTAs (16 warps) per SM (3 on an A100).
// Requirements (checked by the launcher): K % 32 == 0, `packed` 16-byte aligned, x rows 16-byte aligned
// (x and lda % 8), N K < 2^32, sm_80+.
#pragma once

#include "device_ops.cuh"
#include "gemv_plan.h"
#include "nf4_kernel.cuh"
#include "nf4_linear_params.h"

namespace lowrank_ext {
namespace cuda {

constexpr int kGemvThreads = 128;     // 4 warps
constexpr int kGemvWarpRows = 32;     // output features per warp (2 mma A tiles of 16 rows)
constexpr int kGemvRows = 128;        // output features per CTA
constexpr int kGemvChunk = 128;       // k per warp step: 4 lanes x 32 codes
constexpr int kGemvMaxM = 16;         // rows of x: at most 2 mma B tiles of 8
constexpr int kGemvLutCopies = 16;    // level-table copies: one per lane of a half warp
static_assert(kGemvRows == kGemvRowsPerCta && kGemvChunk == kGemvKChunk && kGemvMaxM == kGemvMaxRows,
              "gemv_plan.h and the kernel disagree");
static_assert(kGemvXPiece == 2 * kGemvChunk, "a piece is two chunks: the W register buffers alternate per chunk");

struct GemvArgs {
  NF4MatmulParams p;
  int kslice;         // k per split: multiple of kGemvChunk
  int splits;         // ceil(K / kslice)
  float* partial;     // [splits, M, N] fp32 (splits > 1)
  int* counters;      // [ceil(N / 128)] zeros (splits > 1); left at zero afterwards (the workspace relies
                      // on it: gemv_workspace.h zeroes them only when it allocates them)
};

// One entry of the level table: the NF4 levels of a packed byte's two codes (8 bytes: one LDS.64).
struct alignas(8) GemvLevelPair {
  float even;  // NF4[byte >> 4]: the code of the even (lower) k
  float odd;   // NF4[byte & 15]
};

// Element offset of x[row, kk] (kk = 0 .. kGemvXPiece-1) in a staged piece: rows of 256 elements (512 B)
// without padding; the 16-byte chunk j = kk / 8 is XOR-swizzled to j ^ ((j >> 2) & 2) ^ (row & 1). A
// quarter warp's LDS.128 (lanes g = 2h, 2h+1 and q = 0..3, reading chunk 16c + 4q + i of rows g) then
// hits bank groups 4(q & 1) | (i ^ 2(q >> 1) ^ (g & 1)): 8 different 16-byte groups, no conflict. The
// swizzle only flips bits 0-1 of j, so offset(row, kk + 128 c) = offset(row, kk) + 128 c (c < 2) and
// offset(row + 8, kk) = offset(row, kk) + 8 x 256 (row parity kept): the loop's reads are a per-lane base
// plus immediates.
__host__ __device__ __forceinline__ int gemv_x_offset(int row, int kk) {
  const int j = kk >> 3;
  return row * kGemvXPiece + ((j ^ ((j >> 2) & 2) ^ (row & 1)) << 3) + (kk & 7);
}

// The table entry of the byte at bits bit .. bit+7 of word, in the copy at byte offset copy_bytes (< 128):
// byte offset 128 byte + copy_bytes, formed as one shift and one and-or (LDS.64 [R + base] on sm_80 and
// sm_90; an element index would cost sm_90 a third instruction, the scaled add of the shared window base).
__device__ __forceinline__ GemvLevelPair gemv_levels(const GemvLevelPair* s_lut, uint32_t word, int bit,
                                                     uint32_t copy_bytes) {
  constexpr uint32_t kEntryBytes = kGemvLutCopies * sizeof(GemvLevelPair);  // 128: log2 = 7
  static_assert(kEntryBytes == 128, "the shift below assumes 128-byte table rows");
  const uint32_t row = (bit >= 7 ? word >> (bit - 7) : word << (7 - bit)) & (0xFFu * kEntryBytes);
  return *reinterpret_cast<const GemvLevelPair*>(reinterpret_cast<const char*>(s_lut) + (row | copy_bytes));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lower k) in the low 16 bits
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// y[m, n] = acc + Σ_r T(scaling · u[m, r]) · lora_B[n, r] + bias[n], rounded once to T. The low-rank
// input s·u is rounded once to T as in the mma kernel's rank steps (the products are then exact in fp32),
// so the GEMV and mma paths differ only in the fp32 summation order.
template <typename T>
__device__ __forceinline__ void gemv_store(const NF4MatmulParams& p, int64_t m, int64_t n, float acc) {
  if (p.lowrank != nullptr) {
    const T* u = static_cast<const T*>(p.lowrank) + m * p.ld_lowrank;
    const T* b = static_cast<const T*>(p.lowrank_w) + n * p.ld_lowrank_w;
    float lr = 0.f;
    for (int j = 0; j < p.r; ++j) lr = fmaf(round_to<T>(p.scaling * to_float<T>(u[j])), to_float<T>(b[j]), lr);
    acc += lr;
  }
  if (p.bias != nullptr) acc += to_float<T>(static_cast<const T*>(p.bias)[n]);
  static_cast<T*>(p.out)[m * p.ld_out + n] = from_float<T>(acc);
}

// The raw loads of one chunk for a lane's 4 rows: 16 packed bytes each and the scale's ingredients (fp32
// absmax; or the 8-bit code and the nested absmax). Filled one chunk ahead of its use.
struct GemvChunk {
  uint4 w[4];
  float a[4];     // absmax (plain) or absmax2 (double quant)
  uint32_t c[4];  // qabsmax code (double quant)
};

// The CTA's work for one variant: kDq = double-quantized scales, kRows16 = M > 8 (a second B tile: x rows 8..15).
template <typename T, bool kDq, bool kRows16>
__device__ __forceinline__ void gemv_cta(const GemvArgs& args, GemvLevelPair* s_lut, T* s_x) {
  constexpr int kMTiles = kRows16 ? 2 : 1;      // mma B tiles of 8 rows of x
  constexpr int kStagedRows = 8 * kMTiles;        // x rows in shared memory (zeros past M)
  const NF4MatmulParams& p = args.p;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int64_t M = p.M, N = p.w.N, K = p.w.K;
  const int64_t ks = static_cast<int64_t>(blockIdx.y) * args.kslice;
  const int klen = static_cast<int>((K - ks < args.kslice) ? K - ks : args.kslice);  // multiple of 32
  const int npieces = (klen + kGemvXPiece - 1) / kGemvXPiece;
  const int64_t n_warp = static_cast<int64_t>(blockIdx.x) * kGemvRows + warp * kGemvWarpRows;
  const NF4Scales& scales = p.w.scales;
  if ((reinterpret_cast<uintptr_t>(p.a) % 16 != 0) || (p.lda % 8 != 0)) __trap();  // the launcher's contract

  // ---- per-lane rows n_warp + 8t + g (n >= N reads row N - 1: finite, never stored) ----
  // 32-bit offsets (the launcher checks N K < 2^32): the lane's codes at slice offset kk (a multiple of 32)
  // of row t are flat elements f = 2 wofs[t] + kk .. +31: bytes f / 2, block f / blocksize.
  const int byte_shift = __ffs(p.w.blocksize) - 2;  // block = byte / (blocksize / 2): blocksize is a power of two
  uint32_t wofs[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int64_t n = n_warp + 8 * t + g < N ? n_warp + 8 * t + g : N - 1;
    wofs[t] = static_cast<uint32_t>((n * K + ks) >> 1);
  }
  // Loads of the lane's chunk at slice offset kk (lane-dependent: kk = 32q + 128c). A lane past the slice
  // (its x is zero there) loads the slice's last 32 codes instead: in bounds, finite, no branch.
  auto fetch = [&](int kk, GemvChunk& r) {
    const uint32_t half_k = static_cast<uint32_t>(kk < klen ? kk : klen - 32) >> 1;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const uint32_t byte = wofs[t] + half_k, block = byte >> byte_shift;
      r.w[t] = __ldcs(reinterpret_cast<const uint4*>(p.w.packed + byte));
      if constexpr (kDq) {
        r.c[t] = __ldg(scales.qabsmax + block);
        r.a[t] = __ldg(scales.absmax2 + block / kNestedBlocksize);
      } else {
        r.a[t] = __ldg(scales.absmax_f32 + block);
      }
    }
  };
  GemvChunk buf_a, buf_b;  // chunk 2i of the slice in buf_a, 2i+1 in buf_b
  fetch(32 * q, buf_a);  // the first chunk's weights load while the table and x are set up
  if constexpr (!kDq) {
#pragma unroll
    for (int t = 0; t < 4; ++t) buf_b.c[t] = buf_a.c[t] = 0u;  // unused (plain absmax)
  }

  // ---- x pieces: rows 0 .. kStagedRows-1 of x[:, ks + 256 pc ...], zeros past the slice and past M ----
  // Thread (warp, lane) copies the 8 elements at k = 8 lane of rows warp + 4j with one 16-byte cp.async
  // each (zero-filled when invalid: nothing is read then; the source is still the start of a valid row). Row
  // warp + 4j has the parity of warp, so its destination is gemv_x_offset(warp, 8 lane) + 4j x 256.
  // x rows are 16-byte aligned (the launcher copies a misaligned x first).
  const T* x = static_cast<const T*>(p.a);
  constexpr int kRowsPerPass = kGemvThreads / (kGemvXPiece / 8);  // 4
  constexpr int kPasses = kStagedRows / kRowsPerPass;
  const int x_dst = gemv_x_offset(warp, 8 * lane);
  const T* x_src[kPasses];
  uint32_t x_row_ok = 0;  // bit j: row warp + 4j < M
#pragma unroll
  for (int j = 0; j < kPasses; ++j) {
    const int m = warp + kRowsPerPass * j;
    x_src[j] = x + (m < M ? m : 0) * p.lda + ks + 8 * lane;
    x_row_ok |= static_cast<uint32_t>(m < M) << j;
  }
  auto stage = [&](int pc) {
    T* dst = s_x + (pc & 1) * (kGemvMaxM * kGemvXPiece) + x_dst;
    const int k0 = pc * kGemvXPiece;
    const bool k_ok = k0 + 8 * lane < klen;
#pragma unroll
    for (int j = 0; j < kPasses; ++j) {
      dev::cp_async16(dst + j * kRowsPerPass * kGemvXPiece, x_src[j] + (k_ok ? k0 : -8 * lane),
                      k_ok && ((x_row_ok >> j) & 1));
    }
    dev::cp_async_commit();
  };
  stage(0);

  // ---- the level table: thread tid writes entries 2e, 2e+1 (e = tid + 128 j, j = 0..15) with one 16-byte
  //      store: copies 2 (tid % 8), +1 of byte 16 j + tid / 8, i.e. high nibble j (uniform), low nibble tid / 8 ----
  {
    struct alignas(16) TwoCopies { GemvLevelPair a, b; };
    const float lo = kNF4CodebookDev[tid >> 3];
    TwoCopies* dst = reinterpret_cast<TwoCopies*>(s_lut) + tid;
#pragma unroll
    for (int j = 0; j < 256 * kGemvLutCopies / (2 * kGemvThreads); ++j) {
      const GemvLevelPair v{kNF4CodebookDev[j], lo};
      dst[j * kGemvThreads] = TwoCopies{v, v};
    }
  }

  // ---- per-lane constants of the main loop ----
  const uint32_t copy_bytes = (lane % kGemvLutCopies) * sizeof(GemvLevelPair);  // this lane's table copy
  const float offset = kDq ? __ldg(scales.offset) : 0.f;
  int xoff[4];  // element offset of slot i (x[g, 32q + 8i .. +8]) in a piece; chunk c adds 128 c, row g + 8 adds 2048
#pragma unroll
  for (int i = 0; i < 4; ++i) xoff[i] = gemv_x_offset(g, 32 * q + 8 * i);
  // acc[T][mt] = D of the mma with A = W rows n_warp + 16T + {g, g+8} and B = x rows 8mt + {2q, 2q+1}
  float acc[2][kMTiles][4] = {};

  // One chunk: 8 mma steps x 2 row tiles (x kMTiles) from the W bytes in r and x chunk c of the piece xs.
  auto compute = [&](const GemvChunk& r, const T* xs, int c) {
    float sc[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      sc[t] = kDq ? add_rn(mul_rn(__ldg(scales.nested_map + r.c[t]), r.a[t]), offset) : r.a[t];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // x slot i: k = 32q + 8i .. +8 of the chunk, mma steps 2i and 2i+1
      uint4 xv[kMTiles];           // x[8mt + g, 32q + 8i .. +8]
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        xv[mt] = *reinterpret_cast<const uint4*>(xs + xoff[i] + kGemvChunk * c + 8 * mt * kGemvXPiece);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // step s = 2i + h: x words 2h, 2h+1 = k 32q + 4s + {0,1}, {2,3}
        // W codes of step s: bytes 2s, 2s+1 of the lane's 16 = bits 16h .. 16h+15 of word i of each row;
        // table entry byte * 16 + copy; the packed pairs are the mma's A fragment {row g: k 2q..2q+1,
        // row g+8: 2q.., row g: 2q+8.., row g+8: 2q+8..} of row tile T (rows t = 2T, 2T+1).
        uint32_t wp[4][2];  // wp[t][j]: T(NF4 · scale) of byte 2s + j of row t, packed (even k low)
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const uint32_t word = (&r.w[t].x)[i];
          const GemvLevelPair l0 = gemv_levels(s_lut, word, 16 * h, copy_bytes);
          const GemvLevelPair l1 = gemv_levels(s_lut, word, 16 * h + 8, copy_bytes);
          wp[t][0] = pack2<T>(__fmul_rn(l0.even, sc[t]), __fmul_rn(l0.odd, sc[t]));
          wp[t][1] = pack2<T>(__fmul_rn(l1.even, sc[t]), __fmul_rn(l1.odd, sc[t]));
        }
#pragma unroll
        for (int tt = 0; tt < 2; ++tt) {
          const uint32_t a[4] = {wp[2 * tt][0], wp[2 * tt + 1][0], wp[2 * tt][1], wp[2 * tt + 1][1]};
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            const uint32_t b[2] = {h ? xv[mt].z : xv[mt].x, h ? xv[mt].w : xv[mt].y};
            dev::mma_m16n8k16<T>(acc[tt][mt], a, b);
          }
        }
      }
    }
  };

  // ---- main loop: piece pc = chunks 2pc (buf_a) and 2pc+1 (buf_b) of this warp's 32 rows ----
  for (int pc = 0; pc < npieces; ++pc) {
    dev::cp_async_wait<0>();  // this thread's copies of piece pc have landed ...
    __syncthreads();          // ... everyone's; and everyone is done with piece pc - 1 (its buffer is free)
    if (pc + 1 < npieces) stage(pc + 1);
    const T* xs = s_x + (pc & 1) * (kGemvMaxM * kGemvXPiece);
    const int kk = pc * kGemvXPiece + 32 * q;  // the lane's k of chunk 2pc
    // (a fetch past the slice end re-reads its last codes, just loaded: cache hits, and no branch here
    //  keeps the register buffers' live ranges simple — a conditional fetch costs ptxas spills)
    fetch(kk + kGemvChunk, buf_b);
    compute(buf_a, xs, 0);
    if (pc * kGemvXPiece + kGemvChunk < klen) {  // the slice's last piece may hold one chunk (uniform)
      fetch(kk + 2 * kGemvChunk, buf_a);
      compute(buf_b, xs, 1);
    }
  }

  // ---- epilogue: acc[T][mt] = {y[m, n], y[m+1, n], y[m, n+8], y[m+1, n+8]}, m = 8mt + 2q, n = n_warp + 16T + g ----
  auto for_each_result = [&](auto&& f) {
#pragma unroll
    for (int tt = 0; tt < 2; ++tt) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t m = 8 * mt + 2 * q + (e & 1), n = n_warp + 16 * tt + g + 8 * (e >> 1);
          if (m < M && n < N) f(m, n, acc[tt][mt][e]);
        }
      }
    }
  };
  if (args.splits == 1) {
    for_each_result([&](int64_t m, int64_t n, float v) { gemv_store<T>(p, m, n, v); });
    return;
  }
  float* part = args.partial + static_cast<int64_t>(blockIdx.y) * M * N;
  for_each_result([&](int64_t m, int64_t n, float v) { part[m * N + n] = v; });
  __threadfence();  // partials visible device-wide before the counter says so
  __syncthreads();
  int is_last = 0;
  if (tid == 0) is_last = atomicAdd(&args.counters[blockIdx.x], 1) == args.splits - 1;
  if (!__syncthreads_or(is_last)) return;
  __threadfence();
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kGemvRows;
  for (int i = tid; i < M * kGemvRows; i += kGemvThreads) {
    const int64_t m = i / kGemvRows, n = n0 + i % kGemvRows;
    if (n >= N) continue;
    float sum = 0.f;
    for (int sp = 0; sp < args.splits; ++sp) sum += __ldcg(args.partial + (sp * M + m) * N + n);  // L2, not L1
    gemv_store<T>(p, m, n, sum);
  }
  if (tid == 0) args.counters[blockIdx.x] = 0;  // ready for the next launch that reuses the buffer
}

template <typename T>
__global__ void __launch_bounds__(kGemvThreads, kGemvCtasPerSm) nf4_gemv_kernel(GemvArgs args) {
  __shared__ __align__(16) GemvLevelPair s_lut[256 * kGemvLutCopies];  // 32 KB
  __shared__ __align__(16) T s_x[2 * kGemvMaxM * kGemvXPiece];           // 16 KB: two x pieces
  static_assert(sizeof(s_lut) + sizeof(s_x) == kGemvSmemBytes, "gemv_plan.h's shared memory size");
  // Four variants, chosen once per CTA (uniform branch): double-quantized scales or not, M > 8 or not.
  const bool dq = args.p.w.scales.double_quant(), rows16 = args.p.M > 8;
  if (dq) {
    rows16 ? gemv_cta<T, true, true>(args, s_lut, s_x) : gemv_cta<T, true, false>(args, s_lut, s_x);
  } else {
    rows16 ? gemv_cta<T, false, true>(args, s_lut, s_x) : gemv_cta<T, false, false>(args, s_lut, s_x);
  }
}

}  // namespace cuda
}  // namespace lowrank_ext
