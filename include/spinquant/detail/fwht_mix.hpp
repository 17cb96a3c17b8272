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
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
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
    std::size_t lanes = 0;       ///< SIMD lanes of the kernel's Arch
    /// For output row i and group q, the offset (in elements) of the row's entry within the
    /// group's table: p * lanes, bit t of p set when H[i][q g + t] = -1. Stored by blocks of 4
    /// rows, group by group: index ((i / 4) * groups + q) * 4 + i % 4, so one step of the kernel
    /// reads 4 neighbouring offsets.
    std::vector<std::uint16_t> offsets;

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

/// Builds the table offsets of the K x K +-1 matrix `h` (row-major), or of its transpose, for a
/// kernel with `lanes` SIMD lanes. K is a multiple of 4 (every Hadamard order above 2).
[[nodiscard]] inline hadamard_mix_table make_hadamard_mix_table(std::span<const std::int8_t> h, std::size_t k,
                                                                bool transpose, std::size_t lanes)
{
    SPINQUANT_ASSERT(h.size() == k * k && k % 4 == 0);
    hadamard_mix_table t;
    t.order = k;
    t.group_bits = hadamard_mix_group_bits(k);
    t.groups = (k + t.group_bits - 1) / t.group_bits;
    t.lanes = lanes;
    SPINQUANT_ASSERT(((std::size_t{1} << t.group_bits) - 1) * lanes <= 0xFFFF);
    t.offsets.assign(k * t.groups, 0);
    for (std::size_t i = 0; i < k; ++i)
        for (std::size_t q = 0; q < t.groups; ++q) {
            std::size_t p = 0;
            for (std::size_t b = 0; b < t.group_bits && q * t.group_bits + b < k; ++b) {
                const std::size_t j = q * t.group_bits + b;
                if ((transpose ? h[j * k + i] : h[i * k + j]) < 0) p |= std::size_t{1} << b;
            }
            t.offsets[((i / 4) * t.groups + q) * 4 + i % 4] = static_cast<std::uint16_t>(p * lanes);
        }
    return t;
}

/// The most registers side by side in one strip (columns handled together): the table offsets
/// and the loop overhead are shared by them (two with 32 registers, one otherwise).
template <class Arch>
inline constexpr std::size_t hadamard_mix_strip_registers = std::is_base_of_v<xsimd::avx512f, Arch> ? 2 : 1;

/// Workspace (elements of T) the strip kernel needs with strips of `w` registers and
/// `groups_at_once` groups per round: one strip copy of the K inputs plus the tables, plus one
/// register of slack for alignment.
template <class T, class Arch>
[[nodiscard]] constexpr std::size_t hadamard_mix_workspace(const hadamard_mix_table& t, std::size_t w,
                                                           std::size_t groups_at_once) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    return (t.order + t.entries(groups_at_once)) * w * lanes + lanes;
}

/// Output rows done together: independent accumulators hide the add latency.
template <class Arch>
inline constexpr std::size_t hadamard_mix_rows = fwht_registers<Arch> == 32 ? 8 : 4;

/// acc[r][w] (+)= sum over the groups [0, count) of plane w of table q at the offset of row r, for
/// Rows = 4 B rows starting at the block whose offsets start at `offsets` (groups_total groups
/// per block, see hadamard_mix_table::offsets).
template <class T, class Arch, std::size_t Rows, std::size_t W>
SPINQUANT_FWHT_INLINE void hadamard_mix_accumulate(std::array<std::array<xsimd::batch<T, Arch>, W>, Rows>& acc,
                                                   const std::uint16_t* offsets, std::size_t groups_total,
                                                   const T* tables, std::size_t group_elements,
                                                   std::size_t count) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    static_assert(Rows % 4 == 0);
    for (std::size_t q = 0; q < count; ++q) {
        const T* tq = tables + q * group_elements;
        const std::uint16_t* oq = offsets + q * 4;
        [&]<std::size_t... R>(std::index_sequence<R...>) SPINQUANT_FWHT_LAMBDA_INLINE {
            (
                [&]() SPINQUANT_FWHT_LAMBDA_INLINE {
                    const T* e = tq + oq[(R / 4) * groups_total * 4 + R % 4];
                    for (std::size_t w = 0; w < W; ++w)
                        acc[R][w] += batch::load_unaligned(e + w * (group_elements / W));
                }(),
                ...);
        }(std::make_index_sequence<Rows>{});
    }
}

