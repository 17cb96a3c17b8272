#pragma once
/// Objectives over rotations: a loss and its Euclidean gradient with respect to each rotation,
/// which the Cayley optimizers (stiefel.hpp) project onto the manifold and follow.
///
/// The callable shape (concept rotation_objective) is the one plug-in point: anything callable as
///
///     double f(std::span<const matrix_view<const T>> rotations, std::span<const matrix_view<T>> gradients)
///
/// that returns the loss at `rotations` and writes ∂loss/∂rotations[i] (same shape) into
/// gradients[i] is an objective. The two below are examples with analytic gradients; an
/// end-to-end program with its own forward/backward (e.g. a whole model's cross-entropy with
/// R1 and every layer's R2) provides its own callable of the same shape, and `minimize` drives any
/// of them with any optimizer.
///
/// Both objectives keep views of the caller's calibration data and weights when their rows are
/// contiguous (a copy otherwise): those must outlive the objective and stay unchanged (derived
/// quantities are precomputed at construction).
#include <cmath>
#include <concepts>
#include <algorithm>
#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "concepts.hpp"
#include "detail/checks.hpp"
#include "eigen.hpp"
#include "error.hpp"
#include "quantizer.hpp"
#include "stiefel.hpp"

namespace spinquant {

/// An objective over rotations of element type T (see the header comment): returns the loss and
/// writes the Euclidean gradient for each rotation.
template <class F, class T>
concept rotation_objective =
    real_scalar<T> && requires(F& f, std::span<const matrix_view<const T>> r, std::span<const matrix_view<T>> g) {
        { f(r, g) } -> std::convertible_to<double>;
    };

namespace detail {

template <class T>
using objective_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A read-only row-major matrix with unit column stride, as Eigen's products need it (a Map with a
/// run-time inner stride makes every product copy its operand to the heap): a view of the caller's
/// data when its rows are contiguous, else an owned copy (held by pointer, so moves keep it valid).
template <class T>
class row_major_operand {
public:
    using map = Eigen::Map<const objective_matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
    explicit row_major_operand(matrix_view<const T> v)
        : rows_(static_cast<Eigen::Index>(v.rows)), cols_(static_cast<Eigen::Index>(v.cols))
    {
        if (v.has_contiguous_rows() && v.rows > 1) {
            data_ = v.data;
            stride_ = static_cast<Eigen::Index>(v.row_stride);
        } else {
            copy_ = std::make_unique<objective_matrix<T>>(spinquant::as_eigen(v));
            data_ = copy_->data();
            stride_ = std::max<Eigen::Index>(1, cols_);
        }
    }
    [[nodiscard]] map get() const noexcept { return map(data_, rows_, cols_, Eigen::OuterStride<>(stride_)); }

private:
    std::unique_ptr<objective_matrix<T>> copy_;
    const T* data_ = nullptr;
    Eigen::Index rows_ = 0, cols_ = 0, stride_ = 1;
};

/// Checks the (rotations, gradients) pair of an objective with one n x n rotation.
template <class T>
void require_one_rotation(std::span<const matrix_view<const T>> r, std::span<const matrix_view<T>> g, std::size_t n,
                          std::string_view where)
{
    if (r.size() != 1 || g.size() != 1)
        fail(errc::bad_shape, where,
             std::to_string(r.size()) + " rotations and " + std::to_string(g.size()) + " gradients, expected 1 of each");
    require_shape(r[0], n, n, where, "rotation");
    require_shape(g[0], n, n, where, "gradient");
    require_finite(r[0], where, "rotation");
}

}  // namespace detail

/// The output error of a set of linear layers that share one input rotation R, with activations
/// and weights fake-quantized, on calibration activations X (t x n, rows are tokens):
///
///     L(R) = 1/(t·Σ_l out_l) · Σ_l ‖ Q_a(X·R) · Q_w(W_l·R)ᵀ − X·W_lᵀ ‖²_F
///
/// W_l is [out_l, n] (row = output channel). Each layer reads the rotated input X·R (rows: tokens,
/// quantized per token by Q_a) with the input-side-rotated weight W_l·R (rows: output channels,
/// quantized per channel by Q_w), so for orthogonal R the full-precision product is unchanged:
/// (X·R)(W_l·R)ᵀ = X·W_lᵀ, and L measures only what quantization loses after rotating. This is
/// R1's situation for q/k/v or gate/up (one R1, several readers), or R4's for down_proj.
///
/// Gradient (straight-through: Q's Jacobian is the mask fake_quantize_backward leaves, i.e. the
/// identity on elements the clamp did not cut off): with A = X·R, B_l = W_l·R, Â, B̂_l their
/// quantized values, E_l = Â·B̂_lᵀ − X·W_lᵀ and c = 2/(t·Σ out_l),
///
///     ∂L/∂R = Xᵀ·(M_a ⊙ c·Σ_l E_l·B̂_l) + Σ_l W_lᵀ·(M_w,l ⊙ c·E_lᵀ·Â).
///
/// Without a spec for a side that side is not quantized (its Q and mask are the identity); with
/// neither, L is the exact smooth function (zero at any orthogonal R) and ∂L/∂R its exact
/// gradient, for any R. Computed in T with preallocated buffers (no allocation per call, beyond
/// Eigen's GEMM packing for large sizes). Cost per call: about 2·t·n² + 4·n²·Σ out_l + 6·t·n·Σ out_l flops.
template <real_scalar T>
class linear_quantization_error {
public:
    /// The objective over calibration activations `x` (t x n) and layers `weights` (each
    /// out_l x n), with optional activation and weight quantizers. Throws errc::bad_shape if x or a
    /// weight is empty or a weight's width is not n, errc::non_finite for NaN/Inf in x or a weight,
    /// and what quant_spec::validate throws (plus errc::bad_shape when a group size does not divide
    /// n). Allocates O(t·n + n² + Σ out_l·(t + n)) elements of T (plus copies of x and weights
    /// whose rows are not contiguous) and precomputes X·W_lᵀ.
    template <real_matrix X>
        requires std::same_as<std::remove_const_t<matrix_element_t<X>>, T>
    linear_quantization_error(const X& x, std::span<const matrix_view<const T>> weights, std::optional<quant_spec> activation,
                              std::optional<quant_spec> weight)
        : x_(spinquant::as_matrix_view(x)), xm_(x_), activation_(activation), weight_(weight)
    {
        constexpr std::string_view where = "linear_quantization_error";
        if (x_.empty()) detail::fail(errc::bad_shape, where, "x is empty, expected t x n activations");
        if (weights.empty()) detail::fail(errc::bad_shape, where, "no weights, expected at least one layer");
        detail::require_finite(x_, where, "x");
        const std::size_t n = x_.cols;
        for (std::size_t l = 0; l < weights.size(); ++l) {
            const std::string name = "weight " + std::to_string(l);
            if (weights[l].cols != n || weights[l].rows == 0)
                detail::fail(errc::bad_shape, where,
                             name + " is " + detail::shape_string(weights[l].rows, weights[l].cols) + ", expected out x " +
                                 std::to_string(n) + " (the width of x)");
            detail::require_finite(weights[l], where, name);
        }
        const auto check_spec = [&](const std::optional<quant_spec>& s, const char* what) {
            if (!s) return;
            s->validate();
            if (s->granularity == granularity::group && n % s->group_size != 0)
                detail::fail(errc::bad_shape, where,
                             std::string(what) + " group_size " + std::to_string(s->group_size) + " does not divide n = " + std::to_string(n));
        };
        check_spec(activation_, "activation");
        check_spec(weight_, "weight");

        const auto t = static_cast<Eigen::Index>(x_.rows), ni = static_cast<Eigen::Index>(n);
        a_.resize(t, ni);
        a_hat_.resize(t, ni);
        da_.resize(t, ni);
        r_.resize(ni, ni);
        g_.resize(ni, ni);
        const auto xe = xm_.get();
        for (const auto& w : weights) {
            layer l{detail::row_major_operand<T>(w), {}, {}, {}, {}, {}};
            const auto out = static_cast<Eigen::Index>(w.rows);
            l.y.noalias() = xe * l.w.get().transpose();
            l.b.resize(out, ni);
            l.b_hat.resize(out, ni);
            l.db.resize(out, ni);
            l.e.resize(t, out);
            outputs_ += w.rows;
            layers_.push_back(std::move(l));
        }
    }

