// lrx_cuda_sim.h — a host simulator of the CUDA subset our kernels use (test-only; no CUDA headers).
//
// csrc/cuda/device_ops.cuh includes this file when built with g++ -DLRX_CUDA_SIM, so the kernels' own
// source (csrc/cuda/*.cuh) compiles as host C++ and runs on the CPU (tests/sim/sim_kernels.cpp launches it,
// tests/test_simulated_kernels.py checks the results). What it models:
//   * a CTA's threads are cooperative fibers on one OS thread (sim_runtime.cpp); a thread runs until it
//     blocks in __syncthreads (a barrier over the live threads) or in a warp collective (all 32 lanes of
//     its warp must arrive at the same call site); a block where nothing can run any more is a deadlock,
//     reported with every waiting thread's call site;
//   * the CTAs of a grid run one after another in a seeded shuffled order; `__shared__` variables live in
//     one linker section and the dynamic shared memory in a per-launch arena, both filled with 0xFF bytes
//     (fp32/bf16/fp16 NaN) before every CTA, so reading shared memory nobody wrote shows;
//   * cp.async copies are queued per thread and performed only when a cp.async.wait_group retires their
//     group (the latest moment the PTX ISA allows), so a missing wait or commit reads stale data;
//   * ldmatrix and mma.sync exchange all 32 lanes' registers through the fragment layouts of the PTX ISA;
//   * __half / __nv_bfloat16 conversions round to nearest even and keep NaN; the fp32 intrinsics are plain
//     IEEE operations (the build uses -ffp-contract=off, so nothing is fused behind our back).
// What it does not model: speed, memory-model races between CTAs (they never overlap), the hardware's
// scheduling, and the tensor core's internal summation order (mma sums exact products in double, rounds once).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

// ---- CUDA keywords ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__ const
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
// Static shared memory: one section (bounded by __start_/__stop_lrx_shared, GNU ld) that the launcher
// poisons before every CTA. Blocks run one at a time, so a function-local static is "the CTA's" variable.
#define __shared__ __attribute__((section("lrx_shared"))) static

// ---- vector types -------------------------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

namespace lrx_sim {
// The running simulated thread's coordinates (set by the scheduler before it switches to a fiber).
inline dim3 g_thread_idx, g_block_idx, g_block_dim, g_grid_dim;
}  // namespace lrx_sim
#define threadIdx (::lrx_sim::g_thread_idx)
#define blockIdx (::lrx_sim::g_block_idx)
#define blockDim (::lrx_sim::g_block_dim)
#define gridDim (::lrx_sim::g_grid_dim)

// ---- 16-bit floats: storage types with round-to-nearest-even conversions ------------------------------
namespace lrx_sim {
inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// bf16 = the top 16 bits of fp32; RNE on the dropped 16 bits; a NaN stays a (quiet) NaN of the same sign.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

// IEEE binary16 (1, 5, 10): RNE, overflow to inf, gradual underflow to subnormals, NaN kept quiet.
inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u | static_cast<uint16_t>((a >> 13) & 0x3FFu);  // NaN
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 (the midpoint past 65504) rounds to inf; inf
  if (a < 0x38800000u) {                          // below 2^-14: a subnormal half (or zero)
    if (a < 0x33000000u) return sign;             // <= 2^-25: rounds to 0 (2^-25 itself ties to even 0)
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;  // 24-bit significand
    const int shift = 126 - static_cast<int>(a >> 23);  // value = mant * 2^(e-150); half unit = 2^-24
    const uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    return sign | static_cast<uint16_t>(q + (rem > half || (rem == half && (q & 1u))));
  }
  // normal: rebias 127 -> 15, keep 10 of 23 mantissa bits with RNE (a carry may bump the exponent)
  const uint32_t r = a - 0x38000000u;  // exponent - 112
  return sign | static_cast<uint16_t>((r + 0xFFFu + ((r >> 13) & 1u)) >> 13);
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 31) return bits_f32(sign | 0x7F800000u | (m << 13));                     // inf / NaN
  if (e == 0) return bits_f32(sign | f32_bits(std::ldexp(static_cast<float>(m), -24)));  // exact
  return bits_f32(sign | ((e + 112) << 23) | (m << 13));
}
}  // namespace lrx_sim