/// e[P + Half] = e[P] - a, e[P] = e[P] + a for P < Half: one doubling step of a sign table.
template <std::size_t P, std::size_t Half, class B, std::size_t N>
SPINQUANT_FWHT_INLINE void hadamard_mix_split(std::array<B, N>& e, const B& a) noexcept
{
    e[P + Half] = e[P] - a;
    e[P] = e[P] + a;
}
template <std::size_t Half, class B, std::size_t N, std::size_t... P>
SPINQUANT_FWHT_INLINE void hadamard_mix_double(std::array<B, N>& e, const B& a, std::index_sequence<P...>) noexcept
{
    (hadamard_mix_split<P, Half>(e, a), ...);
}

/// One plane (one register column) of the sign table of one group: entry p at e[p L] is
/// sum_b (-1)^(bit b of p) a_b, with a_b = in[b * in_stride] (0 for b >= valid). Built in
/// registers (the low 4 bits as 16 registers, the rest as a second small table added on), so no
/// entry is stored and reloaded.
template <unsigned G, class T, class Arch>
SPINQUANT_FWHT_INLINE void hadamard_mix_group_table(T* e, const T* in, std::size_t in_stride, std::size_t valid) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    constexpr std::size_t stride = batch::size;
    constexpr unsigned low_bits = G < 4 ? G : 4;
    const auto input = [&](unsigned b) SPINQUANT_FWHT_LAMBDA_INLINE {
        return b < valid ? batch::load_unaligned(in + b * in_stride) : batch(T(0));
    };
    std::array<batch, std::size_t{1} << low_bits> low;
    low[0] = input(0);
    low[1] = -low[0];
    if constexpr (low_bits > 1) hadamard_mix_double<2>(low, input(1), std::make_index_sequence<2>{});
    if constexpr (low_bits > 2) hadamard_mix_double<4>(low, input(2), std::make_index_sequence<4>{});
    if constexpr (low_bits > 3) hadamard_mix_double<8>(low, input(3), std::make_index_sequence<8>{});
    if constexpr (G == low_bits) {
        for (std::size_t p = 0; p < low.size(); ++p) low[p].store_unaligned(e + p * stride);
    } else {
        constexpr unsigned high_bits = G - low_bits;
        static_assert(high_bits <= 2);
        std::array<batch, std::size_t{1} << high_bits> high;
        high[0] = input(low_bits);
        high[1] = -high[0];
        if constexpr (high_bits > 1) hadamard_mix_double<2>(high, input(low_bits + 1), std::make_index_sequence<2>{});
        for (std::size_t h = 0; h < high.size(); ++h)
            for (std::size_t p = 0; p < low.size(); ++p)
                (low[p] + high[h]).store_unaligned(e + ((h << low_bits) + p) * stride);
    }
}

