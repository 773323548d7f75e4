// What the kernels on AMX's tiles share (amx_linear.cpp, paged_attention_amx.cpp): the tile
// configuration's layout, and whether this process may use the tiles.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace helix_amx {
namespace {

// AMX's tile configuration (palette 1): each of the 8 tiles' rows and bytes a row (0: unused).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  void shape(int tile, int tile_rows, int row_bytes) {
    rows[tile] = static_cast<uint8_t>(tile_rows);
    colsb[tile] = static_cast<uint16_t>(row_bytes);
  }
};

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
