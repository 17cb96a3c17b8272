#pragma once
// The power-of-two fast Walsh-Hadamard transform: in place, natural (Sylvester) order,
// H[u, v] = (-1)^popcount(u & v), unnormalised unless a multiplier is given.
//
// How it is fast (the ideas of FFHT, re-derived for xsimd and wide registers):
// - Radix-2 stages commute, so they can run in any order and be grouped freely.
// - The first log2(lanes) stages act inside one register: a lane permutation (xsimd::swizzle;
//   immediate shuffles on AVX-512) and one fused multiply-add by a +-1 constant per stage, or,
//   on 128-bit registers where xsimd 8.1 has no swizzle, a "constant geometry" round of
//   add/sub + zip over a register pair.
// - A leaf pass keeps G consecutive registers (G * lanes elements) in registers and finishes
//   all their stages at once; the remaining stages are radix-2^r passes (r = 3 or 4) that load
//   2^r registers at a power-of-two stride, butterfly them, and store them back.
// - A row of two leaves runs both leaf passes and fuses the stage between them into the second.
// - Blocks of up to fwht_block_bytes are finished while they sit in L1; larger
//   transforms recurse depth first (cache oblivious in spirit), so each level streams the
//   array once.
// - Where that would take two passes over L2 (65536 floats with AVX-512), a split plan finishes
//   every 32 KiB span in L1 but for the lowest bit above the leaf, which one last pass takes
//   together with the bits above the span: one pass over L2 (fwht_plan_passes). Rows of four
//   spans (32768 floats) run it too: its last pass aliases less in L1 than the contiguous top pass.
// - The leaf pass prefetches into L2 ahead of the data (fwht_prefetch_l2), except where rows of
//   at most one block are read in order, a stream the hardware follows (fwht_rows_window).
// - The strided passes subtract with multiply-adds in some of their stages (fwht_fused_subtract,
//   fwht_fuses_stage).
// - Random signs ride along in the first pass, the scale (1/sqrt(n)) in the last stage (in the
//   first pass for rows of one leaf); a per-element multiplier needed after the transform rides
//   along in the last pass.
// Every function here depends on Arch, so one program can hold several instantiations (ODR).
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <xsimd/xsimd.hpp>

#include "../config.hpp"

// GCC 12 reports its own _mm512_undefined_ps()/_pd() inside the AVX-512 shuffles (the immediate
// ones below, _mm512_permutexvar_ps through xsimd::swizzle) as "used uninitialized" once inlined
// here; the value is never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Passes are flattened: every call inside them (xsimd's too) is inlined, whatever the compiler's
// inlining budget says, so that the arrays of registers stay in registers.
// The helpers the passes call are plain inline, not always_inline (like the tile kernel's in
// fwht_mix.hpp): GCC orders early inlining by the call graph but skips the edges from
// always_inline functions to others, so xsimd's functions below an always_inline helper were not
// ready when a pass was flattened early, and the late flattening refused them ("SSA form does not
// match" against the IPA clones of the passes). GCC 12 at -O2 then called xsimd::swizzle and the
// batch_constant conversion out of line in the leaf pass (4-5x slower). SPINQUANT_FWHT_INLINE
// stays for the mix helpers in fwht_mix.hpp, whose code it keeps as it was.
// Loops over the registers of an array are folds over an index_sequence: GCC unrolls a loop of
// 16 completely only at -O3, and a loop left rolled keeps the array in memory.
#if defined(__GNUC__)
#define SPINQUANT_FWHT_INLINE [[gnu::always_inline]] inline
#define SPINQUANT_FWHT_LAMBDA_INLINE __attribute__((always_inline))
#define SPINQUANT_FWHT_FLATTEN [[gnu::flatten]]
#else
#define SPINQUANT_FWHT_INLINE inline
#define SPINQUANT_FWHT_LAMBDA_INLINE
#define SPINQUANT_FWHT_FLATTEN
#endif

namespace spinquant::detail {

/// How the butterflies between the lanes of one register are computed on Arch.
enum class fwht_lane_method {
    swizzle,  ///< a lane permutation + fma with a +-1 constant (AVX, AVX2, AVX-512)
    zip,      ///< pairs of 128-bit registers: add/sub then zip_lo/zip_hi (SSE*, NEON)
    scalar,   ///< through a small array (any other architecture xsimd may add)
};

template <class T, class Arch>
inline constexpr fwht_lane_method fwht_lane_method_for =
    (std::is_base_of_v<xsimd::avx, Arch> || std::is_base_of_v<xsimd::avx512f, Arch>) ? fwht_lane_method::swizzle
    // On a 128-bit register zip_lo/zip_hi interleave the whole register, on every ISA.
    : (sizeof(xsimd::batch<T, Arch>) == 16) ? fwht_lane_method::zip
                                            : fwht_lane_method::scalar;

/// Registers a kernel may keep live without spilling: 32 with AVX-512, else 16.
template <class Arch>
inline constexpr std::size_t fwht_registers = std::is_base_of_v<xsimd::avx512f, Arch> ? 32 : 16;

/// Registers finished together by the leaf pass (a power of two, at least 2).
template <class Arch>
inline constexpr std::size_t fwht_leaf_registers = fwht_registers<Arch> == 32 ? 16 : 8;

/// Largest radix (log2) of the strided passes: 2^r registers stay live plus a few constants.
template <class Arch>
inline constexpr unsigned fwht_max_radix_log2 = fwht_registers<Arch> == 32 ? 4 : 3;

/// Transforms up to this many bytes are finished in one piece, pass after pass; larger ones recurse.
/// A third of a 48 KiB L1 data cache, half of a 32 KiB one (8 KiB pieces measured the same on
/// Zen 4's 32 KiB L1). Smaller pieces also keep memory busy: the leaf pass is
/// the only one that streams from memory, and a row's strided passes run between its pieces while
/// their prefetches arrive. With 32 KiB, a 32 KiB row ran both its strided passes after the whole
/// leaf pass, and from memory reached 0.81-0.84 of the stream's rate instead of 0.90-0.92.
inline constexpr std::size_t fwht_block_bytes = std::size_t{1} << 14;

/// What to multiply by, elementwise, on the way in (before the transform) or out (after).
enum class fwht_scale { none, scalar, vector };

/// A multiplier: a per-element array, or one scalar, or nothing.
template <class T>
struct fwht_multiplier {
    fwht_scale kind = fwht_scale::none;
    T scalar = T(1);
    const T* values = nullptr;  // kind == vector: values[i] multiplies element i

