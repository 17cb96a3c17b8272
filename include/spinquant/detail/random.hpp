#pragma once
// Reproducible draws from any standard random engine. The engines of <random> are specified bit
// for bit by the standard, but its distributions are not (their output differs between standard
// libraries), so the library draws through these instead.
#include <cmath>
#include <concepts>
#include <cstdint>
#include <random>

namespace spinquant::detail {

/// 64 uniformly random bits from any engine: one call for a 64-bit engine, two for a 32-bit one,
/// otherwise as many as needed, always in the same order.
template <std::uniform_random_bit_generator G>
[[nodiscard]] std::uint64_t random_bits64(G& g)
{
    using R = typename G::result_type;
    constexpr auto lo = static_cast<std::uint64_t>(G::min());
    constexpr auto span = static_cast<std::uint64_t>(G::max()) - lo;  // range - 1
    if constexpr (span == ~std::uint64_t{0}) {
        return static_cast<std::uint64_t>(g()) - lo;
    } else if constexpr (span == 0xFFFFFFFFull) {
        const std::uint64_t hi = static_cast<std::uint64_t>(static_cast<R>(g())) - lo;
        const std::uint64_t low = static_cast<std::uint64_t>(static_cast<R>(g())) - lo;
        return (hi << 32) | low;
    } else {
        // Generic engines: take the low floor(log2(range)) bits of each draw (unbiased when the
        // range is a power of two, which covers every standard engine not handled above).
        int bits_per_draw = 0;
        while (bits_per_draw < 63 && (std::uint64_t{1} << (bits_per_draw + 1)) - 1 <= span) ++bits_per_draw;
        std::uint64_t out = 0;
        for (int have = 0; have < 64; have += bits_per_draw) {
            const std::uint64_t d = (static_cast<std::uint64_t>(g()) - lo) & ((std::uint64_t{1} << bits_per_draw) - 1);
            out = (out << bits_per_draw) | d;
        }
        return out;
    }
}

/// Uniform double in [0, 1) with 53 random bits.
template <std::uniform_random_bit_generator G>
[[nodiscard]] double uniform01(G& g)
{
    return static_cast<double>(random_bits64(g) >> 11) * 0x1.0p-53;
}

/// +1 or -1 with equal probability, from the top bit of one 64-bit draw (exact on every platform).
template <std::uniform_random_bit_generator G>
[[nodiscard]] int random_sign(G& g)
{
    return (random_bits64(g) >> 63) != 0 ? -1 : 1;
}

/// Standard normal draws by Marsaglia's polar method. It needs only sqrt (correctly rounded
/// everywhere) and log, so results agree across platforms up to the last bit of libm's log.
/// Keeps the second value of each pair for the next call, so one sampler gives one stream.
class normal_sampler {
public:
    template <std::uniform_random_bit_generator G>
    [[nodiscard]] double operator()(G& g)
    {
        if (has_spare_) {
            has_spare_ = false;
            return spare_;
        }
        double u = 0, v = 0, s = 0;
        do {
            u = 2.0 * uniform01(g) - 1.0;
            v = 2.0 * uniform01(g) - 1.0;
            s = u * u + v * v;
        } while (s >= 1.0 || s == 0.0);
        const double f = std::sqrt(-2.0 * std::log(s) / s);
        spare_ = v * f;
        has_spare_ = true;
        return u * f;
    }

private:
    double spare_ = 0;
    bool has_spare_ = false;
};

}  // namespace spinquant::detail
