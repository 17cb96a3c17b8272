#pragma once
/// Fake and real quantization with SpinQuant's reference semantics (REFERENCE.md §1a): per tensor,
/// row, column or group; symmetric or asymmetric; 1..16 bits; round half to even; the MSE clip
/// search; the straight-through backward. Eigen-free: xsimd and the vocabulary headers only.
///
/// Vocabulary. A quant_spec says how; a unit is the set of elements that share one
/// quant_params {scale, zero}: the whole matrix (granularity::tensor), a row (a token of an
/// activation, an output channel of an [out, in] weight), a column, or a group of group_size
/// consecutive elements of a row (a head when group_size = head_dim). Parameters are ordered
/// unit by unit: row i's groups at i * (cols / group_size) + g.
///
/// Formulas, computed in the element type T (float data: float32, as the reference does):
///   symmetric  qmax = 2^(b-1) - 1, q = clamp(round(x / scale), -(qmax + 1), qmax), x~ = scale * q
///   asymmetric qmax = 2^b - 1,     q = clamp(round(x / scale) + zero, 0, qmax), x~ = scale * (q - zero)
/// with round half to even and a true division. The range [xmin, xmax] of a unit follows the
/// reference's two quantizers, chosen by quant_spec::role:
///   * row / column / tensor units: xmin = min(min x, 0), xmax = max(max x, 0) (the range holds 0);
///     group units: xmin = min x, xmax = max x (the reference does not extend group ranges to 0);
///   * xmin and xmax are multiplied by clip_ratio;
///   * activation: symmetric scale = max(|xmin|, xmax) / qmax, 1 where that is 0; asymmetric:
///     (xmin, xmax) = (-1, 1) when both are 0, scale = (xmax - xmin) / qmax,
///     zero = round(-xmin / scale) (outside [0, qmax] for an all-positive group, as in the reference);
///   * weight: as activation, but the symmetric max(|xmin|, xmax) and the asymmetric
///     (xmax - xmin) are clamped to at least 1e-5 (and the all-zero symmetric scale is 1e-5 / qmax).
/// Where the reference is wrong we are not, unless quant_spec::reference_compat asks for it:
///   * the reference's weight fake_quantize ignores the zero point of asymmetric weights (it
///     applies the symmetric formula, with clamp range [-2^b, 2^b - 1], to asymmetric
///     parameters; facebookresearch/SpinQuant#24). Default: the asymmetric formula.
///   * a constant asymmetric group (xmin == xmax != 0) gets a zero scale in the reference:
///     activations then come out NaN, weights get the 1e-5 clamp and a huge zero point. Default:
///     the range is widened to include 0. reference_compat keeps the weight clamp; for
///     activations it also widens (NaN output is never useful: the one deliberate deviation).
///   * the reference's straight-through estimator passes every gradient; by default ours zeroes
///     the gradient of elements the clamp cut off (fake_quantize_backward).
/// bits = 16: the reference's activation quantizer treats 16 bits as "off". Here 16 bits is a
/// real 16-bit grid like any other width; a caller that wants no quantization does not call it.
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <xsimd/xsimd.hpp>

#include "concepts.hpp"
#include "detail/checks.hpp"
#include "detail/quant_kernels.hpp"
#include "error.hpp"

namespace spinquant {

/// Which elements share one (scale, zero).
enum class granularity {
    tensor,  ///< the whole matrix (the reference's per-tensor WeightQuantizer)
    row,     ///< each row: per token for activations, per output channel for [out, in] weights
    column,  ///< each column
    group,   ///< each run of group_size consecutive elements of a row (per head with group_size = head_dim)
};

/// Which of the reference's two range rules applies (see the header comment).
enum class quant_role {
    activation,  ///< ActQuantizer: activations, K and V caches (no 1e-5 clamp; scale 1 for all-zero symmetric units)
    weight,      ///< WeightQuantizer: weights (1e-5 clamp on the range)
};

/// Rounding of x / scale. The reference uses torch.round, i.e. half to even; that is the only mode.
enum class rounding_mode { nearest_even };

/// The reference's MSE clip search (WeightQuantizer with mse=True, the scripts' --w_clip): for
/// i = 0 .. int(max_shrink * grid) - 1 try the range (p * xmin, p * xmax) with p = 1 - i / grid,
/// and keep a candidate when sum |x~ - x|^norm over the unit is strictly smaller than the best so far.
struct clip_search_options {
    double norm = 2.4;        ///< exponent of the error; > 0
    std::size_t grid = 100;   ///< shrink step is 1 / grid; >= 1
    double max_shrink = 0.8;  ///< fraction of the grid tried, in (0, 1]: 80 candidates by default
};

/// How to quantize. Aggregate; start from quant_spec::activation or quant_spec::weight for the
/// reference's settings. Checked by every function that takes one (see validate()).
struct quant_spec {
    int bits = 4;                     ///< 1..16 (symmetric needs >= 2); errc::bits_out_of_range otherwise
    bool symmetric = true;            ///< symmetric (zero = 0) or asymmetric (integer zero point)
    spinquant::granularity granularity = spinquant::granularity::row;  ///< which elements share parameters
    std::size_t group_size = 0;       ///< elements per group; used (and required >= 1) only for granularity::group
    double clip_ratio = 1.0;          ///< (0, 1]: the range is multiplied by it before the scale is derived
    quant_role role = quant_role::weight;                          ///< the reference's range rule to follow
    rounding_mode rounding = rounding_mode::nearest_even;          ///< the only mode, named for clarity
    std::optional<clip_search_options> clip_search{};             ///< MSE clip search per unit when set
    bool reference_compat = false;    ///< reproduce the reference's bugs (see the header comment)
    bool check_finite = true;         ///< reject NaN/Inf input (errc::non_finite, data untouched); when
                                      ///< false, units holding NaN/Inf get unspecified values (no UB)

    /// Smallest code: -2^(bits-1) when symmetric, 0 when asymmetric. Precondition: valid bits.
    [[nodiscard]] constexpr int qmin() const noexcept { return symmetric ? -(1 << (bits - 1)) : 0; }
    /// Largest code: 2^(bits-1) - 1 when symmetric, 2^bits - 1 when asymmetric.
    [[nodiscard]] constexpr int qmax() const noexcept { return symmetric ? (1 << (bits - 1)) - 1 : (1 << bits) - 1; }