    /// The multiplier of the elements from i on.
    [[nodiscard]] fwht_multiplier advanced(std::size_t i) const noexcept
    {
        return {kind, scalar, kind == fwht_scale::vector ? values + i : values};
    }
};

// ---------------------------------------------------------------------------------------------
// Butterflies between registers

/// Whether the butterflies between registers compute a - b as the multiply-add b * (-1) + a. Where
/// additions and multiply-adds issue to separate pipes (Zen 4 and Zen 5), a butterfly then uses
/// both instead of queueing its two operations on the adders: a radix-16 pass inside L1 took 3.3
/// instead of 4.0 cycles per register on Zen 4 (BENCHMARKS.md). The product by -1 is exact, so the
/// result is that of the subtraction, bit for bit. Not in every stage (fwht_fuses_stage): on Zen 4
/// a 512-bit store takes about as long on the multiply-add pipes as two multiply-adds, and the
/// leaf pass's lane stages and the scaled last stage are multiply-adds too. Only where the
/// multiply-add is one instruction and the constant can be hidden from the compiler (GCC folds
/// b * -1 + a back into a - b).
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define SPINQUANT_FWHT_GNU_X86 1  // GNU inline assembly with x86 vector-register constraints
#else
#define SPINQUANT_FWHT_GNU_X86 0
#endif
template <class Arch>
inline constexpr bool fwht_fused_subtract =
#if SPINQUANT_FWHT_GNU_X86
    std::is_base_of_v<xsimd::avx512f, Arch> || std::is_base_of_v<xsimd::fma3<xsimd::avx2>, Arch>;
#else
    false;
#endif

/// Which register network: the leaf pass's (after its lane stages), a strided pass's, or the last
/// strided pass's when it also applies the scale (fwht_butterfly_scaled in its last stage).
enum class fwht_network { leaf, pass, scaled_pass };

/// Whether a network of R registers subtracts with multiply-adds (when it may) in its stage at
/// register distance H. Chosen by measuring every subset on Zen 4 (one pass over 4096 floats in
/// L1, cycles per register): a strided pass in every stage but the last (radix 16: 2.55 against
/// 3.18 for every stage, 2.96 for the upper half, 3.94 for none; radix 8: 2.27 against 2.77; radix 4:
/// 2.04, none 1.99), a scaled pass in its stage at R/4 only (radix 16: 3.31 against 3.69 for none
/// and 3.95 for all three; radix 4: none, 2.08 against 2.50), the leaf in the upper half of its
/// register stages (7.3 against 8.1 for none and 7.5 for all; the best subset, 7.2, within noise).
template <fwht_network Kind, std::size_t H, std::size_t R>
inline constexpr bool fwht_fuses_stage = Kind == fwht_network::leaf   ? 4 * H >= R
                                         : Kind == fwht_network::pass ? 2 * H < R
                                                                      : R >= 8 && 4 * H == R;

/// (v[J], v[J + H]) -> (v[J] + v[J + H], v[J] - v[J + H]); with a multiply-add for the difference
/// when minus_one (-1 in every lane) is given.
template <std::size_t J, std::size_t H, class B, std::size_t R>
inline void fwht_butterfly(std::array<B, R>& v, const B* minus_one) noexcept
{
    const B a = v[J];
    const B b = v[J + H];
    v[J] = a + b;
    v[J + H] = minus_one != nullptr ? xsimd::fma(b, *minus_one, a) : a - b;
}

/// One radix-2 stage at register distance H over v[0..R): every pair (j, j + H) in each block
/// of 2H. Fold expressions (not loops, not lambdas) so that everything is unrolled and inlined.
template <std::size_t H, class B, std::size_t R, std::size_t... I>
inline void fwht_register_stage(std::array<B, R>& v, const B* minus_one, std::index_sequence<I...>) noexcept
{
    (fwht_butterfly<(I / H) * 2 * H + I % H, H>(v, minus_one), ...);
}

/// (v[J], v[J + H]) -> (c (v[J] + v[J + H]), c (v[J] - v[J + H])) as a = c v[J], then b c + a and
/// a - b c: three multiplications for the pair where two additions and two products take four.
template <std::size_t J, std::size_t H, class B, std::size_t R>
inline void fwht_butterfly_scaled(std::array<B, R>& v, const B& c) noexcept
{
    const B a = v[J] * c;
    const B b = v[J + H];
    v[J] = xsimd::fma(b, c, a);
    v[J + H] = xsimd::fnma(b, c, a);
}

template <std::size_t H, class B, std::size_t R, std::size_t... I>
inline void fwht_register_stage_scaled(std::array<B, R>& v, const B& c, std::index_sequence<I...>) noexcept
{
    (fwht_butterfly_scaled<(I / H) * 2 * H + I % H, H>(v, c), ...);
}

/// Stages at register distances First, 2 First, ..., R/2 (all of them when First = 1).
/// minus_one: see fwht_butterfly and fwht_fuses_stage. A scaled_pass network multiplies its
/// results by *scale (its last stage runs fwht_butterfly_scaled).
template <std::size_t First, std::size_t R, fwht_network Kind = fwht_network::pass, class B>
inline void fwht_register_network(std::array<B, R>& v, const B* minus_one = nullptr, const B* scale = nullptr) noexcept
{
    if constexpr (Kind == fwht_network::scaled_pass && 2 * First == R) {
        fwht_register_stage_scaled<First>(v, *scale, std::make_index_sequence<R / 2>{});
    } else if constexpr (First < R) {
        fwht_register_stage<First>(v, fwht_fuses_stage<Kind, First, R> ? minus_one : nullptr,
                                   std::make_index_sequence<R / 2>{});
        fwht_register_network<2 * First, R, Kind>(v, minus_one, scale);
    }
}

/// -1 in every lane, a value the compiler cannot see (fwht_fused_subtract).
template <class T, class Arch>
inline xsimd::batch<T, Arch> fwht_opaque_minus_one() noexcept
{
    xsimd::batch<T, Arch> m(T(-1));
#if SPINQUANT_FWHT_GNU_X86
    if constexpr (fwht_fused_subtract<Arch>) __asm__("" : "+v"(m.data));
#endif
    return m;
}

// ---------------------------------------------------------------------------------------------
// Butterflies between lanes

template <std::size_t H>
struct fwht_partner_lane {
    static constexpr std::uint64_t get(std::size_t i, std::size_t) noexcept { return i ^ H; }
};
/// -1 in the lanes whose bit H is set, +1 elsewhere.
template <class T, std::size_t Lanes, std::size_t H>
inline constexpr auto fwht_lane_signs = [] {
    std::array<T, Lanes> a{};
    for (std::size_t i = 0; i < Lanes; ++i) a[i] = (i & H) != 0 ? T(-1) : T(1);
    return a;
}();

/// Lane i of the result is lane i ^ H of x. On AVX-512 by immediate shuffles, within 128-bit
/// blocks (vpermilps/vpermilpd) or of whole blocks (vshuff32x4/vshuff64x2), not xsimd::swizzle's
/// general permute (vpermps): on Zen 5 the in-block shuffle issues to all four vector pipes and
/// the general one takes the room of two operations; the leaf pass ran 15% faster, from memory
/// the transform 5-25% (BENCHMARKS.md). AVX2 measured the same either way and keeps the swizzle.
template <std::size_t H, class T, class Arch>
inline xsimd::batch<T, Arch> fwht_lane_partner(const xsimd::batch<T, Arch>& x) noexcept
{
#if defined(__AVX512F__)
    if constexpr (std::is_base_of_v<xsimd::avx512f, Arch>) {
        constexpr std::size_t block = 16 / sizeof(T);  // lanes in 128 bits
        // Swap neighbouring elements (or pairs) inside each 128-bit block.
        constexpr int in_block = sizeof(T) == 4 ? (H == 1 ? 0xB1 : 0x4E) : 0x55;
        // Swap neighbouring 128-bit blocks (or pairs of them).
        constexpr int blocks = H / block == 1 ? 0xB1 : 0x4E;
        if constexpr (std::is_same_v<T, float>)
            return H < block ? _mm512_permute_ps(x, in_block) : _mm512_shuffle_f32x4(x, x, blocks);
        else
            return H < block ? _mm512_permute_pd(x, in_block) : _mm512_shuffle_f64x2(x, x, blocks);
    }
#endif
    using index = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    return xsimd::swizzle(x, xsimd::make_batch_constant<xsimd::batch<index, Arch>, fwht_partner_lane<H>>());
}

/// The lane stage at distance H on one register: lane i becomes x[i] + x[i ^ H] when bit H of
/// i is clear and x[i ^ H] - x[i] when it is set: a permutation and x * (+-1) + partner, one
/// fused multiply-add where the compiler contracts it (the product is exact, so the rounding is
/// that of the plain add or subtract either way).
template <std::size_t H, class T, class Arch>
inline xsimd::batch<T, Arch> fwht_lane_stage(const xsimd::batch<T, Arch>& x) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    const batch sign = batch::load_unaligned(fwht_lane_signs<T, batch::size, H>.data());
    return xsimd::fma(x, sign, fwht_lane_partner<H>(x));
}

