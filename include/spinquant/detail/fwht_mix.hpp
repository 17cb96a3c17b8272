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
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
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
        // The 4 offsets of a block of rows in one 64-bit load: the table loads keep the load
        // ports busy enough.
        std::array<std::uint64_t, Rows / 4> packed;
        for (std::size_t b = 0; b < Rows / 4; ++b)
            std::memcpy(&packed[b], oq + b * groups_total * 4, sizeof(std::uint64_t));
        [&]<std::size_t... R>(std::index_sequence<R...>) SPINQUANT_FWHT_LAMBDA_INLINE {
            (
                [&]() SPINQUANT_FWHT_LAMBDA_INLINE {
                    const T* e = tq + ((packed[R / 4] >> (16 * (R % 4))) & 0xFFFF);
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
/// workspace: the most (up to `most`) that divide m and fit, or 0 when the kernel cannot run
/// (then use hadamard_mix_columns).
template <class T, class Arch>
[[nodiscard]] constexpr std::size_t hadamard_mix_strip_width(
    const hadamard_mix_table& t, std::size_t m, std::size_t available,
    std::size_t most = hadamard_mix_strip_registers<Arch>) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    for (std::size_t w = std::min(most, hadamard_mix_strip_registers<Arch>); w >= 1; w /= 2)
        if (m % (w * lanes) == 0 && available >= hadamard_mix_workspace<T, Arch>(t, w, 1)) return w;
    return 0;
}

/// x (K x m, row-major) <- diag(out) (H x), H given by `t`, in place, with strips of
/// w = hadamard_mix_strip_width(t, m, work.size(), most) > 0 registers. More workspace lets more
/// groups share a round (all of them: no copy of the strip). `out` is none, a scalar, or K*m
/// per-element values. `next` (the data after x, up to K*m elements) is prefetched into L2 on the
/// way. Allocation-free.
template <class T, class Arch>
void hadamard_mix_strips(T* x, std::size_t m, const hadamard_mix_table& t, std::span<T> work,
                         const fwht_multiplier<T>& out, const fwht_window<T>& next = {},
                         std::size_t most = hadamard_mix_strip_registers<Arch>) noexcept
{
    SPINQUANT_ASSERT((t.lanes == xsimd::batch<T, Arch>::size));
    const std::size_t w = hadamard_mix_strip_width<T, Arch>(t, m, work.size(), most);
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

// ---------------------------------------------------------------------------------------------
// Short rows (m < L): the lanes run across rows
//
// When the power-of-two part m of a row is shorter than a register, a row has no strip for the
// kernel above. Blocks of R rows are then moved into a small "tile" in which every lane belongs
// to one row: register (c_hi, b) of a block holds, for each of its R rows, the w consecutive
// columns b m + c_hi w, ..., b m + c_hi w + w - 1. Where registers can permute their lanes
// (xsimd::swizzle), w = m and R = L / m, so the m-point transforms run inside each register;
// elsewhere w = 1 and R = L, and they run between registers. Up to 8 blocks sit side by side,
// so that for each c_hi the tile is a K x (blocks L) row-major matrix whose columns are
// independent vectors: exactly the input of the strip kernel above, which then mixes all the
// blocks in one call. The moves between rows and tile are register transposes (R x R blocks of
// w elements) for contiguous rows (of overlapping rows for packed rows shorter than a register),
// element copies for any other layout and a last partial block. A single vector with m = 1 has
// its own scalar sign-table kernel (hadamard_mix_vector, below), as its tile would be one lane.

/// w: columns of one row side by side in a register of the tile kernel (m < L).
template <class T, class Arch>
[[nodiscard]] constexpr std::size_t hadamard_tile_width(std::size_t m) noexcept
{
    return fwht_lane_method_for<T, Arch> == fwht_lane_method::swizzle ? m : 1;
}

/// R = L / w: rows of one block of the tile (m < L).
template <class T, class Arch>
[[nodiscard]] constexpr std::size_t hadamard_tile_rows(std::size_t m) noexcept
{
    return xsimd::batch<T, Arch>::size / hadamard_tile_width<T, Arch>(m);
}

/// Blocks side by side in a full tile for n = K m: as many as keep the tile within 4096
/// elements (the mix's per-call cost is then spread over them), a power of two, at most 8.
template <class T, class Arch>
[[nodiscard]] constexpr std::size_t hadamard_tile_blocks(std::size_t k, std::size_t m) noexcept
{
    const std::size_t block = hadamard_tile_rows<T, Arch>(m) * k * m;
    std::size_t blocks = 1;
    while (blocks < 8 && 2 * blocks * block <= 4096) blocks *= 2;
    return blocks;
}

/// Offset in the tile of the register that holds column j (a multiple of w) of block `blk`, in
/// a tile of `blocks` blocks.
template <class T, class Arch>
[[nodiscard]] SPINQUANT_FWHT_INLINE std::size_t hadamard_tile_register(std::size_t j, std::size_t k, std::size_t m,
                                                                       std::size_t blocks, std::size_t blk) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    const auto shift = static_cast<unsigned>(std::countr_zero(m));
    const auto w_shift = static_cast<unsigned>(std::countr_zero(hadamard_tile_width<T, Arch>(m)));
    return ((((j & (m - 1)) >> w_shift) * k + (j >> shift)) * blocks + blk) * lanes;
}

/// The registers of the R consecutive groups of w = L / R columns from j0 on (j0 a multiple of
/// w), as offsets into the tile.
template <class T, class Arch, std::size_t R>
[[nodiscard]] SPINQUANT_FWHT_INLINE std::array<std::size_t, R> hadamard_tile_registers(std::size_t j0, std::size_t k,
                                                                                       std::size_t m,
                                                                                       std::size_t blocks,
                                                                                       std::size_t blk) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    constexpr std::size_t w = lanes / R;
    const auto shift = static_cast<unsigned>(std::countr_zero(m));
    std::array<std::size_t, R> at;
    for (std::size_t p = 0; p < R; ++p) {
        const std::size_t j = j0 + p * w;
        at[p] = ((((j & (m - 1)) / w) * k + (j >> shift)) * blocks + blk) * lanes;
    }
    return at;
}

/// Elements per block for the spilled registers of hadamard_tile_move_short (0 unless n < L).
template <class T, class Arch>
[[nodiscard]] constexpr std::size_t hadamard_tile_spill(std::size_t k, std::size_t m) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    const std::size_t n = k * m, w = hadamard_tile_width<T, Arch>(m);
    return n < lanes && n > w ? (lanes - n) / w * lanes : 0;
}

