#pragma once
/// Optimisation on the Stiefel manifold: the Cayley retraction, Cayley SGD with momentum and
/// Cayley Adam (Li, Fuxin and Todorovic, "Efficient Riemannian optimization on the Stiefel manifold
/// via the Cayley transform", ICLR 2020), re-orthonormalisation, and the learning-rate schedule
/// SpinQuant's trainer supplies. These learn SpinQuant's R1/R2 from the Euclidean gradient of a loss
/// (objective.hpp).
///
/// Orientation. An optimizer parameter P is p x n with **orthonormal rows** (P·Pᵀ = I_p, p <= n;
/// square rotations have p = n), stored as the user stores it (any strides), and its gradient G is
/// the Euclidean ∂L/∂P of the same shape: this is how SpinQuant stores R1/R2. The paper's point
/// X = Pᵀ (n x p, orthonormal columns) is the orientation of cayley_retraction.
///
/// What differs from SpinQuant's `SGDG` (REFERENCE §1d), and why:
///   - cayley_mode::exact (default) solves the Cayley system exactly and re-orthonormalises
///     periodically, so ‖P·Pᵀ − I‖ stays at rounding level; the reference's 5 fixed-point
///     iterations, row normalisation and random QR let R drift (1e-2 after 8 steps at lr 1.5).
///   - momentum works; in the reference the buffer is never written (a rebinding bug), so it has
///     no effect. cayley_mode::reference reproduces that too, and its trajectories.
///   - gradient-norm clipping (joint over all parameters) and the cosine schedule are options here;
///     the reference gets them from the Hugging Face Trainer (max_grad_norm 1.0, cosine, 100 steps).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <numbers>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "concepts.hpp"
#include "detail/checks.hpp"
#include "detail/quant_kernels.hpp"
#include "detail/random.hpp"
#include "detail/stiefel_kernels.hpp"
#include "eigen.hpp"
#include "error.hpp"

