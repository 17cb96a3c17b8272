#pragma once
// The second stage of the K * 2^k transform: x viewed as K x m (row-major, m = 2^k), every
// column multiplied by the K x K +-1 matrix H_K (y_i = sum_k H_K[i][k] x_k, rows as vectors).
//
// Dense, that is K^2 multiply-adds per column. Since the entries are +-1, the kernel uses sign
// tables instead (the "four Russians" idea): the K inputs are cut into groups of g; for each group
// all 2^g signed sums +-x_a +-x_b ... are built once (2^(g+1) adds), and then every output row
// adds one table entry per group, chosen by the g signs of its row: K / g adds per output instead
// of K. With g = 4 or 5 that is 3 to 4 times fewer operations than the dense product, all of them
// plain vector adds on SIMD columns of L = lanes elements ("strips").
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include <xsimd/xsimd.hpp>

#include "../config.hpp"
#include "fwht_kernel.hpp"

// See fwht_kernel.hpp: GCC 12's false "uninitialized" report inside _mm512_permutexvar_ps.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace spinquant::detail {

/// H_K (or its transpose) as the sign-table kernel reads it.
struct hadamard_mix_table {
    std::size_t order = 0;       ///< K
    unsigned group_bits = 0;     ///< g: inputs per group, 2^g table entries per group
    std::size_t groups = 0;      ///< ceil(K / g)
    std::vector<std::uint8_t> patterns;  ///< K x groups, row-major: bit t set when H[i][q g + t] = -1

    /// Table entries (in strips of L elements) the kernel needs for `groups_at_once` groups.
    [[nodiscard]] std::size_t entries(std::size_t groups_at_once) const noexcept
    {
        return groups_at_once << group_bits;
    }
};

/// The group size that minimises the work per strip: groups * 2^(g+1) table adds plus
/// K * groups output adds (g from 2 to 6, so that a pattern fits a byte and tables stay small).
[[nodiscard]] inline unsigned hadamard_mix_group_bits(std::size_t k) noexcept
{
    unsigned best = 2;
    std::size_t best_cost = ~std::size_t{0};
    for (unsigned g = 2; g <= 6; ++g) {
        const std::size_t groups = (k + g - 1) / g;
        const std::size_t cost = groups * (std::size_t{2} << g) + k * groups;
        if (cost < best_cost) {
            best_cost = cost;
            best = g;
        }
    }
    return best;
}

/// Builds the sign patterns of the K x K +-1 matrix `h` (row-major), or of its transpose.
[[nodiscard]] inline hadamard_mix_table make_hadamard_mix_table(std::span<const std::int8_t> h, std::size_t k,
                                                                bool transpose)
{
    SPINQUANT_ASSERT(h.size() == k * k);
    hadamard_mix_table t;
    t.order = k;
    t.group_bits = hadamard_mix_group_bits(k);
    t.groups = (k + t.group_bits - 1) / t.group_bits;
    t.patterns.assign(k * t.groups, 0);
    for (std::size_t i = 0; i < k; ++i)
        for (std::size_t j = 0; j < k; ++j) {
            const std::int8_t e = transpose ? h[j * k + i] : h[i * k + j];
            if (e < 0)
                t.patterns[i * t.groups + j / t.group_bits] |=
                    static_cast<std::uint8_t>(1u << (j % t.group_bits));
        }
    return t;
}

/// Workspace (elements of T) the strip kernel needs to run with `groups_at_once` groups per round:
/// one strip copy of the K inputs plus the tables.
template <class T, class Arch>
[[nodiscard]] constexpr std::size_t hadamard_mix_workspace(const hadamard_mix_table& t,
                                                           std::size_t groups_at_once) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    return (t.order + t.entries(groups_at_once)) * lanes;
}

/// Output rows done together: independent accumulators hide the add latency.
template <class Arch>
inline constexpr std::size_t hadamard_mix_rows = fwht_registers<Arch> == 32 ? 8 : 4;

/// acc[r] (+)= sum over the groups [0, count) of table[q][pattern of row r in group q].
template <class T, class Arch, std::size_t Rows>
SPINQUANT_FWHT_INLINE void hadamard_mix_accumulate(std::array<xsimd::batch<T, Arch>, Rows>& acc,
                                                   const std::uint8_t* patterns, std::size_t stride,
                                                   const T* tables, unsigned group_bits, std::size_t count) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    constexpr std::size_t lanes = batch::size;
    const std::size_t group_elements = (std::size_t{1} << group_bits) * lanes;
    for (std::size_t q = 0; q < count; ++q) {
        const T* tq = tables + q * group_elements;
        for (std::size_t r = 0; r < Rows; ++r) acc[r] += batch::load_unaligned(tq + std::size_t{patterns[r * stride + q]} * lanes);
    }
}