/// Workspace (elements of T) of hadamard_tile_rows for n = K m, m < L: a full tile, alignment
/// slack, and the strip kernel's share for strips of `registers` registers with
/// `groups_at_once` groups per round (`t` null: K = 1, no mix).
template <class T, class Arch>
[[nodiscard]] constexpr std::size_t hadamard_tile_workspace(const hadamard_mix_table* t, std::size_t m,
                                                            std::size_t groups_at_once,
                                                            std::size_t registers = 1) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    const std::size_t k = t != nullptr ? t->order : 1;
    const std::size_t blocks = hadamard_tile_blocks<T, Arch>(k, m);
    const std::size_t block = hadamard_tile_rows<T, Arch>(m) * k * m + hadamard_tile_spill<T, Arch>(k, m);
    const std::size_t tile = blocks * block + lanes;
    return t != nullptr ? tile + hadamard_mix_workspace<T, Arch>(*t, registers, groups_at_once) : tile;
}

/// Strip registers of the mix with a full tile and plenty of workspace (for workspace sizes).
template <class T, class Arch>
[[nodiscard]] constexpr std::size_t hadamard_tile_strip_registers(std::size_t k, std::size_t m) noexcept
{
    return hadamard_tile_blocks<T, Arch>(k, m) % 2 == 0 ? hadamard_mix_strip_registers<Arch> : 1;
}