namespace spinquant {

// ---------------------------------------------------------------------------------------------
// Retraction and orthonormality

/// How cayley_retraction computes Y = (I − α/2·W)⁻¹(I + α/2·W)·X.
enum class cayley_method {
    exact,        ///< LU solve of the n x n system: orthonormality preserved to rounding
    fixed_point,  ///< Li et al.'s iteration Y ← X + α·W·½(X + Y) from Y₀ = X + α·W·X (what SpinQuant runs, 5 times)
};

/// Options of cayley_retraction.
struct cayley_retraction_options {
    cayley_method method = cayley_method::exact;  ///< exact solve, or the fixed-point iteration
    unsigned iterations = 5;                       ///< fixed-point iterations (ignored by exact)
};

/// Work buffers for cayley_retraction on n x p points (and for the optimizers, one per shape).
/// Construct once, reuse: retractions through a workspace allocate no matrix.
template <real_scalar T>
class cayley_workspace {
public:
    /// Buffers for points X of n x p (p <= n); throws errc::bad_argument if p == 0 or p > n.
    cayley_workspace(std::size_t n, std::size_t p) : b_(checked(n, p), static_cast<Eigen::Index>(n)) {}
    /// The n of the points this workspace serves.
    [[nodiscard]] std::size_t n() const noexcept { return static_cast<std::size_t>(b_.n); }
    /// The p of the points this workspace serves.
    [[nodiscard]] std::size_t p() const noexcept { return static_cast<std::size_t>(b_.p); }
    /// The buffers themselves: for the library's own kernels, not part of the API.
    [[nodiscard]] detail::stiefel_buffers<T>& buffers() noexcept { return b_; }

private:
    static Eigen::Index checked(std::size_t n, std::size_t p)
    {
        if (p == 0 || p > n)
            detail::fail(errc::bad_argument, "cayley_workspace",
                         "shape n=" + std::to_string(n) + ", p=" + std::to_string(p) + ", expected 1 <= p <= n");
        return static_cast<Eigen::Index>(p);
    }
    detail::stiefel_buffers<T> b_;
};

namespace detail {

/// Largest |W + Wᵀ| allowed for a "skew-symmetric" W: rounding of a product, relative to max|W|.
template <class T>
[[nodiscard]] double skew_tolerance(double max_abs) noexcept
{
    return std::sqrt(static_cast<double>(std::numeric_limits<T>::epsilon())) * std::max(1.0, max_abs);
}

}  // namespace detail

/// Cayley retraction of X (n x p, in place) along the skew-symmetric W (n x n) with step α:
/// X ← (I − α/2·W)⁻¹(I + α/2·W)·X, the curve Y(α) of Li et al. (2020, eq. 4) with Y(0) = X and
/// Y'(0) = W·X. Since the Cayley transform of a skew matrix is orthogonal, X's columns stay
/// orthonormal (exactly up to rounding with cayley_method::exact; with the fixed-point iteration
/// the error shrinks by about α‖W‖/2 per iteration, which converges when α‖W‖₂ < 2).
///
/// Throws errc::bad_shape unless W is n x n and the workspace serves n x p, errc::non_finite for
/// NaN/Inf in X, W or α, errc::bad_argument unless W is skew-symmetric (|W + Wᵀ| within
/// √ε·max(1, max|W|)); X is untouched then. Allocation-free with a workspace; O(n³).
template <mutable_real_matrix X, real_matrix W>
    requires std::same_as<std::remove_const_t<matrix_element_t<W>>, matrix_element_t<X>>
void cayley_retraction(X&& x, const W& w, double alpha, cayley_workspace<matrix_element_t<X>>& workspace,
                       cayley_retraction_options options = {})
{
    using T = matrix_element_t<X>;
    constexpr std::string_view where = "cayley_retraction";
    const auto xv = spinquant::as_matrix_view(x);
    const matrix_view<const T> wv = spinquant::as_matrix_view(w);
    detail::require_shape(wv, xv.rows, xv.rows, where, "w");
    if (workspace.n() != xv.rows || workspace.p() != xv.cols)
        detail::fail(errc::bad_shape, where,
                     "x is " + detail::shape_string(xv.rows, xv.cols) + ", expected " +
                         detail::shape_string(workspace.n(), workspace.p()) + " (the workspace's shape)");
    if (!std::isfinite(alpha)) detail::fail(errc::non_finite, where, "alpha is " + std::to_string(alpha));
    detail::require_finite(matrix_view<const T>(xv), where, "x");
    detail::require_finite(wv, where, "w");
    auto& b = workspace.buffers();
    const auto we = spinquant::as_eigen(wv);
    const double asym = static_cast<double>((we + we.transpose()).cwiseAbs().maxCoeff());
    const double tol = detail::skew_tolerance<T>(static_cast<double>(we.cwiseAbs().maxCoeff()));
    if (asym > tol)
        detail::fail(errc::bad_argument, where,
                     "w is not skew-symmetric: max|w + wᵀ| = " + std::to_string(asym) + ", expected <= " + std::to_string(tol));
    b.w = we;
    b.x = spinquant::as_eigen(xv);
    const T a = static_cast<T>(alpha);
    if (options.method == cayley_method::exact) {
        detail::cayley_exact(b, a);
    } else {
        b.y.noalias() = b.w * b.x;
        b.y = b.x + a * b.y;
        detail::cayley_fixed_point(b, a, options.iterations);
    }
    spinquant::as_eigen(xv) = b.y;
}

/// cayley_retraction with a temporary workspace (allocates O(n²)).
template <mutable_real_matrix X, real_matrix W>
    requires std::same_as<std::remove_const_t<matrix_element_t<W>>, matrix_element_t<X>>
void cayley_retraction(X&& x, const W& w, double alpha, cayley_retraction_options options = {})
{
    const auto xv = spinquant::as_matrix_view(x);
    if (xv.cols == 0 || xv.cols > xv.rows)
        detail::fail(errc::bad_shape, "cayley_retraction",
                     "x is " + detail::shape_string(xv.rows, xv.cols) + ", expected n x p with 1 <= p <= n");
    cayley_workspace<matrix_element_t<X>> ws(xv.rows, xv.cols);
    cayley_retraction(xv, w, alpha, ws, options);
}

/// The largest entry of |P·Pᵀ − I| for a p x n matrix with p < n, of |Pᵀ·P − I| when p > n, and of
/// both when P is square, computed in double: how far P is from having orthonormal rows (columns). Throws errc::bad_shape if P is
/// empty, errc::non_finite for NaN/Inf. O(min(p,n)²·max(p,n)); allocates.
template <real_matrix M>
[[nodiscard]] double max_orthonormality_error(const M& p)
{
    using T = std::remove_const_t<matrix_element_t<M>>;
    const matrix_view<const T> pv = spinquant::as_matrix_view(p);
    if (pv.empty()) detail::fail(errc::bad_shape, "max_orthonormality_error", "p is empty");
    detail::require_finite(pv, "max_orthonormality_error", "p");
    const Eigen::MatrixXd pd = spinquant::as_eigen(pv).template cast<double>();
    const auto defect = [](const Eigen::MatrixXd& g) { return (g - Eigen::MatrixXd::Identity(g.rows(), g.cols())).cwiseAbs().maxCoeff(); };
    if (pv.rows < pv.cols) return defect(pd * pd.transpose());
    if (pv.rows > pv.cols) return defect(pd.transpose() * pd);
    return std::max(defect(pd * pd.transpose()), defect(pd.transpose() * pd));
}

/// Replaces P (p x n) by its polar factor, the nearest matrix (in Frobenius norm) with orthonormal
/// rows (p <= n) or columns (p > n): U·Vᵀ from the thin SVD P = U·Σ·Vᵀ, computed in double by a
/// scaled Newton–Schulz iteration (products only; a handful of iterations for a near-rotation,
/// about log₁.₅ of the condition number more otherwise). Use it to clean up a rotation learned
/// with the reference's drifting optimizer before fusing it.
/// Throws, with P untouched, errc::bad_shape if P is empty, errc::non_finite for NaN/Inf, and
/// errc::bad_argument if P is numerically rank deficient (no unique nearest matrix).
/// Allocates; O(p·n·min(p, n)) per iteration.
template <mutable_real_matrix M>
void nearest_orthogonal(M&& p)
{
    const auto pv = spinquant::as_matrix_view(p);
    using T = typename decltype(pv)::value_type;
    if (pv.empty()) detail::fail(errc::bad_shape, "nearest_orthogonal", "p is empty");
    detail::require_finite(matrix_view<const T>(pv), "nearest_orthogonal", "p");
    const bool wide = pv.rows <= pv.cols;
    Eigen::MatrixXd pd = spinquant::as_eigen(pv).template cast<double>();
    if (!wide) pd.transposeInPlace();
    if (!detail::polar_factor_rows(pd))
        detail::fail(errc::bad_argument, "nearest_orthogonal",
                     "p (" + std::to_string(pv.rows) + "x" + std::to_string(pv.cols) +
                         ") is numerically rank deficient: it has no unique nearest matrix with orthonormal " +
                         (wide ? "rows" : "columns"));
    if (wide)
        spinquant::as_eigen(pv) = pd.template cast<T>();
    else
        spinquant::as_eigen(pv) = pd.transpose().template cast<T>();
}

// ---------------------------------------------------------------------------------------------
// Optimizers

/// Shape of one optimizer parameter: rows x cols with rows <= cols (orthonormal rows).
struct stiefel_shape {
    std::size_t rows = 0;  ///< p
    std::size_t cols = 0;  ///< n
};

/// The cosine learning-rate schedule of the Hugging Face Trainer (`lr_scheduler_type cosine`,
/// which SpinQuant's optimize_rotation.py uses with 100 steps and no warmup): the factor for
/// (0-based) step k is k/warmup during warmup, then ½(1 + cos(π·progress)) with progress =
/// (k − warmup)/(total − warmup) clamped to [0, 1] (HF does not clamp, so its lr rises again past
/// the end). total_steps == 0 means a constant learning rate.
struct cosine_schedule {
    std::size_t total_steps = 0;   ///< length of the decay; 0 = no schedule (factor 1)
    std::size_t warmup_steps = 0;  ///< linear warmup from 0 before the decay