template <std::size_t H, class T, class Arch>
inline void fwht_lane_stages(xsimd::batch<T, Arch>& x) noexcept
{
    if constexpr (H < xsimd::batch<T, Arch>::size) {
        x = fwht_lane_stage<H>(x);
        fwht_lane_stages<2 * H>(x);
    }
}

/// H_L on each register through a small array (fallback for architectures without a fast path).
template <class T, class Arch>
inline void fwht_lanes_scalar(xsimd::batch<T, Arch>& x) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    alignas(64) std::array<T, lanes> a{};
    x.store_unaligned(a.data());
    for (std::size_t h = 1; h < lanes; h *= 2)
        for (std::size_t i = 0; i < lanes; i += 2 * h)
            for (std::size_t j = i; j < i + h; ++j) {
                const T p = a[j];
                const T q = a[j + h];
                a[j] = p + q;
                a[j + h] = p - q;
            }
    x = xsimd::batch<T, Arch>::load_unaligned(a.data());
}

/// H_{2L} on the 2L elements of the register pair (a, b) by constant geometry: each round
/// butterflies the top index bit (a +- b) and zips, which rotates the index bits left by one;
/// after 1 + log2(L) rounds every bit was butterflied once and the order is natural again.
/// Rounds: the rounds still to do (a compile-time recursion, see the top).
template <std::size_t Rounds, class T, class Arch>
inline void fwht_pair_zip(xsimd::batch<T, Arch>& a, xsimd::batch<T, Arch>& b) noexcept
{
    if constexpr (Rounds > 0) {
        const auto s = a + b;
        const auto d = a - b;
        a = xsimd::zip_lo(s, d);
        b = xsimd::zip_hi(s, d);
        fwht_pair_zip<Rounds - 1, T, Arch>(a, b);
    }
}

/// In-register lane butterflies of every register of v (zip: of every register pair).
template <class T, class Arch, std::size_t R, std::size_t... I>
inline void fwht_lanes_all(std::array<xsimd::batch<T, Arch>, R>& v, std::index_sequence<I...>) noexcept
{
    constexpr auto method = fwht_lane_method_for<T, Arch>;
    if constexpr (method == fwht_lane_method::zip)
        (fwht_pair_zip<1 + std::countr_zero(xsimd::batch<T, Arch>::size), T, Arch>(v[2 * I], v[2 * I + 1]), ...);
    else if constexpr (method == fwht_lane_method::swizzle)
        (fwht_lane_stages<1, T, Arch>(v[I]), ...);
    else
        (fwht_lanes_scalar<T, Arch>(v[I]), ...);
}

/// The complete transform of the R * L consecutive elements held in v[0..R) (R >= 2).
template <class T, class Arch, std::size_t R>
inline void fwht_registers_transform(std::array<xsimd::batch<T, Arch>, R>& v) noexcept
{
    static_assert(R >= 2 && std::has_single_bit(R));
    if constexpr (fwht_lane_method_for<T, Arch> == fwht_lane_method::zip) {
        fwht_lanes_all<T, Arch>(v, std::make_index_sequence<R / 2>{});
        fwht_register_network<2, R, fwht_network::leaf>(v);  // the zip rounds did register distance 1
    } else {
        fwht_lanes_all<T, Arch>(v, std::make_index_sequence<R>{});
        const xsimd::batch<T, Arch> minus_one = fwht_opaque_minus_one<T, Arch>();
        fwht_register_network<1, R, fwht_network::leaf>(v, fwht_fused_subtract<Arch> ? &minus_one : nullptr);
    }
}