/// A per-element multiplier `values` (n = K m entries, e.g. scaled signs) laid out as one block
/// of the tile: entry (c_hi K + b) L + q w + c_lo = values[b m + c_hi w + c_lo] for every row q.
/// Allocates R n elements (plan construction).
template <class T, class Arch>
[[nodiscard]] std::vector<T> hadamard_tile_multiplier(std::span<const T> values, std::size_t k, std::size_t m)
{
    const std::size_t w = hadamard_tile_width<T, Arch>(m);
    const std::size_t tile_rows = hadamard_tile_rows<T, Arch>(m);
    std::vector<T> tiled(tile_rows * values.size());
    for (std::size_t j = 0; j < values.size(); ++j)
        for (std::size_t q = 0; q < tile_rows; ++q)
            tiled[hadamard_tile_register<T, Arch>(j - j % w, k, m, 1, 0) + q * w + j % w] = values[j];
    return tiled;
}

/// Swaps lane bit D of a and b with the register bit: the lanes of `a` with bit D set trade
/// places with the lanes of `b` with it clear (one permutation, three blends).
// The helpers of the tile kernel that call xsimd are plain inline, not always_inline: GCC orders
// its early inlining by the call graph but skips the edges from always_inline functions to
// others, so xsimd's functions would not be ready to inline in time, and the flattened kernels
// would call them out of line once the unit's inlining budget is spent (seen with GCC 12).
template <std::size_t D, class T, class Arch>
inline void hadamard_tile_exchange(xsimd::batch<T, Arch>& a, xsimd::batch<T, Arch>& b) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    using index = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    const auto upper = batch::load_unaligned(fwht_lane_signs<T, batch::size, D>.data()) < batch(T(0));
    const batch crossing = xsimd::select(upper, a, b);  // the halves that change register
    const batch moved =
        xsimd::swizzle(crossing, xsimd::make_batch_constant<xsimd::batch<index, Arch>, fwht_partner_lane<D>>());
    a = xsimd::select(upper, moved, a);
    b = xsimd::select(upper, b, moved);
}

/// One round of exchanges: registers Dist apart, lane distance Dist L / R.
template <std::size_t Dist, std::size_t R, class T, class Arch, std::size_t... I>
inline void hadamard_tile_round(std::array<xsimd::batch<T, Arch>, R>& v, std::index_sequence<I...>) noexcept
{
    constexpr std::size_t lane_distance = Dist * (xsimd::batch<T, Arch>::size / R);
    (hadamard_tile_exchange<lane_distance, T, Arch>(v[(I / Dist) * 2 * Dist + I % Dist],
                                                    v[(I / Dist) * 2 * Dist + I % Dist + Dist]),
     ...);
}

/// The rounds of exchanges between registers Dist, 2 Dist, ..., R / 2 apart.
template <std::size_t Dist, std::size_t R, class T, class Arch>
inline void hadamard_tile_exchanges(std::array<xsimd::batch<T, Arch>, R>& v) noexcept
{
    if constexpr (Dist < R) {
        hadamard_tile_round<Dist, R, T, Arch>(v, std::make_index_sequence<R / 2>{});
        hadamard_tile_exchanges<2 * Dist, R, T, Arch>(v);
    }
}

/// Transposes R registers seen as R x R blocks of w = L / R lanes: block p of register q goes to
/// block q of register p. Its own inverse. Zip archs (w = 1, R = L): log2(L) rounds of zip_lo /
/// zip_hi over the register pairs (i, i + L/2); each round rotates the register and lane index
/// bits by one place (as in fwht_pair_zip), so after log2(L) rounds they have traded places.
template <class T, class Arch, std::size_t R>
inline void hadamard_tile_transpose(std::array<xsimd::batch<T, Arch>, R>& v) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    if constexpr (fwht_lane_method_for<T, Arch> == fwht_lane_method::zip) {
        static_assert(R == batch::size);
        for (std::size_t round = 1; round < R; round *= 2) {
            std::array<batch, R> z;
            for (std::size_t i = 0; i < R / 2; ++i) {
                z[2 * i] = xsimd::zip_lo(v[i], v[i + R / 2]);
                z[2 * i + 1] = xsimd::zip_hi(v[i], v[i + R / 2]);
            }
            v = z;
        }
    } else {
        hadamard_tile_exchanges<1, R, T, Arch>(v);
    }
}

