#pragma once
/// GPTQ weight quantization (Frantar et al., arXiv 2210.17323) as SpinQuant runs it
/// (eval_utils/gptq_utils.py; REFERENCE.md §1f): a Hessian H = 2/n sum x x^T of a linear layer's
/// inputs, then column-by-column quantization of W [out, in] with the error of each column
/// spread over the columns not yet quantized through the upper Cholesky factor of H^-1, lazily
/// in blocks of 128 columns.
///
/// Defaults are correct; gptq_options::reference_compat reproduces the reference's quirks:
///   * group parameters: the reference computes a group's parameters from the block-outer copy
///     of W, which lacks the updates from earlier columns of the same block, so every group that
///     does not start on a block boundary (with 128-column blocks: groups 32, 64, 96 of 32) is
///     scaled from stale weights. Default: from the up-to-date weights.
///   * per-row parameters (no groups) are computed before dead input columns are zeroed (their
///     weights still widen the range). Default: after.
///   * asymmetric weights: the reference's fake_quantize ignores the zero point (quantizer.hpp);
///     reference_compat here implies quant_spec::reference_compat for the fake values.
///   * act-order: the reference un-permutes the fake-quantized weight but leaves its exported
///     integer codes and scales in the permuted column order (a scrambled checkpoint). Default:
///     codes in the original column order, with quantized_matrix::group_index mapping each column
///     to its group where act-order groups are not contiguous (like AutoGPTQ's g_idx).
/// Both modes compute in double (Hessian, Cholesky factors, error propagation); each element is
/// quantized in the weight's type, as the reference does in float32. GPTQ groups follow the
/// reference's GPTQ: a group's range is its rows' range over the group's columns including 0
/// (WeightQuantizer per channel), unlike round-to-nearest groups, whose range excludes 0.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "concepts.hpp"
#include "detail/checks.hpp"
#include "eigen.hpp"
#include "error.hpp"
#include "quantizer.hpp"

namespace spinquant {

/// Running average of H = 2/n * sum over calibration rows x of x x^T (the reference's
/// GPTQ.add_batch), accumulated in double. H's scale does not change GPTQ's result; it matters
/// only for comparing Hessians.
class hessian_accumulator {
public:
    /// An empty accumulator for inputs of `columns` features (the layer's in-features).
    explicit hessian_accumulator(std::size_t columns) : sum_(Eigen::MatrixXd::Zero(index(columns), index(columns))) {}

    /// Adds a batch of calibration rows x (tokens x columns) and counts each row as one sample:
    /// H = 2/n sum x x^T with n the number of rows seen.
    /// Errors (nothing changed): x.cols != columns() (errc::bad_shape), NaN/Inf in x
    /// (errc::non_finite). Allocates a double copy of the batch. O(rows * columns^2).
    template <class M>
        requires real_matrix<M>
    void add_batch(const M& x)
    {
        add_batch(x, as_matrix_view(x).rows);
    }

    /// Adds a batch counted as `samples` samples. The reference counts sequences (the batch
    /// dimension), not tokens: a [batch, tokens, columns] input adds `batch`, a 2-D input adds 1.
    /// Pass that here to get its H exactly. Errors as above, plus samples == 0 with rows > 0
    /// (errc::bad_argument).
    template <class M>
        requires real_matrix<M>
    void add_batch(const M& x, std::size_t samples)
    {
        using T = std::remove_const_t<matrix_element_t<M>>;
        const matrix_view<const T> v = as_matrix_view(x);
        if (v.cols != columns())
            detail::fail(errc::bad_shape, "hessian_accumulator::add_batch",
                         "x has " + std::to_string(v.cols) + " columns, expected " + std::to_string(columns()));
        if (samples == 0 && v.rows > 0)
            detail::fail(errc::bad_argument, "hessian_accumulator::add_batch", "samples is 0 for a non-empty batch");
        detail::require_finite(v, "hessian_accumulator::add_batch", "x");
        if (v.rows == 0) return;
        const Eigen::MatrixXd xd = as_eigen(v).template cast<double>();
        sum_.selfadjointView<Eigen::Lower>().rankUpdate(xd.transpose());
        samples_ += samples;
    }