// ---------------------------------------------------------------------------------------------
// Passes over memory

template <fwht_scale Kind, class T, class Arch>
inline xsimd::batch<T, Arch> fwht_load(const T* x, const fwht_multiplier<T>& m, std::size_t i) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    const batch v = batch::load_unaligned(x + i);
    if constexpr (Kind == fwht_scale::scalar)
        return v * batch(m.scalar);
    else if constexpr (Kind == fwht_scale::vector)
        return v * batch::load_unaligned(m.values + i);
    else
        return v;
}

template <fwht_scale Kind, class T, class Arch>
inline void fwht_store(T* x, xsimd::batch<T, Arch> v, const fwht_multiplier<T>& m, std::size_t i) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    if constexpr (Kind == fwht_scale::scalar)
        v *= batch(m.scalar);
    else if constexpr (Kind == fwht_scale::vector)
        v *= batch::load_unaligned(m.values + i);
    v.store_unaligned(x + i);
}

/// Where register t of a pass sits, from its first element: index bit 0 of t steps by `low`, the
/// bits above it by `high` (t * low when high = 2 low, the usual power-of-two stride).
[[nodiscard]] constexpr std::size_t fwht_register_offset(std::size_t t, std::size_t low, std::size_t high) noexcept
{
    return (t & 1) * low + (t >> 1) * high;
}

/// v[t] <- the register at x + i + fwht_register_offset(t, low, high) (times the multiplier),
/// t = 0..R-1 (a fold, see the top). Offsets from x + i, so that constant strides become
/// addressing displacements.
template <fwht_scale Kind, class T, class Arch, std::size_t R, std::size_t... I>
inline void fwht_load_registers(std::array<xsimd::batch<T, Arch>, R>& v, const T* x, const fwht_multiplier<T>& m,
                                std::size_t i, std::size_t low, std::size_t high, std::index_sequence<I...>) noexcept
{
    const fwht_multiplier<T> mi = m.advanced(i);
    ((v[I] = fwht_load<Kind, T, Arch>(x + i, mi, fwht_register_offset(I, low, high))), ...);
}

/// The R registers of v back to where fwht_load_registers found them (times the multiplier).
template <fwht_scale Kind, class T, class Arch, std::size_t R, std::size_t... I>
inline void fwht_store_registers(const std::array<xsimd::batch<T, Arch>, R>& v, T* x, const fwht_multiplier<T>& m,
                                 std::size_t i, std::size_t low, std::size_t high, std::index_sequence<I...>) noexcept
{
    const fwht_multiplier<T> mi = m.advanced(i);
    (fwht_store<Kind, T, Arch>(x + i, v[I], mi, fwht_register_offset(I, low, high)), ...);
}

/// A stretch of memory, `size` elements from `data`, for prefetching: the caller passes the memory
/// from x onwards that it is about to transform (x itself, then e.g. the next rows of a matrix).
/// The leaf pass, which streams from memory, prefetches fwht_prefetch_bytes ahead of the element
/// it works on; the K x K mix, which does not stream, prefetches the data after x. Both into L2.
template <class T>
struct fwht_window {
    const T* data = nullptr;
    std::size_t size = 0;

    /// The window as seen from `offset` elements further on (empty once past its end).
    [[nodiscard]] fwht_window advanced(std::size_t offset) const noexcept
    {
        if (offset >= size) return {};
        return {data + offset, size - offset};
    }
};

/// How far ahead of the data in use the leaf pass prefetches (88 cache lines). On Zen 4, rows of
/// 8192-65536 floats from memory reached 0.63-0.74 of the stream's rate with 5.5 KiB (5 or 6 KiB
/// within 0.02), 0.60-0.72 with 4 KiB or none, 0.56-0.65 with 8 KiB, 0.55-0.64 with 16 KiB.
inline constexpr std::size_t fwht_prefetch_bytes = 5632;

/// What the leaf pass over the data at `region`'s start prefetches in step: the region from
/// fwht_prefetch_bytes on.
template <class T>
[[nodiscard]] constexpr fwht_window<T> fwht_leaf_ahead(const fwht_window<T>& region) noexcept
{
    return region.advanced(fwht_prefetch_bytes / sizeof(T));
}

/// What a transform of consecutive rows of n elements, taken in order, should prefetch of
/// `region`: nothing for rows of at most one block. Such a row is read once, in order, by its leaf
/// pass (its other passes stay in L1), so the rows make one stream that the hardware prefetcher
/// follows by itself, and software prefetches only compete with it (on Zen 4 from memory, 1024
/// floats 0.86-0.97 of the stream's rate without against 0.62-0.77 with).
/// Longer rows go over L2 between their leaf passes, which breaks that stream; the rows of a
/// K x 2^k plan are read again by the mix, so they keep their windows.
template <class T>
[[nodiscard]] constexpr fwht_window<T> fwht_rows_window(std::size_t n, const fwht_window<T>& region) noexcept
{
    return n * sizeof(T) > fwht_block_bytes ? region : fwht_window<T>{};
}

/// Asks for the cache line holding *p into L2 (no effect where unsupported; never faults).
/// Into L2, not L1: on Zen 4 (32 KiB L1) the transform with the leaf pass prefetching into L1
/// reached 0.32-0.70 of the stream's rate from memory, into L2 0.46-0.87 (BENCHMARKS.md).
SPINQUANT_FWHT_INLINE void fwht_prefetch_l2(const void* p) noexcept
{
#if defined(__GNUC__)
    __builtin_prefetch(p, 0, 2);
#else
    (void)p;
#endif
}

