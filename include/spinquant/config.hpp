#pragma once
/// Configuration macros. Define them before the first spinquant include to override.
///
/// SPINQUANT_ASSERT(cond): checks an internal invariant (never user input, which is always
/// checked and reported with spinquant::error). Defaults to assert(), so it is off under NDEBUG;
/// an engine may route it to its own handler, as Eigen allows with eigen_assert.
#ifndef SPINQUANT_ASSERT
#include <cassert>
#define SPINQUANT_ASSERT(cond) assert(cond)
#endif

/// SPINQUANT_HAS_EXCEPTIONS is 1 when the library reports bad input by throwing
/// spinquant::error, 0 when it prints the same message to stderr and aborts (-fno-exceptions).
#ifndef SPINQUANT_HAS_EXCEPTIONS
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
#define SPINQUANT_HAS_EXCEPTIONS 1
#else
#define SPINQUANT_HAS_EXCEPTIONS 0
#endif
#endif