    /// The multiplier of the base learning rate at 0-based step k.
    [[nodiscard]] double factor(std::size_t k) const noexcept
    {
        if (total_steps == 0) return 1.0;
        if (k < warmup_steps) return static_cast<double>(k) / static_cast<double>(warmup_steps);
        const std::size_t span = total_steps > warmup_steps ? total_steps - warmup_steps : 1;
        const double progress = std::min(1.0, static_cast<double>(k - warmup_steps) / static_cast<double>(span));
        return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
    }
};

/// Which update rule cayley_sgd runs.
enum class cayley_mode {
    /// Default: working momentum, exact Cayley solve, Newton–Schulz re-orthonormalisation every
    /// `orthonormalize_every` steps; ‖P·Pᵀ − I‖_max stays near rounding (tested: <= 1e-12 in
    /// double, <= 1e-5 in float after 1000 steps at lr 1.5).
    exact,
    /// SpinQuant's SGDG step (REFERENCE §1d): row-normalise, the three-product projection, the
    /// step clamp, Y₀ = Uᵀ − α·Gᵀ and `fixed_point_iterations` fixed-point iterations, the QR
    /// retraction with probability `qr_probability`, and momentum silently ignored (the reference's
    /// buffer bug). Reproduces the reference's trajectories, drift included.
    reference,
};

/// Options of cayley_sgd.
struct cayley_sgd_options {
    double lr = 1.5;                    ///< base learning rate (SpinQuant's script default); > 0
    double momentum = 0.0;              ///< in [0, 1); ignored in reference mode, as in the reference
    cayley_mode mode = cayley_mode::exact;
    double max_grad_norm = 0.0;         ///< clip the joint gradient norm of all parameters to this; 0 = off (SpinQuant's trainer: 1.0)
    cosine_schedule schedule{};         ///< learning-rate schedule over steps (default: constant)
    std::size_t orthonormalize_every = 32;  ///< exact mode: Newton–Schulz polish every this many steps (and at step 0); 0 = only at step 0
    unsigned fixed_point_iterations = 5;    ///< reference mode: Cayley iterations per step
    double qr_probability = 1.0 / 101.0;    ///< reference mode: chance of the QR retraction per parameter and step
    std::uint64_t seed = 0;                 ///< reference mode: seed of the QR draws (std::mt19937_64)
};

namespace detail {

/// m, or its transpose when that walks along the smaller stride: rows to scan one by one.
template <class T>
[[nodiscard]] matrix_view<const T> scan_order(matrix_view<const T> m) noexcept
{
    return m.has_contiguous_rows() || m.row_stride >= m.col_stride ? m : m.transposed();
}

/// True when every element of m is finite (the quantizer's SIMD scan, row by row).
template <class T>
[[nodiscard]] bool all_finite(matrix_view<const T> m) noexcept
{
    const matrix_view<const T> w = scan_order(m);
    for (std::size_t i = 0; i < w.rows; ++i)
        if (!run_is_finite<T, xsimd::default_arch>(w.data + i * w.row_stride, w.cols, w.col_stride)) return false;
    return true;
}

/// ‖m‖²_F accumulated in double.
template <class T>
[[nodiscard]] double squared_norm(matrix_view<const T> m) noexcept
{
    using row = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>, Eigen::Unaligned, Eigen::InnerStride<>>;
    const matrix_view<const T> w = scan_order(m);
    double sum = 0;
    for (std::size_t i = 0; i < w.rows; ++i)
        sum += row(w.data + i * w.row_stride, static_cast<Eigen::Index>(w.cols),
                   Eigen::InnerStride<>(static_cast<Eigen::Index>(std::max<std::size_t>(1, w.col_stride))))
                   .template cast<double>()
                   .square()
                   .sum();
    return sum;
}

/// What cayley_sgd and cayley_adam share: parameter shapes, one set of buffers per distinct shape,
/// input checks, joint gradient norm and clipping, orthonormality checks and polishing.
template <class T>
class cayley_optimizer_base {
public:
    /// Number of parameters.
    [[nodiscard]] std::size_t size() const noexcept { return shapes_.size(); }
    /// The shape of parameter i.
    [[nodiscard]] stiefel_shape shape(std::size_t i) const { return shapes_.at(i); }
    /// Steps taken so far.
    [[nodiscard]] std::size_t steps_taken() const noexcept { return steps_; }
    /// The joint Frobenius norm of all gradients of the last step, before clipping (what the
    /// Hugging Face Trainer logs as grad_norm).
    [[nodiscard]] double last_gradient_norm() const noexcept { return last_norm_; }
    /// The step size α actually used for parameter i in the last step (after the clamp).
    [[nodiscard]] double last_step_size(std::size_t i) const { return last_alpha_.at(i); }

protected:
    cayley_optimizer_base(std::span<const stiefel_shape> shapes, std::string_view where)
    {
        if (shapes.empty()) fail(errc::bad_argument, where, "no parameters, expected at least one shape");
        for (std::size_t i = 0; i < shapes.size(); ++i) {
            const stiefel_shape s = shapes[i];
            if (s.rows == 0 || s.rows > s.cols)
                fail(errc::bad_shape, where,
                     "parameter " + std::to_string(i) + " is " + shape_string(s.rows, s.cols) +
                         ", expected rows x cols with 1 <= rows <= cols (orthonormal rows)");
        }
        shapes_.assign(shapes.begin(), shapes.end());
        for (const stiefel_shape s : shapes_) {
            std::size_t k = 0;
            while (k < buffers_.size() && !(buffers_[k].p == static_cast<Eigen::Index>(s.rows) &&
                                             buffers_[k].n == static_cast<Eigen::Index>(s.cols)))
                ++k;
            if (k == buffers_.size()) buffers_.emplace_back(static_cast<Eigen::Index>(s.rows), static_cast<Eigen::Index>(s.cols));
            buffer_of_.push_back(k);
        }
        last_alpha_.assign(shapes_.size(), 0.0);
    }

