// Whether this process may use AMX's tiles, for the kernels that do (amx_linear.cpp,
// paged_attention_amx.cpp).
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

namespace helix_amx {
namespace {

// Linux hands out AMX's tile state only to a process that asks for it (once; idempotent).
inline bool amx_permitted() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  static const bool permitted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return permitted;
}

// The CPU has AMX's bfloat16 tiles and the kernel gives them to this process.
inline bool amx_supported() {
  return __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-tile") && amx_permitted();
}

}  // namespace
}  // namespace helix_amx