    /// n, the order of the rotation.
    [[nodiscard]] std::size_t size() const noexcept { return x_.cols; }

    /// L at rotations[0] (n x n, any matrix, not necessarily orthogonal), with ∂L/∂R written into
    /// gradients[0]. Throws errc::bad_shape unless there is exactly one n x n rotation and
    /// gradient, errc::non_finite for NaN/Inf in the rotation; the gradient is untouched then.
    double operator()(std::span<const matrix_view<const T>> rotations, std::span<const matrix_view<T>> gradients)
    {
        constexpr std::string_view where = "linear_quantization_error";
        detail::require_one_rotation(rotations, gradients, x_.cols, where);
        // Dense copies of R and the gradient: the caller's views may have any strides.
        r_ = spinquant::as_eigen(rotations[0]);
        const auto xe = xm_.get();
        a_.noalias() = xe * r_;
        quantize_or_copy(a_, a_hat_, activation_);
        const double c = 2.0 / (static_cast<double>(x_.rows) * static_cast<double>(outputs_));
        double loss = 0;
        da_.setZero();
        for (layer& l : layers_) {
            l.b.noalias() = l.w.get() * r_;
            quantize_or_copy(l.b, l.b_hat, weight_);
            l.e.noalias() = a_hat_ * l.b_hat.transpose();
            l.e -= l.y;
            loss += static_cast<double>(l.e.template cast<double>().squaredNorm());
            // The factor c is applied to E once so both products below carry it.
            l.e *= static_cast<T>(c);
            da_.noalias() += l.e * l.b_hat;
            l.db.noalias() = l.e.transpose() * a_hat_;
            if (weight_) spinquant::fake_quantize_backward(l.b, l.db, *weight_);
        }
        if (activation_) spinquant::fake_quantize_backward(a_, da_, *activation_);
        g_.noalias() = xe.transpose() * da_;
        for (const layer& l : layers_) g_.noalias() += l.w.get().transpose() * l.db;
        spinquant::as_eigen(gradients[0]) = g_;
        return loss * c / 2.0;
    }

private:
    using matrix = detail::objective_matrix<T>;
    struct layer {
        detail::row_major_operand<T> w;
        matrix y, b, b_hat, db, e;
    };