    static void check_common(double lr, double max_grad_norm, std::string_view where)
    {
        if (!(lr > 0) || !std::isfinite(lr)) fail(errc::bad_argument, where, "lr is " + std::to_string(lr) + ", expected > 0");
        if (!(max_grad_norm >= 0) || !std::isfinite(max_grad_norm))
            fail(errc::bad_argument, where, "max_grad_norm is " + std::to_string(max_grad_norm) + ", expected >= 0 (0 = off)");
    }

    /// Shapes and finiteness of all parameters and gradients; returns the clip factor (1 if off).
    double validate(std::span<const matrix_view<T>> params, std::span<const matrix_view<const T>> grads, double max_grad_norm,
                    std::string_view where)
    {
        if (params.size() != shapes_.size() || grads.size() != shapes_.size())
            fail(errc::bad_shape, where,
                 std::to_string(params.size()) + " parameters and " + std::to_string(grads.size()) + " gradients, expected " +
                     std::to_string(shapes_.size()) + " of each");
        double sum = 0;
        for (std::size_t i = 0; i < shapes_.size(); ++i) {
            // Messages are built only on failure: this runs every step.
            const auto name = [i](const char* what) { return std::string(what) + " " + std::to_string(i); };
            const std::size_t r = shapes_[i].rows, c = shapes_[i].cols;
            if (params[i].rows != r || params[i].cols != c) require_shape(params[i], r, c, where, name("parameter"));
            if (grads[i].rows != r || grads[i].cols != c) require_shape(grads[i], r, c, where, name("gradient"));
            if (!all_finite(matrix_view<const T>(params[i]))) require_finite(matrix_view<const T>(params[i]), where, name("parameter"));
            if (!all_finite(grads[i])) require_finite(grads[i], where, name("gradient"));
            sum += squared_norm(grads[i]);
        }
        last_norm_ = std::sqrt(sum);
        // torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), clamped to 1.
        if (max_grad_norm > 0) return std::min(1.0, max_grad_norm / (last_norm_ + 1e-6));
        return 1.0;
    }