/// One multiplier (none, scalar, or tile-layout vector at `at`) on a register.
template <class T, class Arch>
inline xsimd::batch<T, Arch> hadamard_tile_scale(const xsimd::batch<T, Arch>& v,
                                                                const fwht_multiplier<T>& f, std::size_t at) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    if (f.kind == fwht_scale::scalar) return v * batch(f.scalar);
    if (f.kind == fwht_scale::vector) return v * batch::load_unaligned(f.values + at);
    return v;
}

/// H_w on the w-lane groups of one register: the lane stages at distances H, ..., w/2 (as
/// fwht_lane_stage).
template <std::size_t H, class T, class Arch>
inline void hadamard_tile_lane_stages(xsimd::batch<T, Arch>& v, std::size_t w) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    if constexpr (fwht_lane_method_for<T, Arch> == fwht_lane_method::swizzle && H < batch::size) {
        if (H < w) {
            using index = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
            const batch partner =
                xsimd::swizzle(v, xsimd::make_batch_constant<xsimd::batch<index, Arch>, fwht_partner_lane<H>>());
            v = xsimd::fma(v, batch::load_unaligned(fwht_lane_signs<T, batch::size, H>.data()), partner);
            hadamard_tile_lane_stages<2 * H, T, Arch>(v, w);
        }
    }
}

/// Moves the L columns from j0 on of R contiguous rows (row q at block + q * row_stride) into
/// block `blk` of the tile (Load) or back (!Load): R loads, a register transpose, R stores.
/// Loading, each register then gets `in` (tile layout) and, with w > 1, H_w: the whole m-point
/// transform when m = w.
template <class T, class Arch, std::size_t R, bool Load>
SPINQUANT_FWHT_FLATTEN void hadamard_tile_move_columns(T* block, std::size_t row_stride, T* tile, std::size_t j0,
                                                       std::size_t k, std::size_t m, std::size_t blocks,
                                                       std::size_t blk, const fwht_multiplier<T>& in) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    // Register p of the tile: columns j0 + p w ... of every row.
    const std::array<std::size_t, R> at = hadamard_tile_registers<T, Arch, R>(j0, k, m, blocks, blk);
    std::array<batch, R> v;
    // Fold expressions: the registers stay registers.
    [&]<std::size_t... I>(std::index_sequence<I...>) {
        if constexpr (Load) {
            ((v[I] = batch::load_unaligned(block + I * row_stride + j0)), ...);
            hadamard_tile_transpose<T, Arch, R>(v);
            const std::array<std::size_t, R> factor = hadamard_tile_registers<T, Arch, R>(j0, k, m, 1, 0);
            ((v[I] = hadamard_tile_scale<T, Arch>(v[I], in, factor[I])), ...);
            (hadamard_tile_lane_stages<1, T, Arch>(v[I], batch::size / R), ...);
            (v[I].store_unaligned(tile + at[I]), ...);
        } else {
            ((v[I] = batch::load_unaligned(tile + at[I])), ...);
            hadamard_tile_transpose<T, Arch, R>(v);
            (v[I].store_unaligned(block + I * row_stride + j0), ...);
        }
    }(std::make_index_sequence<R>{});
}

/// Moves R full contiguous rows (n = K m >= L columns) into block `blk` of the tile (Load, with
/// `in` and H_w as hadamard_tile_move_columns) or back (!Load), L columns at a time.
template <class T, class Arch, std::size_t R, bool Load>
void hadamard_tile_move(T* block, std::size_t row_stride, T* tile, std::size_t k, std::size_t m, std::size_t blocks,
                        std::size_t blk, const fwht_multiplier<T>& in) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    const std::size_t n = k * m;
    SPINQUANT_ASSERT(n >= lanes);
    std::size_t j0 = 0;
    for (; j0 + lanes <= n; j0 += lanes)
        hadamard_tile_move_columns<T, Arch, R, Load>(block, row_stride, tile, j0, k, m, blocks, blk, in);
    // The last L columns again, overlapping the ones before (n - L is a multiple of w): the tile
    // gets the same values twice on the way in, the rows the same final values on the way out.
    if (j0 < n)
        hadamard_tile_move_columns<T, Arch, R, Load>(block, row_stride, tile, n - lanes, k, m, blocks, blk, in);
}

