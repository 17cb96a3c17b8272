#pragma once
// SIMD kernels of the quantizers. Each works on one "run": n elements starting at `x`, `stride`
// elements apart (stride 1 takes the xsimd path, any other stride the scalar path). No checks:
// the public functions in quantizer.hpp validated everything before calling them.
//
// Every function here depends on `Arch`, so a consumer that compiles one translation unit per
// instruction set (runtime dispatch) never shares an inline helper between them (ODR).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <xsimd/xsimd.hpp>

// GCC 12's AVX-512 intrinsics seed their results with `__Y = __Y` (_mm512_undefined_ps), which
// its own -Wuninitialized flags once inlined here under -march=native (GCC PR 105593, fixed in
// 12.3). The suppression covers these kernels only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace spinquant::detail {

/// Smallest and largest element of a run.
template <class T>
struct run_extent {
    T lo;
    T hi;
};

/// The three ways a run is fake-quantized (quant_spec decides which, see fake_formula):
/// symmetric  s * clamp(round(x / s), qlo, qhi)
/// asymmetric s * (clamp(round(x / s) + z, qlo, qhi) - z)
/// The reference's weight fake_quantize applies the symmetric formula to asymmetric parameters;
/// that is the symmetric kernel with qlo = -2^b, qhi = 2^b - 1 (see quant_spec::reference_compat).
enum class fq_kind { symmetric, asymmetric };

/// Returns x unchanged but opaque to the optimiser, so that a product is rounded to T before it
/// meets an addition. GCC in GNU mode (-ffp-contract=fast, its default) fuses a * b + c into an
/// FMA across statements and inlined calls, and clang fuses within an expression; the reference
/// rounds every product, and the scalar parameter arithmetic must match it bit for bit whatever
/// flags the consumer compiles with. Costs nothing: the value stays in its register.
template <class T, class Arch>
[[nodiscard, gnu::always_inline]] inline T rounded(T x) noexcept
{
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
    __asm__("" : "+x"(x));
#elif defined(__GNUC__) && defined(__aarch64__)
    __asm__("" : "+w"(x));
#elif defined(__GNUC__)
    __asm__("" : "+m"(x));
#else
    volatile T v = x;
    x = v;
#endif
    return x;
}

/// Clamp to [lo, hi] that keeps x (and its sign of zero) when x equals a bound, as torch.clamp
/// does, and maps NaN to lo so that a later integer conversion is always defined.
template <class T, class Arch>
[[nodiscard]] inline T clamp_code(T x, T lo, T hi) noexcept
{
    const T a = x >= lo ? x : lo;
    return a <= hi ? a : hi;
}
template <class T, class Arch>
[[nodiscard]] inline xsimd::batch<T, Arch> clamp_code(const xsimd::batch<T, Arch>& x, const xsimd::batch<T, Arch>& lo,
                                                      const xsimd::batch<T, Arch>& hi) noexcept
{
    const auto a = xsimd::select(x >= lo, x, lo);
    return xsimd::select(a <= hi, a, hi);
}

/// round(x / s) [+ z], clamped: the integer code of x as a value of T. Division, not a multiply
/// by 1/s, and round half to even: this is what the reference computes in the tensor dtype.
template <class T, class Arch, fq_kind K>
[[nodiscard]] inline T code_of(T x, T s, T z, T qlo, T qhi) noexcept
{
    T t = std::nearbyint(x / s);
    if constexpr (K == fq_kind::asymmetric) t = t + z;
    return clamp_code<T, Arch>(t, qlo, qhi);
}