    /// Rejects, before anything is written, a first parameter too far from orthonormal rows to be
    /// a rotation (‖P·Pᵀ − I‖_F >= 1/2): most likely not what the caller meant to optimise.
    void require_orthonormal(std::span<const matrix_view<T>> params, std::string_view where)
    {
        for (std::size_t i = 0; i < shapes_.size(); ++i) {
            auto& b = buffers_[buffer_of_[i]];
            b.u = spinquant::as_eigen(params[i]);
            const double defect = orthonormality_defect(b);
            if (!(defect < 0.5))
                fail(errc::bad_argument, where,
                     "parameter " + std::to_string(i) + " does not have orthonormal rows: ‖P·Pᵀ − I‖_F = " + std::to_string(defect) +
                         ", expected < 0.5 (start from random_orthogonal or random_hadamard, or call nearest_orthogonal)");
        }
    }

    /// Loads parameter i into its buffers' u and, when due, polishes it to orthonormal rows.
    stiefel_buffers<T>& load(std::size_t i, const matrix_view<T>& param, bool polish)
    {
        auto& b = buffers_[buffer_of_[i]];
        b.u = spinquant::as_eigen(param);
        if (polish) polish_rows(b);
        return b;
    }

    [[nodiscard]] bool polish_due(std::size_t every) const noexcept { return steps_ == 0 || (every != 0 && steps_ % every == 0); }

