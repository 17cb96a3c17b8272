#pragma once
// Test support for stiefel.hpp: problems with a known optimum on the Stiefel manifold, and plain
// dense (double, textbook-order) transcriptions of the update rules the optimizers must follow,
// written from the published descriptions (the golden file's `update_rule`, Li et al. 2020
// Algorithm 2), not from the library's code.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/LU>
#include <Eigen/QR>
#include <Eigen/SVD>

namespace spinquant::test {

template <class T>
using row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Orthogonal Procrustes: L(P) = ½‖A·P − B‖²_F over orthogonal n x n P, gradient Aᵀ(A·P − B).
/// The Cayley transform of a skew matrix has determinant +1, so an optimizer started at P₀ stays
/// in det P = det P₀; the optimum there is U·diag(1, …, 1, s)·Vᵀ from AᵀB = U·Σ·Vᵀ, with s chosen
/// so that det matches (Kabsch), giving up the smallest singular value if it must.
struct procrustes {
    Eigen::MatrixXd a, b;

    [[nodiscard]] double loss(const Eigen::MatrixXd& p) const { return 0.5 * (a * p - b).squaredNorm(); }
    [[nodiscard]] Eigen::MatrixXd gradient(const Eigen::MatrixXd& p) const { return a.transpose() * (a * p - b); }
    [[nodiscard]] Eigen::MatrixXd optimum(double det_sign) const
    {
        const Eigen::JacobiSVD<Eigen::MatrixXd> svd(a.transpose() * b, Eigen::ComputeFullU | Eigen::ComputeFullV);
        Eigen::VectorXd d = Eigen::VectorXd::Ones(svd.matrixU().cols());
        const double det = (svd.matrixU() * svd.matrixV().transpose()).determinant();
        if (det * det_sign < 0) d(d.size() - 1) = -1;  // singular values are sorted: flip the smallest
        return svd.matrixU() * d.asDiagonal() * svd.matrixV().transpose();
    }
};

/// Brockett's cost: L(P) = tr(P·S·Pᵀ·N) over p x n P with orthonormal rows, S symmetric n x n and
/// N = diag(μ₁ > … > μ_p > 0); gradient 2·N·P·S. Minimised by the rows P_i = ±v_i, the eigenvectors
/// of S for its p smallest eigenvalues λ₁ <= … <= λ_p (the largest weight μ₁ on the smallest λ₁),
/// with minimum Σ μ_i·λ_i (Brockett 1991).
struct brockett {
    Eigen::MatrixXd s;
    Eigen::VectorXd mu;

    [[nodiscard]] double loss(const Eigen::MatrixXd& p) const { return (p * s * p.transpose() * mu.asDiagonal()).trace(); }
    [[nodiscard]] Eigen::MatrixXd gradient(const Eigen::MatrixXd& p) const { return 2.0 * mu.asDiagonal() * p * s; }
    [[nodiscard]] double minimum() const
    {
        const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(s);  // ascending eigenvalues
        return mu.dot(es.eigenvalues().head(mu.size()));
    }
    [[nodiscard]] Eigen::MatrixXd minimiser_rows() const
    {
        const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(s);
        return es.eigenvectors().leftCols(mu.size()).transpose();
    }
};

/// One step of SpinQuant's SGDG, transcribed from the golden file's `update_rule` in double:
/// X = P row-normalised; [QR]; V = −Gᵀ; MX = V·X; XMX = X·MX; XXMX = Xᵀ·XMX; Ŵ = MX − ½XXMX;
/// W = Ŵ − Ŵᵀ; α = min(lr, 1/(‖W‖₁ + 1e-8)); Y = Xᵀ + αV; 5× Y = Xᵀ + α·W·½(Xᵀ + Y); P = Yᵀ.
inline Eigen::MatrixXd sgdg_reference_step(const Eigen::MatrixXd& p, const Eigen::MatrixXd& g, double lr, bool qr)
{
    Eigen::MatrixXd x = p;
    for (Eigen::Index i = 0; i < x.rows(); ++i) x.row(i) /= x.row(i).norm() + 1e-8;
    if (qr) {
        const Eigen::HouseholderQR<Eigen::MatrixXd> f(x.transpose());
        Eigen::MatrixXd q = f.householderQ() * Eigen::MatrixXd::Identity(x.cols(), x.rows());
        for (Eigen::Index j = 0; j < q.cols(); ++j) {
            const double r = f.matrixQR()(j, j);
            q.col(j) *= r > 0 ? 1.0 : (r < 0 ? -1.0 : 0.0);
        }
        x = q.transpose();
    }
    const Eigen::MatrixXd v = -g.transpose();
    const Eigen::MatrixXd mx = v * x;
    const Eigen::MatrixXd xmx = x * mx;
    const Eigen::MatrixXd xxmx = x.transpose() * xmx;
    const Eigen::MatrixXd w_hat = mx - 0.5 * xxmx;
    const Eigen::MatrixXd w = w_hat - w_hat.transpose();
    const double alpha = std::min(lr, 1.0 / (w.cwiseAbs().colwise().sum().maxCoeff() + 1e-8));
    const Eigen::MatrixXd xt = x.transpose();
    Eigen::MatrixXd y = xt + alpha * v;
    for (int k = 0; k < 5; ++k) y = xt + alpha * (w * (0.5 * (xt + y)));
    return y.transpose();
}

/// Cayley Adam (Li et al. 2020, Algorithm 2) in the paper's orientation X = Pᵀ, with the exact
/// Cayley transform in place of its fixed-point approximation; state kept by the caller.
struct adam_reference {
    double lr, beta1, beta2, eps;
    Eigen::MatrixXd m;  // n x p, paper orientation
    double v = 0;
    int k = 0;

    Eigen::MatrixXd step(const Eigen::MatrixXd& p, const Eigen::MatrixXd& g)
    {
        ++k;
        const Eigen::MatrixXd x = p.transpose();
        const Eigen::MatrixXd gx = g.transpose();
        if (m.size() == 0) m = Eigen::MatrixXd::Zero(x.rows(), x.cols());
        m = beta1 * m + (1 - beta1) * gx;
        v = beta2 * v + (1 - beta2) * gx.squaredNorm();
        const double v_hat = v / (1 - std::pow(beta2, k));
        const double r = (1 - std::pow(beta1, k)) * std::sqrt(v_hat + eps);
        const Eigen::MatrixXd w_hat = m * x.transpose() - 0.5 * x * (x.transpose() * m * x.transpose());
        const Eigen::MatrixXd w = (w_hat - w_hat.transpose()) / r;
        m = r * w * x;
        const double alpha = std::min(lr, 1.0 / (w.cwiseAbs().colwise().sum().maxCoeff() + 1e-8));
        const Eigen::MatrixXd id = Eigen::MatrixXd::Identity(w.rows(), w.cols());
        // The paper moves along −W: Y(α) = (I + α/2·W)⁻¹(I − α/2·W)·X.
        const Eigen::MatrixXd y = (id + 0.5 * alpha * w).inverse() * (id - 0.5 * alpha * w) * x;
        return y.transpose();
    }
};

}  // namespace spinquant::test