/// hadamard_mix_strips for group size G and strips of W registers. A group's table is W planes
/// (one per register column) of 2^G entries of L elements.
template <unsigned G, std::size_t W, class T, class Arch>
SPINQUANT_FWHT_FLATTEN void hadamard_mix_strips_g(T* x, std::size_t m, const hadamard_mix_table& t,
                                                  std::span<T> work, const fwht_multiplier<T>& out,
                                                  const fwht_window<T>& next) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    constexpr std::size_t lanes = batch::size;
    constexpr std::size_t w_regs = W;
    constexpr std::size_t strip = w_regs * lanes;
    constexpr std::size_t rows_at_once = hadamard_mix_rows<Arch>;
    constexpr std::size_t group_elements = (std::size_t{1} << G) * strip;
    const std::size_t k = t.order;
    // Tables aligned to the register size: a load that straddles two cache lines costs double.
    const auto address = reinterpret_cast<std::uintptr_t>(work.data());
    const std::size_t skip = (sizeof(batch) - address % sizeof(batch)) % sizeof(batch) / sizeof(T);
    const std::size_t usable = work.size() - skip;
    // With room for every table at once, the tables are built straight from x; otherwise the
    // strip is copied first, since outputs overwrite x between rounds.
    const bool one_round = usable >= t.groups * group_elements;
    T* copy = work.data() + skip;
    T* tables = one_round ? copy : copy + k * strip;
    const std::size_t round_groups = one_round ? t.groups : std::min(t.groups, (usable - k * strip) / group_elements);
    constexpr std::size_t line = 64 / sizeof(T);
    for (std::size_t j = 0; j < m; j += strip) {
        // The strip's share of `next` (K strip elements) goes to L2 while this strip is mixed.
        for (std::size_t p = j * k; p < (j + strip) * k && p < next.size; p += line) fwht_prefetch_l2(next.data + p);
        const T* in = x + j;  // input b of the strip: in + b * in_stride
        std::size_t in_stride = m;
        if (!one_round) {
            for (std::size_t r = 0; r < k; ++r)
                for (std::size_t w = 0; w < w_regs; ++w)
                    batch::load_unaligned(x + r * m + j + w * lanes).store_unaligned(copy + r * strip + w * lanes);
            in = copy;
            in_stride = strip;
        }
        for (std::size_t q0 = 0; q0 < t.groups; q0 += round_groups) {
            const std::size_t count = std::min(round_groups, t.groups - q0);
            for (std::size_t q = 0; q < count; ++q) {
                const std::size_t first = (q0 + q) * G;
                for (std::size_t w = 0; w < w_regs; ++w)
                    hadamard_mix_group_table<G, T, Arch>(tables + q * group_elements + w * (group_elements / W),
                                                         in + first * in_stride + w * lanes, in_stride, k - first);
            }
            const bool first_round = q0 == 0;
            const bool last_round = q0 + count == t.groups;
            const auto rows = [&]<std::size_t Rows>(std::size_t r) SPINQUANT_FWHT_LAMBDA_INLINE {
                std::array<std::array<batch, w_regs>, Rows> acc;
                for (std::size_t u = 0; u < Rows; ++u)
                    for (std::size_t w = 0; w < w_regs; ++w)
                        acc[u][w] = first_round ? batch(T(0)) : batch::load_unaligned(x + (r + u) * m + j + w * lanes);
                hadamard_mix_accumulate<T, Arch, Rows, w_regs>(acc, t.offsets.data() + (r / 4 * t.groups + q0) * 4,
                                                               t.groups, tables, group_elements, count);
                for (std::size_t u = 0; u < Rows; ++u)
                    for (std::size_t w = 0; w < w_regs; ++w) {
                        const std::size_t at = (r + u) * m + j + w * lanes;
                        batch v = acc[u][w];
                        if (last_round) {
                            if (out.kind == fwht_scale::scalar)
                                v *= batch(out.scalar);
                            else if (out.kind == fwht_scale::vector)
                                v *= batch::load_unaligned(out.values + at);
                        }
                        v.store_unaligned(x + at);
                    }
            };
            std::size_t r = 0;
            for (; r + rows_at_once <= k; r += rows_at_once) rows.template operator()<rows_at_once>(r);
            for (; r < k; r += 4) rows.template operator()<4>(r);  // K is a multiple of 4
        }
    }
}

/// Registers per strip the strip kernel uses for K x m data with `available` elements of
/// workspace: the most that divide m and fit, or 0 when the kernel cannot run (then use
/// hadamard_mix_columns).
template <class T, class Arch>
[[nodiscard]] constexpr std::size_t hadamard_mix_strip_width(const hadamard_mix_table& t, std::size_t m,
                                                             std::size_t available) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    for (std::size_t w = hadamard_mix_strip_registers<Arch>; w >= 1; w /= 2)
        if (m % (w * lanes) == 0 && available >= hadamard_mix_workspace<T, Arch>(t, w, 1)) return w;
    return 0;
}

/// x (K x m, row-major) <- diag(out) (H x), H given by `t`, in place, with strips of
/// w = hadamard_mix_strip_width(t, m, work.size()) > 0 registers. More workspace lets more groups
/// share a round (all of them: no copy of the strip). `out` is none, a scalar, or K*m
/// per-element values. `next` (the data after x, up to K*m elements) is prefetched into L2 on the
/// way. Allocation-free.
template <class T, class Arch>
void hadamard_mix_strips(T* x, std::size_t m, const hadamard_mix_table& t, std::span<T> work,
                         const fwht_multiplier<T>& out, const fwht_window<T>& next = {}) noexcept
{
    SPINQUANT_ASSERT((t.lanes == xsimd::batch<T, Arch>::size));
    const std::size_t w = hadamard_mix_strip_width<T, Arch>(t, m, work.size());
    SPINQUANT_ASSERT(w > 0);
    const auto run = [&]<std::size_t W>() {
        switch (t.group_bits) {
        case 2: hadamard_mix_strips_g<2, W, T, Arch>(x, m, t, work, out, next); break;
        case 3: hadamard_mix_strips_g<3, W, T, Arch>(x, m, t, work, out, next); break;
        case 4: hadamard_mix_strips_g<4, W, T, Arch>(x, m, t, work, out, next); break;
        case 5: hadamard_mix_strips_g<5, W, T, Arch>(x, m, t, work, out, next); break;
        default: hadamard_mix_strips_g<6, W, T, Arch>(x, m, t, work, out, next); break;
        }
    };
    if constexpr (hadamard_mix_strip_registers<Arch> >= 2)
        if (w == 2) {
            run.template operator()<2>();
            return;
        }
    run.template operator()<1>();
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