/// The leaf pass over x[0..n): every run of R * L consecutive elements is transformed
/// completely in registers (R = 2, 4, ... fwht_leaf_registers). `in` multiplies on load, `out` on
/// store. n is a multiple of R * L. `ahead` is prefetched in step (see fwht_window).
template <class T, class Arch, std::size_t R, fwht_scale In, fwht_scale Out>
SPINQUANT_FWHT_FLATTEN void fwht_leaf_pass(T* x, std::size_t n, const fwht_multiplier<T>& in, const fwht_multiplier<T>& out,
                    const fwht_window<T>& ahead) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    constexpr std::size_t line = 64 / sizeof(T);
    for (std::size_t i = 0; i < n; i += R * lanes) {
        for (std::size_t p = i; p < i + R * lanes && p < ahead.size; p += line) fwht_prefetch_l2(ahead.data + p);
        std::array<xsimd::batch<T, Arch>, R> v;
        fwht_load_registers<In, T, Arch>(v, x, in, i, lanes, 2 * lanes, std::make_index_sequence<R>{});
        fwht_registers_transform<T, Arch, R>(v);
        fwht_store_registers<Out, T, Arch>(v, x, out, i, lanes, 2 * lanes, std::make_index_sequence<R>{});
    }
}

/// Elements in one leaf on Arch.
template <class T, class Arch>
inline constexpr std::size_t fwht_leaf_size = fwht_leaf_registers<Arch> * xsimd::batch<T, Arch>::size;

/// Whether a transform of n (a power of two) is one leaf pass: two registers to one leaf.
template <class T, class Arch>
[[nodiscard]] constexpr bool fwht_fits_leaf(std::size_t n) noexcept
{
    return n >= 2 * xsimd::batch<T, Arch>::size && n <= fwht_leaf_size<T, Arch>;
}

/// The leaf pass with R chosen at run time: every run of `run` consecutive elements of x[0..n)
/// transformed (fwht_fits_leaf(run), n a multiple of it).
template <class T, class Arch, fwht_scale In, fwht_scale Out>
void fwht_leaf_runs(T* x, std::size_t run, std::size_t n, const fwht_multiplier<T>& in, const fwht_multiplier<T>& out,
                    const fwht_window<T>& ahead) noexcept
{
    switch (run / xsimd::batch<T, Arch>::size) {
    case 2: fwht_leaf_pass<T, Arch, 2, In, Out>(x, n, in, out, ahead); break;
    case 4: fwht_leaf_pass<T, Arch, 4, In, Out>(x, n, in, out, ahead); break;
    case 8: fwht_leaf_pass<T, Arch, 8, In, Out>(x, n, in, out, ahead); break;
    default: fwht_leaf_pass<T, Arch, fwht_leaf_registers<Arch>, In, Out>(x, n, in, out, ahead); break;
    }
}

/// One radix-R pass over x[0..n): butterflies index bit log2(low) and the log2(R) - 1 bits from
/// log2(high) on, between registers loaded fwht_register_offset(t, low, high) elements apart.
/// low is a multiple of L, high of 2 low, n of R/2 high. With high = 2 low: the log2(R)
/// consecutive bits from log2(low), registers `low` apart (the usual strided pass). A scalar `out`
/// rides in the last stage (fwht_butterfly_scaled), a vector one in the stores. Low and High:
/// std::size_t, or std::integral_constant where the strides are known at compile time (they then
/// become addressing displacements instead of 16 offsets competing for the integer registers).
template <class T, class Arch, std::size_t R, fwht_scale Out, class Low = std::size_t, class High = std::size_t>
SPINQUANT_FWHT_FLATTEN void fwht_strided_pass(T* x, std::size_t n, Low low, High high,
                                              const fwht_multiplier<T>& out) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    constexpr std::size_t lanes = batch::size;
    constexpr bool scaled = Out == fwht_scale::scalar;
    const batch minus_one = fwht_opaque_minus_one<T, Arch>();
    const batch* const fused = fwht_fused_subtract<Arch> ? &minus_one : nullptr;
    const batch scale(out.scalar);
    for (std::size_t block = 0; block < n; block += R / 2 * high)
        for (std::size_t part = block; part < block + high; part += 2 * low)
            for (std::size_t j = part; j < part + low; j += lanes) {
                std::array<batch, R> v;
                fwht_load_registers<fwht_scale::none, T, Arch>(v, x, {}, j, low, high, std::make_index_sequence<R>{});
                if constexpr (scaled)
                    fwht_register_network<1, R, fwht_network::scaled_pass>(v, fused, &scale);
                else
                    fwht_register_network<1, R>(v, fused);
                fwht_store_registers<scaled ? fwht_scale::none : Out, T, Arch>(v, x, out, j, low, high,
                                                                                std::make_index_sequence<R>{});
            }
}

/// The transform of two leaves, x[0..2 R L): the leaf pass on each, the last stage (between
/// them) fused into the second one while it is still in registers. A separate radix-2 pass would
/// load and store every register once more for a single stage. A scalar `out` rides in that stage
/// (fwht_butterfly_scaled).
template <class T, class Arch, std::size_t R, fwht_scale In, fwht_scale Out, std::size_t... I>
SPINQUANT_FWHT_FLATTEN void fwht_leaf_pair(T* x, const fwht_multiplier<T>& in, const fwht_multiplier<T>& out,
                                           const fwht_window<T>& ahead, std::index_sequence<I...> seq) noexcept
{
    using batch = xsimd::batch<T, Arch>;
    constexpr std::size_t lanes = batch::size;
    constexpr std::size_t half = R * lanes;
    constexpr std::size_t line = 64 / sizeof(T);
    fwht_leaf_pass<T, Arch, R, In, fwht_scale::none>(x, half, in, {}, ahead);
    for (std::size_t p = half; p < 2 * half && p < ahead.size; p += line) fwht_prefetch_l2(ahead.data + p);
    std::array<batch, R> v;
    fwht_load_registers<In, T, Arch>(v, x, in, half, lanes, 2 * lanes, seq);
    fwht_registers_transform<T, Arch, R>(v);
    const fwht_multiplier<T> out_b = out.advanced(half);
    const batch scale(out.scalar);
    const auto fuse = [&](std::size_t i, const batch& b) SPINQUANT_FWHT_LAMBDA_INLINE {
        std::array<batch, 2> pair{batch::load_unaligned(x + i), b};
        if constexpr (Out == fwht_scale::scalar) {
            fwht_butterfly_scaled<0, 1>(pair, scale);
            pair[0].store_unaligned(x + i);
            pair[1].store_unaligned(x + half + i);
        } else {
            fwht_butterfly<0, 1>(pair, static_cast<const batch*>(nullptr));
            fwht_store<Out, T, Arch>(x, pair[0], out, i);
            fwht_store<Out, T, Arch>(x + half, pair[1], out_b, i);
        }
    };
    (fuse(I * lanes, v[I]), ...);
}

