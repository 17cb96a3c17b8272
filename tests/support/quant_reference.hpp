#pragma once
// A deliberately plain restatement of the quantizer semantics (REFERENCE.md §1a and the header
// comment of quantizer.hpp) for the tests: units as lists of coordinates, one element at a time,
// std::vector copies, no views, no SIMD, no shared code with the library.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include <spinquant/quantizer.hpp>

namespace spinquant::test {

template <class T>
struct ref_params {
    T scale;
    T zero;
};

/// The coordinates of each unit, in the library's documented unit order.
inline std::vector<std::vector<std::pair<std::size_t, std::size_t>>> ref_units(std::size_t rows, std::size_t cols,
                                                                               const quant_spec& s)
{
    std::vector<std::vector<std::pair<std::size_t, std::size_t>>> u;
    switch (s.granularity) {
    case granularity::tensor:
        u.emplace_back();
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t j = 0; j < cols; ++j) u.back().emplace_back(i, j);
        break;
    case granularity::row:
        for (std::size_t i = 0; i < rows; ++i) {
            u.emplace_back();
            for (std::size_t j = 0; j < cols; ++j) u.back().emplace_back(i, j);
        }
        break;
    case granularity::column:
        for (std::size_t j = 0; j < cols; ++j) {
            u.emplace_back();
            for (std::size_t i = 0; i < rows; ++i) u.back().emplace_back(i, j);
        }
        break;
    case granularity::group:
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t g = 0; g < cols / s.group_size; ++g) {
                u.emplace_back();
                for (std::size_t j = g * s.group_size; j < (g + 1) * s.group_size; ++j) u.back().emplace_back(i, j);
            }
        break;
    }
    return u;
}

inline int ref_maxq(const quant_spec& s) { return s.symmetric ? (1 << (s.bits - 1)) - 1 : (1 << s.bits) - 1; }

/// q = clamp(round(x / scale) [+ zero]) with the reference's clamp range.
template <class T>
T ref_code(T x, ref_params<T> p, const quant_spec& s, bool use_zero)
{
    const T maxq = static_cast<T>(ref_maxq(s));
    T q = std::nearbyint(x / p.scale);
    if (use_zero) q = q + p.zero;
    const T lo = use_zero ? T(0) : -(maxq + T(1));
    if (q < lo) q = lo;
    if (q > maxq) q = maxq;
    return q;
}

/// A product rounded to T: the volatile store keeps compilers from fusing it into an FMA with a
/// later addition (the reference rounds every product; -ffp-contract would not).
template <class T>
T round_product(T a, T b)
{
    volatile T r = a * b;
    return r;
}

/// Dequantized code with the correct formula (asymmetric uses the zero point).
template <class T>
T ref_fake(T x, ref_params<T> p, const quant_spec& s)
{
    const T q = ref_code(x, p, s, !s.symmetric);
    return s.symmetric ? round_product(p.scale, q) : round_product(p.scale, q - p.zero);
}

/// The reference's WeightQuantizer.fake_quantize: the symmetric formula whatever the spec says,
/// with qmax of the configured mode (2^b - 1 when asymmetric).
template <class T>
T ref_fake_weight_compat(T x, ref_params<T> p, const quant_spec& s)
{
    const T maxq = static_cast<T>(ref_maxq(s));
    T q = std::nearbyint(x / p.scale);
    if (q < -(maxq + T(1))) q = -(maxq + T(1));
    if (q > maxq) q = maxq;
    return round_product(p.scale, q);
}

/// Parameters of one unit from its values: range rules by role, clip ratio, optional MSE search.
template <class T>
ref_params<T> ref_unit_params(const std::vector<T>& v, const quant_spec& s)
{
    T lo = v.empty() ? T(0) : v[0];
    T hi = lo;
    for (T x : v) {
        lo = std::fmin(lo, x);
        hi = std::fmax(hi, x);
    }
    if (s.granularity != granularity::group) {
        lo = std::fmin(lo, T(0));
        hi = std::fmax(hi, T(0));
    }
    lo = round_product(lo, static_cast<T>(s.clip_ratio));
    hi = round_product(hi, static_cast<T>(s.clip_ratio));
    const T maxq = static_cast<T>(ref_maxq(s));
    const bool weight = s.role == quant_role::weight;
    ref_params<T> p{};
    T xmax = 0;
    if (s.symmetric) {
        xmax = std::fmax(std::fabs(lo), hi);
        if (weight) xmax = std::fmax(xmax, static_cast<T>(1e-5));
        p = {xmax == T(0) ? T(1) : xmax / maxq, T(0)};
    } else {
        if (lo == 0 && hi == 0) {
            lo = -1;
            hi = 1;
        }
        if (lo == hi && !(s.reference_compat && weight)) {
            lo = std::fmin(lo, T(0));
            hi = std::fmax(hi, T(0));
        }
        const T d = weight ? std::fmax(hi - lo, static_cast<T>(1e-5)) : hi - lo;
        p.scale = d / maxq;
        p.zero = std::nearbyint(-lo / p.scale);
    }
    if (!s.clip_search) return p;
    double best = std::numeric_limits<double>::infinity();
    const std::size_t n = static_cast<std::size_t>(s.clip_search->max_shrink * static_cast<double>(s.clip_search->grid));
    for (std::size_t i = 0; i < n; ++i) {
        const T f = static_cast<T>(1.0 - static_cast<double>(i) / static_cast<double>(s.clip_search->grid));
        ref_params<T> c{};
        if (s.symmetric) {
            c = {round_product(f, xmax) / maxq, T(0)};
        } else {
            const T flo = round_product(f, lo);
            c.scale = (round_product(f, hi) - flo) / maxq;
            c.zero = std::nearbyint(-flo / c.scale);
        }
        double err = 0;
        for (T x : v) err += std::pow(std::fabs(static_cast<double>(ref_fake(x, c, s) - x)), s.clip_search->norm);
        if (err < best) {  // NaN errors (zero scales) never win
            best = err;
            p = c;
        }
    }
    return p;
}

/// Parameters of every unit of a row-major rows x cols matrix.
template <class T>
std::vector<ref_params<T>> ref_find_params(const std::vector<T>& m, std::size_t rows, std::size_t cols,
                                           const quant_spec& s)
{
    std::vector<ref_params<T>> out;
    for (const auto& unit : ref_units(rows, cols, s)) {
        std::vector<T> v;
        for (auto [i, j] : unit) v.push_back(m[i * cols + j]);
        out.push_back(ref_unit_params(v, s));
    }
    return out;
}

/// Fake quantization of a row-major matrix, the formula chosen as the library documents.
template <class T>
std::vector<T> ref_fake_quantize(const std::vector<T>& m, std::size_t rows, std::size_t cols, const quant_spec& s)
{
    std::vector<T> out(m.size());
    const auto units = ref_units(rows, cols, s);
    const auto params = ref_find_params(m, rows, cols, s);
    for (std::size_t k = 0; k < units.size(); ++k)
        for (auto [i, j] : units[k]) {
            const T x = m[i * cols + j];
            out[i * cols + j] = (s.reference_compat && s.role == quant_role::weight && !s.symmetric)
                                    ? ref_fake_weight_compat(x, params[k], s)
                                    : ref_fake(x, params[k], s);
        }
    return out;
}

}  // namespace spinquant::test