/// Rows shorter than a register (n < L <= 2 n), packed (row q at block + q n), into block `blk`
/// of the tile (Load) or back (!Load): row q is loaded and stored as the L elements from its
/// start on, i.e. with the first L - n elements of row q + 1. Their registers go to `spill` and
/// come back untouched, and the rows are stored in order, so each row's spill is overwritten by
/// the row it belongs to. The last row overlaps the next block's first row (rewritten with its
/// values as they are) unless `last`, where it goes through a small buffer instead. Loading
/// applies `in` and H_w as hadamard_tile_move_columns.
template <class T, class Arch, std::size_t R, bool Load>
SPINQUANT_FWHT_FLATTEN void hadamard_tile_move_short(T* block, T* tile, T* spill, std::size_t k, std::size_t m,
                                                     std::size_t blocks, std::size_t blk, bool last,
                                                     const fwht_multiplier<T>& in) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    constexpr std::size_t lanes = batch::size;
    constexpr std::size_t w = lanes / R;
    const std::size_t n = k * m;
    const std::size_t inside = n / w;  // registers of real columns; the others spill
    const std::array<std::size_t, R> offsets = hadamard_tile_registers<T, Arch, R>(0, k, m, blocks, blk);
    std::array<T*, R> at;
    for (std::size_t p = 0; p < R; ++p) at[p] = p < inside ? tile + offsets[p] : spill + (p - inside) * lanes;
    std::array<batch, R> v;
    T* final_row = block + (R - 1) * n;
    std::array<T, lanes> buffer{};
    [&]<std::size_t... I>(std::index_sequence<I...>) {
        if constexpr (Load) {
            ((v[I] = batch::load_unaligned(block + I * n)), ...);  // rows 0 .. R - 2
            if (last) {
                for (std::size_t j = 0; j < n; ++j) buffer[j] = final_row[j];
                v[R - 1] = batch::load_unaligned(buffer.data());
            } else {
                v[R - 1] = batch::load_unaligned(final_row);
            }
            hadamard_tile_transpose<T, Arch, R>(v);
            const std::array<std::size_t, R> factor = hadamard_tile_registers<T, Arch, R>(0, k, m, 1, 0);
            const auto finish = [&](batch& r, std::size_t p) {  // the spill stays as it is
                if (p < inside) {
                    r = hadamard_tile_scale<T, Arch>(r, in, factor[p]);
                    hadamard_tile_lane_stages<1, T, Arch>(r, w);
                }
            };
            (finish(v[I], I), ...);
            finish(v[R - 1], R - 1);
            ((v[I].store_unaligned(at[I])), ...);
            v[R - 1].store_unaligned(at[R - 1]);
        } else {
            ((v[I] = batch::load_unaligned(at[I])), ...);
            v[R - 1] = batch::load_unaligned(at[R - 1]);
            hadamard_tile_transpose<T, Arch, R>(v);
            (v[I].store_unaligned(block + I * n), ...);  // in order: each row mends the spill of the one before
            if (last) {
                v[R - 1].store_unaligned(buffer.data());
                for (std::size_t j = 0; j < n; ++j) final_row[j] = buffer[j];
            } else {
                v[R - 1].store_unaligned(final_row);
            }
        }
    }(std::make_index_sequence<R - 1>{});
}

/// The same for the first `valid` <= R rows in any layout (element (q, j) at block[q *
/// row_stride + j * col_stride]), element by element; loading fills the tile rows from `valid`
/// on with zeros.
template <class T, class Arch, bool Load>
void hadamard_tile_copy(T* block, std::size_t valid, std::size_t row_stride, std::size_t col_stride, T* tile,
                        std::size_t k, std::size_t m, std::size_t blocks, std::size_t blk) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    constexpr std::size_t lanes = batch::size;
    const std::size_t w = hadamard_tile_width<T, Arch>(m);
    if (Load && valid < lanes / w)
        for (std::size_t r = 0; r < (m / w) * k; ++r) batch(T(0)).store_unaligned(tile + (r * blocks + blk) * lanes);
    for (std::size_t q = 0; q < valid; ++q) {
        T* x = block + q * row_stride;
        std::size_t j = 0;  // column b m + c_hi w + c_lo, in order
        for (std::size_t b = 0; b < k; ++b)
            for (std::size_t c_hi = 0; c_hi < m / w; ++c_hi) {
                T* e = tile + ((c_hi * k + b) * blocks + blk) * lanes + q * w;
                for (std::size_t c_lo = 0; c_lo < w; ++c_lo, ++j) {
                    if constexpr (Load)
                        e[c_lo] = x[j * col_stride];
                    else
                        x[j * col_stride] = e[c_lo];
                }
            }
    }
}

