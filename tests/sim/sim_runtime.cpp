// sim_runtime.cpp — the host simulator's runtime (lrx_cuda_sim.h): fibers and their scheduler, barriers,
// warp collectives (shuffles, votes, ldmatrix, mma.sync) with the PTX ISA's register layouts, cp.async groups,
// shared-memory poisoning, and the launch loop over a grid's blocks. Test-only (tests/sim/build.py).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <random>

#include "lrx_cuda_sim.h"

// Bounds of the static __shared__ variables' section (GNU ld defines __start_/__stop_ for a section whose
// name is an identifier); weak: a library whose kernels use only dynamic shared memory has no such section.
extern "C" __attribute__((weak)) unsigned char __start_lrx_shared[];
extern "C" __attribute__((weak)) unsigned char __stop_lrx_shared[];

// ---- context switch ---------------------------------------------------------------------------------------
// lrx_sim_switch(save, to): push the callee-saved registers (System V x86-64: rbx, rbp, r12-r15) and the
// SSE/x87 control words on the current stack, store the stack pointer in *save, load `to`, pop, return
// into the other fiber. Other targets fall back to ucontext (slower: a signal-mask syscall per switch).
#if defined(__x86_64__)
extern "C" void lrx_sim_switch(void** save, void* to);
asm(R"(
  .text
  .globl lrx_sim_switch
  .hidden lrx_sim_switch
  .type lrx_sim_switch, @function
lrx_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lrx_sim_switch, .-lrx_sim_switch
)");
#else
#include <ucontext.h>
#endif

