#pragma once
// Input checks shared by the public functions. Each check builds its message only on failure.
#include <cmath>
#include <cstddef>
#include <span>
#include <string>
#include <string_view>

#include "../concepts.hpp"
#include "../error.hpp"

namespace spinquant::detail {

/// Index of the first non-finite element of `x`, or x.size() when all are finite.
/// Compares bit patterns, so it keeps working under -ffast-math (where std::isfinite may be folded away).
template <class T>
[[nodiscard]] std::size_t first_non_finite(std::span<const T> x) noexcept
{
    for (std::size_t i = 0; i < x.size(); ++i) {
        const T v = x[i];
        // v - v is 0 for finite v and NaN for Inf/NaN; NaN != NaN even in IEEE mode.
        const T d = v - v;
        if (!(d == d)) return i;
    }
    return x.size();
}

/// Fails with errc::non_finite naming `where` and `what` unless every element of `x` is finite.
template <class T>
void require_finite(std::span<const T> x, std::string_view where, std::string_view what)
{
    const std::size_t i = first_non_finite(x);
    if (i != x.size())
        fail(errc::non_finite, where,
             std::string(what) + " has a non-finite value at index " + std::to_string(i));
}

/// Same for a matrix view (any strides).
template <class T>
void require_finite(matrix_view<const T> m, std::string_view where, std::string_view what)
{
    for (std::size_t i = 0; i < m.rows; ++i)
        for (std::size_t j = 0; j < m.cols; ++j) {
            const T v = m(i, j);
            const T d = v - v;
            if (!(d == d))
                fail(errc::non_finite, where,
                     std::string(what) + " has a non-finite value at (" + std::to_string(i) + ", " +
                         std::to_string(j) + ")");
        }
}

/// Fails with errc::bad_shape unless `m` is rows x cols.
template <class T>
void require_shape(matrix_view<T> m, std::size_t rows, std::size_t cols, std::string_view where, std::string_view what)
{
    if (m.rows != rows || m.cols != cols)
        fail(errc::bad_shape, where,
             std::string(what) + " is " + shape_string(m.rows, m.cols) + ", expected " + shape_string(rows, cols));
}

/// Fails with errc::bad_shape unless `v` has n elements.
inline void require_size(std::size_t got, std::size_t n, std::string_view where, std::string_view what)
{
    if (got != n)
        fail(errc::bad_shape, where,
             std::string(what) + " has " + std::to_string(got) + " elements, expected " + std::to_string(n));
}

}  // namespace spinquant::detail
