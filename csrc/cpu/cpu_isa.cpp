// cpu/cpu_isa.cpp — CPU feature detection and the LOWRANK_EXT_CPU_ISA override (cpu_isa.h), and the op
// cpu_isa(bool detected) -> str behind lowrank_ext.build_info()["cpu_isa"].

#include "cpu_isa.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include "lowrank_ext/check.h"

namespace lowrank_ext {
namespace cpu {
namespace {

constexpr const char* kNames[] = {"avx2", "avx512", "avx512bf16", "amx"};

CpuIsa detect() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  // __builtin_cpu_supports also checks that the OS saves the zmm state (XCR0). AMX additionally needs
  // the kernel's permission for tile data, which oneDNN requests itself before it uses AMX.
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (avx512 && __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-tile")) return CpuIsa::kAmx;
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return CpuIsa::kAvx512Bf16;
  if (avx512) return CpuIsa::kAvx512;
#endif
  return CpuIsa::kAvx2;  // the build's baseline (setup.py compiles with -mavx2 where the compiler can)
}

}  // namespace

CpuIsa detected_cpu_isa() {
  static const CpuIsa isa = detect();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) { return kNames[static_cast<int>(isa)]; }

CpuIsa cpu_isa() {
  const CpuIsa best = detected_cpu_isa();
  const char* env = std::getenv("LOWRANK_EXT_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best;
  for (int i = 0; i < 4; ++i) {
    if (std::strcmp(env, kNames[i]) != 0) continue;
    const auto forced = static_cast<CpuIsa>(i);
    LRX_CHECK(forced <= best, "cpu_isa", "LOWRANK_EXT_CPU_ISA",
              std::string("name a kernel family this CPU supports (auto, or up to ") + cpu_isa_name(best) + ")",
              env);
    return forced;
  }
  LRX_CHECK(false, "cpu_isa", "LOWRANK_EXT_CPU_ISA", "be one of auto, avx2, avx512, avx512bf16, amx", env);
  return best;
}

std::string cpu_isa_op(bool detected) { return cpu_isa_name(detected ? detected_cpu_isa() : cpu_isa()); }

}  // namespace cpu
}  // namespace lowrank_ext