namespace lrx_sim {
namespace {

constexpr size_t kStackBytes = 256 << 10;
constexpr uint64_t kCanary = 0x5AFEC0DE5AFEC0DEull;
constexpr size_t kArenaGuard = 4096;  // poisoned bytes after the dynamic shared memory: a store there is an error

enum class St : uint8_t { kReady, kBarrier, kWarp, kDone };

struct CpAsync {
  void* dst;
  const void* src;
  int bytes;
  bool valid;
};

struct Thread {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  unsigned char* stack = nullptr;
  St st = St::kReady;
  const char* wait_what = "";
  Loc wait_loc;
  dim3 idx;
  int linear = 0;
  std::vector<CpAsync> open;                  // this thread's copies not yet committed
  std::deque<std::vector<CpAsync>> committed;  // committed groups, oldest first
};

struct Warp {
  int arrived = 0, size = 32;
  const char* name = "";
  Loc loc;
  WarpOp op = nullptr;
  LaneSlot slots[32];
};

// The one launch in progress (launch() holds g_mutex; fibers all run on the caller's OS thread).
std::mutex g_mutex;
std::vector<std::unique_ptr<unsigned char[]>> g_stacks;
std::vector<Thread> g_threads;
std::vector<Warp> g_warps;
Thread* g_cur = nullptr;
int g_live = 0, g_at_barrier = 0, g_bar_or = 0, g_bar_or_result = 0;
Loc g_bar_loc;
std::string g_error;
const std::function<void()>* g_kernel = nullptr;
std::vector<Buffer> g_globals;
std::vector<unsigned char> g_arena;
size_t g_dyn_bytes = 0;
LaunchStats g_stats;
#if defined(__x86_64__)
void* g_sched_sp = nullptr;
#else
ucontext_t g_sched_ctx;
#endif

bool same_site(const Loc& a, const Loc& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

std::string site(const Loc& l) {
  const char* f = std::strrchr(l.file_name(), '/');
  return std::string(f ? f + 1 : l.file_name()) + ":" + std::to_string(l.line());
}

std::string coords(const dim3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

void to_scheduler() {  // the running fiber gives the CPU back (its state says why)
  ++g_stats.context_switches;
#if defined(__x86_64__)
  lrx_sim_switch(&g_cur->sp, g_sched_sp);
#else
  swapcontext(&g_cur->ctx, &g_sched_ctx);
#endif
}

void fiber_main() {
  (*g_kernel)();
  g_cur->st = St::kDone;
  --g_live;
  if (g_at_barrier > 0 && g_at_barrier == g_live) {  // the others wait for the live threads only
    for (Thread& t : g_threads)
      if (t.st == St::kBarrier) t.st = St::kReady;
    g_bar_or_result = g_bar_or, g_bar_or = 0, g_at_barrier = 0;
  }
  to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

void init_fiber(Thread& t) {
  std::memcpy(t.stack, &kCanary, sizeof kCanary);  // the lowest bytes: overwritten only by a stack overflow
#if defined(__x86_64__)
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(t.stack + kStackBytes) & ~uintptr_t(15));
  *--sp = 0;                                         // fiber_main's return address (never used); rsp % 16 == 8
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);   // lrx_sim_switch's `ret` enters fiber_main
  for (int i = 0; i < 6; ++i) *--sp = 0;             // rbp rbx r12 r13 r14 r15
  *--sp = (uint64_t{0x037F} << 32) | 0x1F80u;        // fpu control word | mxcsr (defaults)
  t.sp = sp;
#else
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = t.stack;
  t.ctx.uc_stack.ss_size = kStackBytes;
  t.ctx.uc_link = nullptr;
  makecontext(&t.ctx, fiber_main, 0);
#endif
}

void release_warp(Warp& w, int warp) {
  for (int l = 0; l < w.size; ++l) {
    Thread& t = g_threads[warp * 32 + l];
    if (t.st == St::kWarp) t.st = St::kReady;
  }
}

// Deadlock report: every thread that is not done, grouped by what it waits for and where.
std::string deadlock_report() {
  std::string msg = "deadlock in block " + coords(blockIdx) + ": no thread can run;";
  std::vector<std::pair<std::string, std::vector<int>>> groups;
  int done = 0;
  for (const Thread& t : g_threads) {
    if (t.st == St::kDone) {
      ++done;
      continue;
    }
    const std::string key = std::string(t.wait_what) + " at " + site(t.wait_loc);
    auto it = std::find_if(groups.begin(), groups.end(), [&](auto& g) { return g.first == key; });
    if (it == groups.end()) groups.push_back({key, {t.linear}}), it = groups.end() - 1;
    else it->second.push_back(t.linear);
  }
  for (auto& [key, ids] : groups) {
    msg += " " + std::to_string(ids.size()) + " thread(s) wait in " + key + " (first: thread " +
           std::to_string(ids[0]) + ", warp " + std::to_string(ids[0] / 32) + ");";
  }
  return msg + " " + std::to_string(done) + " thread(s) exited";
}

// Runs fiber t until it blocks or finishes; false when the launch failed (g_error) or its stack overflowed.
bool resume(Thread& t) {
  g_cur = &t;
  g_thread_idx = t.idx;
#if defined(__x86_64__)
  lrx_sim_switch(&g_sched_sp, t.sp);
#else
  swapcontext(&g_sched_ctx, &t.ctx);
#endif
  g_cur = nullptr;
  if (std::memcmp(t.stack, &kCanary, sizeof kCanary) != 0 && g_error.empty()) {
    g_error = "simulator: a fiber stack overflowed (" + std::to_string(kStackBytes) + " bytes)";
  }
  return g_error.empty();
}

}  // namespace

// ---- failures ------------------------------------------------------------------------------------------
void fail(const char* what, const Loc& loc) {
  if (g_error.empty()) {
    g_error = std::string(what) + " at " + site(loc) + " (thread " + coords(threadIdx) + " of block " +
              coords(blockIdx) + ")";
  }
  if (g_cur == nullptr) std::abort();  // not inside a launch: nothing sensible to return to
  g_cur->st = St::kDone;               // never resumed: the launch is abandoned
  to_scheduler();
  std::abort();
}

void check_mask(unsigned mask, const char* name, const Loc& loc) {
  if (mask != 0xffffffffu) fail((std::string(name) + ": the simulator supports the full-warp mask only").c_str(), loc);
}

// ---- __syncthreads / __syncthreads_or (PTX ISA "bar": bar.sync / bar.red.or, barrier 0) -------------
void barrier(const Loc& loc, int pred_in, int* pred_or_out) {
  ++g_stats.barriers;
  if (g_at_barrier == 0) {
    g_bar_loc = loc;
  } else if (!same_site(g_bar_loc, loc)) {
    fail(("divergent __syncthreads: this thread is at " + site(loc) + " while " + std::to_string(g_at_barrier) +
          " thread(s) wait at " + site(g_bar_loc))
             .c_str(),
         loc);
  }
  g_bar_or |= pred_in;
  g_cur->wait_what = "__syncthreads", g_cur->wait_loc = loc;
  if (++g_at_barrier == g_live) {
    for (Thread& t : g_threads)
      if (t.st == St::kBarrier) t.st = St::kReady;
    g_bar_or_result = g_bar_or, g_bar_or = 0, g_at_barrier = 0;
  } else {
    g_cur->st = St::kBarrier;
    to_scheduler();
  }
  if (pred_or_out != nullptr) *pred_or_out = g_bar_or_result;  // stays valid until every thread has resumed
}

// ---- warp collectives ----------------------------------------------------------------------------------
LaneSlot& my_slot() { return g_warps[g_cur->linear / 32].slots[g_cur->linear % 32]; }

void warp_collective(const char* name, WarpOp op, const Loc& loc) {
  ++g_stats.collectives;
  const int warp = g_cur->linear / 32;
  Warp& w = g_warps[warp];
  if (w.arrived == 0) {
    w.name = name, w.loc = loc, w.op = op;
  } else if (w.op != op || !same_site(w.loc, loc)) {
    fail(("warp divergence: lane " + std::to_string(g_cur->linear % 32) + " reached " + name + " at " + site(loc) +
          " while " + std::to_string(w.arrived) + " lane(s) wait in " + w.name + " at " + site(w.loc))
             .c_str(),
         loc);
  }
  g_cur->wait_what = name, g_cur->wait_loc = loc;
  if (++w.arrived == w.size) {  // the last lane computes every lane's result, then all go on
    w.op(w.slots);
    w.arrived = 0;
    release_warp(w, warp);
  } else {
    g_cur->st = St::kWarp;
    to_scheduler();
  }
}

// shfl.sync.idx (PTX ISA "shfl.sync"): lane i reads lane (src & (width-1)) of its width-lane segment.
void shfl_idx_op(LaneSlot (&l)[32]) {
  uint32_t v[32];
  for (int i = 0; i < 32; ++i) v[i] = l[i].in[0];
  for (int i = 0; i < 32; ++i) {
    const int width = static_cast<int>(l[i].in[2]), base = i & ~(width - 1);
    l[i].out[0] = v[base + (static_cast<int>(l[i].in[1]) & (width - 1))];
  }
}
// shfl.sync.bfly: lane i reads lane i ^ lane_mask (if it is inside the segment; otherwise its own value).
void shfl_xor_op(LaneSlot (&l)[32]) {
  uint32_t v[32];
  for (int i = 0; i < 32; ++i) v[i] = l[i].in[0];
  for (int i = 0; i < 32; ++i) {
    const int width = static_cast<int>(l[i].in[2]), j = i ^ static_cast<int>(l[i].in[1]);
    l[i].out[0] = ((j & ~(width - 1)) == (i & ~(width - 1))) ? v[j] : v[i];
  }
}
// shfl.sync.down: lane i reads lane i + delta if that is in its segment, else keeps its own value.
void shfl_down_op(LaneSlot (&l)[32]) {
  uint32_t v[32];
  for (int i = 0; i < 32; ++i) v[i] = l[i].in[0];
  for (int i = 0; i < 32; ++i) {
    const int width = static_cast<int>(l[i].in[2]), j = i + static_cast<int>(l[i].in[1]);
    l[i].out[0] = ((j & ~(width - 1)) == (i & ~(width - 1)) && j < 32) ? v[j] : v[i];
  }
}
// shfl.sync.up: lane i reads lane i - delta if that is in its segment, else keeps its own value.
void shfl_up_op(LaneSlot (&l)[32]) {
  uint32_t v[32];
  for (int i = 0; i < 32; ++i) v[i] = l[i].in[0];
  for (int i = 0; i < 32; ++i) {
    const int width = static_cast<int>(l[i].in[2]), j = i - static_cast<int>(l[i].in[1]);
    l[i].out[0] = (j >= (i & ~(width - 1))) ? v[j] : v[i];
  }
}
// vote.sync.all (PTX ISA "vote.sync")
void vote_all_op(LaneSlot (&l)[32]) {
  uint32_t all = 1;
  for (int i = 0; i < 32; ++i) all &= l[i].in[0];
  for (int i = 0; i < 32; ++i) l[i].out[0] = all;
}
// vote.sync.ballot: bit i = lane i's predicate (also __any_sync: ballot != 0)
void vote_ballot_op(LaneSlot (&l)[32]) {
  uint32_t bits = 0;
  for (int i = 0; i < 32; ++i) bits |= (l[i].in[0] & 1u) << i;
  for (int i = 0; i < 32; ++i) l[i].out[0] = bits;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (PTX ISA, "ldmatrix"): lanes 8i .. 8i+7 give
// the addresses of rows 0..7 of matrix i (8 b16 each, 16 contiguous bytes). Fragment: lane t's register i
// holds row t/4, columns 2(t%4) and 2(t%4)+1 of matrix i (lower column in the low half); with .trans the
// matrix is transposed first, i.e. rows 2(t%4), 2(t%4)+1 of column t/4.
template <bool kTrans>
void ldmatrix_op(LaneSlot (&l)[32]) {
  for (int i = 0; i < 4; ++i) {
    for (int t = 0; t < 32; ++t) {
      uint16_t e[2];
      for (int h = 0; h < 2; ++h) {
        const int row = kTrans ? 2 * (t % 4) + h : t / 4;
        const int col = kTrans ? t / 4 : 2 * (t % 4) + h;
        std::memcpy(&e[h], static_cast<const unsigned char*>(l[8 * i + row].ptr) + 2 * col, 2);
      }
      l[t].out[i] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
    }
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"), g = lane / 4 (groupID), q = lane % 4 (threadID_in_group):
//   A 16x16: register i (0..3) holds (row g + 8·(i%2), cols 2q + 8·(i/2) + {0,1})     [a0..a7 in pairs]
//   B 16x8:  register i (0..1) holds (rows k = 2q + 8·i + {0,1}, col g)                [b0..b3 in pairs]
//   C/D 16x8: element i (0..3) is (row g + 8·(i/2), col 2q + i%2)
// D = A·B + C. The hardware's internal order and precision of the sum are not documented; here the exact
// products are summed in double and rounded once to fp32 (the tests' tolerances allow either).
template <bool kBf16>
void mma_op(LaneSlot (&l)[32]) {
  auto elem = [](uint32_t reg, int h) -> double {
    const uint16_t v = static_cast<uint16_t>(reg >> (16 * h));
    return kBf16 ? bf16_to_f32(v) : f16_to_f32(v);
  };
  double A[16][16], B[16][8], C[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, q = t % 4;
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h) A[g + 8 * (i % 2)][2 * q + 8 * (i / 2) + h] = elem(l[t].in[i], h);
    for (int i = 0; i < 2; ++i)
      for (int h = 0; h < 2; ++h) B[2 * q + 8 * i + h][g] = elem(l[t].in[4 + i], h);
    for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * q + i % 2] = bits_f32(l[t].in[6 + i]);
  }
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, q = t % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * q + i % 2;
      double d = C[row][col];
      for (int k = 0; k < 16; ++k) d += A[row][k] * B[k][col];
      l[t].out[i] = f32_bits(static_cast<float>(d));
    }
  }
}

// ---- memory spaces -------------------------------------------------------------------------------------
unsigned char* dynamic_smem() { return g_arena.data(); }

bool is_shared(const void* p, size_t bytes) {
  auto in = [&](const unsigned char* lo, const unsigned char* hi) {
    const auto* c = static_cast<const unsigned char*>(p);
    return lo != nullptr && c >= lo && c + bytes <= hi;
  };
  return in(__start_lrx_shared, __stop_lrx_shared) || in(g_arena.data(), g_arena.data() + g_dyn_bytes);
}

bool is_global(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (const Buffer& b : g_globals) {
    const auto* lo = static_cast<const unsigned char*>(b.p);
    if (c >= lo && c + bytes <= lo + b.bytes) return true;
  }
  return false;
}

// ---- cp.async ------------------------------------------------------------------------------------------
void cp_async_queue(void* dst, const void* src, int bytes, bool valid, const Loc& loc) {
  if (!is_shared(dst, bytes)) fail("cp.async: the destination is not in shared memory", loc);
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0) fail("cp.async: the destination is not cp-size aligned", loc);
  if (valid && !is_global(src, bytes)) fail("cp.async: the source is outside every global buffer", loc);
  if (valid && reinterpret_cast<uintptr_t>(src) % bytes != 0) fail("cp.async: the source is not cp-size aligned", loc);
  g_cur->open.push_back(CpAsync{dst, src, bytes, valid});
}