/// Runs the radix-2^r pass (1 <= r <= 4), choosing the instantiation at run time.
template <class T, class Arch, fwht_scale Out, class Low = std::size_t, class High = std::size_t>
void fwht_strided_pass_r(T* x, std::size_t n, Low low, High high, unsigned r, const fwht_multiplier<T>& out) noexcept
{
    switch (r) {
    case 1: fwht_strided_pass<T, Arch, 2, Out>(x, n, low, high, out); break;
    case 2: fwht_strided_pass<T, Arch, 4, Out>(x, n, low, high, out); break;
    case 3: fwht_strided_pass<T, Arch, 8, Out>(x, n, low, high, out); break;
    default:
        if constexpr (fwht_max_radix_log2<Arch> >= 4)
            fwht_strided_pass<T, Arch, 16, Out>(x, n, low, high, out);
        else
            SPINQUANT_ASSERT(false);
        break;
    }
}

/// Scalar transform for lengths below the leaf size (n a power of two).
template <class T, fwht_scale In, fwht_scale Out>
void fwht_scalar(T* x, std::size_t n, const fwht_multiplier<T>& in, const fwht_multiplier<T>& out) noexcept
{
    if constexpr (In == fwht_scale::scalar)
        for (std::size_t i = 0; i < n; ++i) x[i] *= in.scalar;
    else if constexpr (In == fwht_scale::vector)
        for (std::size_t i = 0; i < n; ++i) x[i] *= in.values[i];
    for (std::size_t h = 1; h < n; h *= 2)
        for (std::size_t i = 0; i < n; i += 2 * h)
            for (std::size_t j = i; j < i + h; ++j) {
                const T a = x[j];
                const T b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    if constexpr (Out == fwht_scale::scalar)
        for (std::size_t i = 0; i < n; ++i) x[i] *= out.scalar;
    else if constexpr (Out == fwht_scale::vector)
        for (std::size_t i = 0; i < n; ++i) x[i] *= out.values[i];
}

/// The strided passes of one transform: their radices (log2), bottom up, over the consecutive
/// index bits from `first` on. A split plan (span_bits > 0) runs the leaf pass and these passes on
/// each span of 2^span_bits elements, so they leave bit first - 1 alone, and ends with one pass
/// over bit first - 1 and the bits from span_bits up (fwht_plan_passes says why).
struct fwht_pass_plan {
    std::array<unsigned char, 64> radix{};
    unsigned count = 0;
    unsigned first = 0;
    unsigned span_bits = 0;
};

/// Bits finished by the leaf pass on Arch.
template <class T, class Arch>
inline constexpr unsigned fwht_leaf_bits =
    static_cast<unsigned>(std::countr_zero(fwht_leaf_size<T, Arch>));

/// Strided passes whose stride is a multiple of this many bytes put all their streams in one
/// L1 set; more streams than the L1 has ways (12 on Zen 5, 8 to 12 elsewhere) thrash it.
inline constexpr std::size_t fwht_alias_bytes = 4096;

/// The most radix bits a pass starting at index bit `first` may take.
template <class T, class Arch>
[[nodiscard]] constexpr unsigned fwht_radix_cap(unsigned first) noexcept
{
    const bool aliased = (std::size_t{1} << first) * sizeof(T) >= fwht_alias_bytes;
    return aliased && fwht_max_radix_log2<Arch> > 3 ? 3 : fwht_max_radix_log2<Arch>;
}

/// Splits the index bits [first, bits) into as few strided passes as the radix caps allow, then
/// evens them out (larger radices at the bottom) where the caps still hold.
template <class T, class Arch>
[[nodiscard]] constexpr fwht_pass_plan fwht_plan_range(unsigned first, unsigned bits) noexcept
{
    fwht_pass_plan greedy;
    greedy.first = first;
    for (unsigned bit = first; bit < bits;) {
        const unsigned cap = fwht_radix_cap<T, Arch>(bit);
        const unsigned r = bits - bit < cap ? bits - bit : cap;
        greedy.radix[greedy.count++] = static_cast<unsigned char>(r);
        bit += r;
    }
    fwht_pass_plan even = greedy;
    const unsigned above = bits - first;
    unsigned bit = first;
    for (unsigned p = 0; p < even.count; ++p) {
        const unsigned r = (above + even.count - 1 - p) / even.count;
        if (r > fwht_radix_cap<T, Arch>(bit)) return greedy;
        even.radix[p] = static_cast<unsigned char>(r);
        bit += r;
    }
    return even;
}

/// Spans that split plans finish in L1 before their last pass: two thirds of a 48 KiB L1 data
/// cache, all of a 32 KiB one (on Zen 4 the contiguous plan, which 16 KiB spans would leave,
/// still took 10% longer in cache).
inline constexpr std::size_t fwht_span_bytes = std::size_t{1} << 15;

/// Rows of at least this many spans run the split plan also where it takes as many passes as the
/// contiguous one. On Zen 4, 128 KiB rows (32768 floats, 16384 doubles) took 6-11% less time in
/// cache with it (AVX-512 and AVX2; SSE 3-4%) and from memory reached 0.69-0.71 of the stream
/// against 0.65-0.68 (floats; doubles 0.73-0.74 against 0.70). With AVX-512 or AVX2 the contiguous
/// plan's top pass there reads its 8 lines 16 KiB apart, all in one L1 set; the split plan's last
/// pass 4 from each of two sets. 64 KiB rows (two spans) took 5% less in cache but from memory
/// 0.71-0.74 against 0.74-0.75 (floats), so they stay contiguous.
inline constexpr std::size_t fwht_split_tie_spans = 4;

/// The strided passes a split plan runs inside each span: index bits leaf + 1 .. span - 1 (bit
/// `leaf` is left to the last pass). The same for every length: a compile-time constant.
template <class T, class Arch>
inline constexpr fwht_pass_plan fwht_span_plan = [] {
    constexpr auto span_bits = static_cast<unsigned>(std::countr_zero(fwht_span_bytes / sizeof(T)));
    fwht_pass_plan plan = fwht_plan_range<T, Arch>(fwht_leaf_bits<T, Arch> + 1, span_bits);
    plan.span_bits = span_bits;
    return plan;
}();

/// The passes of a 2^bits transform (bits above one leaf). Rows beyond a span pay for every pass
/// over L2 in full (from memory too: no memory traffic is left to hide them behind), and the
/// contiguous plan needs two such passes when the bits above the L1 blocks exceed one aliased
/// radix (65536 floats with AVX-512). A split plan needs one: it leaves the lowest bit above the
/// leaf (whose stride does not alias in L1) to the last pass, which takes it with the bits above
/// the span, so every span gets all its other bits while it sits in L1. Used where it saves a pass
/// (the plan is then fwht_span_plan, span_bits > 0: the passes inside a span; the last pass
/// follows from n), and where both take as many passes but the row spans at least
/// fwht_split_tie_spans spans (measured faster there; see that constant).
template <class T, class Arch>
[[nodiscard]] constexpr fwht_pass_plan fwht_plan_passes(unsigned bits) noexcept
{
    constexpr unsigned leaf = fwht_leaf_bits<T, Arch>;
    constexpr auto& split = fwht_span_plan<T, Arch>;
    const fwht_pass_plan contiguous = fwht_plan_range<T, Arch>(leaf, bits);
    const bool leaf_stride_aliases = (std::size_t{1} << leaf) * sizeof(T) >= fwht_alias_bytes;
    const unsigned span = split.span_bits;
    if (bits <= span || split.count == 0 || leaf_stride_aliases || 1 + bits - span > fwht_max_radix_log2<Arch> ||
        bits - span > fwht_radix_cap<T, Arch>(span))
        return contiguous;
    const bool saves_pass = split.count + 1 < contiguous.count;
    const bool long_tie = split.count + 1 == contiguous.count && (std::size_t{1} << (bits - span)) >= fwht_split_tie_spans;
    return saves_pass || long_tie ? split : contiguous;
}

/// The plan of every length, index log2(n), built at compile time: a row looks its plan up.
template <class T, class Arch>
inline constexpr auto fwht_plans = [] {
    std::array<fwht_pass_plan, std::numeric_limits<std::size_t>::digits> plans{};
    for (unsigned bits = 0; bits < plans.size(); ++bits) plans[bits] = fwht_plan_passes<T, Arch>(bits);
    return plans;
}();

/// Index bits below strided pass `level` (the leaf's plus those of passes 0..level-1).
[[nodiscard]] constexpr unsigned fwht_bits_below(const fwht_pass_plan& plan, unsigned level) noexcept
{
    unsigned bits = plan.first;
    for (unsigned p = 0; p < level; ++p) bits += plan.radix[p];
    return bits;
}

/// The transform of x[0..n) for n = 2^(bits below `levels`) (whole leaves), made of the leaf
/// pass and strided passes 0..levels-1. Sub-transforms of up to fwht_block_bytes run pass after
/// pass; larger ones recurse depth first: the 2^r parts below the top pass, then the top pass.
/// `ahead` is prefetched by the leaf pass in step.
template <class T, class Arch, fwht_scale In, fwht_scale Out>
void fwht_passes(T* x, std::size_t n, const fwht_pass_plan& plan, unsigned levels, const fwht_multiplier<T>& in,
                 const fwht_multiplier<T>& out, const fwht_window<T>& ahead) noexcept
{
    constexpr std::size_t block = fwht_block_bytes / sizeof(T);
    if (levels == 0) {
        fwht_leaf_pass<T, Arch, fwht_leaf_registers<Arch>, In, Out>(x, n, in, out, ahead);
        return;
    }
    const unsigned top = levels - 1;
    const std::size_t stride = std::size_t{1} << fwht_bits_below(plan, top);
    if (n <= block) {
        fwht_passes<T, Arch, In, fwht_scale::none>(x, n, plan, top, in, {}, ahead);
    } else {
        const std::size_t parts = std::size_t{1} << plan.radix[top];
        for (std::size_t t = 0; t < parts; ++t) {
            fwht_multiplier<T> in_t = in;
            if constexpr (In == fwht_scale::vector) in_t.values = in.values + t * stride;
            fwht_passes<T, Arch, In, fwht_scale::none>(x + t * stride, stride, plan, top, in_t, {},
                                                       ahead.advanced(t * stride));
        }
    }
    fwht_strided_pass_r<T, Arch, Out>(x, n, stride, 2 * stride, plan.radix[top], out);
}

/// The strided passes of fwht_span_plan on the span at x, strides known at compile time (they
/// become addressing displacements instead of 16 offsets competing for the integer registers).
template <class T, class Arch, std::size_t... P>
void fwht_span_passes(T* x, std::index_sequence<P...>) noexcept
{
    constexpr auto& plan = fwht_span_plan<T, Arch>;
    constexpr std::size_t span = std::size_t{1} << plan.span_bits;
    (fwht_strided_pass<T, Arch, std::size_t{1} << plan.radix[P], fwht_scale::none>(
         x, span, std::integral_constant<std::size_t, std::size_t{1} << fwht_bits_below(plan, P)>{},
         std::integral_constant<std::size_t, std::size_t{2} << fwht_bits_below(plan, P)>{}, {}),
     ...);
}

/// The transform of x[0..n) by the split plan (n > one span): on each span, the leaf pass and the
/// strided passes one after the other (the span fits in L1), then the pass over the bit just above
/// the leaf and the bits above the span.
template <class T, class Arch, fwht_scale In, fwht_scale Out>
void fwht_split_passes(T* x, std::size_t n, const fwht_multiplier<T>& in, const fwht_multiplier<T>& out,
                       const fwht_window<T>& ahead) noexcept
{
    constexpr auto& plan = fwht_span_plan<T, Arch>;
    constexpr std::size_t span = std::size_t{1} << plan.span_bits;
    for (std::size_t s = 0; s < n; s += span) {
        fwht_leaf_pass<T, Arch, fwht_leaf_registers<Arch>, In, fwht_scale::none>(x + s, span, in.advanced(s), {},
                                                                                  ahead.advanced(s));
        fwht_span_passes<T, Arch>(x + s, std::make_index_sequence<plan.count>{});
    }
    using low = std::integral_constant<std::size_t, std::size_t{1} << fwht_leaf_bits<T, Arch>>;
    using high = std::integral_constant<std::size_t, span>;
    const auto radix = static_cast<unsigned>(std::countr_zero(n / span)) + 1;
    fwht_strided_pass_r<T, Arch, Out>(x, n, low{}, high{}, radix, out);
}

/// x <- diag(out) * H_n * diag(in) * x for n = x.size() a power of two (n >= 1), in place.
/// A scalar multiplier may be given as `in` only (it commutes; above one leaf it is applied in the
/// last stage); `out` is none or a vector. No checks (callers validate), no allocation.
template <class T, class Arch, fwht_scale In, fwht_scale Out>
void fwht_pow2_fixed(std::span<T> x, const fwht_multiplier<T>& in, const fwht_multiplier<T>& out,
                     const fwht_window<T>& region = {}) noexcept
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    const std::size_t n = x.size();
    SPINQUANT_ASSERT(std::has_single_bit(n));
    if constexpr (In == fwht_scale::scalar && Out == fwht_scale::none) {
        // Above one leaf the scale rides in the last stage (fwht_butterfly_scaled), where it costs
        // half a multiplication per register instead of one on the leaf's loads: 4096 floats 5%
        // faster in cache on Zen 4, and the last pass's adders and multiply-adds more even.
        if (n >= 2 * fwht_leaf_size<T, Arch>) {
            fwht_pow2_fixed<T, Arch, fwht_scale::none, fwht_scale::scalar>(x, {}, in, region);
            return;
        }
    }
    const auto ahead = fwht_leaf_ahead(region);
    if (n < 2 * lanes)  // below the smallest leaf (two registers)
        fwht_scalar<T, In, Out>(x.data(), n, in, out);
    else if (fwht_fits_leaf<T, Arch>(n))
        fwht_leaf_runs<T, Arch, In, Out>(x.data(), n, n, in, out, ahead);
    else if (n == 2 * fwht_leaf_size<T, Arch>)
        fwht_leaf_pair<T, Arch, fwht_leaf_registers<Arch>, In, Out>(
            x.data(), in, out, ahead, std::make_index_sequence<fwht_leaf_registers<Arch>>{});
    else {
        const fwht_pass_plan& plan = fwht_plans<T, Arch>[static_cast<unsigned>(std::countr_zero(n))];
        if (plan.span_bits == 0)
            fwht_passes<T, Arch, In, Out>(x.data(), n, plan, plan.count, in, out, ahead);
        else
            fwht_split_passes<T, Arch, In, Out>(x.data(), n, in, out, ahead);
    }
}

