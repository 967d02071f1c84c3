// The limits a kernel library reports to Python (its `<library>_limits()` export): read once by
// minimax_m1/ops/_library.py, so that Python never copies a C++ constant.
#pragma once

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/string.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

#include "check.h"

namespace minimax_m1 {

using Limits = tvm::ffi::Map<tvm::ffi::String, tvm::ffi::Any>;

template <size_t N>
tvm::ffi::Array<int64_t> int_list(const int64_t (&values)[N]) {
  tvm::ffi::Array<int64_t> out;
  for (int64_t v : values) out.push_back(v);
  return out;
}

// Names as torch spells them ("bfloat16", ...).
template <size_t N>
tvm::ffi::Array<tvm::ffi::String> dtype_list(const Dtype (&dtypes)[N]) {
  tvm::ffi::Array<tvm::ffi::String> out;
  for (Dtype d : dtypes) out.push_back(dtype_name(d));
  return out;
}

// The library's entries plus those every library shares (row_align_bytes).
inline Limits make_limits(std::initializer_list<std::pair<const char*, tvm::ffi::Any>> entries) {
  Limits out;
  out.Set("row_align_bytes", static_cast<int64_t>(kRowAlignBytes));
  for (const auto& [key, value] : entries) out.Set(key, value);
  return out;
}

}  // namespace minimax_m1
