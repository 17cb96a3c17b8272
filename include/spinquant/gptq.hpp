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

/// U upper triangular with H^-1 = U^T U, i.e. the reference's chol(cholesky_inverse(chol(H)),
/// upper=True), from one Cholesky factorisation: with J the reversal, J H J = L L^T gives
/// H = R R^T for the upper triangular R = J L J, and H^-1 = R^-T R^-1, so U = R^-1 (Cholesky
/// factors are unique). Returns false when H is not (numerically) positive definite.
[[nodiscard]] inline bool gptq_inverse_factor(const Eigen::MatrixXd& h, Eigen::MatrixXd& u)
{
    const Eigen::Index n = h.rows();
    const Eigen::MatrixXd hr = h.reverse();  // J H J
    const Eigen::LLT<Eigen::MatrixXd> llt(hr);
    if (llt.info() != Eigen::Success) return false;
    const Eigen::MatrixXd r = Eigen::MatrixXd(llt.matrixL()).reverse();  // J L J, upper triangular
    for (Eigen::Index i = 0; i < n; ++i)
        if (!(r(i, i) > 0.0) || !std::isfinite(r(i, i))) return false;
    u = Eigen::MatrixXd::Identity(n, n);
    r.triangularView<Eigen::Upper>().solveInPlace(u);
    return u.allFinite();
}

/// Per-row parameters of columns [c0, c0 + k) of a double working matrix, computed in T.
template <class T, class Arch>
void gptq_params_of(const Eigen::MatrixXd& w, std::size_t c0, std::size_t k, const quant_spec& row_spec,
                    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>& scratch,
                    std::span<quant_params<T>> out)
{
    scratch = w.middleCols(eidx(c0), eidx(k)).template cast<T>();
    find_params_unchecked<T, Arch>(as_matrix_view(scratch), row_spec, out);
}

}  // namespace detail

