#pragma once
// Dense double references for the Walsh-Hadamard tests, written from the definitions only
// (no FWHT, no tables): entry formulas, O(n) per output, O(n^2) per vector; for powers of two
// also every output at once in O(n^1.5), by the entry formula's Kronecker factorisation.
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <stdexcept>
#include <utility>
#include <vector>

namespace spinquant::test {

/// Sylvester (natural order) entry: (-1)^popcount(i & j).
[[nodiscard]] inline int sylvester_entry(std::size_t i, std::size_t j) noexcept
{
    return (std::popcount(i & j) & 1) != 0 ? -1 : 1;
}

/// The operator of a K * 2^k transform written out: M[i][j] = H_K[i/m][j/m] H_m[i%m][j%m] s_j / d
/// (forward) or its transpose (inverse). `hk` is H_K row-major (empty for K = 1), `signs` empty or
/// n entries of +-1.
struct dense_hadamard {
    std::size_t n = 0, k = 1;
    std::vector<std::int8_t> hk;
    std::vector<double> signs;
    double divisor = 1;

    [[nodiscard]] std::size_t m() const noexcept { return n / k; }

    /// Entry (i, j) of M (forward) or of M^T (inverse).
    [[nodiscard]] double entry(std::size_t i, std::size_t j, bool inverse) const noexcept
    {
        if (inverse) std::swap(i, j);
        const std::size_t mm = m();
        double e = sylvester_entry(i % mm, j % mm);
        if (k > 1) e *= hk[(i / mm) * k + j / mm];
        if (!signs.empty()) e *= signs[j];
        return e / divisor;
    }

    /// Output i of M x (or M^T x), in double.
    template <class T>
    [[nodiscard]] double output(std::span<const T> x, std::size_t i, bool inverse) const noexcept
    {
        double acc = 0;
        for (std::size_t j = 0; j < n; ++j) acc += entry(i, j, inverse) * static_cast<double>(x[j]);
        return acc;
    }

    /// The whole of M x (or M^T x).
    template <class T>
    [[nodiscard]] std::vector<double> apply(std::span<const T> x, bool inverse) const
    {
        std::vector<double> y(n);
        for (std::size_t i = 0; i < n; ++i) y[i] = output(x, i, inverse);
        return y;
    }

    /// The same for K = 1 (n = 2^k), every output at once from the entry formula factorised: with
    /// n = a b (a = 2^(k/2)) and i = i_hi b + i_lo, (-1)^popcount(i & j) = (-1)^popcount(i_hi & j_hi)
    /// (-1)^popcount(i_lo & j_lo), so H_n x is H_a X H_b for x read as the a x b matrix X:
    /// O(n (a + b)) instead of O(n^2), which checks every output of n = 2^16 in a test.
    template <class T>
    [[nodiscard]] std::vector<double> apply_pow2(std::span<const T> x, bool inverse) const
    {
        if (k != 1 || !std::has_single_bit(n) || x.size() != n)
            throw std::logic_error("dense_hadamard::apply_pow2 needs K = 1, n a power of two and n inputs");
        const std::size_t a = std::size_t{1} << (std::countr_zero(n) / 2), b = n / a;
        const auto sign = [&](std::size_t i) { return signs.empty() ? 1.0 : signs[i]; };
        std::vector<double> in(n), half(n, 0.0), y(n, 0.0);
        for (std::size_t j = 0; j < n; ++j) in[j] = static_cast<double>(x[j]) * (inverse ? 1.0 : sign(j));
        for (std::size_t r = 0; r < a; ++r)  // half = X H_b
            for (std::size_t i = 0; i < b; ++i)
                for (std::size_t j = 0; j < b; ++j) half[r * b + i] += sylvester_entry(i, j) * in[r * b + j];
        for (std::size_t i = 0; i < a; ++i)  // y = H_a half
            for (std::size_t j = 0; j < a; ++j) {
                const int h = sylvester_entry(i, j);
                for (std::size_t c = 0; c < b; ++c) y[i * b + c] += h * half[j * b + c];
            }
        for (std::size_t i = 0; i < n; ++i) y[i] = y[i] * (inverse ? sign(i) : 1.0) / divisor;
        return y;
    }
};

/// Deterministic test data: uniform in [-1, 1) from a seeded engine (the engine's output is
/// specified by the standard; the conversion below is ours, so data is identical everywhere).
template <class T>
[[nodiscard]] std::vector<T> random_vector(std::size_t n, std::uint64_t seed)
{
    std::mt19937_64 engine(seed);
    std::vector<T> x(n);
    for (T& v : x) v = static_cast<T>(static_cast<double>(engine() >> 11) * 0x1.0p-52 - 1.0);
    return x;
}

/// A bound on the rounding error of an output of a transform that sums n terms of |x_j| through
/// additions nested at most `depth` deep in T, then scales by 1/d: each level adds at most one
/// rounding (relative eps) of a partial sum bounded by sum |x_j|, the scale and the signs one more
/// each; the factor 2 covers the reciprocal being rounded too.
template <class T>
[[nodiscard]] double transform_tolerance(double sum_abs, double divisor, double depth)
{
    const double eps = static_cast<double>(std::numeric_limits<T>::epsilon());
    return 2.0 * eps * (depth + 2.0) * sum_abs / divisor;
}

/// Nesting depth of the additions of a K * 2^k transform in any of the library's paths:
/// log2(m) for the power-of-two part, then the mix: at most 6 levels inside a sign table plus one
/// sequential add per group (fewer than K), or K sequential adds in the scalar column product.
[[nodiscard]] inline double transform_depth(std::size_t n, std::size_t k)
{
    return std::log2(static_cast<double>(n / k)) + (k > 1 ? static_cast<double>(k) + 6.0 : 0.0);
}

}  // namespace spinquant::test