/// The m-point transforms of every row in blocks [first, last) of the tile (`blocks` blocks),
/// with `in` before and `out` after them (multipliers in the layout of
/// hadamard_tile_multiplier): per b and block,
/// the C = m / w registers (c_hi, b) hold the block's K x m column b; H_w inside each register,
/// H_C between them. With w = 1 and C = 1 (k then counting all registers), only the multipliers.
template <class T, class Arch, std::size_t C>
SPINQUANT_FWHT_FLATTEN void hadamard_tile_transform(T* tile, std::size_t k, std::size_t w, std::size_t blocks,
                                                    std::size_t first, std::size_t last, const fwht_multiplier<T>& in,
                                                    const fwht_multiplier<T>& out) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    constexpr std::size_t lanes = batch::size;
    for (std::size_t b = 0; b < k; ++b)
        for (std::size_t blk = first; blk < last; ++blk) {
            std::array<batch, C> v;
            for (std::size_t c = 0; c < C; ++c) {
                const std::size_t at = ((c * k + b) * blocks + blk) * lanes;
                v[c] = hadamard_tile_scale<T, Arch>(batch::load_unaligned(tile + at), in, (c * k + b) * lanes);
                hadamard_tile_lane_stages<1, T, Arch>(v[c], w);
            }
            fwht_register_network<1, C>(v);
            for (std::size_t c = 0; c < C; ++c) {
                const std::size_t at = ((c * k + b) * blocks + blk) * lanes;
                hadamard_tile_scale<T, Arch>(v[c], out, (c * k + b) * lanes).store_unaligned(tile + at);
            }
        }
}