    /// H = 2/n * sum x x^T (full symmetric matrix). Errors: no samples yet (errc::bad_argument).
    /// Allocates the result.
    [[nodiscard]] Eigen::MatrixXd hessian() const
    {
        if (samples_ == 0) detail::fail(errc::bad_argument, "hessian_accumulator::hessian", "no samples were added");
        Eigen::MatrixXd h = sum_.selfadjointView<Eigen::Lower>();
        h *= 2.0 / static_cast<double>(samples_);
        return h;
    }
    /// The number of samples counted so far.
    [[nodiscard]] std::size_t samples() const noexcept { return samples_; }
    /// The number of input features.
    [[nodiscard]] std::size_t columns() const noexcept { return static_cast<std::size_t>(sum_.cols()); }
    /// Forgets every batch.
    void reset() noexcept
    {
        sum_.setZero();
        samples_ = 0;
    }

private:
    static Eigen::Index index(std::size_t n) noexcept { return static_cast<Eigen::Index>(n); }
    Eigen::MatrixXd sum_;  // lower triangle of sum x x^T
    std::size_t samples_ = 0;
};

/// Settings of gptq(); the defaults are the reference's fasterquant defaults.
struct gptq_options {
    double damp_ratio = 0.01;       ///< percdamp: damp = damp_ratio * mean(diag H) is added to diag H; >= 0
    std::size_t block_size = 128;   ///< columns per lazy-update block; >= 1
    bool act_order = false;         ///< process columns by decreasing diag H (the reference's --act_order)
    bool static_groups = false;     ///< group parameters from the unquantized W, before any update
    bool reference_compat = false;  ///< reproduce the reference's quirks (see the header comment)
    unsigned damp_retries = 0;      ///< if H + damp is not positive definite: retry with damp x 10, this often
};

/// What gptq() returns.
template <real_scalar T>
struct gptq_result {
    /// The fake-quantized weight, [out, in], in the original column order.
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> weight;
    /// Codes and parameters (granularity row, or group). dequantize(quantized) == weight, except
    /// when permuted_export is true (see below) or under reference_compat with asymmetric
    /// weights (whose fake values ignore the zero point, as the reference's do).
    quantized_matrix<T> quantized;
    /// Act-order: processing position k quantized original column permutation[k]; else empty.
    std::vector<std::uint32_t> permutation;
    /// True under reference_compat with act_order: `quantized` holds the columns in processing
    /// order, as the reference's export does, so dequantize(quantized) is weight[:, permutation].
    bool permuted_export = false;
    /// The reference's loss: sum over elements of (w - q)^2 / (2 d^2), d the diagonal of the
    /// Cholesky factor of H^-1 at the element's column (w as updated when it was quantized).
    double loss = 0;
    /// The dampening actually added to the diagonal of H.
    double damp = 0;
};

namespace detail {

[[nodiscard]] inline Eigen::Index eidx(std::size_t n) noexcept { return static_cast<Eigen::Index>(n); }

/// The factor GPTQ needs, without inverting anything. The reference uses U, upper triangular
/// with H^-1 = U^T U (chol(cholesky_inverse(chol(H)), upper=True)), and updates the weights not
/// yet quantized by W' = W - E U_strict with errors e_c = (w'_c - q_c) / U_cc. With H = R R^T,
/// R upper triangular (from J H J = L L^T, R = J L J, J the reversal), U = R^-1, and then
/// E U = W - Q =: Z, so E = Z R and W' = W - Z R U_strict = W + Z Rt_strict, where Rt is R with
/// each column divided by its diagonal (R U_strict = I - R diag(U) and U_cc = 1 / R_cc).
/// So GPTQ needs one Cholesky factorisation and the products with Rt: no inverse, which the
/// reference's route spends two more factorisations' worth of flops on.
/// Overwrites h (H + damp, symmetric) with Rt in its upper triangle (unit diagonal) and fills
/// r_diag with diag(R). Returns false when H is not (numerically) positive definite.
[[nodiscard]] inline bool gptq_factor(Eigen::MatrixXd& h, std::vector<double>& r_diag)
{
    const Eigen::Index n = h.rows();
    h.reverseInPlace();
    const Eigen::LLT<Eigen::Ref<Eigen::MatrixXd>> llt(h);  // in place: L in the lower triangle
    if (llt.info() != Eigen::Success) return false;
    h.reverseInPlace();  // R = J L J in the upper triangle
    r_diag.resize(static_cast<std::size_t>(n));
    for (Eigen::Index c = 0; c < n; ++c) {
        const double d = h(c, c);
        if (!(d > 0.0) || !std::isfinite(d)) return false;
        r_diag[static_cast<std::size_t>(c)] = d;
        h.col(c).head(c + 1) /= d;
    }
    return true;
}

/// Per-row parameters of a block of a double working matrix (rows x k), computed in T, into out
/// (one per row of the block).
template <class T, class Arch, class D>
void gptq_params_of(const Eigen::MatrixBase<D>& block, const quant_spec& row_spec,
                    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& scratch,
                    std::span<quant_params<T>> out)
{
    scratch = block.template cast<T>();
    find_params_unchecked<T, Arch>(as_matrix_view(scratch), row_spec, out);
}

}  // namespace detail

/// Quantizes W [out, in] with GPTQ given the Hessian H [in, in] of its inputs (see
/// hessian_accumulator) and a weight spec with granularity::row (per output channel) or
/// granularity::group (group_size inputs per group); spec.clip_search turns on the MSE clip
/// search for every parameter computation, as the reference's --w_clip.
/// Steps: dead inputs (H_ii == 0) get H_ii = 1 and a zero weight column; act-order permutes;
/// damp = damp_ratio * mean(diag H) is added to the diagonal; then each column is quantized and
/// its error (w - q) / U_ii subtracted from later columns along row i of U, H^-1 = U^T U, exactly
/// as the reference does, but computed from the Cholesky factor of H alone (no inverse; see
/// detail::gptq_factor): about in^3/3 + out * in^2 flops, the cost of one factorisation and of
/// the lazy block updates themselves.
/// Errors (nothing returned): invalid spec, or a granularity other than row or group
/// (errc::bad_argument); group_size not dividing in (errc::bad_shape); H not in x in
/// (errc::bad_shape); NaN/Inf in W or H (errc::non_finite); damp_ratio < 0 or block_size 0
/// (errc::bad_argument); H + damp not positive definite after options.damp_retries tenfold
/// increases (errc::not_positive_definite, naming the damp tried).
/// Allocates (double copies of W and H, the result). O(in^3 + out * in^2); one thread unless
/// Eigen is built with OpenMP.
/// **Example** `auto r = spinquant::gptq(W, acc.hessian(), spinquant::quant_spec::weight(4));`
template <class Arch = xsimd::default_arch, class WM, class HM>
    requires real_matrix<WM> && real_matrix<HM>
[[nodiscard]] gptq_result<std::remove_const_t<matrix_element_t<WM>>> gptq(const WM& w_in, const HM& h_in,
                                                                            const quant_spec& spec,
                                                                            const gptq_options& opts = {})
{
    using T = std::remove_const_t<matrix_element_t<WM>>;
    using HT = std::remove_const_t<matrix_element_t<HM>>;
    using detail::eidx;
    const matrix_view<const T> wv = as_matrix_view(w_in);
    const matrix_view<const HT> hv = as_matrix_view(h_in);
    const std::size_t rows = wv.rows;
    const std::size_t cols = wv.cols;

    // ---- validate everything before any work
    detail::check_spec_for(spec, cols, "gptq", "W");
    if (spec.granularity != granularity::row && spec.granularity != granularity::group)
        detail::fail(errc::bad_argument, "gptq",
                     "spec.granularity must be row (per output channel) or group, got " +
                         std::string(spec.granularity == granularity::tensor ? "tensor" : "column"));
    if (hv.rows != hv.cols)
        detail::fail(errc::bad_shape, "gptq",
                     "hessian is " + detail::shape_string(hv.rows, hv.cols) + ", expected square");
    if (hv.rows != cols)
        detail::fail(errc::bad_shape, "gptq",
                     "hessian is " + detail::shape_string(hv.rows, hv.cols) + ", expected " +
                         detail::shape_string(cols, cols) + " to match W's " + std::to_string(cols) + " columns");
    if (!(opts.damp_ratio >= 0.0) || !std::isfinite(opts.damp_ratio))
        detail::fail(errc::bad_argument, "gptq", "options.damp_ratio is " + std::to_string(opts.damp_ratio) + ", expected >= 0");
    if (opts.block_size == 0) detail::fail(errc::bad_argument, "gptq", "options.block_size is 0, expected >= 1");
    detail::require_finite_view<T, Arch>(wv, "gptq", "W");
    detail::require_finite_view<HT, Arch>(hv, "gptq", "hessian");

    const bool groups = spec.granularity == granularity::group;
    const std::size_t gs = groups ? spec.group_size : cols;
    const std::size_t ngroups = groups ? cols / gs : 1;
    const bool compat = opts.reference_compat;
    quant_spec fq_spec = spec;  // GPTQ's compat mode implies the quantizer's (symmetric-only fake values)
    fq_spec.reference_compat = spec.reference_compat || compat;
    quant_spec row_spec = fq_spec;  // parameters of a column slice: per-row ranges, 0 included
    row_spec.granularity = granularity::row;
    row_spec.group_size = 0;
    row_spec.check_finite = false;

    gptq_result<T> res;
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> scratch;
    const auto hin = as_eigen(hv);
    std::vector<bool> dead(cols);
    for (std::size_t j = 0; j < cols; ++j) dead[j] = hin(eidx(j), eidx(j)) == HT(0);

    // Working copy of W in double, original column order. Dead inputs (never active in
    // calibration, so their weights do not matter) are zeroed, after the reference-compatible
    // per-row parameters have seen them.
    std::vector<quant_params<T>> row_params(groups ? 0 : rows);  // per-row parameters without groups
    if (!groups && compat) detail::find_params_unchecked<T, Arch>(wv, row_spec, std::span(row_params));
    // Row-major like an [out, in] weight: the copy is a straight conversion, not a transpose.
    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> w = as_eigen(wv).template cast<double>();
    for (std::size_t j = 0; j < cols; ++j)
        if (dead[j]) w.col(eidx(j)).setZero();
    if (!groups && !compat) detail::gptq_params_of<T, Arch>(w, row_spec, scratch, std::span(row_params));

    std::vector<quant_params<T>> static_params;  // [row][original group]
    if (groups && opts.static_groups) {
        static_params.resize(rows * ngroups);
        std::vector<quant_params<T>> p(rows);
        for (std::size_t g = 0; g < ngroups; ++g) {
            detail::gptq_params_of<T, Arch>(w.middleCols(eidx(g * gs), eidx(gs)), row_spec, scratch, std::span(p));
            for (std::size_t r = 0; r < rows; ++r) static_params[r * ngroups + g] = p[r];
        }
    }

    // Act-order: decreasing diag H (dead ones count as 1), ties in column order (a stable order;
    // torch's argsort is not).
    const auto diag = [&](std::size_t j) { return dead[j] ? 1.0 : static_cast<double>(hin(eidx(j), eidx(j))); };
    std::vector<Eigen::Index> perm(cols);
    std::iota(perm.begin(), perm.end(), Eigen::Index{0});
    if (opts.act_order) {
        std::stable_sort(perm.begin(), perm.end(), [&](Eigen::Index a, Eigen::Index b) {
            return diag(static_cast<std::size_t>(a)) > diag(static_cast<std::size_t>(b));
        });
        w = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>(w(Eigen::all, perm));
        res.permutation.resize(cols);
        for (std::size_t k = 0; k < cols; ++k) res.permutation[k] = static_cast<std::uint32_t>(perm[k]);
    }

    // Dampening and the Cholesky factor of H^-1, built from the input on every attempt.
    double mean_diag = 0;
    for (std::size_t j = 0; j < cols; ++j) mean_diag += diag(j);
    mean_diag /= static_cast<double>(std::max<std::size_t>(cols, 1));
    double damp = opts.damp_ratio * mean_diag;
    Eigen::MatrixXd hd(eidx(cols), eidx(cols));  // becomes Rt (see detail::gptq_factor)
    std::vector<double> r_diag;
    for (unsigned attempt = 0;; ++attempt) {
        if (opts.act_order)
            hd = hin(perm, perm).template cast<double>();
        else
            hd = hin.template cast<double>();
        for (std::size_t k = 0; k < cols; ++k)
            hd(eidx(k), eidx(k)) = diag(static_cast<std::size_t>(perm[k])) + damp;
        if (detail::gptq_factor(hd, r_diag)) break;
        if (attempt >= opts.damp_retries)
            detail::fail(errc::not_positive_definite, "gptq",
                         "hessian + damp is not positive definite with damp " + std::to_string(damp) + " (" +
                             std::to_string(opts.damp_ratio) + " of the mean diagonal, after " +
                             std::to_string(attempt) + " tenfold retries); raise options.damp_ratio or options.damp_retries");
        damp = damp > 0.0 ? damp * 10.0 : 1e-8 * std::max(1.0, std::fabs(mean_diag));
    }
    const Eigen::MatrixXd& rt = hd;
    res.damp = damp;

    // Blocks. Default: group starts fall on block starts or inside a block that holds the whole
    // group, so a group's parameters come from current weights (bs a multiple or divisor of gs).
    std::size_t bs = opts.block_size;
    if (groups && !opts.static_groups && !compat) {
        if (gs <= bs) {
            bs -= bs % gs;
        } else {
            std::size_t d = bs;
            while (gs % d != 0) --d;
            bs = d;
        }
    }

    // Outputs, written in place: the weight in original column order; codes in the order they
    // are exported (processing order under reference_compat with act-order).
    res.permuted_export = compat && opts.act_order;
    res.weight.resize(eidx(rows), eidx(cols));
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> codes(eidx(rows), eidx(cols));
    std::vector<quant_params<T>> group_params(groups ? rows * ngroups : 0);  // [row][group in processing order]
    std::vector<quant_params<T>> cur(rows);
    if (!groups) cur = row_params;
    const T qlo = static_cast<T>(spec.qmin());
    const T qhi = static_cast<T>(spec.qmax());
    double loss = 0;

    // Rows are independent: each block is swept in chunks of rows that stay in cache, and inside
    // a block the column-by-column updates reach only the next few columns (a sub-block); the
    // rest of the block gets them as one small product per sub-block. Sub-blocks start at every
    // group start, so a group's parameters still see current weights.
    constexpr std::size_t row_chunk = 256;
    const std::size_t sub = groups && !opts.static_groups && !compat ? std::gcd(std::size_t{16}, gs) : 16;
    // The fake value is the code's value unless reference_compat's asymmetric weight formula applies.
    const bool value_from_code = !(fq_spec.reference_compat && spec.role == quant_role::weight && !spec.symmetric);
    // w holds the current weights W' (lazily: up to date with earlier blocks); z1 the block's
    // columns of Z = W - Q, which is what the updates multiply (see detail::gptq_factor).
    Eigen::MatrixXd w1, z1(eidx(rows), eidx(std::min(bs, cols))), held, orig;
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> q_tile(eidx(std::min(row_chunk, rows)), eidx(std::min(bs, cols))),
        c_tile(q_tile.rows(), q_tile.cols());  // one row chunk of the block's outputs
    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> r1;
    const auto original = [&](std::size_t r, std::size_t c) {  // W after dead inputs were zeroed
        const auto j = static_cast<std::size_t>(perm[c]);
        return dead[j] ? 0.0 : static_cast<double>(wv(r, j));
    };
    for (std::size_t i1 = 0; i1 < cols; i1 += bs) {
        const std::size_t i2 = std::min(i1 + bs, cols);
        const std::size_t cnt = i2 - i1;
        r1 = rt.block(eidx(i1), eidx(i1), eidx(cnt), eidx(cnt));  // row-major: rank-1 updates read rows
        for (std::size_t r0 = 0; r0 < rows; r0 += row_chunk) {
            const std::size_t rn = std::min(row_chunk, rows - r0);
            w1 = w.block(eidx(r0), eidx(i1), eidx(rn), eidx(cnt));  // the reference's block copy W1
            const std::span<quant_params<T>> cur_rows(cur.data() + r0, rn);
            for (std::size_t i = 0; i < cnt; ++i) {
                const std::size_t c = i1 + i;
                if (groups) {
                    if (opts.static_groups) {
                        const std::size_t g = static_cast<std::size_t>(perm[c]) / gs;
                        for (std::size_t r = 0; r < rn; ++r) cur_rows[r] = static_params[(r0 + r) * ngroups + g];
                    } else if (c % gs == 0) {
                        // The weights the reference scales a group from. The block-outer W is
                        // current at a block start only; compat reads it anyway (stale inside a
                        // block), the default reads the block copy (which holds the whole group:
                        // blocks and sub-blocks were aligned to groups). Our lazily-held columns
                        // are W + S diag(1/R) with S the accumulated numerators, the reference's
                        // are W + S R^-1 on the trailing block (see detail::gptq_factor); they agree
                        // on the column being quantized, and for a run of columns starting at
                        // `from` the reference's values are W + (held - W) Rt^-1 over that run.
                        const std::size_t from = compat ? i1 : c;
                        const std::size_t k = c + gs - from;
                        if (compat || i == 0)
                            held = w.block(eidx(r0), eidx(from), eidx(rn), eidx(k));
                        else
                            held = w1.middleCols(eidx(i), eidx(gs));
                        orig.resize(eidx(rn), eidx(k));
                        for (std::size_t j = 0; j < k; ++j)
                            for (std::size_t r = 0; r < rn; ++r) orig(eidx(r), eidx(j)) = original(r0 + r, from + j);
                        held -= orig;
                        rt.block(eidx(from), eidx(from), eidx(k), eidx(k))
                            .template triangularView<Eigen::UnitUpper>()
                            .template solveInPlace<Eigen::OnTheRight>(held);
                        held += orig;
                        detail::gptq_params_of<T, Arch>(held.rightCols(eidx(gs)), row_spec, scratch, cur_rows);
                        for (std::size_t r = 0; r < rn; ++r) group_params[(r0 + r) * ngroups + c / gs] = cur_rows[r];
                    }
                }
                const double rc = r_diag[c];  // the reference divides by U_cc = 1 / R_cc
                const auto quantize_column = [&](auto kind) {
                    constexpr detail::fq_kind K = decltype(kind)::value;
                    for (std::size_t r = 0; r < rn; ++r) {
                        const double wr = w1(eidx(r), eidx(i));
                        const T wt = static_cast<T>(wr);
                        const quant_params<T> p = cur_rows[r];
                        const T code = detail::code_of<T, Arch, K>(wt, p.scale, p.zero, qlo, qhi);
                        const T qv = value_from_code ? detail::value_of<T, Arch, K>(code, p.scale, p.zero)
                                                     : fake_quantize_value<Arch>(wt, p, fq_spec);
                        q_tile(eidx(r), eidx(i)) = qv;
                        c_tile(eidx(r), eidx(i)) = code;
                        const double e = (wr - static_cast<double>(qv)) * rc;
                        z1(eidx(r0 + r), eidx(i)) = original(r0 + r, c) - static_cast<double>(qv);
                        loss += e * e / 2.0;
                    }
                };
                if (spec.symmetric)
                    quantize_column(std::integral_constant<detail::fq_kind, detail::fq_kind::symmetric>{});
                else
                    quantize_column(std::integral_constant<detail::fq_kind, detail::fq_kind::asymmetric>{});
                // The reference's W1[:, i:] -= err * U[i, i:], as W1 += z * Rt[i, i:], in two steps.
                const std::size_t s0 = i - i % sub;
                const std::size_t s1 = std::min(s0 + sub, cnt);
                if (i + 1 < s1)
                    w1.middleCols(eidx(i + 1), eidx(s1 - i - 1)).noalias() +=
                        z1.block(eidx(r0), eidx(i), eidx(rn), 1) * r1.row(eidx(i)).segment(eidx(i + 1), eidx(s1 - i - 1));
                if (i + 1 == s1 && s1 < cnt)
                    w1.rightCols(eidx(cnt - s1)).noalias() +=
                        z1.block(eidx(r0), eidx(s0), eidx(rn), eidx(s1 - s0)) *
                        r1.block(eidx(s0), eidx(s1), eidx(s1 - s0), eidx(cnt - s1));
            }
            // Out of the tile row by row: contiguous runs unless act-order scatters them.
            for (std::size_t r = 0; r < rn; ++r)
                for (std::size_t i = 0; i < cnt; ++i) {
                    const std::size_t c = i1 + i;
                    res.weight(eidx(r0 + r), perm[c]) = q_tile(eidx(r), eidx(i));
                    codes(eidx(r0 + r), res.permuted_export ? eidx(c) : perm[c]) = c_tile(eidx(r), eidx(i));
                }
        }
        if (i2 < cols)
            w.rightCols(eidx(cols - i2)).noalias() +=
                z1.leftCols(eidx(cnt)) * rt.block(eidx(i1), eidx(i2), eidx(cnt), eidx(cols - i2));
    }
    res.loss = loss;

    // Codes and parameters.
    quantized_matrix<T>& qm = res.quantized;
    quant_spec out_spec = spec;
    out_spec.clip_search.reset();
    detail::shape_quantized(qm, out_spec, rows, cols);
    const std::size_t per_row = groups ? ngroups : 1;
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t g = 0; g < per_row; ++g) {
            const quant_params<T> p = !groups ? row_params[r]
                                      : opts.static_groups ? static_params[r * ngroups + g]
                                                           : group_params[r * ngroups + g];
            qm.scales[r * per_row + g] = p.scale;
            qm.zeros[r * per_row + g] = spec.symmetric ? T(0) : p.zero;
        }
    for (std::size_t r = 0; r < rows; ++r)
        detail::pack_codes<T, Arch>(codes.data() + r * cols, cols, 0, spec.bits, qm.codes.data() + r * qm.row_bytes);
    if (groups && opts.act_order) {
        // Which group each stored column belongs to, where that is not j / group_size.
        if (res.permuted_export && opts.static_groups) {
            qm.group_index.resize(cols);
            for (std::size_t k = 0; k < cols; ++k)
                qm.group_index[k] = static_cast<std::uint32_t>(static_cast<std::size_t>(perm[k]) / gs);
        } else if (!res.permuted_export && !opts.static_groups) {
            qm.group_index.resize(cols);
            for (std::size_t k = 0; k < cols; ++k)
                qm.group_index[static_cast<std::size_t>(perm[k])] = static_cast<std::uint32_t>(k / gs);
        }
    }
    return res;
}

/// The layer-output error GPTQ minimises: trace((W - Q) H (W - Q)^T), in double, for W and Q
/// [out, in] and H [in, in] (with H = 2/n sum x x^T this is 2/n sum ||(W - Q) x||^2).
/// Errors: shapes that do not match (errc::bad_shape). Allocates. O(out * in^2).
template <class WM, class QM, class HM>
    requires real_matrix<WM> && real_matrix<QM> && real_matrix<HM>
[[nodiscard]] double layer_error(const WM& w, const QM& q, const HM& h)
{
    const auto wv = as_matrix_view(w);
    const auto qv = as_matrix_view(q);
    const auto hv = as_matrix_view(h);
    detail::require_shape(qv, wv.rows, wv.cols, "layer_error", "Q");
    detail::require_shape(hv, wv.cols, wv.cols, "layer_error", "hessian");
    const Eigen::MatrixXd d = as_eigen(wv).template cast<double>() - as_eigen(qv).template cast<double>();
    return (d * as_eigen(hv).template cast<double>()).cwiseProduct(d).sum();
}

}  // namespace spinquant