struct __align__(2) __half { uint16_t x = 0; };
struct __align__(2) __nv_bfloat16 { uint16_t x = 0; };
struct __align__(4) __half2 { __half x, y; };          // .x at the lower address (the low 16 bits)
struct __align__(4) __nv_bfloat162 { __nv_bfloat16 x, y; };

inline __half __float2half_rn(float f) { return __half{lrx_sim::f32_to_f16(f)}; }
inline float __half2float(__half h) { return lrx_sim::f16_to_f32(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{lrx_sim::f32_to_bf16(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return lrx_sim::bf16_to_f32(h.x); }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// Pair helpers (cuda_fp16.h / cuda_bf16.h): .x is the low half.
struct __align__(8) float2 { float x, y; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline __half2 __halves2half2(__half lo, __half hi) { return __half2{lo, hi}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return __nv_bfloat162{lo, hi}; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline float2 __half22float2(__half2 v) { return float2{__half2float(v.x), __half2float(v.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{__bfloat162float(v.x), __bfloat162float(v.y)}; }

// ---- fp32 intrinsics: IEEE operations, each rounded once (CUDA Math API "_rn" = round to nearest) --------
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
using std::isfinite;
using std::isnan;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int __ffs(int x) { return __builtin_ffs(x); }

// ---- the simulator's runtime (sim_runtime.cpp) ----------------------------------------------------------
namespace lrx_sim {
using Loc = std::source_location;

// Fails the running launch with `what` (+ the current thread / block): the fiber never resumes.
[[noreturn]] void fail(const char* what, const Loc& loc);

// Block until every live thread of the CTA is here; all must wait at the same call site.
void barrier(const Loc& loc, int pred_in, int* pred_or_out);

// Warp collectives: every lane deposits `in` (words) and blocks until its 32 lanes arrived at the same call
// site; the last to arrive runs `op` over the 32 lanes' slots, and each lane then reads its own `out`.
struct LaneSlot {
  uint32_t in[10];
  const void* ptr;
  uint32_t out[4];
};
using WarpOp = void (*)(LaneSlot (&lanes)[32]);
LaneSlot& my_slot();
void warp_collective(const char* name, WarpOp op, const Loc& loc);

// Is [p, p + bytes) inside the CTA's shared memory (static section or dynamic arena)? Global arguments?
bool is_shared(const void* p, size_t bytes);
bool is_global(const void* p, size_t bytes);
unsigned char* dynamic_smem();

// cp.async bookkeeping of the running thread (sim_runtime.cpp): queue, commit, retire.
void cp_async_queue(void* dst, const void* src, int bytes, bool valid, const Loc& loc);
void cp_async_commit_group();
void cp_async_wait_groups(int pending);

void check_mask(unsigned mask, const char* name, const Loc& loc);
}  // namespace lrx_sim

#define LRX_DYNAMIC_SMEM(name) unsigned char* name = ::lrx_sim::dynamic_smem()

inline void __syncthreads(const lrx_sim::Loc& loc = lrx_sim::Loc::current()) { lrx_sim::barrier(loc, 0, nullptr); }
inline int __syncthreads_or(int pred, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  int out = 0;
  lrx_sim::barrier(loc, pred != 0, &out);
  return out;
}
// Blocks never overlap in time here, so there is nothing to fence (the cross-CTA memory model is not simulated).
inline void __threadfence() {}
[[noreturn]] inline void __trap(const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  lrx_sim::fail("__trap() executed", loc);
}

// Global loads through the read-only / streaming / L2 caches: plain loads, checked to be in an argument buffer.
template <typename T>
inline T lrx_sim_global_load(const T* p, const lrx_sim::Loc& loc) {
  if (!lrx_sim::is_global(p, sizeof(T))) lrx_sim::fail("__ldg/__ldcs/__ldcg outside every global buffer", loc);
  return *p;
}
template <typename T>
inline T __ldg(const T* p, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) { return lrx_sim_global_load(p, loc); }
template <typename T>
inline T __ldcs(const T* p, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) { return lrx_sim_global_load(p, loc); }
template <typename T>
inline T __ldca(const T* p, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) { return lrx_sim_global_load(p, loc); }
template <typename T>
inline T __ldcg(const T* p, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) { return lrx_sim_global_load(p, loc); }

// Atomics: fibers never run concurrently, so a read-modify-write is atomic by construction.
inline int atomicAdd(int* p, int v) { const int old = *p; *p = old + v; return old; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned old = *p; *p = old + v; return old; }
inline float atomicAdd(float* p, float v) { const float old = *p; *p = old + v; return old; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline int atomicExch(int* p, int v) { const int old = *p; *p = v; return old; }
inline int atomicCAS(int* p, int compare, int v) { const int old = *p; if (old == compare) *p = v; return old; }
inline int atomicMax(int* p, int v) { const int old = *p; if (v > old) *p = v; return old; }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  if (v < old) *p = v;
  return old;
}

// ---- warp shuffles and votes (PTX ISA: shfl.sync, vote.sync) --------------------------------------------
namespace lrx_sim {
// shfl.sync.idx: lane i reads lane (src_i mod width) of its width-lane segment; .bfly: lane i ^ mask.
void shfl_idx_op(LaneSlot (&l)[32]);
void shfl_xor_op(LaneSlot (&l)[32]);
void shfl_down_op(LaneSlot (&l)[32]);
void shfl_up_op(LaneSlot (&l)[32]);
void vote_all_op(LaneSlot (&l)[32]);
void vote_ballot_op(LaneSlot (&l)[32]);
template <typename T>
inline T shfl(const char* name, WarpOp op, unsigned mask, T v, int arg, int width, const Loc& loc) {
  static_assert(sizeof(T) == 4, "the simulator shuffles 32-bit values");
  check_mask(mask, name, loc);
  LaneSlot& s = my_slot();
  std::memcpy(&s.in[0], &v, 4);
  s.in[1] = static_cast<uint32_t>(arg);
  s.in[2] = static_cast<uint32_t>(width);
  warp_collective(name, op, loc);
  T r;
  std::memcpy(&r, &my_slot().out[0], 4);
  return r;
}
}  // namespace lrx_sim

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  return lrx_sim::shfl("__shfl_sync", lrx_sim::shfl_idx_op, mask, v, src, width, loc);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  return lrx_sim::shfl("__shfl_xor_sync", lrx_sim::shfl_xor_op, mask, v, lane_mask, width, loc);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                          const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  return lrx_sim::shfl("__shfl_down_sync", lrx_sim::shfl_down_op, mask, v, static_cast<int>(delta), width, loc);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                        const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  return lrx_sim::shfl("__shfl_up_sync", lrx_sim::shfl_up_op, mask, v, static_cast<int>(delta), width, loc);
}
namespace lrx_sim {
inline uint32_t vote(const char* name, WarpOp op, unsigned mask, int pred, const Loc& loc) {
  check_mask(mask, name, loc);
  my_slot().in[0] = pred != 0;
  warp_collective(name, op, loc);
  return my_slot().out[0];
}
}  // namespace lrx_sim
inline int __all_sync(unsigned mask, int pred, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  return static_cast<int>(lrx_sim::vote("__all_sync", lrx_sim::vote_all_op, mask, pred, loc));
}
inline int __any_sync(unsigned mask, int pred, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  return lrx_sim::vote("__any_sync", lrx_sim::vote_ballot_op, mask, pred, loc) != 0;
}
inline unsigned __ballot_sync(unsigned mask, int pred, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  return lrx_sim::vote("__ballot_sync", lrx_sim::vote_ballot_op, mask, pred, loc);
}
// bar.warp.sync: every lane of the warp must reach the same __syncwarp.
inline void __syncwarp(unsigned mask = 0xffffffffu, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  lrx_sim::vote("__syncwarp", lrx_sim::vote_all_op, mask, 1, loc);
}

// ---- integer / bit intrinsics (CUDA Math API, integer intrinsics) ------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
// byte n of the result = byte (s >> 4n) & 7 of the 8-byte value {y, x} (x holds bytes 0..3)
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << (8 * n);
  return r;
}
inline unsigned __float_as_uint(float f) { return lrx_sim::f32_bits(f); }
inline float __uint_as_float(unsigned u) { return lrx_sim::bits_f32(u); }
inline int __float_as_int(float f) { return static_cast<int>(lrx_sim::f32_bits(f)); }
inline float __int_as_float(int i) { return lrx_sim::bits_f32(static_cast<uint32_t>(i)); }

// ---- device_ops.cuh's interface: cp.async, ldmatrix, mma.sync ---------------------------------------------
namespace lowrank_ext {
namespace dev {

// PTX ISA, data movement instructions, "cp.async": copy cp-size bytes global -> shared; src-size 0 (valid == false) zero-fills the
// destination and reads nothing. Queued in the thread's open group; performed when a wait retires the group.
inline void cp_async16(void* dst, const void* src, bool valid, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  lrx_sim::cp_async_queue(dst, src, 16, valid, loc);
}
inline void cp_async4(void* dst, const void* src, bool valid, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  lrx_sim::cp_async_queue(dst, src, 4, valid, loc);
}
// PTX ISA "cp.async.commit_group": close the open group (an empty group is still a group).
inline void cp_async_commit() { lrx_sim::cp_async_commit_group(); }
// PTX ISA "cp.async.wait_group" N: wait until at most N of this thread's committed groups are pending.
template <int kPending>
inline void cp_async_wait() {
  static_assert(kPending >= 0, "cp.async.wait_group takes N >= 0");
  lrx_sim::cp_async_wait_groups(kPending);
}

// PTX ISA "ldmatrix": ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (sim_runtime.cpp: ldmatrix_op).
void ldmatrix_x4_impl(uint32_t (&r)[4], const void* p, bool trans, const lrx_sim::Loc& loc);
template <bool kTrans>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  ldmatrix_x4_impl(r, p, kTrans, loc);
}

// PTX ISA, warp-level matrix instructions, "mma": mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (sim_runtime.cpp: mma_op).
void mma_m16n8k16_impl(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16,
                       const lrx_sim::Loc& loc);
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const lrx_sim::Loc& loc = lrx_sim::Loc::current()) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "mma_m16n8k16: T must be __nv_bfloat16 or __half");
  mma_m16n8k16_impl(d, a, b, std::is_same_v<T, __nv_bfloat16>, loc);
}

}  // namespace dev
}  // namespace lowrank_ext

// ---- launching a kernel on the simulator (sim_runtime.cpp) ------------------------------------------------
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace lrx_sim {
struct Buffer {  // a global-memory argument: loads through __ldg & co. and cp.async sources must hit one
  const void* p;
  size_t bytes;
};
struct LaunchStats {
  uint64_t context_switches = 0, collectives = 0, barriers = 0;
};
// Runs `kernel` (called once per simulated thread) over `grid` x `block`, blocks in an order shuffled by
// `seed`, with `dynamic_smem` bytes of dynamic shared memory. Returns "" or the error.
std::string launch(dim3 grid, dim3 block, size_t dynamic_smem, uint64_t seed, std::vector<Buffer> globals,
                   const std::function<void()>& kernel, LaunchStats* stats = nullptr);
}  // namespace lrx_sim