/// round(x / s) for batches, equal bit for bit to rounding the true quotient (what the reference
/// computes), at the cost of a multiply in almost every case. t = x * (1/s) is within 3 half-ulps
/// of fl(x / s) (two roundings against one), so both round to the same integer unless t lies
/// that close to a half-integer. Only |t| <= bound matters (beyond it the code is clamped either
/// way), so one tolerance serves the whole run: a batch with |t - round(t)| >= 1/2 - tolerance,
/// or with NaN/Inf (the comparison is false), takes the division. So does every batch when 1/s
/// is not a normal number (it would have lost precision). A division costs several multiplies.
template <class T, class Arch>
class quotient_rounder {
public:
    using batch = xsimd::batch<T, Arch>;
    quotient_rounder(T s, T bound) noexcept
        : s_(s), inv_(T(1) / s), limit_(T(0.5) - T(4) * std::numeric_limits<T>::epsilon() * (bound + T(2)))
    {
        const T inv = T(1) / s;
        const T lim = T(0.5) - T(4) * std::numeric_limits<T>::epsilon() * (bound + T(2));
        fast_ = inv >= std::numeric_limits<T>::min() && inv <= std::numeric_limits<T>::max() && lim > T(0.25);
    }
    [[nodiscard]] batch operator()(const batch& x) const noexcept
    {
        if (fast_) {
            const batch t = x * inv_;
            const batch r = xsimd::nearbyint(t);
            if (xsimd::all(xsimd::abs(t - r) < limit_)) return r;
        }
        return xsimd::nearbyint(x / s_);
    }

private:
    batch s_;
    batch inv_;
    batch limit_;
    bool fast_ = false;
};

/// The largest |round(x / s)| that can survive the clamp to [qlo - z, qhi - z].
template <class T, class Arch>
[[nodiscard]] inline T code_bound(T z, T qlo, T qhi) noexcept
{
    const T a = std::fabs(qlo - z);
    const T b = std::fabs(qhi - z);
    return a < b ? b : a;
}

/// The dequantized value of a code (as T): s * (q - z), or s * q when symmetric. The scalar form
/// is rounded (see rounded()) because callers subtract it from x (clip search, GPTQ).
template <class T, class Arch, fq_kind K>
[[nodiscard]] inline T value_of(T q, T s, T z) noexcept
{
    if constexpr (K == fq_kind::asymmetric)
        return rounded<T, Arch>(s * (q - z));
    else
        return rounded<T, Arch>(s * q);
}
template <class T, class Arch, fq_kind K>
[[nodiscard]] inline xsimd::batch<T, Arch> value_of(const xsimd::batch<T, Arch>& q, const xsimd::batch<T, Arch>& s,
                                                    const xsimd::batch<T, Arch>& z) noexcept
{
    if constexpr (K == fq_kind::asymmetric)
        return s * (q - z);
    else
        return s * q;
}