    std::vector<stiefel_shape> shapes_;
    std::vector<stiefel_buffers<T>> buffers_;
    std::vector<std::size_t> buffer_of_;
    std::vector<double> last_alpha_;
    std::size_t steps_ = 0;
    double last_norm_ = 0;
};

template <class M, class T>
concept parameter_of = mutable_real_matrix<M> && std::same_as<matrix_element_t<M>, T>;
template <class M, class T>
concept gradient_of = real_matrix<M> && std::same_as<std::remove_const_t<matrix_element_t<M>>, T>;

}  // namespace detail

/// Cayley SGD with momentum on the Stiefel manifold (Li et al. 2020, Algorithm 1), SpinQuant's
/// optimizer for R1/R2. One optimizer serves a fixed list of parameters (e.g. R1 and every layer's
/// R2), whose shapes it takes at construction; it owns all buffers, so step() allocates no matrix.
///
/// One step for a parameter P (p x n, orthonormal rows) with Euclidean gradient G, at learning rate
/// lr_k = lr·schedule.factor(k), after joint clipping G ← c·G:
///   D = momentum·M − G                       (M: momentum, a tangent vector, initially 0)
///   Ŵ = DᵀU − ½·Uᵀ(U·DᵀU),  W = Ŵ − Ŵᵀ      (n x n skew; = ½(DᵀU − UᵀD) for square orthogonal U)
///   α = min(lr_k, 1/(‖W‖₁ + 1e-8))           (the reference's clamp; ‖·‖₁ = max column sum)
///   Pᵀ ← (I − α/2·W)⁻¹(I + α/2·W)·Pᵀ,   M ← (W·Pᵀ)ᵀ at the old P
/// For square orthogonal P and no momentum the initial slope is ⟨G, dP/dα⟩ = −‖W‖²_F <= 0: a
/// descent direction.
///
/// **Example**
/// ```
/// spinquant::cayley_sgd<float> opt(dim, {.lr = 1.5, .max_grad_norm = 1.0, .schedule = {.total_steps = 100}});
/// for (int k = 0; k < 100; ++k) { loss(r1, grad); opt.step(r1, grad); }
/// ```
template <real_scalar T>
class cayley_sgd : public detail::cayley_optimizer_base<T> {
    using base = detail::cayley_optimizer_base<T>;

public:
    /// An optimizer for the parameters of the given shapes. Throws errc::bad_shape unless each has
    /// 1 <= rows <= cols, errc::bad_argument for options out of range (lr <= 0, momentum outside
    /// [0, 1), max_grad_norm < 0, qr_probability outside [0, 1]). Allocates all buffers.
    cayley_sgd(std::span<const stiefel_shape> shapes, cayley_sgd_options options = {}) : base(shapes, "cayley_sgd"), options_(options)
    {
        constexpr std::string_view where = "cayley_sgd";
        base::check_common(options.lr, options.max_grad_norm, where);
        if (!(options.momentum >= 0 && options.momentum < 1))
            detail::fail(errc::bad_argument, where, "momentum is " + std::to_string(options.momentum) + ", expected in [0, 1)");
        if (!(options.qr_probability >= 0 && options.qr_probability <= 1))
            detail::fail(errc::bad_argument, where,
                         "qr_probability is " + std::to_string(options.qr_probability) + ", expected in [0, 1]");
        rng_.seed(options.seed);
        if (options.mode == cayley_mode::exact && options.momentum > 0)
            for (const stiefel_shape s : this->shapes_)
                momentum_.push_back(detail::dense_matrix<T>::Zero(static_cast<Eigen::Index>(s.rows), static_cast<Eigen::Index>(s.cols)));
    }
    /// An optimizer for the parameters of the given shapes, e.g. `{{dim, dim}, {head_dim, head_dim}}`.
    cayley_sgd(std::initializer_list<stiefel_shape> shapes, cayley_sgd_options options = {})
        : cayley_sgd(std::span<const stiefel_shape>(shapes.begin(), shapes.size()), options)
    {
    }
    /// An optimizer for one n x n rotation.
    explicit cayley_sgd(std::size_t n, cayley_sgd_options options = {}) : cayley_sgd({stiefel_shape{n, n}}, options) {}

    /// The options it was built with.
    [[nodiscard]] const cayley_sgd_options& options() const noexcept { return options_; }
    /// The learning rate the next step uses: lr · schedule.factor(steps_taken()).
    [[nodiscard]] double learning_rate() const noexcept { return options_.lr * options_.schedule.factor(this->steps_); }
    /// Reference mode: make the next step take the QR retraction for every parameter (the
    /// reference's random.randint(1, 101) == 1), as a golden run with pinned draws requires.
    void force_qr_retraction_on_next_step() noexcept { force_qr_ = true; }

    /// One step on all parameters, with the joint gradient norm clipped first. params[i] and
    /// grads[i] have shape(i). Throws, with every parameter untouched, errc::bad_shape for a count or
    /// shape mismatch, errc::non_finite for NaN/Inf in a parameter or gradient, and (exact mode,
    /// first step) errc::bad_argument for a parameter whose rows are far from orthonormal
    /// (‖P·Pᵀ − I‖_F >= 1/2). A parameter the caller changed between later steps is projected back
    /// at the next polish (its polar factor; that path allocates).
    /// Allocation-free otherwise: no matrix is allocated, but Eigen's GEMM and LU take their packing
    /// buffers from the heap when they exceed its stack limit (n above about 100), and the
    /// reference mode's QR branch allocates.
    void step(std::span<const matrix_view<T>> params, std::span<const matrix_view<const T>> grads)
    {
        constexpr std::string_view where = "cayley_sgd::step";
        const double clip = base::validate(params, grads, options_.max_grad_norm, where);
        const bool exact = options_.mode == cayley_mode::exact;
        const bool polish = exact && base::polish_due(options_.orthonormalize_every);
        if (exact && this->steps_ == 0) base::require_orthonormal(params, where);
        const T lr = static_cast<T>(learning_rate());
        for (std::size_t i = 0; i < params.size(); ++i) {
            if (exact)
                step_exact(i, params[i], grads[i], static_cast<T>(clip), lr, polish);
            else
                step_reference(i, params[i], grads[i], static_cast<T>(clip), lr);
        }
        force_qr_ = false;
        ++this->steps_;
    }

