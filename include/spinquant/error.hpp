#pragma once
/// spinquant::error and spinquant::errc: how every public function reports bad input.
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <string_view>

#include "config.hpp"

namespace spinquant {

/// What was wrong with the input. Every public function checks its input before writing any
/// output, so the caller's data is untouched when one of these is reported.
enum class errc {
    bad_shape,             ///< dimensions do not match, or a view is empty where it must not be
    unsupported_size,      ///< a size the operation cannot handle (e.g. no Hadamard matrix of that order)
    bits_out_of_range,     ///< quantizer bit width outside 1..16
    non_finite,            ///< NaN or Inf where a finite value is required
    bad_argument,          ///< any other option out of its documented range (clip ratio, group size, step...)
    not_positive_definite, ///< a matrix that must be positive definite is not (GPTQ Hessian)
    bad_file,              ///< a file is missing, truncated or inconsistent
};

/// Human-readable name of an errc, for messages and logs.
[[nodiscard]] constexpr std::string_view to_string(errc code) noexcept
{
    switch (code) {
    case errc::bad_shape: return "bad_shape";
    case errc::unsupported_size: return "unsupported_size";
    case errc::bits_out_of_range: return "bits_out_of_range";
    case errc::non_finite: return "non_finite";
    case errc::bad_argument: return "bad_argument";
    case errc::not_positive_definite: return "not_positive_definite";
    case errc::bad_file: return "bad_file";
    }
    return "unknown";
}

/// Thrown by every public function on bad input, before any output is written.
/// what() names the function, the argument, and what was expected versus what was given.
class error : public std::invalid_argument {
public:
    error(errc code, const std::string& what) : std::invalid_argument(what), code_(code) {}
    [[nodiscard]] errc code() const noexcept { return code_; }

private:
    errc code_;
};

namespace detail {

/// Reports bad input: throws spinquant::error, or without exceptions prints the same text and
/// aborts. Out of line and cold, so the check at the call site stays one compare and one branch.
[[noreturn, gnu::cold, gnu::noinline]] inline void fail(errc code, std::string_view where, std::string_view why)
{
    std::string msg = "spinquant::";
    msg.append(where).append(": ").append(why);
#if SPINQUANT_HAS_EXCEPTIONS
    throw error(code, msg);
#else
    (void)code;
    std::fprintf(stderr, "%s\n", msg.c_str());
    std::fflush(stderr);
    std::abort();
#endif
}

}  // namespace detail
}  // namespace spinquant