/// x (K x m, row-major, m a multiple of L) <- diag(out) (H x), H given by `t`, in place.
/// `work` holds at least hadamard_mix_workspace(t, 1) elements; more lets more groups share a
/// round. `out` is none, a scalar, or m*K per-element values. Allocation-free.
template <class T, class Arch>
SPINQUANT_FWHT_FLATTEN void hadamard_mix_strips(T* x, std::size_t m, const hadamard_mix_table& t, std::span<T> work,
                         const fwht_multiplier<T>& out) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    constexpr std::size_t lanes = batch::size;
    constexpr std::size_t rows_at_once = hadamard_mix_rows<Arch>;
    const std::size_t k = t.order;
    const unsigned g = t.group_bits;
    const std::size_t entries_per_group = std::size_t{1} << g;
    SPINQUANT_ASSERT((m % lanes == 0 && k % 4 == 0 && work.size() >= hadamard_mix_workspace<T, Arch>(t, 1)));
    const std::size_t round_groups =
        std::min(t.groups, (work.size() / lanes - k) / entries_per_group);  // groups per round
    T* in = work.data();                 // the strip's K inputs, L elements each
    T* tables = work.data() + k * lanes;  // round_groups tables of 2^g entries of L elements
    for (std::size_t j = 0; j < m; j += lanes) {
        for (std::size_t r = 0; r < k; ++r) batch::load_unaligned(x + r * m + j).store_unaligned(in + r * lanes);
        for (std::size_t q0 = 0; q0 < t.groups; q0 += round_groups) {
            const std::size_t count = std::min(round_groups, t.groups - q0);
            // Tables: entry p of group q is sum_b (-1)^(bit b of p) x[q g + b] (missing inputs are 0).
            for (std::size_t q = 0; q < count; ++q) {
                T* e = tables + q * entries_per_group * lanes;
                const std::size_t first = (q0 + q) * g;
                const batch a0 = batch::load_unaligned(in + first * lanes);
                a0.store_unaligned(e);
                (-a0).store_unaligned(e + lanes);
                for (unsigned b = 1; b < g; ++b) {
                    const std::size_t half = std::size_t{1} << b;
                    const batch ab = first + b < k ? batch::load_unaligned(in + (first + b) * lanes) : batch(T(0));
                    for (std::size_t p = 0; p < half; ++p) {
                        const batch v = batch::load_unaligned(e + p * lanes);
                        (v - ab).store_unaligned(e + (p + half) * lanes);
                        (v + ab).store_unaligned(e + p * lanes);
                    }
                }
            }
            const bool first_round = q0 == 0;
            const bool last_round = q0 + count == t.groups;
            const auto finish = [&](std::size_t r, batch v) {
                T* dst = x + r * m + j;
                if (last_round) {
                    if (out.kind == fwht_scale::scalar)
                        v *= batch(out.scalar);
                    else if (out.kind == fwht_scale::vector)
                        v *= batch::load_unaligned(out.values + r * m + j);
                }
                v.store_unaligned(dst);
            };
            std::size_t r = 0;
            for (; r + rows_at_once <= k; r += rows_at_once) {
                std::array<batch, rows_at_once> acc;
                for (std::size_t u = 0; u < rows_at_once; ++u)
                    acc[u] = first_round ? batch(T(0)) : batch::load_unaligned(x + (r + u) * m + j);
                hadamard_mix_accumulate<T, Arch, rows_at_once>(acc, t.patterns.data() + r * t.groups + q0, t.groups,
                                                               tables, g, count);
                for (std::size_t u = 0; u < rows_at_once; ++u) finish(r + u, acc[u]);
            }
            for (; r < k; r += 4) {  // K is a multiple of 4
                std::array<batch, 4> acc;
                for (std::size_t u = 0; u < 4; ++u)
                    acc[u] = first_round ? batch(T(0)) : batch::load_unaligned(x + (r + u) * m + j);
                hadamard_mix_accumulate<T, Arch, 4>(acc, t.patterns.data() + r * t.groups + q0, t.groups, tables, g,
                                                    count);
                for (std::size_t u = 0; u < 4; ++u) finish(r + u, acc[u]);
            }
        }
    }
}

/// The same product one column at a time, for any layout: element (r, c) of the K x m view is
/// x[(r * m + c) * step]. `h` is H_K row-major (transposed when `transpose`); `column` holds K
/// elements. Scalar and O(K^2 m): the path for strided rows, m < L, or K beyond the stack budget.
template <class T>
void hadamard_mix_columns(T* x, std::size_t m, std::size_t step, std::span<const std::int8_t> h, std::size_t k,
                          bool transpose, std::span<T> column, const fwht_multiplier<T>& out) noexcept
{
    SPINQUANT_ASSERT(column.size() >= k && h.size() == k * k);
    for (std::size_t c = 0; c < m; ++c) {
        for (std::size_t r = 0; r < k; ++r) column[r] = x[(r * m + c) * step];
        for (std::size_t i = 0; i < k; ++i) {
            T acc = T(0);
            for (std::size_t r = 0; r < k; ++r) {
                const std::int8_t e = transpose ? h[r * k + i] : h[i * k + r];
                acc = e > 0 ? acc + column[r] : acc - column[r];
            }
            if (out.kind == fwht_scale::scalar)
                acc *= out.scalar;
            else if (out.kind == fwht_scale::vector)
                acc *= out.values[i * m + c];
            x[(i * m + c) * step] = acc;
        }
    }
}

/// Unnormalised in-place FWHT of the n = 2^k elements x[0], x[step], ..., scalar (strided rows).
template <class T>
void fwht_pow2_strided(T* x, std::size_t n, std::size_t step) noexcept
{
    for (std::size_t h = 1; h < n; h *= 2)
        for (std::size_t i = 0; i < n; i += 2 * h)
            for (std::size_t j = i; j < i + h; ++j) {
                const T a = x[j * step];
                const T b = x[(j + h) * step];
                x[j * step] = a + b;
                x[(j + h) * step] = a - b;
            }
}

}  // namespace spinquant::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
