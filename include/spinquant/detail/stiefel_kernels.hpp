#pragma once
// Building blocks of the Cayley optimizers (stiefel.hpp): buffers for one parameter shape and the
// dense steps on them. Orientation: a parameter P is p x n with orthonormal rows (P·Pᵀ = I_p, p <= n),
// as SpinQuant stores its rotations; the paper's point on the Stiefel manifold is X = Pᵀ (n x p).
// All products go through Eigen into preallocated buffers (`noalias`), so no matrix is allocated
// per step; Eigen's GEMM and LU may still allocate their packing buffers for large n.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>

#include <Eigen/Core>
#include <Eigen/LU>
#include <Eigen/QR>

namespace spinquant::detail {

template <class T>
using dense_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

/// Work buffers for one p x n parameter shape, allocated once.
template <class T>
struct stiefel_buffers {
    Eigen::Index p = 0, n = 0;
    dense_matrix<T> u;   // p x n: the current point (rows orthonormal)
    dense_matrix<T> d;   // p x n: the direction the step follows (descent, or Adam's first moment)
    dense_matrix<T> t;   // p x n: scratch
    dense_matrix<T> s;   // n x n: Dᵀ·U, then Ŵ
    dense_matrix<T> w;   // n x n: the skew-symmetric generator W
    dense_matrix<T> x;   // n x p: Uᵀ, the point in the paper's orientation
    dense_matrix<T> y;   // n x p: the retracted point
    dense_matrix<T> z;   // n x p: scratch
    dense_matrix<T> e;   // p x p: I − U·Uᵀ
    // float parameters: U and I − U·Uᵀ in double, since a float rank update has an error of about
    // √n·ε_float, more than the defect it measures, and the polish would inject it.
    dense_matrix<double> ud, ed;
    Eigen::PartialPivLU<dense_matrix<T>> lu;
    Eigen::HouseholderQR<dense_matrix<T>> qr;