/// Quantizes W [out, in] with GPTQ given the Hessian H [in, in] of its inputs (see
/// hessian_accumulator) and a weight spec with granularity::row (per output channel) or
/// granularity::group (group_size inputs per group); spec.clip_search turns on the MSE clip
/// search for every parameter computation, as the reference's --w_clip.
/// Steps: dead inputs (H_ii == 0) get H_ii = 1 and a zero weight column; act-order permutes;
/// damp = damp_ratio * mean(diag H) is added to the diagonal; U with H^-1 = U^T U; then each
/// column is quantized and its error (w - q) / U_ii subtracted from later columns along row i of U.
/// Errors (nothing returned): invalid spec, or a granularity other than row or group
/// (errc::bad_argument); group_size not dividing in (errc::bad_shape); H not in x in
/// (errc::bad_shape); NaN/Inf in W or H (errc::non_finite); damp_ratio < 0 or block_size 0
/// (errc::bad_argument); H + damp not positive definite after options.damp_retries tenfold
/// increases (errc::not_positive_definite, naming the damp tried).
/// Allocates (double copies of W and H, the result). O(in^3 + out * in^2).
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
    detail::require_finite(wv, "gptq", "W");
    detail::require_finite(hv, "gptq", "hessian");

    const bool groups = spec.granularity == granularity::group;
    const std::size_t gs = groups ? spec.group_size : cols;
    const std::size_t ngroups = groups ? cols / gs : 1;
    const bool compat = opts.reference_compat;
    quant_spec row_spec = spec;  // parameters of a column slice: per-row ranges, 0 included
    row_spec.granularity = granularity::row;
    row_spec.group_size = 0;
    row_spec.check_finite = false;

    gptq_result<T> res;
    Eigen::MatrixXd w = as_eigen(wv).template cast<double>();
    Eigen::MatrixXd h = as_eigen(hv).template cast<double>();
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> scratch;

    std::vector<quant_params<T>> row_params(groups ? 0 : rows);  // per-row parameters without groups
    if (!groups && compat) detail::gptq_params_of<T, Arch>(w, 0, cols, row_spec, scratch, row_params);

    // Dead inputs: never active in calibration, so their weights do not matter; zero them.
    for (std::size_t j = 0; j < cols; ++j)
        if (h(eidx(j), eidx(j)) == 0.0) {
            h(eidx(j), eidx(j)) = 1.0;
            w.col(eidx(j)).setZero();
        }
    if (!groups && !compat) detail::gptq_params_of<T, Arch>(w, 0, cols, row_spec, scratch, row_params);

    std::vector<quant_params<T>> static_params;  // [row][original group]
    if (groups && opts.static_groups) {
        static_params.resize(rows * ngroups);
        std::vector<quant_params<T>> p(rows);
        for (std::size_t g = 0; g < ngroups; ++g) {
            detail::gptq_params_of<T, Arch>(w, g * gs, gs, row_spec, scratch, p);
            for (std::size_t r = 0; r < rows; ++r) static_params[r * ngroups + g] = p[r];
        }
    }

    // Act-order: decreasing diag H, ties in column order (a stable order; torch's argsort is not).
    std::vector<Eigen::Index> perm(cols);
    std::iota(perm.begin(), perm.end(), Eigen::Index{0});
    if (opts.act_order) {
        std::stable_sort(perm.begin(), perm.end(), [&](Eigen::Index a, Eigen::Index b) { return h(a, a) > h(b, b); });
        w = Eigen::MatrixXd(w(Eigen::all, perm));
        h = Eigen::MatrixXd(h(perm, perm));
        res.permutation.resize(cols);
        for (std::size_t k = 0; k < cols; ++k) res.permutation[k] = static_cast<std::uint32_t>(perm[k]);
    }

    // Dampening and the Cholesky factor of H^-1.
    double damp = opts.damp_ratio * h.diagonal().mean();
    Eigen::MatrixXd u;
    for (unsigned attempt = 0;; ++attempt) {
        Eigen::MatrixXd hd = h;
        hd.diagonal().array() += damp;
        if (detail::gptq_inverse_factor(hd, u)) break;
        if (attempt >= opts.damp_retries)
            detail::fail(errc::not_positive_definite, "gptq",
                         "hessian + damp is not positive definite with damp " + std::to_string(damp) + " (" +
                             std::to_string(opts.damp_ratio) + " of the mean diagonal, after " +
                             std::to_string(attempt) + " tenfold retries); raise options.damp_ratio or options.damp_retries");
        damp = damp > 0.0 ? damp * 10.0 : 1e-8 * std::max(1.0, h.diagonal().cwiseAbs().mean());
    }
    res.damp = damp;

    // Blocks. Default: group starts fall on block starts, so the block-outer W is up to date when
    // a group's parameters are computed (bs a multiple of gs, or a divisor of it).
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

    // Outputs in processing order; un-permuted at the end.
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> q(eidx(rows), eidx(cols));
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> codes(eidx(rows), eidx(cols));
    std::vector<quant_params<T>> group_params(groups ? rows * ngroups : 0);  // [row][group in processing order]
    std::vector<quant_params<T>> cur(rows);
    if (!groups) cur = row_params;
    const T qlo = static_cast<T>(spec.qmin());
    const T qhi = static_cast<T>(spec.qmax());
    double loss = 0;
    Eigen::MatrixXd w1, err1;
    for (std::size_t i1 = 0; i1 < cols; i1 += bs) {
        const std::size_t i2 = std::min(i1 + bs, cols);
        const std::size_t cnt = i2 - i1;
        w1 = w.middleCols(eidx(i1), eidx(cnt));
        err1.resize(eidx(rows), eidx(cnt));
        for (std::size_t i = 0; i < cnt; ++i) {
            const std::size_t c = i1 + i;
            if (groups) {
                if (opts.static_groups) {
                    const std::size_t g = static_cast<std::size_t>(perm[c]) / gs;
                    for (std::size_t r = 0; r < rows; ++r) cur[r] = static_params[r * ngroups + g];
                } else if (c % gs == 0) {
                    // The block-outer W is current at a block start only. compat reads it
                    // anyway (stale inside a block); the default reads the block copy there,
                    // which holds the whole group because blocks were aligned to groups above.
                    if (compat || i == 0)
                        detail::gptq_params_of<T, Arch>(w, c, gs, row_spec, scratch, cur);
                    else
                        detail::gptq_params_of<T, Arch>(w1, i, gs, row_spec, scratch, cur);
                    for (std::size_t r = 0; r < rows; ++r) group_params[r * ngroups + c / gs] = cur[r];
                }
            }
            const double d = u(eidx(c), eidx(c));
            for (std::size_t r = 0; r < rows; ++r) {
                const double wr = w1(eidx(r), eidx(i));
                const T wt = static_cast<T>(wr);
                const T qv = fake_quantize_value<Arch>(wt, cur[r], spec);
                q(eidx(r), eidx(c)) = qv;
                codes(eidx(r), eidx(c)) = spec.symmetric
                                             ? detail::code_of<T, Arch, detail::fq_kind::symmetric>(
                                                   wt, cur[r].scale, cur[r].zero, qlo, qhi)
                                             : detail::code_of<T, Arch, detail::fq_kind::asymmetric>(
                                                   wt, cur[r].scale, cur[r].zero, qlo, qhi);
                const double e = (wr - static_cast<double>(qv)) / d;
                err1(eidx(r), eidx(i)) = e;
                loss += e * e / 2.0;
            }
            if (i + 1 < cnt)
                w1.rightCols(eidx(cnt - i - 1)).noalias() -=
                    err1.col(eidx(i)) * u.row(eidx(c)).segment(eidx(c + 1), eidx(cnt - i - 1));
        }
        if (i2 < cols)
            w.rightCols(eidx(cols - i2)).noalias() -=
                err1 * u.block(eidx(i1), eidx(i2), eidx(cnt), eidx(cols - i2));
    }
    res.loss = loss;

    // The fake-quantized weight in the original column order.
    res.weight.resize(eidx(rows), eidx(cols));
    for (std::size_t k = 0; k < cols; ++k) res.weight.col(perm[k]) = q.col(eidx(k));

    // Codes and parameters.
    quantized_matrix<T>& qm = res.quantized;
    quant_spec out_spec = spec;
    out_spec.clip_search.reset();
    res.permuted_export = compat && opts.act_order;
    detail::shape_quantized(qm, out_spec, rows, cols);
    for (std::size_t r = 0; r < rows; ++r) {
        for (std::size_t g = 0; g < (groups ? ngroups : 1); ++g) {
            const quant_params<T> p = !groups ? row_params[r]
                                      : opts.static_groups ? static_params[r * ngroups + g]
                                                           : group_params[r * ngroups + g];
            qm.scales[r * (groups ? ngroups : 1) + g] = p.scale;
            qm.zeros[r * (groups ? ngroups : 1) + g] = spec.symmetric ? T(0) : p.zero;
        }
    }
    std::vector<T> row_codes(cols);
    for (std::size_t r = 0; r < rows; ++r) {
        for (std::size_t k = 0; k < cols; ++k) {
            const std::size_t dst = res.permuted_export ? k : static_cast<std::size_t>(perm[k]);
            row_codes[dst] = codes(eidx(r), eidx(k));
        }
        detail::pack_codes<T, Arch>(row_codes.data(), cols, 0, spec.bits, qm.codes.data() + r * qm.row_bytes);
    }
    if (groups && opts.act_order) {
        // Which group each stored column belongs to, where that is not j / group_size.
        if (res.permuted_export && opts.static_groups) {
            qm.group_index.resize(cols);
            for (std::size_t k = 0; k < cols; ++k) qm.group_index[k] = static_cast<std::uint32_t>(static_cast<std::size_t>(perm[k]) / gs);
        } else if (!res.permuted_export && !opts.static_groups) {
            qm.group_index.resize(cols);
            for (std::size_t k = 0; k < cols; ++k) qm.group_index[static_cast<std::size_t>(perm[k])] = static_cast<std::uint32_t>(k / gs);
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
