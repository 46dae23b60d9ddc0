// Argument errors, thrown as c10's typed errors (ValueError, TypeError reach Python as such) built
// from the message alone. TORCH_CHECK also captures the C++ call stack when it throws; that costs
// time on every rejected call and adds nothing to a message that already names the op and the
// argument. (On the H200 test machine every exception through the module crashed, with or without
// the capture: benchmarks/RESULTS.md.) Use these instead of TORCH_CHECK in shammie's code.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#define SHAMMIE_THROW_IF_NOT(error, cond, ...)              \
  do {                                                      \
    if (C10_UNLIKELY(!(cond))) {                            \
      throw ::c10::error(::c10::str(__VA_ARGS__));          \
    }                                                       \
  } while (false)

#define SHAMMIE_CHECK(cond, ...) SHAMMIE_THROW_IF_NOT(Error, cond, __VA_ARGS__)
#define SHAMMIE_CHECK_VALUE(cond, ...) SHAMMIE_THROW_IF_NOT(ValueError, cond, __VA_ARGS__)
#define SHAMMIE_CHECK_TYPE(cond, ...) SHAMMIE_THROW_IF_NOT(TypeError, cond, __VA_ARGS__)