/// Smallest and largest element of a run of n >= 1 elements (NaN-free input assumed).
template <class T, class Arch>
[[nodiscard]] run_extent<T> extent_of_run(const T* x, std::size_t n, std::size_t stride) noexcept
{
    using B = xsimd::batch<T, Arch>;
    constexpr std::size_t N = B::size;
    T lo = x[0];
    T hi = x[0];
    std::size_t i = 0;
    if (stride == 1 && n >= 4 * N) {
        // Four accumulators per bound hide the latency of min/max.
        B lo0 = B::load_unaligned(x), hi0 = lo0;
        B lo1 = B::load_unaligned(x + N), hi1 = lo1;
        B lo2 = B::load_unaligned(x + 2 * N), hi2 = lo2;
        B lo3 = B::load_unaligned(x + 3 * N), hi3 = lo3;
        for (i = 4 * N; i + 4 * N <= n; i += 4 * N) {
            const B a = B::load_unaligned(x + i), b = B::load_unaligned(x + i + N);
            const B c = B::load_unaligned(x + i + 2 * N), d = B::load_unaligned(x + i + 3 * N);
            lo0 = xsimd::min(lo0, a);
            hi0 = xsimd::max(hi0, a);
            lo1 = xsimd::min(lo1, b);
            hi1 = xsimd::max(hi1, b);
            lo2 = xsimd::min(lo2, c);
            hi2 = xsimd::max(hi2, c);
            lo3 = xsimd::min(lo3, d);
            hi3 = xsimd::max(hi3, d);
        }
        alignas(B::arch_type::alignment()) T l[N];
        alignas(B::arch_type::alignment()) T h[N];
        xsimd::min(xsimd::min(lo0, lo1), xsimd::min(lo2, lo3)).store_aligned(l);
        xsimd::max(xsimd::max(hi0, hi1), xsimd::max(hi2, hi3)).store_aligned(h);
        for (std::size_t k = 0; k < N; ++k) {
            lo = l[k] < lo ? l[k] : lo;
            hi = h[k] > hi ? h[k] : hi;
        }
    }
    for (; i < n; ++i) {
        const T v = x[i * stride];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    return {lo, hi};
}

/// True when every element of the run is finite (v - v is 0 for finite v, NaN otherwise; this
/// compares values, so it survives -ffast-math's folding of std::isfinite only as far as the
/// foundation's own check does).
template <class T, class Arch>
[[nodiscard]] bool run_is_finite(const T* x, std::size_t n, std::size_t stride) noexcept
{
    using B = xsimd::batch<T, Arch>;
    constexpr std::size_t N = B::size;
    std::size_t i = 0;
    T acc = T(0);
    if (stride == 1 && n >= N) {
        B a(T(0)), b(T(0));
        for (; i + 2 * N <= n; i += 2 * N) {
            const B u = B::load_unaligned(x + i), v = B::load_unaligned(x + i + N);
            a += u - u;  // stays 0 while finite; NaN sticks
            b += v - v;
        }
        for (; i + N <= n; i += N) {
            const B v = B::load_unaligned(x + i);
            a += v - v;
        }
        acc = xsimd::hadd(a + b);
    }
    for (; i < n; ++i) {
        const T v = x[i * stride];
        acc += v - v;
    }
    return acc == acc;
}

/// Hints the cache to fetch the line holding p (never faults, so p may point anywhere).
template <class Arch>
inline void prefetch_line(const void* p) noexcept
{
#if defined(__GNUC__)
    __builtin_prefetch(p, 0, 3);
#else
    (void)p;
#endif
}

/// out[k] = fake quantization of in[k] with one (s, z) over n elements. `out` may equal `in`.
/// `next`, when not null, is the start of the contiguous run the caller processes next: one of
/// its cache lines is prefetched per batch, so its first read overlaps this run's arithmetic.
template <class T, class Arch, fq_kind K>
void fake_quantize_run(const T* in, std::size_t in_stride, T* out, std::size_t out_stride, std::size_t n, T s, T z,
                       T qlo, T qhi, const T* next = nullptr) noexcept
{
    using B = xsimd::batch<T, Arch>;
    constexpr std::size_t N = B::size;
    std::size_t i = 0;
    // Clamping r = round(x / s) to [qlo - z, qhi - z] and returning s * r equals s * (clamp(r + z,
    // qlo, qhi) - z) while every integer involved is exact in T; + 0 turns the -0 of a rounded
    // small negative into the +0 that q - z gives. min/max keep r at an equal bound, and the
    // symmetric bounds are never 0, so the reference's signed zeros are kept too.
    const bool exact_ints = std::fabs(z) <= T(1) / (T(8) * std::numeric_limits<T>::epsilon());
    if (in_stride == 1 && out_stride == 1 && n >= N && (K == fq_kind::symmetric || exact_ints)) {
        const T lo = K == fq_kind::asymmetric ? qlo - z : qlo;
        const T hi = K == fq_kind::asymmetric ? qhi - z : qhi;
        const quotient_rounder<T, Arch> round_div(s, code_bound<T, Arch>(T(0), lo, hi));
        const B bs(s), blo(lo), bhi(hi), zero(T(0));
        // One prefetch per 64 bytes of this run covers the same length of the next one.
        const std::size_t every = N * sizeof(T) >= 64 ? 1 : 64 / (N * sizeof(T));
        std::size_t b = 0;
        for (; i + N <= n; i += N, ++b) {
            if (next != nullptr && b % every == 0) prefetch_line<Arch>(next + i);
            B r = xsimd::min(xsimd::max(blo, round_div(B::load_unaligned(in + i))), bhi);
            if constexpr (K == fq_kind::asymmetric) r = r + zero;
            (bs * r).store_unaligned(out + i);
        }
    }
    for (; i < n; ++i) {
        const T q = code_of<T, Arch, K>(in[i * in_stride], s, z, qlo, qhi);
        out[i * out_stride] = value_of<T, Arch, K>(q, s, z);
    }
}

/// codes[k] = integer code of in[k] (as T) with one (s, z); codes is contiguous. `next` as for
/// fake_quantize_run.
template <class T, class Arch, fq_kind K>
void code_run(const T* in, std::size_t in_stride, T* codes, std::size_t n, T s, T z, T qlo, T qhi,
              const T* next = nullptr) noexcept
{
    using B = xsimd::batch<T, Arch>;
    constexpr std::size_t N = B::size;
    std::size_t i = 0;
    if (in_stride == 1 && n >= N) {
        const quotient_rounder<T, Arch> round_div(s, code_bound<T, Arch>(K == fq_kind::asymmetric ? z : T(0), qlo, qhi));
        const B bz(z), blo(qlo), bhi(qhi);
        const std::size_t every = N * sizeof(T) >= 64 ? 1 : 64 / (N * sizeof(T));
        std::size_t b = 0;
        for (; i + N <= n; i += N, ++b) {
            if (next != nullptr && b % every == 0) prefetch_line<Arch>(next + i);
            B t = round_div(B::load_unaligned(in + i));
            if constexpr (K == fq_kind::asymmetric) t = t + bz;
            clamp_code<T, Arch>(t, blo, bhi).store_unaligned(codes + i);
        }
    }
    for (; i < n; ++i) codes[i] = code_of<T, Arch, K>(in[i * in_stride], s, z, qlo, qhi);
}

/// out[k] = dequantized value of codes[k] (contiguous codes as T) with one (s, z).
template <class T, class Arch, fq_kind K>
void dequantize_run(const T* codes, T* out, std::size_t out_stride, std::size_t n, T s, T z) noexcept
{
    using B = xsimd::batch<T, Arch>;
    constexpr std::size_t N = B::size;
    std::size_t i = 0;
    if (out_stride == 1 && n >= N) {
        const B bs(s), bz(z);
        for (; i + N <= n; i += N)
            value_of<T, Arch, K>(B::load_unaligned(codes + i), bs, bz).store_unaligned(out + i);
    }
    for (; i < n; ++i) out[i * out_stride] = value_of<T, Arch, K>(codes[i], s, z);
}

/// Straight-through mask: grad[k] is zeroed where x[k] / s + z lies outside [lo, hi] (the caller
/// passes lo = qmin - 1/2 and hi = qmax + 1/2: clipped beyond rounding). z = 0 when symmetric.
template <class T, class Arch>
void ste_mask_run(const T* x, std::size_t x_stride, T* grad, std::size_t g_stride, std::size_t n, T s, T z, T lo,
                  T hi) noexcept
{
    using B = xsimd::batch<T, Arch>;
    constexpr std::size_t N = B::size;
    std::size_t i = 0;
    if (x_stride == 1 && g_stride == 1 && n >= N) {
        const B bs(s), bz(z), blo(lo), bhi(hi), zero(T(0));
        for (; i + N <= n; i += N) {
            const B t = B::load_unaligned(x + i) / bs + bz;
            const B g = B::load_unaligned(grad + i);
            xsimd::select((t >= blo) && (t <= bhi), g, zero).store_unaligned(grad + i);
        }
    }
    for (; i < n; ++i) {
        const T t = x[i * x_stride] / s + z;
        if (!(t >= lo && t <= hi)) grad[i * g_stride] = T(0);
    }
}

/// Sum over the run of |fq(x) - x|^norm in double (the MSE clip search's error, REFERENCE §1a),
/// with fq the asymmetric or symmetric formula. Scalar: pow dominates and the search is offline.
template <class T, class Arch, fq_kind K>
[[nodiscard]] double clip_error_run(const T* x, std::size_t n, std::size_t stride, T s, T z, T qlo, T qhi,
                                    double norm) noexcept
{
    double err = 0;
    for (std::size_t i = 0; i < n; ++i) {
        const T v = x[i * stride];
        const T q = value_of<T, Arch, K>(code_of<T, Arch, K>(v, s, z, qlo, qhi), s, z);
        const T d = q - v;  // in T, as the reference subtracts in the tensor dtype
        err += std::pow(std::fabs(static_cast<double>(d)), norm);
    }
    return err;
}

/// Writes n codes (values of T, already clamped to the code range) into a packed row starting at
/// column c0. Columns must be written in increasing order within a row: an even column of a
/// 4-bit row writes its whole byte (high nibble 0), the odd column after it ORs its nibble in.
/// bits <= 4: two codes per byte, low nibble first; <= 8: one byte; <= 16: two bytes, little
/// endian. Negative (symmetric) codes are stored in two's complement of that width.
/// (__restrict: a byte store may alias anything, which would otherwise stop vectorisation.)
template <class T, class Arch>
void pack_codes(const T* __restrict codes, std::size_t n, std::size_t c0, int bits, std::uint8_t* __restrict row) noexcept
{
    if (bits <= 4) {
        const auto nib = [&](std::size_t k) { return static_cast<std::uint32_t>(static_cast<std::int32_t>(codes[k])) & 0xFU; };
        std::size_t k = 0;
        if ((c0 & 1U) != 0 && n > 0) {  // an odd start completes the byte its even partner began
            row[c0 / 2] = static_cast<std::uint8_t>(row[c0 / 2] | (nib(0) << 4));
            k = 1;
        }
        std::uint8_t* __restrict dst = row + (c0 + k) / 2;
        const T* __restrict src = codes + k;
        const std::size_t pairs = (n - k) / 2;
        for (std::size_t p = 0; p < pairs; ++p) {  // written for the auto-vectoriser
            const auto lo = static_cast<std::int32_t>(src[2 * p]) & 0xF;
            const auto hi = static_cast<std::int32_t>(src[2 * p + 1]) & 0xF;
            dst[p] = static_cast<std::uint8_t>(lo | (hi << 4));
        }
        if (k + 2 * pairs < n) dst[pairs] = static_cast<std::uint8_t>(nib(k + 2 * pairs));
    } else if (bits <= 8) {
        for (std::size_t k = 0; k < n; ++k)
            row[c0 + k] = static_cast<std::uint8_t>(static_cast<std::int32_t>(codes[k]) & 0xFF);
    } else {
        for (std::size_t k = 0; k < n; ++k) {
            const auto u = static_cast<std::uint32_t>(static_cast<std::int32_t>(codes[k])) & 0xFFFFU;
            row[2 * (c0 + k)] = static_cast<std::uint8_t>(u & 0xFFU);
            row[2 * (c0 + k) + 1] = static_cast<std::uint8_t>(u >> 8);
        }
    }
}

/// The code stored at column c of a packed row, sign-extended when `is_signed` (symmetric).
template <class Arch>
[[nodiscard]] inline std::int32_t unpack_code(const std::uint8_t* row, std::size_t c, int bits, bool is_signed) noexcept
{
    if (bits <= 4) {
        const std::int32_t nib = (row[c / 2] >> ((c & 1U) * 4U)) & 0xF;
        return is_signed && nib >= 8 ? nib - 16 : nib;
    }
    if (bits <= 8) {
        const std::int32_t b = row[c];
        return is_signed && b >= 128 ? b - 256 : b;
    }
    const std::int32_t u = row[2 * c] | (row[2 * c + 1] << 8);
    return is_signed && u >= 32768 ? u - 65536 : u;
}

/// Unpacks n codes starting at column c0 into `codes` (as T).
template <class T, class Arch>
void unpack_codes(const std::uint8_t* row, std::size_t c0, std::size_t n, int bits, bool is_signed, T* codes) noexcept
{
    for (std::size_t k = 0; k < n; ++k) codes[k] = static_cast<T>(unpack_code<Arch>(row, c0 + k, bits, is_signed));
}

}  // namespace spinquant::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