    /// Throws spinquant::error unless the spec is usable: bits in 1..16 (2..16 when symmetric;
    /// errc::bits_out_of_range), clip_ratio in (0, 1], group_size >= 1 for granularity::group,
    /// clip_search fields in range (errc::bad_argument).
    void validate() const;

    /// The reference's activation quantizer (ActQuantizer.configure): per token (row), or per
    /// group of `group_size` elements of a token when group_size > 0 (per head: head_dim).
    /// SpinQuant's scripts use asymmetric activations (--a_asym), the default here.
    [[nodiscard]] static constexpr quant_spec activation(int bits, bool is_symmetric = false, std::size_t group_size = 0,
                                                         double clip = 1.0) noexcept
    {
        quant_spec s;
        s.bits = bits;
        s.symmetric = is_symmetric;
        s.granularity = group_size > 0 ? spinquant::granularity::group : spinquant::granularity::row;
        s.group_size = group_size;
        s.clip_ratio = clip;
        s.role = quant_role::activation;
        return s;
    }
    /// The reference's weight quantizer (WeightQuantizer.configure, perchannel=True): per output
    /// channel (row of [out, in]), or per group of `group_size` inputs when group_size > 0;
    /// `mse` turns on the clip search with the reference's defaults (--w_clip).
    [[nodiscard]] static constexpr quant_spec weight(int bits, bool is_symmetric = true, std::size_t group_size = 0,
                                                     bool mse = false) noexcept
    {
        quant_spec s;
        s.bits = bits;
        s.symmetric = is_symmetric;
        s.granularity = group_size > 0 ? spinquant::granularity::group : spinquant::granularity::row;
        s.group_size = group_size;
        s.role = quant_role::weight;
        if (mse) s.clip_search = clip_search_options{};
        return s;
    }
};

/// Scale and zero point of one unit. zero is an integer stored as T (0 when symmetric); it may lie
/// outside [qmin, qmax] for group ranges that exclude 0, exactly as in the reference.
template <real_scalar T>
struct quant_params {
    T scale = T(1);
    T zero = T(0);
};

/// Number of parameter units of a rows x cols matrix under `spec`: 1 (tensor), rows (row), cols
/// (column) or rows * cols / group_size (group). Precondition: spec valid, group_size divides cols.
[[nodiscard]] constexpr std::size_t param_count(const quant_spec& spec, std::size_t rows, std::size_t cols) noexcept
{
    switch (spec.granularity) {
    case granularity::tensor: return 1;
    case granularity::row: return rows;
    case granularity::column: return cols;
    case granularity::group: return spec.group_size == 0 ? 0 : rows * (cols / spec.group_size);
    }
    return 0;
}

/// Bytes of one packed row of `cols` codes: (cols + 1) / 2 for bits <= 4 (two codes per byte),
/// cols for bits <= 8, 2 * cols for bits <= 16 (little endian).
[[nodiscard]] constexpr std::size_t packed_row_bytes(int bits, std::size_t cols) noexcept
{
    return bits <= 4 ? (cols + 1) / 2 : bits <= 8 ? cols : 2 * cols;
}

/// Integer codes and their parameters: what an inference engine consumes.
///
/// Layout. Row i's codes are codes[i * row_bytes, (i + 1) * row_bytes), columns in order:
///   * bits <= 4: two per byte, column 2k in the low nibble and 2k + 1 in the high nibble (a last
///     odd column leaves the high nibble 0), as SpinQuant's pack_i4;
///   * bits 5..8: one byte per code; bits 9..16: two bytes per code, little endian;
///   * symmetric codes are signed, in two's complement of that width (4, 8 or 16 bits);
///     asymmetric codes are unsigned.
/// scales[u] and zeros[u] (zeros all 0 when symmetric) belong to unit u in the order of
/// param_count(). For granularity::group, column j of row i uses unit
/// i * (cols / group_size) + group_of(j), where group_of(j) is group_index[j] when group_index
/// is not empty (act-order GPTQ with groups, like AutoGPTQ's g_idx) and j / group_size otherwise.
/// The value of element (i, j) is scale * (code - zero).
template <real_scalar T>
struct quantized_matrix {
    quant_spec spec{};                       ///< how the codes were made (bits decide the packing)
    std::size_t rows = 0;                    ///< rows of the quantized matrix
    std::size_t cols = 0;                    ///< columns of the quantized matrix
    std::size_t row_bytes = 0;               ///< packed_row_bytes(spec.bits, cols)
    std::vector<std::uint8_t> codes;         ///< rows * row_bytes bytes, layout above
    std::vector<T> scales;                   ///< one per unit
    std::vector<T> zeros;                    ///< one per unit (0 when symmetric)
    std::vector<std::uint32_t> group_index;  ///< empty, or the group of each column (granularity::group only)