/// fwht_pow2_fixed on `rows` rows of n elements, `stride` elements apart (row r at x + r * stride).
/// `region`: the memory from x on that the caller transforms now and next (see fwht_window).
template <class T, class Arch, fwht_scale In, fwht_scale Out>
void fwht_pow2_rows_fixed(T* x, std::size_t n, std::size_t rows, std::size_t stride, const fwht_multiplier<T>& in,
                          const fwht_multiplier<T>& out, const fwht_window<T>& region) noexcept
{
    if constexpr (In != fwht_scale::vector && Out != fwht_scale::vector) {
        // Contiguous rows of at most one leaf, whose multipliers do not depend on the place in the
        // row: one leaf pass over all of them (each of its runs is a row), without a call per row.
        if (stride == n && fwht_fits_leaf<T, Arch>(n)) {
            fwht_leaf_runs<T, Arch, In, Out>(x, n, n * rows, in, out, fwht_leaf_ahead(region));
            return;
        }
    }
    for (std::size_t r = 0; r < rows; ++r)
        fwht_pow2_fixed<T, Arch, In, Out>({x + r * stride, n}, in, out, region.advanced(r * stride));
}

/// The same with the multiplier kinds chosen at run time, once for all the rows: a dispatch per
/// row cost a row of 256 floats about a quarter of its time in cache. The multipliers apply to
/// every row alike (a vector one holds n values). `region`: as above, or empty for no prefetching.
template <class T, class Arch = xsimd::default_arch>
void fwht_pow2_rows(T* x, std::size_t n, std::size_t rows, std::size_t stride, const fwht_multiplier<T>& in,
                    const fwht_multiplier<T>& out, const fwht_window<T>& region = {}) noexcept
{
    SPINQUANT_ASSERT(out.kind != fwht_scale::scalar);
    const bool out_vector = out.kind == fwht_scale::vector;
    const auto run = [&]<fwht_scale In>(std::integral_constant<fwht_scale, In>) {
        if (out_vector)
            fwht_pow2_rows_fixed<T, Arch, In, fwht_scale::vector>(x, n, rows, stride, in, out, region);
        else
            fwht_pow2_rows_fixed<T, Arch, In, fwht_scale::none>(x, n, rows, stride, in, out, region);
    };
    switch (in.kind) {
    case fwht_scale::none: run(std::integral_constant<fwht_scale, fwht_scale::none>{}); break;
    case fwht_scale::scalar: run(std::integral_constant<fwht_scale, fwht_scale::scalar>{}); break;
    case fwht_scale::vector: run(std::integral_constant<fwht_scale, fwht_scale::vector>{}); break;
    }
}

/// One row: x <- diag(out) * H_n * diag(in) * x (see fwht_pow2_fixed), the kinds chosen at run time.
template <class T, class Arch = xsimd::default_arch>
void fwht_pow2_scaled(std::span<T> x, const fwht_multiplier<T>& in, const fwht_multiplier<T>& out,
                      const fwht_window<T>& region = {}) noexcept
{
    fwht_pow2_rows<T, Arch>(x.data(), x.size(), 1, x.size(), in, out, region);
}

/// Unnormalised in-place FWHT, power-of-two length, natural order; no checks (callers validated).
template <class T, class Arch = xsimd::default_arch>
void fwht_pow2(std::span<T> x) noexcept
{
    fwht_pow2_fixed<T, Arch, fwht_scale::none, fwht_scale::none>(x, {}, {});
}

}  // namespace spinquant::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