    /// One step for an optimizer of exactly one parameter (any matrix types the library can view).
    template <detail::parameter_of<T> P, detail::gradient_of<T> G>
    void step(P&& param, const G& grad)
    {
        const matrix_view<T> p[1] = {spinquant::as_matrix_view(param)};
        const matrix_view<const T> g[1] = {spinquant::as_matrix_view(grad)};
        step(std::span<const matrix_view<T>>(p), std::span<const matrix_view<const T>>(g));
    }

private:
    void step_exact(std::size_t i, const matrix_view<T>& param, const matrix_view<const T>& grad, T clip, T lr, bool polish)
    {
        auto& b = base::load(i, param, polish);
        b.d = -clip * spinquant::as_eigen(grad);
        const bool has_momentum = !momentum_.empty();
        if (has_momentum) b.d += static_cast<T>(options_.momentum) * momentum_[i];
        detail::skew_generator(b, true);
        const T alpha = detail::clamped_step(b.w, lr);
        this->last_alpha_[i] = static_cast<double>(alpha);
        b.x = b.u.transpose();
        detail::cayley_exact(b, alpha);
        // The new momentum is the tangent W·X at the old point (Li et al. 2020, Algorithm 1).
        if (has_momentum) momentum_[i].noalias() = -b.u * b.w;
        spinquant::as_eigen(param) = b.y.transpose();
    }

    void step_reference(std::size_t i, const matrix_view<T>& param, const matrix_view<const T>& grad, T clip, T lr)
    {
        auto& b = base::load(i, param, false);
        // Row normalisation (gutils.unit): not an orthonormalisation.
        for (Eigen::Index r = 0; r < b.p; ++r) b.u.row(r) /= (b.u.row(r).norm() + T(1e-8));
        bool qr = force_qr_;
        if (!qr && options_.qr_probability > 0) qr = detail::uniform01(rng_) < options_.qr_probability;
        if (qr) detail::qr_retraction_reference(b);
        // V = momentum·buffer − Gᵀ with a buffer that is never updated: the momentum term is 0.
        b.d = -clip * spinquant::as_eigen(grad);
        detail::skew_generator(b, false);
        const T alpha = detail::clamped_step(b.w, lr);
        this->last_alpha_[i] = static_cast<double>(alpha);
        b.x = b.u.transpose();
        b.y = b.x + alpha * b.d.transpose();
        detail::cayley_fixed_point(b, alpha, options_.fixed_point_iterations);
        spinquant::as_eigen(param) = b.y.transpose();
    }

    cayley_sgd_options options_;
    std::vector<detail::dense_matrix<T>> momentum_;
    std::mt19937_64 rng_;
    bool force_qr_ = false;
};

/// Options of cayley_adam.
struct cayley_adam_options {
    double lr = 0.1;               ///< base learning rate; > 0
    double beta1 = 0.9;            ///< first-moment decay, in [0, 1)
    double beta2 = 0.99;           ///< second-moment decay, in [0, 1) (Li et al.'s default)
    double epsilon = 1e-8;         ///< added to the second moment before the square root; > 0
    double max_grad_norm = 0.0;    ///< joint gradient-norm clipping; 0 = off
    cosine_schedule schedule{};    ///< learning-rate schedule (default: constant)
    std::size_t orthonormalize_every = 32;  ///< Newton–Schulz polish every this many steps (and at step 0); 0 = only at step 0
};

/// Cayley Adam on the Stiefel manifold (Li et al. 2020, Algorithm 2): a first moment kept as a
/// tangent vector and one scalar second moment per parameter (the mean squared gradient norm).
/// For step k = 1, 2, … and each parameter, with G clipped jointly first:
///   m ← β₁m + (1 − β₁)G,   v ← β₂v + (1 − β₂)‖G‖²_F,   v̂ = v/(1 − β₂ᵏ),   r = (1 − β₁ᵏ)·√(v̂ + ε)
///   W from the direction D = −m/r as in cayley_sgd,  α = min(lr_k, 1/(‖W‖₁ + 1e-8))
///   Pᵀ ← Cayley(α, W)·Pᵀ (exact solve),   m ← −r·(W·Pᵀ)ᵀ at the old P
/// The paper approximates the retraction with 2 fixed-point iterations; the exact solve and the
/// periodic Newton–Schulz polish keep P orthonormal to rounding instead. Same shapes, checks and
/// allocation behaviour as cayley_sgd.
template <real_scalar T>
class cayley_adam : public detail::cayley_optimizer_base<T> {
    using base = detail::cayley_optimizer_base<T>;

public:
    /// An optimizer for the parameters of the given shapes. Throws errc::bad_shape unless each has
    /// 1 <= rows <= cols, errc::bad_argument for options out of range. Allocates all buffers.
    cayley_adam(std::span<const stiefel_shape> shapes, cayley_adam_options options = {}) : base(shapes, "cayley_adam"), options_(options)
    {
        constexpr std::string_view where = "cayley_adam";
        base::check_common(options.lr, options.max_grad_norm, where);
        if (!(options.beta1 >= 0 && options.beta1 < 1))
            detail::fail(errc::bad_argument, where, "beta1 is " + std::to_string(options.beta1) + ", expected in [0, 1)");
        if (!(options.beta2 >= 0 && options.beta2 < 1))
            detail::fail(errc::bad_argument, where, "beta2 is " + std::to_string(options.beta2) + ", expected in [0, 1)");
        if (!(options.epsilon > 0) || !std::isfinite(options.epsilon))
            detail::fail(errc::bad_argument, where, "epsilon is " + std::to_string(options.epsilon) + ", expected > 0");
        for (const stiefel_shape s : this->shapes_)
            m_.push_back(detail::dense_matrix<T>::Zero(static_cast<Eigen::Index>(s.rows), static_cast<Eigen::Index>(s.cols)));
        v_.assign(this->shapes_.size(), 0.0);
    }
    /// An optimizer for the parameters of the given shapes.
    cayley_adam(std::initializer_list<stiefel_shape> shapes, cayley_adam_options options = {})
        : cayley_adam(std::span<const stiefel_shape>(shapes.begin(), shapes.size()), options)
    {
    }
    /// An optimizer for one n x n rotation.
    explicit cayley_adam(std::size_t n, cayley_adam_options options = {}) : cayley_adam({stiefel_shape{n, n}}, options) {}