    /// The group (within its row) of column j, for granularity::group.
    [[nodiscard]] std::size_t group_of(std::size_t j) const noexcept
    {
        return group_index.empty() ? j / spec.group_size : std::size_t{group_index[j]};
    }
    /// The unit (index into scales/zeros) that element (i, j) belongs to.
    [[nodiscard]] std::size_t unit_of(std::size_t i, std::size_t j) const noexcept
    {
        switch (spec.granularity) {
        case granularity::tensor: return 0;
        case granularity::row: return i;
        case granularity::column: return j;
        case granularity::group: return i * (cols / spec.group_size) + group_of(j);
        }
        return 0;
    }
    /// The integer code of element (i, j). Precondition: i < rows, j < cols.
    [[nodiscard]] std::int32_t code(std::size_t i, std::size_t j) const noexcept
    {
        SPINQUANT_ASSERT(i < rows && j < cols);
        return detail::unpack_code<xsimd::default_arch>(codes.data() + i * row_bytes, j, spec.bits, spec.symmetric);
    }
    /// The parameters of element (i, j).
    [[nodiscard]] quant_params<T> params(std::size_t i, std::size_t j) const noexcept
    {
        const std::size_t u = unit_of(i, j);
        return {scales[u], zeros[u]};
    }
};

// ---------------------------------------------------------------------------------------------
// Internals shared by the public functions below.

namespace detail {

/// A read-only matrix that is not also a vector (a vector goes to the per-token overloads).
template <class M>
concept quant_matrix_arg = real_matrix<M> && !real_vector<M>;
/// A writable matrix that is not also a vector.
template <class M>
concept quant_mutable_matrix_arg = mutable_real_matrix<M> && !real_vector<M>;

template <class M>
using quant_scalar_t = std::remove_const_t<matrix_element_t<M>>;

inline void check_spec(const quant_spec& s, std::string_view where)
{
    if (s.bits < 1 || s.bits > 16)
        fail(errc::bits_out_of_range, where, "spec.bits is " + std::to_string(s.bits) + ", expected 1..16");
    if (s.symmetric && s.bits < 2)
        fail(errc::bits_out_of_range, where,
             "spec.bits is 1 with symmetric = true; symmetric quantization needs 2..16 bits (use asymmetric for 1 bit)");
    if (!(s.clip_ratio > 0.0 && s.clip_ratio <= 1.0))
        fail(errc::bad_argument, where, "spec.clip_ratio is " + std::to_string(s.clip_ratio) + ", expected (0, 1]");
    if (s.granularity == granularity::group && s.group_size == 0)
        fail(errc::bad_argument, where, "spec.group_size is 0 with granularity::group, expected >= 1");
    if (s.clip_search) {
        const clip_search_options& c = *s.clip_search;
        if (!(c.norm > 0.0 && std::isfinite(c.norm)))
            fail(errc::bad_argument, where, "spec.clip_search.norm is " + std::to_string(c.norm) + ", expected > 0");
        if (c.grid == 0) fail(errc::bad_argument, where, "spec.clip_search.grid is 0, expected >= 1");
        if (!(c.max_shrink > 0.0 && c.max_shrink <= 1.0))
            fail(errc::bad_argument, where,
                 "spec.clip_search.max_shrink is " + std::to_string(c.max_shrink) + ", expected (0, 1]");
    }
}

/// The spec is valid and fits a rows x cols matrix (group_size divides cols).
inline void check_spec_for(const quant_spec& s, std::size_t cols, std::string_view where, std::string_view what)
{
    check_spec(s, where);
    if (s.granularity == granularity::group && cols % s.group_size != 0)
        fail(errc::bad_shape, where,
             std::string(what) + " has " + std::to_string(cols) + " columns, not a multiple of spec.group_size " +
                 std::to_string(s.group_size));
}

/// Every element of v is finite (SIMD scan; the scalar check only runs to name the culprit).
template <class T, class Arch>
void require_finite_view(matrix_view<const T> v, std::string_view where, std::string_view what)
{
    if (v.empty()) return;
    const bool by_rows = v.has_contiguous_rows() || v.row_stride >= v.col_stride;
    const matrix_view<const T> w = by_rows ? v : v.transposed();  // walk along the smaller stride
    for (std::size_t i = 0; i < w.rows; ++i)
        if (!run_is_finite<T, Arch>(w.data + i * w.row_stride, w.cols, w.col_stride))
            require_finite(v, where, what);
}

/// Unit k of v (see param_count); a column unit is returned as a 1 x rows strided run.
template <class T>
[[nodiscard]] matrix_view<T> unit_view(matrix_view<T> v, const quant_spec& s, std::size_t k) noexcept
{
    switch (s.granularity) {
    case granularity::tensor: return v;
    case granularity::row: return v.block(k, 0, 1, v.cols);
    case granularity::column: return v.block(0, k, v.rows, 1).transposed();
    case granularity::group: {
        const std::size_t ng = v.cols / s.group_size;
        return v.block(k / ng, (k % ng) * s.group_size, 1, s.group_size);
    }
    }
    return v;
}

/// Smallest and largest element of a non-empty view.
template <class T, class Arch>
[[nodiscard]] run_extent<T> extent_of(matrix_view<const T> u) noexcept
{
    run_extent<T> e = extent_of_run<T, Arch>(u.data, u.cols, u.col_stride);
    for (std::size_t i = 1; i < u.rows; ++i) {
        const run_extent<T> r = extent_of_run<T, Arch>(u.data + i * u.row_stride, u.cols, u.col_stride);
        e.lo = r.lo < e.lo ? r.lo : e.lo;
        e.hi = r.hi > e.hi ? r.hi : e.hi;
    }
    return e;
}

/// The range a unit's scale derives from, after the role's rules (see the header comment).
/// Symmetric: {-xmax, xmax}. Asymmetric: {xmin, xmax} after the all-zero guard and, where it
/// applies, the degenerate-range widening.
template <class T, class Arch>
[[nodiscard]] run_extent<T> quant_bounds(run_extent<T> e, const quant_spec& s) noexcept
{
    T lo = e.lo;
    T hi = e.hi;
    if (s.granularity != granularity::group) {
        // torch.minimum(min, 0) / torch.maximum(max, 0), keeping the sign of a -0.0 minimum as they do.
        lo = T(0) < lo ? T(0) : lo;
        hi = hi < T(0) ? T(0) : hi;
    }
    const T clip = static_cast<T>(s.clip_ratio);
    lo = rounded<T, Arch>(lo * clip);
    hi = rounded<T, Arch>(hi * clip);
    const T tiny = static_cast<T>(1e-5);
    if (s.symmetric) {
        const T a = std::fabs(lo);
        T xmax = a < hi ? hi : a;
        if (s.role == quant_role::weight) xmax = xmax < tiny ? tiny : xmax;
        return {-xmax, xmax};
    }
    if (lo == T(0) && hi == T(0)) {
        lo = T(-1);
        hi = T(1);
    }
    // lo == hi != 0 only happens for a constant group. The reference's zero scale gives NaN for
    // activations and a 1e-5 clamp for weights; widen to include 0 instead (exact for the constant).
    if (lo == hi && !(s.reference_compat && s.role == quant_role::weight)) {
        lo = T(0) < lo ? T(0) : lo;
        hi = hi < T(0) ? T(0) : hi;
    }
    return {lo, hi};
}

/// Parameters from bounds (the initial, unsearched ones: clamps and guards applied).
template <class T, class Arch>
[[nodiscard]] quant_params<T> params_from_bounds(run_extent<T> b, const quant_spec& s) noexcept
{
    const T qmax = static_cast<T>(s.qmax());
    if (s.symmetric) {
        const T xmax = b.hi;
        T scale = xmax / qmax;
        if (xmax == T(0)) scale = T(1);  // activations only: weights were clamped to >= 1e-5
        return {scale, T(0)};
    }
    T d = b.hi - b.lo;
    const T tiny = static_cast<T>(1e-5);
    if (s.role == quant_role::weight) d = d < tiny ? tiny : d;
    const T scale = d / qmax;
    return {scale, std::nearbyint(-b.lo / scale)};
}

/// The clip-search error of candidate p over a unit.
template <class T, class Arch>
[[nodiscard]] double clip_error(matrix_view<const T> u, quant_params<T> p, const quant_spec& s, double norm) noexcept
{
    double err = 0;
    const T qlo = static_cast<T>(s.qmin());
    const T qhi = static_cast<T>(s.qmax());
    for (std::size_t i = 0; i < u.rows; ++i) {
        const T* r = u.data + i * u.row_stride;
        err += s.symmetric ? clip_error_run<T, Arch, fq_kind::symmetric>(r, u.cols, u.col_stride, p.scale, p.zero, qlo,
                                                                          qhi, norm)
                           : clip_error_run<T, Arch, fq_kind::asymmetric>(r, u.cols, u.col_stride, p.scale, p.zero,
                                                                           qlo, qhi, norm);
    }
    return err;
}

/// The parameters of one non-empty unit: range, role rules, then the clip search when asked.
template <class T, class Arch>
[[nodiscard]] quant_params<T> unit_params(matrix_view<const T> u, const quant_spec& s) noexcept
{
    // An empty unit (a 0-column matrix) gets the parameters of an all-zero one.
    const run_extent<T> b = quant_bounds<T, Arch>(u.empty() ? run_extent<T>{T(0), T(0)} : extent_of<T, Arch>(u), s);
    quant_params<T> best_p = params_from_bounds<T, Arch>(b, s);
    if (!s.clip_search) return best_p;
    const clip_search_options& c = *s.clip_search;
    const T qmax = static_cast<T>(s.qmax());
    const auto steps = static_cast<std::size_t>(c.max_shrink * static_cast<double>(c.grid));
    double best = std::numeric_limits<double>::infinity();
    for (std::size_t i = 0; i < steps; ++i) {
        // p in double, then the product in T: the reference multiplies a float32 tensor by a Python float.
        const T p = static_cast<T>(1.0 - static_cast<double>(i) / static_cast<double>(c.grid));
        quant_params<T> cand;
        if (s.symmetric) {
            cand = {rounded<T, Arch>(p * b.hi) / qmax, T(0)};
        } else {
            const T lo1 = rounded<T, Arch>(p * b.lo);
            const T hi1 = rounded<T, Arch>(p * b.hi);
            cand.scale = (hi1 - lo1) / qmax;
            if (!(cand.scale > T(0))) continue;  // a zero scale: the reference's error is NaN, never better
            cand.zero = std::nearbyint(-lo1 / cand.scale);
        }
        if (!(cand.scale > T(0))) continue;  // symmetric all-zero activation unit: same reason
        const double err = clip_error<T, Arch>(u, cand, s, c.norm);
        if (err < best) {  // strictly better, as the reference
            best = err;
            best_p = cand;
        }
    }
    return best_p;
}

/// Code range and formula of the fake quantizer (not of the codes: see quantize).
template <class T>
struct fake_formula {
    fq_kind kind;
    T qlo;
    T qhi;
};
template <class T>
[[nodiscard]] fake_formula<T> fake_formula_of(const quant_spec& s) noexcept
{
    if (s.symmetric) return {fq_kind::symmetric, static_cast<T>(s.qmin()), static_cast<T>(s.qmax())};
    if (s.reference_compat && s.role == quant_role::weight)  // WeightQuantizer.fake_quantize (#24)
        return {fq_kind::symmetric, static_cast<T>(-s.qmax() - 1), static_cast<T>(s.qmax())};
    return {fq_kind::asymmetric, T(0), static_cast<T>(s.qmax())};
}

/// Fake-quantizes unit `in` into `out` (same shape) with parameters p; `next` (or null) is the
/// contiguous unit the caller reads next, to prefetch.
template <class T, class Arch>
void fake_quantize_unit(matrix_view<const T> in, matrix_view<T> out, quant_params<T> p, fake_formula<T> f,
                        const T* next = nullptr) noexcept
{
    for (std::size_t i = 0; i < in.rows; ++i) {
        const T* a = in.data + i * in.row_stride;
        T* b = out.data + i * out.row_stride;
        const T* ahead = in.rows == 1 ? next : nullptr;
        if (f.kind == fq_kind::symmetric)
            fake_quantize_run<T, Arch, fq_kind::symmetric>(a, in.col_stride, b, out.col_stride, in.cols, p.scale,
                                                           p.zero, f.qlo, f.qhi, ahead);
        else
            fake_quantize_run<T, Arch, fq_kind::asymmetric>(a, in.col_stride, b, out.col_stride, in.cols, p.scale,
                                                            p.zero, f.qlo, f.qhi, ahead);
    }
}

/// find_params without checks, into `out` (param_count elements).
template <class T, class Arch>
void find_params_unchecked(matrix_view<const T> v, const quant_spec& s, std::span<quant_params<T>> out) noexcept
{
    for (std::size_t k = 0; k < out.size(); ++k) out[k] = unit_params<T, Arch>(unit_view(v, s, k), s);
}

/// fake_quantize without checks; `in` and `out` may be the same storage.
template <class T, class Arch>
void fake_quantize_unchecked(matrix_view<const T> in, matrix_view<T> out, const quant_spec& s) noexcept
{
    if (in.empty()) return;
    const fake_formula<T> f = fake_formula_of<T>(s);
    const std::size_t n = param_count(s, in.rows, in.cols);
    // Row and group units are contiguous runs when rows are: prefetch the next one.
    const bool runs = (s.granularity == granularity::row || s.granularity == granularity::group) &&
                      in.has_contiguous_rows();
    for (std::size_t k = 0; k < n; ++k) {
        const matrix_view<const T> u = unit_view(in, s, k);
        const T* next = runs && k + 1 < n ? unit_view(in, s, k + 1).data : nullptr;
        // The unit's parameters are computed from all its elements before any is written.
        fake_quantize_unit<T, Arch>(u, unit_view(out, s, k), unit_params<T, Arch>(u, s), f, next);
    }
}

/// Parameters given by the caller must be usable: finite, scale > 0, integer zero.
template <class T>
void check_params(std::span<const quant_params<T>> p, std::size_t expected, std::string_view where)
{
    require_size(p.size(), expected, where, "params");
    for (std::size_t k = 0; k < p.size(); ++k) {
        const T s = p[k].scale;
        const T z = p[k].zero;
        if (!(s > T(0)) || !(s - s == T(0)) || !(z - z == T(0)) || std::nearbyint(z) != z)
            fail(errc::bad_argument, where,
                 "params[" + std::to_string(k) + "] is {scale " + std::to_string(s) + ", zero " + std::to_string(z) +
                     "}, expected a finite scale > 0 and an integer zero");
    }
}

/// A 1 x n view of a vector.
template <class E>
[[nodiscard]] matrix_view<E> row_view(std::span<E> s) noexcept
{
    return {s.data(), 1, s.size(), s.size(), 1};
}

/// Calls f(c0, length, unit) for each run of consecutive columns of row i that share a unit.
template <class T, class F>
void for_each_segment(const quantized_matrix<T>& q, std::size_t i, F&& f)
{
    const quant_spec& s = q.spec;
    switch (s.granularity) {
    case granularity::tensor: f(std::size_t{0}, q.cols, std::size_t{0}); return;
    case granularity::row: f(std::size_t{0}, q.cols, i); return;
    case granularity::column:
        for (std::size_t j = 0; j < q.cols; ++j) f(j, std::size_t{1}, j);
        return;
    case granularity::group: {
        const std::size_t ng = q.cols / s.group_size;
        if (q.group_index.empty())
            for (std::size_t g = 0; g < ng; ++g) f(g * s.group_size, s.group_size, i * ng + g);
        else
            for (std::size_t j = 0; j < q.cols; ++j) f(j, std::size_t{1}, i * ng + q.group_index[j]);
        return;
    }
    }
}

/// Elements per chunk of the encode/decode loops (a stack buffer; even, so 4-bit pairs stay in one chunk).
inline constexpr std::size_t quant_chunk = 256;

/// Codes of row i of v into q (params already in q.scales/zeros).
template <class T, class Arch>
void encode_row(matrix_view<const T> v, std::size_t i, quantized_matrix<T>& q) noexcept
{
    const quant_spec& s = q.spec;
    const T qlo = static_cast<T>(s.qmin());
    const T qhi = static_cast<T>(s.qmax());
    std::uint8_t* dst = q.codes.data() + i * q.row_bytes;
    const T* src = v.data + i * v.row_stride;
    // While this row is coded (from cache: its parameters were just computed), fetch the next one.
    const T* next_row = v.has_contiguous_rows() && i + 1 < v.rows ? src + v.row_stride : nullptr;
    T buf[quant_chunk];
    for_each_segment(q, i, [&](std::size_t c0, std::size_t len, std::size_t u) {
        const T sc = q.scales[u];
        const T z = q.zeros[u];
        for (std::size_t off = 0; off < len; off += quant_chunk) {
            const std::size_t n = len - off < quant_chunk ? len - off : quant_chunk;
            const T* a = src + (c0 + off) * v.col_stride;
            const T* ahead = next_row != nullptr ? next_row + c0 + off : nullptr;
            if (s.symmetric)
                code_run<T, Arch, fq_kind::symmetric>(a, v.col_stride, buf, n, sc, z, qlo, qhi, ahead);
            else
                code_run<T, Arch, fq_kind::asymmetric>(a, v.col_stride, buf, n, sc, z, qlo, qhi, ahead);
            pack_codes<T, Arch>(buf, n, c0 + off, s.bits, dst);
        }
    });
}

/// Shapes the output quantized_matrix for v and spec (reusing its storage).
template <class T>
void shape_quantized(quantized_matrix<T>& q, const quant_spec& s, std::size_t rows, std::size_t cols)
{
    q.spec = s;
    q.rows = rows;
    q.cols = cols;
    q.row_bytes = packed_row_bytes(s.bits, cols);
    q.codes.resize(rows * q.row_bytes);
    const std::size_t n = param_count(s, rows, cols);
    q.scales.resize(n);
    q.zeros.resize(n);
    q.group_index.clear();
}

/// quantize without checks; q already shaped.
template <class T, class Arch>
void quantize_unchecked(matrix_view<const T> v, quantized_matrix<T>& q) noexcept
{
    const quant_spec& s = q.spec;
    const auto set = [&](std::size_t k) {
        const quant_params<T> p = unit_params<T, Arch>(unit_view(v, s, k), s);
        q.scales[k] = p.scale;
        q.zeros[k] = p.zero;
    };
    if (s.granularity == granularity::row || s.granularity == granularity::group) {
        // Units lie inside rows: parameters and codes row by row while the row is in cache.
        const std::size_t per_row = param_count(s, 1, v.cols);
        for (std::size_t i = 0; i < v.rows; ++i) {
            for (std::size_t k = i * per_row; k < (i + 1) * per_row; ++k) set(k);
            encode_row<T, Arch>(v, i, q);
        }
        return;
    }
    for (std::size_t k = 0; k < q.scales.size(); ++k) set(k);
    for (std::size_t i = 0; i < v.rows; ++i) encode_row<T, Arch>(v, i, q);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Public API

inline void quant_spec::validate() const { detail::check_spec(*this, "quant_spec::validate"); }

/// Computes the quantization parameters of every unit of `m` into `out` (param_count(spec,
/// rows, cols) elements, unit order documented there), with the clip search when
/// spec.clip_search is set. This is the parameter layer GPTQ uses: pass a column block with
/// granularity::row to get per-row parameters of that block.
/// Errors (nothing written): invalid spec (see quant_spec::validate), group_size not dividing
/// cols (errc::bad_shape), out.size() wrong (errc::bad_shape), NaN/Inf in m when
/// spec.check_finite (errc::non_finite). Allocation-free. O(size) (x 80 with the clip search).
template <class Arch = xsimd::default_arch, class M>
    requires detail::quant_matrix_arg<M>
void find_params(const M& m, const quant_spec& spec, std::span<quant_params<detail::quant_scalar_t<M>>> out)
{
    using T = detail::quant_scalar_t<M>;
    const matrix_view<const T> v = as_matrix_view(m);
    detail::check_spec_for(spec, v.cols, "find_params", "m");
    detail::require_size(out.size(), param_count(spec, v.rows, v.cols), "find_params", "out");
    if (spec.check_finite) detail::require_finite_view<T, Arch>(v, "find_params", "m");
    detail::find_params_unchecked<T, Arch>(v, spec, out);
}

/// find_params for one vector seen as a 1 x n matrix (one token: granularity::row gives one
/// parameter, granularity::group one per group). Same errors. Allocation-free.
template <class Arch = xsimd::default_arch, real_vector V>
void find_params(const V& x, const quant_spec& spec, std::span<quant_params<std::remove_const_t<element_t<const V>>>> out)
{
    const auto s = spinquant::as_span(x);
    using T = std::remove_const_t<typename decltype(s)::element_type>;
    const matrix_view<const T> v = detail::row_view(std::span<const T>(s.data(), s.size()));
    detail::check_spec_for(spec, v.cols, "find_params", "x");
    detail::require_size(out.size(), param_count(spec, 1, v.cols), "find_params", "out");
    if (spec.check_finite) detail::require_finite_view<T, Arch>(v, "find_params", "x");
    detail::find_params_unchecked<T, Arch>(v, spec, out);
}

/// The reference's MSE clip search (WeightQuantizer with mse=True): find_params with
/// spec.clip_search = opts. Same errors as find_params, plus errc::bad_argument for opts out of
/// range. Allocation-free; about 80 fake quantizations of m with the default options.
template <class Arch = xsimd::default_arch, class M>
    requires detail::quant_matrix_arg<M>
void search_clip(const M& m, const quant_spec& spec, std::span<quant_params<detail::quant_scalar_t<M>>> out,
                 const clip_search_options& opts = {})
{
    quant_spec s = spec;
    s.clip_search = opts;
    using T = detail::quant_scalar_t<M>;
    const matrix_view<const T> v = as_matrix_view(m);
    detail::check_spec_for(s, v.cols, "search_clip", "m");
    detail::require_size(out.size(), param_count(s, v.rows, v.cols), "search_clip", "out");
    if (s.check_finite) detail::require_finite_view<T, Arch>(v, "search_clip", "m");
    detail::find_params_unchecked<T, Arch>(v, s, out);
}

/// The integer code of one value with given parameters (the proper formula: asymmetric codes
/// include the zero point even under reference_compat). Precondition: spec valid, p.scale > 0.
/// NaN maps to qmin. Same arithmetic as the vectorised kernels, so results agree bit for bit.
template <class Arch = xsimd::default_arch, real_scalar T>
[[nodiscard]] std::int32_t quantize_value(T x, quant_params<T> p, const quant_spec& spec) noexcept
{
    const T qlo = static_cast<T>(spec.qmin());
    const T qhi = static_cast<T>(spec.qmax());
    const T q = spec.symmetric ? detail::code_of<T, Arch, detail::fq_kind::symmetric>(x, p.scale, p.zero, qlo, qhi)
                               : detail::code_of<T, Arch, detail::fq_kind::asymmetric>(x, p.scale, p.zero, qlo, qhi);
    return static_cast<std::int32_t>(q);
}

/// The value a code stands for: scale * (code - zero) (scale * code when symmetric).
template <class Arch = xsimd::default_arch, real_scalar T>
[[nodiscard]] T dequantize_value(std::int32_t code, quant_params<T> p, const quant_spec& spec) noexcept
{
    const T q = static_cast<T>(code);
    return spec.symmetric ? detail::value_of<T, Arch, detail::fq_kind::symmetric>(q, p.scale, p.zero)
                          : detail::value_of<T, Arch, detail::fq_kind::asymmetric>(q, p.scale, p.zero);
}

/// The fake-quantized value of x with given parameters: exactly what fake_quantize writes for an
/// element of that unit (including the reference_compat weight formula). Precondition: spec
/// valid, p.scale > 0. For GPTQ-style column-at-a-time quantization.
template <class Arch = xsimd::default_arch, real_scalar T>
[[nodiscard]] T fake_quantize_value(T x, quant_params<T> p, const quant_spec& spec) noexcept
{
    const detail::fake_formula<T> f = detail::fake_formula_of<T>(spec);
    if (f.kind == detail::fq_kind::symmetric)
        return detail::value_of<T, Arch, detail::fq_kind::symmetric>(
            detail::code_of<T, Arch, detail::fq_kind::symmetric>(x, p.scale, p.zero, f.qlo, f.qhi), p.scale, p.zero);
    return detail::value_of<T, Arch, detail::fq_kind::asymmetric>(
        detail::code_of<T, Arch, detail::fq_kind::asymmetric>(x, p.scale, p.zero, f.qlo, f.qhi), p.scale, p.zero);
}

/// Fake-quantizes `m` in place: each unit gets its parameters from its own elements (and the
/// clip search when spec.clip_search is set), then every element becomes its dequantized code.
/// Errors (m untouched): invalid spec, group_size not dividing cols (errc::bad_shape), NaN/Inf in
/// m when spec.check_finite (errc::non_finite). Allocation-free; any strides (contiguous rows
/// take the SIMD path). Idempotent with clip_ratio = 1 and no clip search, up to the rounding of
/// the scale the second call recomputes from the quantized range (a few ulps; at 16 bits in
/// float32, where x / scale resolves only ~1e-2 of a step, up to one step).
/// **Example** `spinquant::fake_quantize(W, spinquant::quant_spec::weight(4));  // W4 per channel`
template <class Arch = xsimd::default_arch, class M>
    requires detail::quant_mutable_matrix_arg<M>
void fake_quantize(M&& m, const quant_spec& spec)
{
    using T = detail::quant_scalar_t<M>;
    const matrix_view<T> v = as_matrix_view(m);
    detail::check_spec_for(spec, v.cols, "fake_quantize", "m");
    if (spec.check_finite) detail::require_finite_view<T, Arch>(v, "fake_quantize", "m");
    detail::fake_quantize_unchecked<T, Arch>(v, v, spec);
}

/// Fake-quantizes `in` into `out` (same shape; `in` unchanged). Same semantics and errors as the
/// in-place form, plus errc::bad_shape when the shapes differ; `out` is untouched on error.
/// `out` may be `in` itself, but not a partial overlap.
template <class Arch = xsimd::default_arch, class In, class Out>
    requires detail::quant_matrix_arg<In> && detail::quant_mutable_matrix_arg<Out> &&
             std::same_as<detail::quant_scalar_t<In>, matrix_element_t<Out>>
void fake_quantize(const In& in, Out&& out, const quant_spec& spec)
{
    using T = detail::quant_scalar_t<In>;
    const matrix_view<const T> a = as_matrix_view(in);
    const matrix_view<T> b = as_matrix_view(out);
    detail::check_spec_for(spec, a.cols, "fake_quantize", "in");
    detail::require_shape(b, a.rows, a.cols, "fake_quantize", "out");
    if (spec.check_finite) detail::require_finite_view<T, Arch>(a, "fake_quantize", "in");
    detail::fake_quantize_unchecked<T, Arch>(a, b, spec);
}

/// Fake-quantizes `m` in place with parameters computed elsewhere (find_params, search_clip,
/// GPTQ, a checkpoint): one per unit, in param_count order. Errors (m untouched): invalid spec,
/// params.size() wrong (errc::bad_shape), a scale that is not finite and > 0 or a zero that is
/// not an integer (errc::bad_argument), NaN/Inf in m when spec.check_finite. Allocation-free.
template <class Arch = xsimd::default_arch, class M>
    requires detail::quant_mutable_matrix_arg<M>
void fake_quantize(M&& m, std::span<const quant_params<detail::quant_scalar_t<M>>> params, const quant_spec& spec)
{
    using T = detail::quant_scalar_t<M>;
    const matrix_view<T> v = as_matrix_view(m);
    detail::check_spec_for(spec, v.cols, "fake_quantize", "m");
    detail::check_params<T>(params, param_count(spec, v.rows, v.cols), "fake_quantize");
    if (spec.check_finite) detail::require_finite_view<T, Arch>(v, "fake_quantize", "m");
    if (v.empty()) return;
    const detail::fake_formula<T> f = detail::fake_formula_of<T>(spec);
    for (std::size_t k = 0; k < params.size(); ++k) {
        const matrix_view<T> u = detail::unit_view(v, spec, k);
        detail::fake_quantize_unit<T, Arch>(u, u, params[k], f);
    }
}

/// Fake-quantizes one vector in place as a 1 x n matrix: one activation token per row
/// (granularity::row or tensor), or per group of group_size elements (per head). Same
/// semantics and errors as the matrix form. Allocation-free.
/// **Example** `spinquant::fake_quantize(token, spinquant::quant_spec::activation(8));  // A8 per token`
template <class Arch = xsimd::default_arch, mutable_real_vector V>
void fake_quantize(V&& x, const quant_spec& spec)
{
    const auto s = spinquant::as_span(x);
    using T = std::remove_const_t<typename decltype(s)::element_type>;
    const matrix_view<T> v = detail::row_view(s);
    detail::check_spec_for(spec, v.cols, "fake_quantize", "x");
    if (spec.check_finite) detail::require_finite_view<T, Arch>(v, "fake_quantize", "x");
    detail::fake_quantize_unchecked<T, Arch>(v, v, spec);
}

/// Fake-quantizes vector `in` into `out` (same length) as a 1 x n matrix; errors as above, plus
/// errc::bad_shape when the lengths differ (out untouched).
template <class Arch = xsimd::default_arch, real_vector In, mutable_real_vector Out>
    requires std::same_as<std::remove_const_t<element_t<In>>, element_t<Out>>
void fake_quantize(const In& in, Out&& out, const quant_spec& spec)
{
    const auto a = spinquant::as_span(in);
    const auto b = spinquant::as_span(out);
    using T = element_t<Out>;
    const matrix_view<const T> va = detail::row_view(std::span<const T>(a.data(), a.size()));
    detail::check_spec_for(spec, va.cols, "fake_quantize", "in");
    detail::require_size(b.size(), a.size(), "fake_quantize", "out");
    if (spec.check_finite) detail::require_finite_view<T, Arch>(va, "fake_quantize", "in");
    detail::fake_quantize_unchecked<T, Arch>(va, detail::row_view(b), spec);
}

/// Quantizes `m` into `out`, reusing out's storage (allocation-free once its vectors have the
/// capacity): parameters as find_params, codes with the proper formula (asymmetric codes use the
/// zero point also under reference_compat), packed as documented at quantized_matrix.
/// dequantize(out) equals fake_quantize(m) (without reference_compat's asymmetric weight formula).
/// Errors (out untouched): as find_params.
template <class Arch = xsimd::default_arch, class M>
    requires detail::quant_matrix_arg<M>
void quantize(const M& m, const quant_spec& spec, quantized_matrix<detail::quant_scalar_t<M>>& out)
{
    using T = detail::quant_scalar_t<M>;
    const matrix_view<const T> v = as_matrix_view(m);
    detail::check_spec_for(spec, v.cols, "quantize", "m");
    if (spec.check_finite) detail::require_finite_view<T, Arch>(v, "quantize", "m");
    detail::shape_quantized(out, spec, v.rows, v.cols);
    detail::quantize_unchecked<T, Arch>(v, out);
}

/// Quantizes `m` into a new quantized_matrix (allocates its codes and parameters; use the
/// overload above to reuse storage). Errors: as find_params.
/// **Example** `auto q = spinquant::quantize(W, spinquant::quant_spec::weight(4, true, 32));`
template <class Arch = xsimd::default_arch, class M>
    requires detail::quant_matrix_arg<M>
[[nodiscard]] quantized_matrix<detail::quant_scalar_t<M>> quantize(const M& m, const quant_spec& spec)
{
    quantized_matrix<detail::quant_scalar_t<M>> q;
    quantize<Arch>(m, spec, q);
    return q;
}

/// Writes the values of `q` (scale * (code - zero)) into `out`, which must be q.rows x q.cols.
/// Errors (out untouched): a shape mismatch, or a quantized_matrix whose vectors do not match its
/// spec and shape (errc::bad_shape), or an invalid spec / group_index entry (errc::bad_argument).
/// Allocation-free.
template <class Arch = xsimd::default_arch, real_scalar T, class M>
    requires detail::quant_mutable_matrix_arg<M> && std::same_as<matrix_element_t<M>, T>
void dequantize(const quantized_matrix<T>& q, M&& out)
{
    const matrix_view<T> o = as_matrix_view(out);
    detail::check_spec_for(q.spec, q.cols, "dequantize", "q");
    detail::require_shape(o, q.rows, q.cols, "dequantize", "out");
    if (q.row_bytes != packed_row_bytes(q.spec.bits, q.cols))
        detail::fail(errc::bad_shape, "dequantize",
                     "q.row_bytes is " + std::to_string(q.row_bytes) + ", expected " +
                         std::to_string(packed_row_bytes(q.spec.bits, q.cols)));
    detail::require_size(q.codes.size(), q.rows * q.row_bytes, "dequantize", "q.codes");
    const std::size_t units = param_count(q.spec, q.rows, q.cols);
    detail::require_size(q.scales.size(), units, "dequantize", "q.scales");
    detail::require_size(q.zeros.size(), units, "dequantize", "q.zeros");
    if (!q.group_index.empty()) {
        if (q.spec.granularity != granularity::group)
            detail::fail(errc::bad_argument, "dequantize", "q.group_index is set but the granularity is not group");
        detail::require_size(q.group_index.size(), q.cols, "dequantize", "q.group_index");
        const std::size_t ng = q.cols / q.spec.group_size;
        for (std::size_t j = 0; j < q.cols; ++j)
            if (q.group_index[j] >= ng)
                detail::fail(errc::bad_argument, "dequantize",
                             "q.group_index[" + std::to_string(j) + "] is " + std::to_string(q.group_index[j]) +
                                 ", expected < " + std::to_string(ng));
    }
    T buf[detail::quant_chunk];
    for (std::size_t i = 0; i < q.rows; ++i) {
        const std::uint8_t* row = q.codes.data() + i * q.row_bytes;
        T* dst = o.data + i * o.row_stride;
        detail::for_each_segment(q, i, [&](std::size_t c0, std::size_t len, std::size_t u) {
            for (std::size_t off = 0; off < len; off += detail::quant_chunk) {
                const std::size_t n = len - off < detail::quant_chunk ? len - off : detail::quant_chunk;
                detail::unpack_codes<T, Arch>(row, c0 + off, n, q.spec.bits, q.spec.symmetric, buf);
                T* d = dst + (c0 + off) * o.col_stride;
                if (q.spec.symmetric)
                    detail::dequantize_run<T, Arch, detail::fq_kind::symmetric>(buf, d, o.col_stride, n, q.scales[u],
                                                                                q.zeros[u]);
                else
                    detail::dequantize_run<T, Arch, detail::fq_kind::asymmetric>(buf, d, o.col_stride, n, q.scales[u],
                                                                                 q.zeros[u]);
            }
        });
    }
}

namespace detail {
/// The straight-through mask of every unit of `a` applied to `g`, with the parameters params_of(unit, k).
template <class T, class Arch, class Params>
void ste_mask(const matrix_view<const T>& a, const matrix_view<T>& g, const quant_spec& spec, Params&& params_of)
{
    const T lo = static_cast<T>(spec.qmin()) - T(0.5);
    const T hi = static_cast<T>(spec.qmax()) + T(0.5);
    const std::size_t n = param_count(spec, a.rows, a.cols);
    for (std::size_t k = 0; k < n; ++k) {
        const matrix_view<const T> u = unit_view(a, spec, k);
        const matrix_view<T> ug = unit_view(g, spec, k);
        const quant_params<T> p = params_of(u, k);
        for (std::size_t i = 0; i < u.rows; ++i)
            ste_mask_run<T, Arch>(u.data + i * u.row_stride, u.col_stride, ug.data + i * ug.row_stride, ug.col_stride,
                                  u.cols, p.scale, spec.symmetric ? T(0) : p.zero, lo, hi);
    }
}
}  // namespace detail

/// Straight-through backward of fake_quantize(x, spec), in place on `grad` (same shape as x):
/// the parameters are recomputed from x as the forward pass does; grad(i, j) is kept where
/// x(i, j) / scale + zero lies in [qmin - 1/2, qmax + 1/2] (the element is represented up to
/// rounding) and set to 0 where the clamp cut it off (clip_ratio < 1, the clip search). With
/// clip_ratio = 1 and no search nothing is clipped and grad is unchanged. reference_compat: the
/// reference's STE passes every gradient, so grad is left unchanged.
/// Errors (grad untouched): as fake_quantize for x, errc::bad_shape when the shapes differ,
/// NaN/Inf in x when spec.check_finite. Allocation-free.
template <class Arch = xsimd::default_arch, class X, class G>
    requires detail::quant_matrix_arg<X> && detail::quant_mutable_matrix_arg<G> &&
             std::same_as<detail::quant_scalar_t<X>, matrix_element_t<G>>
void fake_quantize_backward(const X& x, G&& grad, const quant_spec& spec)
{
    using T = detail::quant_scalar_t<X>;
    const matrix_view<const T> a = as_matrix_view(x);
    const matrix_view<T> g = as_matrix_view(grad);
    detail::check_spec_for(spec, a.cols, "fake_quantize_backward", "x");
    detail::require_shape(g, a.rows, a.cols, "fake_quantize_backward", "grad");
    if (spec.check_finite) detail::require_finite_view<T, Arch>(a, "fake_quantize_backward", "x");
    if (spec.reference_compat || a.empty()) return;
    detail::ste_mask<T, Arch>(a, g, spec, [&](const matrix_view<const T>& u, std::size_t) { return detail::unit_params<T, Arch>(u, spec); });
}

/// fake_quantize_backward with the parameters the forward pass quantized with (find_params,
/// search_clip, GPTQ; one per unit in param_count order) instead of recomputing them from x: the
/// same mask for the same parameters, without repeating a clip search.
/// Errors (grad untouched): as above, plus params.size() wrong (errc::bad_shape) and a scale that
/// is not finite and > 0 or a zero that is not an integer (errc::bad_argument). Allocation-free.
template <class Arch = xsimd::default_arch, class X, class G>
    requires detail::quant_matrix_arg<X> && detail::quant_mutable_matrix_arg<G> &&
             std::same_as<detail::quant_scalar_t<X>, matrix_element_t<G>>
void fake_quantize_backward(const X& x, G&& grad, std::span<const quant_params<detail::quant_scalar_t<X>>> params,
                            const quant_spec& spec)
{
    using T = detail::quant_scalar_t<X>;
    const matrix_view<const T> a = as_matrix_view(x);
    const matrix_view<T> g = as_matrix_view(grad);
    detail::check_spec_for(spec, a.cols, "fake_quantize_backward", "x");
    detail::require_shape(g, a.rows, a.cols, "fake_quantize_backward", "grad");
    detail::check_params<T>(params, param_count(spec, a.rows, a.cols), "fake_quantize_backward");
    if (spec.check_finite) detail::require_finite_view<T, Arch>(a, "fake_quantize_backward", "x");
    if (spec.reference_compat || a.empty()) return;
    detail::ste_mask<T, Arch>(a, g, spec, [&](const matrix_view<const T>&, std::size_t k) { return params[k]; });
}

}  // namespace spinquant