    static void quantize_or_copy(const matrix& in, matrix& out, const std::optional<quant_spec>& spec)
    {
        if (spec)
            spinquant::fake_quantize(in, out, *spec);
        else
            out = in;
    }

    matrix_view<const T> x_;
    detail::row_major_operand<T> xm_;
    std::optional<quant_spec> activation_, weight_;
    std::vector<layer> layers_;
    std::size_t outputs_ = 0;
    matrix a_, a_hat_, da_, r_, g_;
};

/// An outlier proxy: the mean kurtosis of the rotated activation tokens,
///
///     L(R) = (1/t) · Σ_i κ(x_i·R),   κ(a) = n · Σ_j a_j⁴ / (Σ_j a_j²)²,
///
/// over calibration activations X (t x n, rows x_i are tokens). κ is n for a token whose energy
/// sits in one channel (a massive outlier), about 3 for Gaussian-like tokens and 1 at its minimum
/// (all |a_j| equal): rotating to lower κ spreads outliers over channels, which is what makes
/// per-token quantization work. Tokens with x_i = 0 contribute 0.
///
/// Gradient: ∂κ/∂a_j = 4n·(a_j³/s₂² − s₄·a_j/s₂³) with s₂ = Σ a², s₄ = Σ a⁴, and
/// ∂L/∂R = (1/t)·Xᵀ·D with D the matrix of those row gradients. Exact for any R (not only
/// orthogonal). Computed in T with preallocated buffers; about 4·t·n² flops per call.
template <real_scalar T>
class activation_kurtosis {
public:
    /// The objective over calibration activations `x` (t x n). Throws errc::bad_shape if x is
    /// empty, errc::non_finite for NaN/Inf. Allocates 2·t·n elements.
    template <real_matrix X>
        requires std::same_as<std::remove_const_t<matrix_element_t<X>>, T>
    explicit activation_kurtosis(const X& x) : x_(spinquant::as_matrix_view(x)), xm_(x_)
    {
        if (x_.empty()) detail::fail(errc::bad_shape, "activation_kurtosis", "x is empty, expected t x n activations");
        detail::require_finite(x_, "activation_kurtosis", "x");
        a_.resize(static_cast<Eigen::Index>(x_.rows), static_cast<Eigen::Index>(x_.cols));
        d_.resizeLike(a_);
        r_.resize(a_.cols(), a_.cols());
        g_.resizeLike(r_);
    }

    /// n, the order of the rotation.
    [[nodiscard]] std::size_t size() const noexcept { return x_.cols; }