void cp_async_commit_group() {
  g_cur->committed.push_back(std::move(g_cur->open));
  g_cur->open.clear();
}

void cp_async_wait_groups(int pending) {
  auto& q = g_cur->committed;
  while (static_cast<int>(q.size()) > pending) {  // retire the oldest groups: only now do the bytes land
    for (const CpAsync& c : q.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, c.bytes);
      else std::memset(c.dst, 0, c.bytes);
    }
    q.pop_front();
  }
}

// ---- launch --------------------------------------------------------------------------------------------
std::string launch(dim3 grid, dim3 block, size_t dynamic_smem, uint64_t seed, std::vector<Buffer> globals,
                   const std::function<void()>& kernel, LaunchStats* stats) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024 || nthreads % 32 != 0)
    return "launch: the block must hold a multiple of 32 threads, at most 1024; got " + std::to_string(nthreads);
  g_error.clear();
  g_stats = LaunchStats{};
  g_kernel = &kernel;
  g_globals = std::move(globals);
  g_dyn_bytes = dynamic_smem;
  g_arena.assign(dynamic_smem + kArenaGuard, 0xFF);
  while (static_cast<int>(g_stacks.size()) < nthreads) g_stacks.emplace_back(new unsigned char[kStackBytes]);
  g_grid_dim = grid, g_block_dim = block;

  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  std::mt19937_64 rng(seed);
  std::shuffle(blocks.begin(), blocks.end(), rng);  // the result must not depend on the order of the CTAs

  const size_t section = __start_lrx_shared ? static_cast<size_t>(__stop_lrx_shared - __start_lrx_shared) : 0;
  for (const dim3& b : blocks) {
    g_block_idx = b;
    if (section) std::memset(__start_lrx_shared, 0xFF, section);  // poison: reads of unwritten smem show
    std::memset(g_arena.data(), 0xFF, g_arena.size());
    g_threads.assign(nthreads, Thread{});
    g_warps.assign(nthreads / 32, Warp{});
    g_live = nthreads, g_at_barrier = 0, g_bar_or = 0, g_bar_or_result = 0;
    for (int i = 0; i < nthreads; ++i) {
      Thread& t = g_threads[i];
      t.linear = i;
      t.idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
      t.stack = g_stacks[i].get();
      init_fiber(t);
    }
    // Schedule: one warp at a time runs as far as it can (until all its lanes wait at a barrier, at a
    // collective another lane has not reached, or are done), the warps in a seeded random order, reshuffled
    // every round. A warp racing ahead of the others is what exposes a missing __syncthreads: it reads
    // shared memory the other warps have not written yet (still poisoned, or the previous tile's).
    std::vector<int> warps(nthreads / 32);
    while (g_live > 0) {
      bool ran = false;
      for (size_t w = 0; w < warps.size(); ++w) warps[w] = static_cast<int>(w);
      std::shuffle(warps.begin(), warps.end(), rng);
      for (int w : warps) {
        for (bool warp_ran = true; warp_ran;) {
          warp_ran = false;
          for (int lane = 0; lane < 32; ++lane) {
            Thread& t = g_threads[w * 32 + lane];
            if (t.st != St::kReady) continue;
            if (!resume(t)) return g_error;  // the block's other fibers are abandoned
            warp_ran = ran = true;
          }
        }
      }
      if (!ran && g_live > 0) return deadlock_report();
    }
    for (size_t i = g_dyn_bytes; i < g_arena.size(); ++i) {
      if (g_arena[i] != 0xFF) {
        return "block " + coords(b) + " wrote past its " + std::to_string(g_dyn_bytes) +
               " bytes of dynamic shared memory (byte " + std::to_string(i) + ")";
      }
    }
  }
  if (stats != nullptr) *stats = g_stats;
  return "";
}

}  // namespace lrx_sim