/// Every row of a rows x n matrix (n = K m, m < L a power of two; element (r, j) at
/// data[r * row_stride + j * col_stride]) <- diag(out) (H (x) H_m) diag(in) row, H given by `t`
/// (null: K = 1, no mix). `in` and `out` are none, a scalar or a vector in the layout of
/// hadamard_tile_multiplier. Needs at least hadamard_tile_workspace(t, m, 1) elements of `work`;
/// more lets the mix take more groups per round (and strips of two registers). Contiguous rows
/// take register transposes; a last partial block and any other layout are copied element by
/// element (rows of n < L elements too). Allocation-free.
template <class T, class Arch>
void hadamard_tile_rows(T* data, std::size_t rows, std::size_t row_stride, std::size_t col_stride, std::size_t m,
                        const hadamard_mix_table* t, std::span<T> work, const fwht_multiplier<T>& in,
                        const fwht_multiplier<T>& out) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    constexpr std::size_t lanes = batch::size;
    constexpr auto method = fwht_lane_method_for<T, Arch>;
    SPINQUANT_ASSERT((m < lanes && std::has_single_bit(m) && m / hadamard_tile_width<T, Arch>(m) <= 8));
    SPINQUANT_ASSERT((work.size() >= hadamard_tile_workspace<T, Arch>(t, m, 1)));
    const std::size_t k = t != nullptr ? t->order : 1;
    const std::size_t w = hadamard_tile_width<T, Arch>(m);
    const std::size_t tile_rows = lanes / w;
    const std::size_t n = k * m;
    const std::size_t full_blocks = hadamard_tile_blocks<T, Arch>(k, m);
    const auto address = reinterpret_cast<std::uintptr_t>(work.data());
    const std::size_t skip = (sizeof(batch) - address % sizeof(batch)) % sizeof(batch) / sizeof(T);
    T* tile = work.data() + skip;
    T* spill = tile + full_blocks * tile_rows * n;
    const std::span<T> rest = work.subspan(skip + full_blocks * (tile_rows * n + hadamard_tile_spill<T, Arch>(k, m)));
    // With no mix, `out` comes right after the m-point transforms; else after the mix. With a mix
    // and m = w, the moves apply `in` and do the m-point transforms on the way (no extra pass).
    const fwht_multiplier<T> after_transform = t != nullptr ? fwht_multiplier<T>{} : out;
    const bool on_the_way = t != nullptr && m == w;
    // How a block of R rows (all of them there) moves: register transposes of L columns at a time
    // (n >= L), one register as it is (packed rows, n = w, so the block is one register in the
    // tile's layout), transposes of overlapping rows (packed, L <= 2 n), else element copies.
    enum class way { columns, whole, overlapping, copy };
    const way by_registers = [&] {
        if (method == fwht_lane_method::scalar || col_stride != 1) return way::copy;
        if (n >= lanes) return way::columns;
        if (row_stride != n) return way::copy;
        if (n == w) return way::whole;
        return 2 * n >= lanes ? way::overlapping : way::copy;
    }();
    const auto move = [&]<bool Load>(std::size_t first, std::size_t blocks, std::size_t blk, way by) {
        T* block = data + first * row_stride;
        // Loading with a mix and m = w: `in` and the m-point transforms on the way.
        const fwht_multiplier<T> with = on_the_way ? in : fwht_multiplier<T>{};
        if (by == way::whole) {  // K = 1: no mix, so no multiplier either
            T* e = tile + blk * lanes;
            if constexpr (Load)
                batch::load_unaligned(block).store_unaligned(e);
            else
                batch::load_unaligned(e).store_unaligned(block);
            return;
        }
        T* spilled = spill + blk * hadamard_tile_spill<T, Arch>(k, m);
        const auto run = [&]<std::size_t R>() {
            if (by == way::columns)
                hadamard_tile_move<T, Arch, R, Load>(block, row_stride, tile, k, m, blocks, blk, with);
            else
                hadamard_tile_move_short<T, Arch, R, Load>(block, tile, spilled, k, m, blocks, blk,
                                                           first + tile_rows == rows, with);
        };
        if constexpr (method == fwht_lane_method::zip) {
            run.template operator()<lanes>();  // w = 1, R = L
        } else if constexpr (method == fwht_lane_method::swizzle) {
            switch (tile_rows) {
            case 2: run.template operator()<2>(); break;
            case 4: run.template operator()<4>(); break;
            case 8:
                if constexpr (lanes >= 8) run.template operator()<8>();
                break;
            default:
                if constexpr (lanes >= 16) run.template operator()<16>();
                break;
            }
        }
    };
    const auto transform = [&](std::size_t blocks, std::size_t first_blk, std::size_t last_blk) {
        const auto run = [&]<std::size_t C>() {
            hadamard_tile_transform<T, Arch, C>(tile, k, w, blocks, first_blk, last_blk, in, after_transform);
        };
        switch (m / w) {
        case 1: run.template operator()<1>(); break;
        case 2: run.template operator()<2>(); break;
        case 4: run.template operator()<4>(); break;
        default: run.template operator()<8>(); break;
        }
    };
    for (std::size_t r0 = 0; r0 < rows; r0 += full_blocks * tile_rows) {
        // The last tile has only as many blocks as it has rows for.
        const std::size_t blocks = std::min(full_blocks, (rows - r0 + tile_rows - 1) / tile_rows);
        for (std::size_t blk = 0; blk < blocks; ++blk) {
            const std::size_t first = r0 + blk * tile_rows;
            const std::size_t valid = std::min(tile_rows, rows - first);
            const way by = valid == tile_rows ? by_registers : way::copy;
            if (by != way::copy) {
                move.template operator()<true>(first, blocks, blk, by);
                if (!on_the_way) transform(blocks, blk, blk + 1);
            } else {
                hadamard_tile_copy<T, Arch, true>(data + first * row_stride, valid, row_stride, col_stride, tile, k, m,
                                                  blocks, blk);
                transform(blocks, blk, blk + 1);
            }
        }
        if (t != nullptr) {
            // Strips of two registers when there is room for at most two rounds of them.
            const std::size_t most =
                blocks % 2 == 0 && rest.size() >= hadamard_mix_workspace<T, Arch>(*t, 2, (t->groups + 1) / 2) ? 2 : 1;
            for (std::size_t c = 0; c < m / w; ++c)
                hadamard_mix_strips<T, Arch>(tile + c * k * blocks * lanes, blocks * lanes, *t, rest, {}, {}, most);
            if (out.kind != fwht_scale::none)
                hadamard_tile_transform<T, Arch, 1>(tile, (m / w) * k, 1, blocks, 0, blocks, out, {});
        }
        for (std::size_t blk = 0; blk < blocks; ++blk) {
            const std::size_t first = r0 + blk * tile_rows;
            const std::size_t valid = std::min(tile_rows, rows - first);
            const way by = valid == tile_rows ? by_registers : way::copy;
            if (by != way::copy)
                move.template operator()<false>(first, blocks, blk, by);
            else
                hadamard_tile_copy<T, Arch, false>(data + first * row_stride, valid, row_stride, col_stride, tile, k,
                                                   m, blocks, blk);
        }
    }
}