    /// The options it was built with.
    [[nodiscard]] const cayley_adam_options& options() const noexcept { return options_; }
    /// The learning rate the next step uses: lr · schedule.factor(steps_taken()).
    [[nodiscard]] double learning_rate() const noexcept { return options_.lr * options_.schedule.factor(this->steps_); }

    /// One step on all parameters; same contract as cayley_sgd::step (exact mode).
    void step(std::span<const matrix_view<T>> params, std::span<const matrix_view<const T>> grads)
    {
        constexpr std::string_view where = "cayley_adam::step";
        const double clip = base::validate(params, grads, options_.max_grad_norm, where);
        const bool polish = base::polish_due(options_.orthonormalize_every);
        if (this->steps_ == 0) base::require_orthonormal(params, where);
        const T lr = static_cast<T>(learning_rate());
        const double k = static_cast<double>(this->steps_ + 1);
        const double bias1 = 1.0 - std::pow(options_.beta1, k);
        const double bias2 = 1.0 - std::pow(options_.beta2, k);
        for (std::size_t i = 0; i < params.size(); ++i) {
            auto& b = base::load(i, params[i], polish);
            const auto g = spinquant::as_eigen(grads[i]);
            const T b1 = static_cast<T>(options_.beta1);
            m_[i] = b1 * m_[i] + (T(1) - b1) * static_cast<T>(clip) * g;
            const double gn2 = clip * clip * detail::squared_norm(grads[i]);
            v_[i] = options_.beta2 * v_[i] + (1.0 - options_.beta2) * gn2;
            const double r = bias1 * std::sqrt(v_[i] / bias2 + options_.epsilon);
            b.d = (T(-1) / static_cast<T>(r)) * m_[i];
            detail::skew_generator(b, true);
            const T alpha = detail::clamped_step(b.w, lr);
            this->last_alpha_[i] = static_cast<double>(alpha);
            b.x = b.u.transpose();
            detail::cayley_exact(b, alpha);
            m_[i].noalias() = static_cast<T>(r) * b.u * b.w;
            spinquant::as_eigen(params[i]) = b.y.transpose();
        }
        ++this->steps_;
    }

    /// One step for an optimizer of exactly one parameter.
    template <detail::parameter_of<T> P, detail::gradient_of<T> G>
    void step(P&& param, const G& grad)
    {
        const matrix_view<T> p[1] = {spinquant::as_matrix_view(param)};
        const matrix_view<const T> g[1] = {spinquant::as_matrix_view(grad)};
        step(std::span<const matrix_view<T>>(p), std::span<const matrix_view<const T>>(g));
    }

private:
    cayley_adam_options options_;
    std::vector<detail::dense_matrix<T>> m_;
    std::vector<double> v_;
};

}  // namespace spinquant