// ldmatrix / mma entry points of device_ops.cuh's interface (declared in lrx_cuda_sim.h).
namespace lowrank_ext {
namespace dev {

void ldmatrix_x4_impl(uint32_t (&r)[4], const void* p, bool trans, const lrx_sim::Loc& loc) {
  if (!lrx_sim::is_shared(p, 16)) lrx_sim::fail("ldmatrix: the row address is not in shared memory", loc);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) lrx_sim::fail("ldmatrix: the row address is not 16-byte aligned", loc);
  lrx_sim::my_slot().ptr = p;
  lrx_sim::warp_collective(trans ? "ldmatrix.x4.trans" : "ldmatrix.x4",
                           trans ? lrx_sim::ldmatrix_op<true> : lrx_sim::ldmatrix_op<false>, loc);
  std::memcpy(r, lrx_sim::my_slot().out, sizeof r);
}

void mma_m16n8k16_impl(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16,
                       const lrx_sim::Loc& loc) {
  lrx_sim::LaneSlot& s = lrx_sim::my_slot();
  std::memcpy(s.in, a, 16);
  std::memcpy(s.in + 4, b, 8);
  std::memcpy(s.in + 6, d, 16);
  lrx_sim::warp_collective(bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16",
                           bf16 ? lrx_sim::mma_op<true> : lrx_sim::mma_op<false>, loc);
  std::memcpy(d, lrx_sim::my_slot().out, 16);
}

}  // namespace dev
}  // namespace lowrank_ext