    /// L at rotations[0] with ∂L/∂R written into gradients[0]; errors as linear_quantization_error.
    double operator()(std::span<const matrix_view<const T>> rotations, std::span<const matrix_view<T>> gradients)
    {
        detail::require_one_rotation(rotations, gradients, x_.cols, "activation_kurtosis");
        r_ = spinquant::as_eigen(rotations[0]);
        const auto xe = xm_.get();
        a_.noalias() = xe * r_;
        const double n = static_cast<double>(x_.cols), t = static_cast<double>(x_.rows);
        double loss = 0;
        for (Eigen::Index i = 0; i < a_.rows(); ++i) {
            double s2 = 0, s4 = 0;
            for (Eigen::Index j = 0; j < a_.cols(); ++j) {
                const double v = static_cast<double>(a_(i, j)), v2 = v * v;
                s2 += v2;
                s4 += v2 * v2;
            }
            if (s2 == 0) {
                d_.row(i).setZero();
                continue;
            }
            loss += n * s4 / (s2 * s2);
            const double f3 = 4.0 * n / (s2 * s2 * t), f1 = 4.0 * n * s4 / (s2 * s2 * s2 * t);
            for (Eigen::Index j = 0; j < a_.cols(); ++j) {
                const double v = static_cast<double>(a_(i, j));
                d_(i, j) = static_cast<T>(f3 * v * v * v - f1 * v);
            }
        }
        g_.noalias() = xe.transpose() * d_;
        spinquant::as_eigen(gradients[0]) = g_;
        return loss / t;
    }

private:
    matrix_view<const T> x_;
    detail::row_major_operand<T> xm_;
    detail::objective_matrix<T> a_, d_, r_, g_;
};

/// Runs `steps` steps of `optimizer` (cayley_sgd, cayley_adam, or anything with their step
/// signature) on `objective` (any rotation_objective) from the rotations given, which are updated
/// in place. Returns the loss before each step, then the final loss (steps + 1 values), evaluated
/// by the objective. The optimizer must have been built for the rotations' shapes. Allocates the
/// gradient buffers once; errors are those of the objective and of the optimizer's step.
///
/// **Example**
/// ```
/// spinquant::linear_quantization_error<float> loss(calib, layers, quant_spec::activation(4), quant_spec::weight(4));
/// spinquant::cayley_sgd<float> opt(n, {.lr = 1.5, .max_grad_norm = 1.0, .schedule = {.total_steps = 100}});
/// const auto history = spinquant::minimize(opt, loss, r1, 100);
/// ```
template <real_scalar T, class Optimizer, class Objective>
    requires rotation_objective<Objective, T> &&
             requires(Optimizer& o, std::span<const matrix_view<T>> p, std::span<const matrix_view<const T>> g) { o.step(p, g); }
std::vector<double> minimize(Optimizer& optimizer, Objective&& objective, std::span<const matrix_view<T>> rotations, std::size_t steps)
{
    std::vector<detail::objective_matrix<T>> grads;
    std::vector<matrix_view<const T>> r;
    std::vector<matrix_view<T>> g;
    std::vector<matrix_view<const T>> g_const;
    for (const matrix_view<T>& m : rotations) {
        grads.emplace_back(static_cast<Eigen::Index>(m.rows), static_cast<Eigen::Index>(m.cols));
        r.push_back(m);
    }
    for (auto& m : grads) {
        g.push_back(spinquant::as_matrix_view(m));
        g_const.push_back(spinquant::as_matrix_view(m));
    }
    std::vector<double> losses;
    losses.reserve(steps + 1);
    for (std::size_t k = 0; k <= steps; ++k) {
        losses.push_back(static_cast<double>(objective(std::span<const matrix_view<const T>>(r), std::span<const matrix_view<T>>(g))));
        if (k == steps) break;
        optimizer.step(rotations, std::span<const matrix_view<const T>>(g_const));
    }
    return losses;
}

/// minimize for a single rotation (any matrix type the library can view).
template <class Optimizer, class Objective, mutable_real_matrix M>
std::vector<double> minimize(Optimizer& optimizer, Objective&& objective, M&& rotation, std::size_t steps)
{
    using T = matrix_element_t<M>;
    const matrix_view<T> one[1] = {spinquant::as_matrix_view(rotation)};
    return spinquant::minimize<T>(optimizer, static_cast<Objective&&>(objective), std::span<const matrix_view<T>>(one), steps);
}

}  // namespace spinquant