    stiefel_buffers(Eigen::Index rows, Eigen::Index cols)
        : p(rows), n(cols), u(rows, cols), d(rows, cols), t(rows, cols), s(cols, cols), w(cols, cols), x(cols, rows),
          y(cols, rows), z(cols, rows), e(rows, rows), lu(cols), qr(cols, rows)
    {
        if constexpr (!std::is_same_v<T, double>) {
            ud.resize(rows, cols);
            ed.resize(rows, rows);
        }
    }
};

/// ‖W‖₁: the largest column sum of absolute values (torch's matrix_norm_one in the reference).
template <class T>
[[nodiscard]] T norm_one(const dense_matrix<T>& w) noexcept
{
    T best = 0;
    for (Eigen::Index j = 0; j < w.cols(); ++j) best = std::max(best, w.col(j).cwiseAbs().sum());
    return best;
}

/// W from the direction D at U. The general form (Li et al. 2020, eq. 6, as the reference computes
/// it): Ŵ = DᵀU − ½·Uᵀ(U·DᵀU), W = Ŵ − Ŵᵀ; three products. For a square orthogonal U the second term
/// is ½·DᵀU, so W = ½(DᵀU − UᵀD): one product (`square_shortcut`, valid only when U is orthonormal
/// to working precision, which the exact mode maintains). W is skew-symmetric exactly either way.
template <class T>
void skew_generator(stiefel_buffers<T>& b, bool square_shortcut)
{
    b.s.noalias() = b.d.transpose() * b.u;
    if (square_shortcut && b.p == b.n) {
        b.w.noalias() = T(0.5) * (b.s - b.s.transpose());
        return;
    }
    b.t.noalias() = b.u * b.s;
    b.w.noalias() = b.u.transpose() * b.t;
    b.s -= T(0.5) * b.w;
    b.w.noalias() = b.s - b.s.transpose();
}

/// The reference's step clamp: α = min(lr, 1 / (‖W‖₁ + 1e-8)), in the parameter's precision.
template <class T>
[[nodiscard]] T clamped_step(const dense_matrix<T>& w, T lr) noexcept
{
    const T bound = T(1) / (norm_one(w) + T(1e-8));
    return std::min(lr, bound);
}

/// Exact Cayley retraction of b.x along W: Y = (I − α/2·W)⁻¹(I + α/2·W)·X, into b.y.
/// Computed as Y = X + α·W·Z with Z = (I − α/2·W)⁻¹·X (the same matrix, since W commutes with
/// (I − α/2·W)⁻¹): the rounding errors of the solve then only touch the small increment, not X
/// itself. In float this keeps the orthonormality defect per step near ε·‖X‖ instead of about
/// 10·ε for the cheaper Y = 2Z − X. One LU factorisation, one solve, one product.
template <class T>
void cayley_exact(stiefel_buffers<T>& b, T alpha)
{
    b.lu.compute(dense_matrix<T>::Identity(b.n, b.n) - (alpha / T(2)) * b.w);
    b.z.noalias() = b.lu.solve(b.x);
    b.y = b.x;
    b.y.noalias() += alpha * (b.w * b.z);
}

/// The fixed-point form of the same retraction (Li et al. 2020, eq. 10): starting from b.y,
/// `iterations` times Y ← X + α·W·½(X + Y), with the reference's order of operations. It is a
/// contraction with factor α‖W‖/2, so each iteration gains about a bit under the step clamp.
template <class T>
void cayley_fixed_point(stiefel_buffers<T>& b, T alpha, unsigned iterations)
{
    for (unsigned k = 0; k < iterations; ++k) {
        b.z = T(0.5) * (b.x + b.y);
        b.y.noalias() = b.w * b.z;
        b.y = b.x + alpha * b.y;
    }
}

/// e = I − U·Uᵀ (a symmetric rank update, half a product), accumulated in double; returns ‖e‖_F.
template <class T>
double orthonormality_defect(stiefel_buffers<T>& b)
{
    const auto defect = [&](auto& e, const auto& u) {
        using E = typename std::remove_reference_t<decltype(e)>::Scalar;
        e.setIdentity();
        e.template selfadjointView<Eigen::Lower>().rankUpdate(u, E(-1));
        for (Eigen::Index j = 0; j < b.p; ++j)
            for (Eigen::Index i = 0; i < j; ++i) e(i, j) = e(j, i);
        return static_cast<double>(e.norm());
    };
    if constexpr (std::is_same_v<T, double>) {
        return defect(b.e, b.u);
    } else {
        b.ud = b.u.template cast<double>();
        const double norm = defect(b.ed, b.ud);
        b.e = b.ed.template cast<T>();
        return norm;
    }
}

/// Replaces X (p x n, p <= n) by its polar factor, the nearest matrix with orthonormal rows
/// (X = (X·Xᵀ)^(−1/2)·X), in double, with the Newton–Schulz iteration X ← X + ½(I − X·Xᵀ)·X. It
/// maps each singular value σ to σ(3 − σ²)/2, which converges to 1 from anywhere in (0, √3):
/// linearly (×1.5) while σ is small, then quadratically. X is first scaled by 1/√‖X·Xᵀ‖₁, which
/// puts every singular value in (0, 1]. Products only (no SVD: an SVD costs far more to compile
/// than everything else here and is not needed). Returns false, X then unspecified, when it has
/// not converged in 100 iterations: X is (numerically) rank deficient, with no unique polar
/// factor. Allocates two temporaries. (A template only so that TUs that never call it do not
/// compile it; the callers use double.)
template <class S>
[[nodiscard]] bool polar_factor_rows(dense_matrix<S>& x)
{
    using std::sqrt;
    const Eigen::Index p = x.rows();
    dense_matrix<S> g(p, p);
    g.noalias() = x * x.transpose();
    const S norm1 = g.cwiseAbs().colwise().sum().maxCoeff();  // >= ‖X·Xᵀ‖₂ = σ_max²
    if (!(norm1 > S(0)) || !std::isfinite(norm1)) return false;
    x *= S(1) / sqrt(norm1);
    g *= S(1) / norm1;
    dense_matrix<S> t(p, x.cols());
    const S eps = std::numeric_limits<S>::epsilon();
    const S converged = S(64) * eps * sqrt(static_cast<S>(p));
    for (int k = 0; k < 100; ++k) {
        g = dense_matrix<S>::Identity(p, p) - g;  // I − X·Xᵀ
        const S defect = g.norm();
        if (defect < converged) return true;
        t.noalias() = g * x;
        x += S(0.5) * t;
        // Quadratic phase: once the defect is below √ε, this correction left about defect².
        if (defect < sqrt(eps)) return true;
        g.noalias() = x * x.transpose();
    }
    return false;
}

/// Brings the rows of U back to orthonormal. Newton–Schulz polar iteration
/// U ← U + ½(I − U·Uᵀ)·U, which converges quadratically to the polar factor (the nearest matrix
/// with orthonormal rows) when ‖I − U·Uᵀ‖₂ < 1: one correction when U is already close (the
/// steady state: a rank update and a symmetric product), more while the defect is above √ε.
/// Farther away (‖I − U·Uᵀ‖_F >= 1/2: the caller changed the parameter between steps) it takes the
/// polar factor in double from polar_factor_rows, which allocates; if U has lost rank there, the
/// orthonormal rows of its LQ factorisation instead (any orthonormal completion would do).
template <class T>
void polish_rows(stiefel_buffers<T>& b)
{
    double defect = orthonormality_defect(b);
    if (!(defect < 0.5)) {
        Eigen::MatrixXd u = b.u.template cast<double>();
        if (polar_factor_rows(u)) {
            b.u = u.template cast<T>();
        } else {
            b.x = b.u.transpose();
            b.qr.compute(b.x);
            b.z.setIdentity();
            b.z.applyOnTheLeft(b.qr.householderQ());
            b.u = b.z.transpose();
        }
        return;
    }
    const double converged = std::sqrt(static_cast<double>(std::numeric_limits<T>::epsilon()));
    for (int k = 0; k < 8; ++k) {
        b.t.noalias() = b.e.template selfadjointView<Eigen::Lower>() * b.u;
        b.u += T(0.5) * b.t;
        if (defect < converged) return;  // the correction left a defect of order defect² + rounding
        defect = orthonormality_defect(b);
    }
}

/// The reference's QR retraction of the rows of U: Q·R = Uᵀ (thin), columns of Q multiplied by
/// sign(diag R) with torch's sign(0) = 0, U ← Qᵀ.
template <class T>
void qr_retraction_reference(stiefel_buffers<T>& b)
{
    b.x = b.u.transpose();
    b.qr.compute(b.x);
    b.z.setIdentity();
    b.z.applyOnTheLeft(b.qr.householderQ());
    for (Eigen::Index j = 0; j < b.p; ++j) {
        const T r = b.qr.matrixQR()(j, j);
        const T sign = r > T(0) ? T(1) : (r < T(0) ? T(-1) : T(0));
        b.z.col(j) *= sign;
    }
    b.u = b.z.transpose();
}

}  // namespace spinquant::detail