/// Elements of workspace hadamard_mix_vector needs: the sign tables of all groups, in scalars.
[[nodiscard]] inline std::size_t hadamard_mix_vector_workspace(const hadamard_mix_table& t) noexcept
{
    return t.groups << t.group_bits;
}

/// x (K elements, one vector with m = 1) <- diag(out) (H x), H given by `t`, with the sign
/// tables in scalars: every group's 2^g signed sums, then K / g table entries per output. For a
/// single short vector, where a register's lanes would have nothing else to do. `out` is none, a
/// scalar or K values. Allocation-free.
template <class T, class Arch>
void hadamard_mix_vector(T* x, const hadamard_mix_table& t, std::span<T> work, const fwht_multiplier<T>& out) noexcept
{
    const std::size_t k = t.order;
    const std::size_t entries = std::size_t{1} << t.group_bits;
    SPINQUANT_ASSERT(work.size() >= hadamard_mix_vector_workspace(t));
    for (std::size_t q = 0; q < t.groups; ++q) {
        // Entry p: sum over b of (-1)^(bit b of p) x[q g + b], doubled one input at a time.
        T* e = work.data() + q * entries;
        const std::size_t first = q * t.group_bits;
        e[0] = x[first];
        e[1] = -x[first];
        for (std::size_t b = 1; b < t.group_bits; ++b) {
            const T a = first + b < k ? x[first + b] : T(0);
            const std::size_t half = std::size_t{1} << b;
            for (std::size_t p = 0; p < half; ++p) {
                e[p + half] = e[p] - a;
                e[p] = e[p] + a;
            }
        }
    }
    const auto shift = static_cast<unsigned>(std::countr_zero(t.lanes));  // offsets are p * lanes
    for (std::size_t i0 = 0; i0 < k; i0 += 4) {
        // 4 outputs, each as two partial sums (even and odd groups): 8 independent chains of
        // adds, in named variables so that they stay in registers.
        T a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
        const std::uint16_t* o = t.offsets.data() + (i0 / 4) * t.groups * 4;
        const T* e = work.data();
        std::size_t q = 0;
        for (; q + 2 <= t.groups; q += 2, o += 8, e += 2 * entries) {
            a0 += e[o[0] >> shift];
            a1 += e[o[1] >> shift];
            a2 += e[o[2] >> shift];
            a3 += e[o[3] >> shift];
            b0 += e[entries + (o[4] >> shift)];
            b1 += e[entries + (o[5] >> shift)];
            b2 += e[entries + (o[6] >> shift)];
            b3 += e[entries + (o[7] >> shift)];
        }
        if (q < t.groups) {
            a0 += e[o[0] >> shift];
            a1 += e[o[1] >> shift];
            a2 += e[o[2] >> shift];
            a3 += e[o[3] >> shift];
        }
        const std::array<T, 4> sums{a0 + b0, a1 + b1, a2 + b2, a3 + b3};
        for (std::size_t u = 0; u < 4; ++u) {
            T v = sums[u];
            if (out.kind == fwht_scale::scalar)
                v *= out.scalar;
            else if (out.kind == fwht_scale::vector)
                v *= out.values[i0 + u];
            x[i0 + u] = v;
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
