// Tests of stiefel.hpp: the Cayley retraction, Cayley SGD (exact and reference modes), Cayley Adam.
//
// Allocation checks: Eigen's heap allocations are caught through EIGEN_RUNTIME_NO_MALLOC, with
// eigen_assert routed to an always-on check (so it also works under NDEBUG), and everything else
// through a replaced global operator new that counts while a test asks it to.
#include "support/allocation_counter.hpp"  // first: replaces operator new, forbids Eigen mallocs on request

#include "support/catch.hpp"

#include <cmath>
#include <limits>
#include <numbers>
#include <random>
#include <vector>

#include <Eigen/Core>

#include <spinquant/rotation.hpp>
#include <spinquant/stiefel.hpp>

#include "support/json.hpp"
#include "support/shared_data.hpp"
#include "support/stiefel_problems.hpp"

using spinquant::cayley_adam;
using spinquant::cayley_mode;
using spinquant::cayley_sgd;
using spinquant::matrix_view;
using spinquant::stiefel_shape;
using spinquant::test::row_matrix;
using Catch::Matchers::WithinAbs;

namespace {

Eigen::MatrixXd gaussian(Eigen::Index rows, Eigen::Index cols, std::mt19937_64& rng)
{
    spinquant::detail::normal_sampler normal;
    Eigen::MatrixXd m(rows, cols);
    for (Eigen::Index i = 0; i < rows; ++i)
        for (Eigen::Index j = 0; j < cols; ++j) m(i, j) = normal(rng);
    return m;
}

Eigen::MatrixXd random_skew(Eigen::Index n, std::mt19937_64& rng)
{
    const Eigen::MatrixXd s = gaussian(n, n, rng);
    return s - s.transpose();
}

// p x n with orthonormal rows: the top rows of a Haar rotation.
Eigen::MatrixXd random_stiefel(Eigen::Index p, Eigen::Index n, std::mt19937_64& rng)
{
    return spinquant::random_orthogonal<double>(static_cast<std::size_t>(n), rng).topRows(p);
}

spinquant::test::procrustes random_procrustes(Eigen::Index n, std::mt19937_64& rng)
{
    return {gaussian(2 * n, n, rng), gaussian(2 * n, n, rng)};
}

double max_abs(const Eigen::MatrixXd& m) { return m.cwiseAbs().maxCoeff(); }

Eigen::MatrixXd golden_matrix(const spinquant::test::json& j, Eigen::Index rows, Eigen::Index cols)
{
    const std::vector<double> v = j.doubles();
    REQUIRE(v.size() == static_cast<std::size_t>(rows * cols));
    return Eigen::Map<const row_matrix<double>>(v.data(), rows, cols);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Retraction

TEMPLATE_TEST_CASE("cayley_retraction with the exact solve equals the dense Cayley transform and keeps columns orthonormal",
                   "[stiefel]", float, double)
{
    using T = TestType;
    std::mt19937_64 rng(11);
    const auto [n, p] = GENERATE(table<Eigen::Index, Eigen::Index>({{1, 1}, {6, 6}, {9, 4}, {33, 5}, {33, 33}}));
    const Eigen::MatrixXd x0 = random_stiefel(p, n, rng).transpose();  // n x p, orthonormal columns
    const Eigen::MatrixXd w = random_skew(n, rng);
    const double alpha = 0.7 / std::max(1.0, w.cwiseAbs().colwise().sum().maxCoeff());
    const Eigen::MatrixXd id = Eigen::MatrixXd::Identity(n, n);
    const Eigen::MatrixXd expected = (id - 0.5 * alpha * w).inverse() * (id + 0.5 * alpha * w) * x0;

    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> x = x0.cast<T>();
    const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> wt = w.cast<T>();
    spinquant::cayley_retraction(x, wt, alpha);
    const double eps = static_cast<double>(std::numeric_limits<T>::epsilon());
    CHECK(max_abs(x.template cast<double>() - expected) <= 64 * eps);
    CHECK(spinquant::max_orthonormality_error(x) <= 64 * eps);
}

TEST_CASE("the fixed-point Cayley iteration contracts towards the exact retraction at rate α‖W‖₂/2", "[stiefel]")
{
    std::mt19937_64 rng(12);
    const Eigen::Index n = 12, p = 5;
    const Eigen::MatrixXd x0 = random_stiefel(p, n, rng).transpose();
    const Eigen::MatrixXd w = random_skew(n, rng);
    const double alpha = 1.0 / (w.cwiseAbs().colwise().sum().maxCoeff() + 1e-8);  // the optimizers' clamp
    Eigen::MatrixXd exact = x0;
    spinquant::cayley_retraction(exact, w, alpha);
    const double rho = 0.5 * alpha * Eigen::JacobiSVD<Eigen::MatrixXd>(w).singularValues()(0);
    REQUIRE(rho <= 0.5);
    const Eigen::MatrixXd y0 = x0 + alpha * w * x0;  // the documented starting point
    const auto two_norm = [](const Eigen::MatrixXd& m) { return Eigen::JacobiSVD<Eigen::MatrixXd>(m).singularValues()(0); };
    const double e0 = two_norm(y0 - exact);
    REQUIRE(e0 > 1e-6);
    double previous = e0;
    for (unsigned k = 1; k <= 20; ++k) {
        Eigen::MatrixXd y = x0;
        spinquant::cayley_retraction(y, w, alpha, {spinquant::cayley_method::fixed_point, k});
        const double e = two_norm(y - exact);
        CHECK(e <= std::pow(rho, k) * e0 * (1 + 1e-9) + 1e-14);
        CHECK(e <= previous + 1e-15);
        previous = e;
    }
    CHECK(previous < 1e-6 * e0);
}

TEST_CASE("the Cayley curve starts at X with velocity W·X", "[stiefel]")
{
    std::mt19937_64 rng(13);
    const Eigen::MatrixXd x0 = random_stiefel(3, 7, rng).transpose();
    const Eigen::MatrixXd w = random_skew(7, rng);
    Eigen::MatrixXd at0 = x0, plus = x0, minus = x0;
    spinquant::cayley_retraction(at0, w, 0.0);
    CHECK(max_abs(at0 - x0) == 0.0);
    const double h = 1e-5;
    spinquant::cayley_retraction(plus, w, h);
    spinquant::cayley_retraction(minus, w, -h);
    CHECK(max_abs((plus - minus) / (2 * h) - w * x0) < 1e-8);
}

TEST_CASE("cayley_retraction rejects bad input and leaves X untouched", "[stiefel][errors]")
{
    std::mt19937_64 rng(14);
    const Eigen::MatrixXd x0 = random_stiefel(3, 6, rng).transpose();
    Eigen::MatrixXd x = x0;
    Eigen::MatrixXd w = random_skew(6, rng);
    SECTION("W not skew-symmetric")
    {
        w(1, 2) += 0.1;
        CHECK_THROWS_WITH(spinquant::cayley_retraction(x, w, 0.1), Catch::Contains("not skew-symmetric"));
    }
    SECTION("W of the wrong order")
    {
        const Eigen::MatrixXd w5 = random_skew(5, rng);
        CHECK_THROWS_AS(spinquant::cayley_retraction(x, w5, 0.1), spinquant::error);
    }
    SECTION("non-finite α, X or W")
    {
        CHECK_THROWS_AS(spinquant::cayley_retraction(x, w, std::numeric_limits<double>::quiet_NaN()), spinquant::error);
        w(0, 1) = std::numeric_limits<double>::infinity();
        CHECK_THROWS_AS(spinquant::cayley_retraction(x, w, 0.1), spinquant::error);
    }
    SECTION("more columns than rows")
    {
        Eigen::MatrixXd wide = Eigen::MatrixXd::Zero(2, 3);
        const Eigen::MatrixXd w2 = Eigen::MatrixXd::Zero(2, 2);
        CHECK_THROWS_AS(spinquant::cayley_retraction(wide, w2, 0.1), spinquant::error);
        CHECK(wide.isZero());
    }
    CHECK(x == x0);
}

TEST_CASE("nearest_orthogonal returns the polar factor and leaves rotations alone", "[stiefel]")
{
    std::mt19937_64 rng(15);
    SECTION("square")
    {
        const Eigen::MatrixXd p = gaussian(7, 7, rng);
        Eigen::MatrixXd q = p;
        spinquant::nearest_orthogonal(q);
        CHECK(spinquant::max_orthonormality_error(q) < 1e-13);
        // P = Q·H with H symmetric positive semidefinite characterises the polar factor.
        const Eigen::MatrixXd h = q.transpose() * p;
        CHECK(max_abs(h - h.transpose()) < 1e-12);
        CHECK(Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>(0.5 * (h + h.transpose())).eigenvalues().minCoeff() > -1e-12);
    }
    SECTION("wide, float")
    {
        const Eigen::MatrixXf p = gaussian(3, 8, rng).cast<float>();
        Eigen::MatrixXf q = p;
        spinquant::nearest_orthogonal(q);
        CHECK(spinquant::max_orthonormality_error(q) < 1e-6);
        const Eigen::MatrixXd h = q.cast<double>() * p.cast<double>().transpose();  // 3 x 3 = H
        CHECK(max_abs(h - h.transpose()) < 1e-5);
    }
    SECTION("a rotation is its own polar factor")
    {
        const Eigen::MatrixXd r = spinquant::random_orthogonal<double>(9, rng);
        Eigen::MatrixXd q = r;
        spinquant::nearest_orthogonal(q);
        CHECK(max_abs(q - r) < 1e-13);
    }
    SECTION("tall: orthonormal columns, against the polar factor from a double SVD")
    {
        const Eigen::MatrixXd p = gaussian(9, 4, rng);
        Eigen::MatrixXd q = p;
        spinquant::nearest_orthogonal(q);
        const Eigen::JacobiSVD<Eigen::MatrixXd> svd(p, Eigen::ComputeThinU | Eigen::ComputeThinV);
        CHECK(max_abs(q - svd.matrixU() * svd.matrixV().transpose()) < 1e-13);
    }
    SECTION("ill-conditioned (condition number 1e6), against the SVD")
    {
        const Eigen::MatrixXd a = spinquant::random_orthogonal<double>(6, rng), b = spinquant::random_orthogonal<double>(6, rng);
        Eigen::VectorXd sigma(6);
        sigma << 3e3, 10, 1, 0.5, 1e-2, 3e-3;
        const Eigen::MatrixXd p = a * sigma.asDiagonal() * b;
        Eigen::MatrixXd q = p;
        spinquant::nearest_orthogonal(q);
        CHECK(max_abs(q - a * b) < 1e-9);  // the polar factor of A·Σ·B is A·B
    }
    SECTION("NaN is rejected")
    {
        Eigen::MatrixXd q = Eigen::MatrixXd::Identity(3, 3);
        q(1, 1) = std::numeric_limits<double>::quiet_NaN();
        CHECK_THROWS_AS(spinquant::nearest_orthogonal(q), spinquant::error);
    }
    SECTION("a rank-deficient matrix is rejected and left untouched")
    {
        Eigen::MatrixXd q = gaussian(4, 6, rng);
        q.row(2) = 2.0 * q.row(0) - q.row(1);
        const Eigen::MatrixXd before = q;
        try {
            spinquant::nearest_orthogonal(q);
            FAIL("no error");
        } catch (const spinquant::error& e) {
            CHECK(e.code() == spinquant::errc::bad_argument);
            CHECK(std::string(e.what()).find("rank deficient") != std::string::npos);
        }
        CHECK(q == before);
        Eigen::MatrixXd zero = Eigen::MatrixXd::Zero(3, 3);
        CHECK_THROWS_AS(spinquant::nearest_orthogonal(zero), spinquant::error);
        CHECK(zero.isZero());
    }
}

TEMPLATE_TEST_CASE("a parameter moved far from orthonormal between steps is projected back at the next polish", "[stiefel]",
                   float, double)
{
    using T = TestType;
    using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
    std::mt19937_64 rng(16);
    matrix p = spinquant::random_orthogonal<T>(12, rng).topRows(5);
    const matrix g = gaussian(5, 12, rng).cast<T>();
    const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
    for (const bool lose_rank : {false, true}) {
        cayley_sgd<T> opt({{5, 12}}, {.lr = 0.01, .orthonormalize_every = 2});
        opt.step(p, g);  // step 0 (polished)
        opt.step(p, g);  // step 1
        const matrix scaled = T(3) * p;
        p = scaled;  // polar factor unchanged: the projection must give p back
        if (lose_rank) p.row(3) = p.row(1);
        const matrix before = p;
        opt.step(p, g);  // step 2 polishes first, then takes a small step
        CHECK(spinquant::max_orthonormality_error(p) < tol);
        if (!lose_rank) CHECK(max_abs((p - before / T(3)).template cast<double>()) < 0.05);  // near where it was
    }
}

TEST_CASE("max_orthonormality_error measures rows, columns, or both for a square matrix", "[stiefel]")
{
    Eigen::MatrixXd m = Eigen::MatrixXd::Identity(4, 4);
    CHECK(spinquant::max_orthonormality_error(m) == 0.0);
    m(0, 0) = 1.5;
    CHECK_THAT(spinquant::max_orthonormality_error(m), WithinAbs(1.25, 1e-15));
    // Rows orthonormal but columns not: the square case must see it.
    Eigen::MatrixXd rows(2, 3);
    rows << 1, 0, 0, 0, 1, 0;
    CHECK(spinquant::max_orthonormality_error(rows) == 0.0);
    CHECK(spinquant::max_orthonormality_error(Eigen::MatrixXd(rows.transpose())) == 0.0);
    Eigen::MatrixXd sq(2, 2);
    sq << 1, 1, 0, 0;  // PᵀP = [[1,1],[1,1]], P·Pᵀ = [[2,0],[0,0]]
    CHECK(spinquant::max_orthonormality_error(sq) == 1.0);
}

// ---------------------------------------------------------------------------------------------
// Reference mode

TEST_CASE("reference mode reproduces SpinQuant's SGDG trajectories (golden)", "[stiefel][golden]")
{
    const auto path = spinquant::test::shared_path_or_skip("golden/cayley_sgdg_spinquant.json");
    if (!path) return;
    const auto golden = spinquant::test::json::parse_file(path->string());
    REQUIRE(golden["cases"].size() >= 2);
    for (const auto& c : golden["cases"].items()) {
        const double lr = c["lr"].number();
        INFO("lr " << lr << ", momentum " << c["momentum"].number());
        REQUIRE(c["dtype"].string() == "float64");
        REQUIRE(c["forced_qr_retraction_at_steps"].size() == 0);
        const spinquant::test::procrustes problem{golden_matrix(c["A"], 16, 8), golden_matrix(c["B"], 16, 8)};
        row_matrix<double> p = golden_matrix(c["R0"], 8, 8);
        // The golden draws never fired the QR branch: probability 0 pins that.
        cayley_sgd<double> opt(8, {.lr = lr, .momentum = c["momentum"].number(), .mode = cayley_mode::reference, .qr_probability = 0});
        double drift = 0;
        for (const auto& step : c["trajectory"].items()) {
            INFO("step " << step["step"].integer());
            const Eigen::MatrixXd g = problem.gradient(p);
            CHECK(max_abs(g - golden_matrix(step["grad"], 8, 8)) < 1e-12);
            CHECK_THAT(problem.loss(p), WithinAbs(step["loss_before_step"].number(), 1e-10));
            opt.step(p, g);
            CHECK(max_abs(p - golden_matrix(step["R_after"], 8, 8)) < 1e-12);
            drift = max_abs(p.transpose() * p - Eigen::MatrixXd::Identity(8, 8));
            CHECK_THAT(drift, WithinAbs(step["max_abs_RtR_minus_I"].number(), 1e-10));
        }
        // The documented drift of the reference: 1e-2 after 8 steps at lr 1.5.
        if (lr == 1.5) CHECK(drift > 1e-2);
    }
}

TEST_CASE("reference mode matches the transcription of the update rule, forced QR retraction included", "[stiefel]")
{
    std::mt19937_64 rng(21);
    const auto problem = random_procrustes(8, rng);
    const Eigen::MatrixXd p0 = spinquant::random_orthogonal<double>(8, rng);
    Eigen::MatrixXd expected = p0;
    row_matrix<double> p = p0;
    row_matrix<float> pf = p0.cast<float>();
    cayley_sgd<double> opt(8, {.lr = 1.5, .mode = cayley_mode::reference, .qr_probability = 0});
    cayley_sgd<float> optf(8, {.lr = 1.5, .mode = cayley_mode::reference, .qr_probability = 0});
    for (int k = 1; k <= 6; ++k) {
        INFO("step " << k);
        const bool qr = k == 3;
        if (qr) {
            opt.force_qr_retraction_on_next_step();
            optf.force_qr_retraction_on_next_step();
        }
        const Eigen::MatrixXd g = problem.gradient(expected);
        const row_matrix<float> gf = problem.gradient(pf.cast<double>()).cast<float>();
        opt.step(p, g);
        optf.step(pf, gf);
        expected = spinquant::test::sgdg_reference_step(expected, g, 1.5, qr);
        CHECK(max_abs(p - expected) < 1e-12);
        CHECK(max_abs(pf.cast<double>() - expected) < 2e-5);
    }
}

TEST_CASE("reference mode takes the QR retraction with the configured probability, reproducibly", "[stiefel]")
{
    std::mt19937_64 rng(22);
    const auto problem = random_procrustes(6, rng);
    const Eigen::MatrixXd p0 = spinquant::random_orthogonal<double>(6, rng);
    SECTION("probability 1: every step")
    {
        Eigen::MatrixXd p = p0, expected = p0;
        cayley_sgd<double> opt(6, {.lr = 1.5, .mode = cayley_mode::reference, .qr_probability = 1});
        for (int k = 0; k < 4; ++k) {
            const Eigen::MatrixXd g = problem.gradient(p);
            opt.step(p, g);
            expected = spinquant::test::sgdg_reference_step(expected, g, 1.5, true);
            CHECK(max_abs(p - expected) < 1e-12);
        }
    }
    SECTION("the same seed gives the same draws, another seed other draws")
    {
        const auto run = [&](std::uint64_t seed) {
            Eigen::MatrixXd p = p0;
            cayley_sgd<double> opt(6, {.lr = 1.5, .mode = cayley_mode::reference, .qr_probability = 0.5, .seed = seed});
            for (int k = 0; k < 12; ++k) {
                const Eigen::MatrixXd g = problem.gradient(p);
                opt.step(p, g);
            }
            return p;
        };
        CHECK(run(5) == run(5));
        CHECK(run(5) != run(6));
    }
}

TEST_CASE("momentum is a no-op in reference mode, as in the reference, and works in exact mode", "[stiefel]")
{
    std::mt19937_64 rng(23);
    const auto problem = random_procrustes(8, rng);
    const Eigen::MatrixXd p0 = spinquant::random_orthogonal<double>(8, rng);
    const auto run = [&](cayley_mode mode, double momentum, int steps) {
        Eigen::MatrixXd p = p0;
        cayley_sgd<double> opt(8, {.lr = 0.05, .momentum = momentum, .mode = mode, .qr_probability = 0});
        for (int k = 0; k < steps; ++k) {
            const Eigen::MatrixXd g = problem.gradient(p);
            opt.step(p, g);
        }
        return p;
    };
    CHECK(run(cayley_mode::reference, 0.9, 5) == run(cayley_mode::reference, 0.0, 5));
    // The first exact step has no history yet; from the second on momentum changes the path.
    CHECK(max_abs(run(cayley_mode::exact, 0.9, 1) - run(cayley_mode::exact, 0.0, 1)) < 1e-15);
    CHECK(max_abs(run(cayley_mode::exact, 0.9, 5) - run(cayley_mode::exact, 0.0, 5)) > 1e-3);
}

// ---------------------------------------------------------------------------------------------
// Exact mode

TEST_CASE("exact mode keeps rotations orthonormal for 1000 steps at lr 1.5, where the reference drifts", "[stiefel]")
{
    std::mt19937_64 rng(31);
    const auto problem = random_procrustes(8, rng);
    const Eigen::MatrixXd p0 = spinquant::random_orthogonal<double>(8, rng);
    const Eigen::MatrixXf af = problem.a.cast<float>(), bf = problem.b.cast<float>();
    row_matrix<double> p = p0;
    row_matrix<float> pf = p0.cast<float>();
    cayley_sgd<double> opt(8, {.lr = 1.5});
    cayley_sgd<float> optf(8, {.lr = 1.5});
    double drift = 0, drift_f = 0;
    for (int k = 0; k < 1000; ++k) {
        const Eigen::MatrixXd g = problem.gradient(p);
        opt.step(p, g);
        const Eigen::MatrixXf gf = af.transpose() * (af * pf - bf);
        optf.step(pf, gf);
        drift = std::max(drift, spinquant::max_orthonormality_error(p));
        drift_f = std::max(drift_f, spinquant::max_orthonormality_error(pf));
    }
    CHECK(drift <= 1e-12);
    CHECK(drift_f <= 1e-5);
    CHECK(problem.loss(p) < problem.loss(p0));

    row_matrix<double> r = p0;
    cayley_sgd<double> reference(8, {.lr = 1.5, .mode = cayley_mode::reference, .qr_probability = 0});
    for (int k = 0; k < 8; ++k) {
        const Eigen::MatrixXd g = problem.gradient(r);
        reference.step(r, g);
    }
    CHECK(spinquant::max_orthonormality_error(r) > 1e-4);
}

TEST_CASE("exact Cayley SGD with momentum reaches the Procrustes optimum of its connected component", "[stiefel]")
{
    std::mt19937_64 rng(32);
    const auto problem = random_procrustes(8, rng);
    Eigen::MatrixXd p0 = spinquant::random_orthogonal<double>(8, rng);
    if (GENERATE(false, true)) p0.row(0) *= -1;  // both components of O(8)
    const Eigen::MatrixXd optimum = problem.optimum(p0.determinant());
    Eigen::MatrixXd p = p0;
    cayley_sgd<double> opt(8, {.lr = 0.04, .momentum = 0.9});
    for (int k = 0; k < 600; ++k) {
        const Eigen::MatrixXd g = problem.gradient(p);
        opt.step(p, g);
    }
    CHECK(max_abs(p - optimum) < 1e-8);
    CHECK_THAT(problem.loss(p), WithinAbs(problem.loss(optimum), 1e-9));
    CHECK(p.determinant() * p0.determinant() > 0);
}

TEST_CASE("exact Cayley SGD reaches Brockett's minimum with its rows on the eigenvectors, square or not", "[stiefel]")
{
    std::mt19937_64 rng(33);
    const Eigen::Index n = 10;
    const Eigen::Index p_rows = GENERATE(as<Eigen::Index>{}, 4, 10);
    const Eigen::MatrixXd m = gaussian(n, n, rng);
    const spinquant::test::brockett problem{m + m.transpose(), Eigen::VectorXd::LinSpaced(p_rows, 4.0, 1.0)};
    Eigen::MatrixXd p = random_stiefel(p_rows, n, rng);
    cayley_sgd<double> opt({{static_cast<std::size_t>(p_rows), static_cast<std::size_t>(n)}}, {.lr = 0.01, .momentum = 0.9});
    for (int k = 0; k < 1500; ++k) {
        const Eigen::MatrixXd g = problem.gradient(p);
        opt.step(p, g);
    }
    CHECK_THAT(problem.loss(p), WithinAbs(problem.minimum(), 1e-9));
    const Eigen::MatrixXd v = problem.minimiser_rows();
    for (Eigen::Index i = 0; i < p_rows; ++i) {
        INFO("row " << i);
        CHECK(std::min(max_abs(p.row(i) - v.row(i)), max_abs(p.row(i) + v.row(i))) < 1e-5);
    }
    CHECK(spinquant::max_orthonormality_error(p) < 1e-13);
}

TEST_CASE("momentum makes exact Cayley SGD converge in fewer steps on Brockett's cost", "[stiefel]")
{
    std::mt19937_64 rng(34);
    const Eigen::MatrixXd m = gaussian(10, 10, rng);
    const spinquant::test::brockett problem{m + m.transpose(), Eigen::VectorXd::LinSpaced(4, 4.0, 1.0)};
    const Eigen::MatrixXd p0 = random_stiefel(4, 10, rng);
    const auto steps_to_converge = [&](double momentum) {
        Eigen::MatrixXd p = p0;
        cayley_sgd<double> opt({{4, 10}}, {.lr = 0.01, .momentum = momentum});
        int k = 0;
        for (; k < 20000 && problem.loss(p) - problem.minimum() > 1e-10; ++k) {
            const Eigen::MatrixXd g = problem.gradient(p);
            opt.step(p, g);
        }
        return k;
    };
    const int plain = steps_to_converge(0.0), heavy = steps_to_converge(0.9);
    INFO("steps without momentum " << plain << ", with momentum 0.9 " << heavy);
    CHECK(plain < 20000);
    CHECK(3 * heavy < plain);
}

TEST_CASE("float and double exact steps agree to float precision", "[stiefel]")
{
    std::mt19937_64 rng(35);
    const auto problem = random_procrustes(16, rng);
    const Eigen::MatrixXd p0 = spinquant::random_orthogonal<double>(16, rng);
    Eigen::MatrixXd p = p0;
    Eigen::MatrixXf pf = p0.cast<float>();
    cayley_sgd<double> opt(16, {.lr = 0.02, .momentum = 0.5});
    cayley_sgd<float> optf(16, {.lr = 0.02, .momentum = 0.5});
    for (int k = 0; k < 20; ++k) {
        const Eigen::MatrixXd g = problem.gradient(p);
        opt.step(p, g);
        const Eigen::MatrixXf gf = problem.gradient(pf.cast<double>()).cast<float>();
        optf.step(pf, gf);
    }
    CHECK(max_abs(pf.cast<double>() - p) < 1e-4);
}

// ---------------------------------------------------------------------------------------------
// Adam

TEST_CASE("Cayley Adam follows Li et al.'s Algorithm 2 step for step", "[stiefel]")
{
    std::mt19937_64 rng(41);
    const auto problem = random_procrustes(8, rng);
    const Eigen::MatrixXd p0 = spinquant::random_orthogonal<double>(8, rng);
    Eigen::MatrixXd p = p0, q = p0;
    cayley_adam<double> opt(8, {.lr = 0.5, .beta1 = 0.8, .beta2 = 0.95, .epsilon = 1e-8});
    spinquant::test::adam_reference reference{0.5, 0.8, 0.95, 1e-8, {}};
    for (int k = 0; k < 50; ++k) {
        INFO("step " << k);
        const Eigen::MatrixXd g = problem.gradient(p);
        opt.step(p, g);
        q = reference.step(q, problem.gradient(q));
        CHECK(max_abs(p - q) < 1e-11);
    }
}

TEST_CASE("Cayley Adam reaches the Procrustes optimum and stays orthonormal", "[stiefel]")
{
    std::mt19937_64 rng(42);
    const auto problem = random_procrustes(8, rng);
    const Eigen::MatrixXd p0 = spinquant::random_orthogonal<double>(8, rng);
    const Eigen::MatrixXd optimum = problem.optimum(p0.determinant());
    Eigen::MatrixXd p = p0;
    cayley_adam<double> opt(8, {.lr = 3.0});
    for (int k = 0; k < 2500; ++k) {
        const Eigen::MatrixXd g = problem.gradient(p);
        opt.step(p, g);
    }
    CHECK(max_abs(p - optimum) < 1e-7);
    CHECK(spinquant::max_orthonormality_error(p) < 1e-13);
}

// ---------------------------------------------------------------------------------------------
// Clipping, schedule, several parameters

TEST_CASE("cosine_schedule follows the Hugging Face cosine schedule, clamped past its end", "[stiefel]")
{
    const spinquant::cosine_schedule constant{};
    CHECK(constant.factor(0) == 1.0);
    CHECK(constant.factor(12345) == 1.0);
    const spinquant::cosine_schedule cosine{.total_steps = 100};
    CHECK(cosine.factor(0) == 1.0);
    CHECK_THAT(cosine.factor(50), WithinAbs(0.5, 1e-15));  // SpinQuant#21 logs lr 0.75 of 1.5 mid-run
    CHECK_THAT(cosine.factor(25), WithinAbs(0.5 * (1 + std::cos(std::numbers::pi / 4)), 1e-15));
    CHECK(cosine.factor(100) == 0.0);
    CHECK(cosine.factor(150) == 0.0);
    const spinquant::cosine_schedule warm{.total_steps = 110, .warmup_steps = 10};
    CHECK(warm.factor(0) == 0.0);
    CHECK_THAT(warm.factor(5), WithinAbs(0.5, 1e-15));
    CHECK(warm.factor(10) == 1.0);
    CHECK_THAT(warm.factor(60), WithinAbs(0.5, 1e-15));
}

TEST_CASE("the optimizer steps with the scheduled learning rate", "[stiefel]")
{
    std::mt19937_64 rng(51);
    Eigen::MatrixXd p = spinquant::random_orthogonal<double>(6, rng);
    const Eigen::MatrixXd tiny = 1e-6 * gaussian(6, 6, rng);  // small enough that the clamp never binds
    cayley_sgd<double> opt(6, {.lr = 0.3, .schedule = {.total_steps = 10}});
    for (std::size_t k = 0; k < 12; ++k) {
        const double lr = 0.3 * opt.options().schedule.factor(k);
        CHECK_THAT(opt.learning_rate(), WithinAbs(lr, 1e-16));
        opt.step(p, tiny);
        CHECK_THAT(opt.last_step_size(0), WithinAbs(lr, 1e-16));
    }
    CHECK(opt.steps_taken() == 12);
}

TEST_CASE("gradient clipping scales all gradients by their joint norm, like clip_grad_norm_", "[stiefel]")
{
    std::mt19937_64 rng(52);
    const Eigen::MatrixXd r1_0 = spinquant::random_orthogonal<double>(8, rng);
    const Eigen::MatrixXd r2_0 = spinquant::random_orthogonal<double>(4, rng);
    const Eigen::MatrixXd g1 = 30 * gaussian(8, 8, rng), g2 = 30 * gaussian(4, 4, rng);
    const double norm = std::sqrt(g1.squaredNorm() + g2.squaredNorm());
    const double scale = 1.0 / (norm + 1e-6);

    Eigen::MatrixXd a1 = r1_0, a2 = r2_0, b1 = r1_0, b2 = r2_0;
    cayley_sgd<double> clipped({{8, 8}, {4, 4}}, {.lr = 0.2, .momentum = 0.5, .max_grad_norm = 1.0});
    cayley_sgd<double> manual({{8, 8}, {4, 4}}, {.lr = 0.2, .momentum = 0.5});
    for (int k = 0; k < 3; ++k) {
        const std::vector<matrix_view<double>> pa = {spinquant::as_matrix_view(a1), spinquant::as_matrix_view(a2)};
        const std::vector<matrix_view<const double>> ga = {spinquant::as_matrix_view(g1), spinquant::as_matrix_view(g2)};
        clipped.step(pa, ga);
        CHECK_THAT(clipped.last_gradient_norm(), WithinAbs(norm, 1e-9));
        const Eigen::MatrixXd s1 = scale * g1, s2 = scale * g2;
        const std::vector<matrix_view<double>> pb = {spinquant::as_matrix_view(b1), spinquant::as_matrix_view(b2)};
        const std::vector<matrix_view<const double>> gb = {spinquant::as_matrix_view(s1), spinquant::as_matrix_view(s2)};
        manual.step(pb, gb);
        CHECK(max_abs(a1 - b1) < 1e-14);
        CHECK(max_abs(a2 - b2) < 1e-14);
    }
    // A gradient already inside the bound is left as it is.
    Eigen::MatrixXd c = r2_0, d = r2_0;
    const Eigen::MatrixXd small = 1e-3 * gaussian(4, 4, rng);
    cayley_sgd<double> loose(4, {.lr = 0.2, .max_grad_norm = 1.0});
    cayley_sgd<double> plain(4, {.lr = 0.2});
    loose.step(c, small);
    plain.step(d, small);
    CHECK(c == d);
}

TEST_CASE("one optimizer over R1 and several R2 equals one optimizer per parameter", "[stiefel]")
{
    std::mt19937_64 rng(53);
    std::vector<Eigen::MatrixXd> joint, separate;
    const std::vector<Eigen::Index> sizes = {8, 4, 4};
    for (const Eigen::Index n : sizes) joint.push_back(spinquant::random_orthogonal<double>(static_cast<std::size_t>(n), rng));
    separate = joint;
    std::vector<spinquant::test::procrustes> problems;
    for (const Eigen::Index n : sizes) problems.push_back(random_procrustes(n, rng));
    const spinquant::cayley_sgd_options options{.lr = 0.05, .momentum = 0.9};
    cayley_sgd<double> all({{8, 8}, {4, 4}, {4, 4}}, options);
    std::vector<cayley_sgd<double>> each;
    for (const Eigen::Index n : sizes) each.emplace_back(static_cast<std::size_t>(n), options);
    for (int k = 0; k < 40; ++k) {
        std::vector<Eigen::MatrixXd> grads;
        std::vector<matrix_view<double>> pv;
        std::vector<matrix_view<const double>> gv;
        for (std::size_t i = 0; i < sizes.size(); ++i) grads.push_back(problems[i].gradient(joint[i]));
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            pv.push_back(spinquant::as_matrix_view(joint[i]));
            gv.push_back(spinquant::as_matrix_view(grads[i]));
        }
        all.step(pv, gv);
        for (std::size_t i = 0; i < sizes.size(); ++i) {
            const Eigen::MatrixXd g = problems[i].gradient(separate[i]);
            each[i].step(separate[i], g);
        }
    }
    for (std::size_t i = 0; i < sizes.size(); ++i) CHECK(max_abs(joint[i] - separate[i]) < 1e-13);
}

// ---------------------------------------------------------------------------------------------
// Errors and allocation

TEST_CASE("optimizers reject bad options and shapes at construction", "[stiefel][errors]")
{
    CHECK_THROWS_AS(cayley_sgd<float>(8, {.lr = 0}), spinquant::error);
    CHECK_THROWS_AS(cayley_sgd<float>(8, {.lr = std::numeric_limits<double>::infinity()}), spinquant::error);
    CHECK_THROWS_AS(cayley_sgd<float>(8, {.momentum = 1.0}), spinquant::error);
    CHECK_THROWS_AS(cayley_sgd<float>(8, {.max_grad_norm = -1}), spinquant::error);
    CHECK_THROWS_AS(cayley_sgd<float>(8, {.qr_probability = 2}), spinquant::error);
    CHECK_THROWS_WITH(cayley_sgd<float>({{5, 4}}), Catch::Contains("rows <= cols"));
    CHECK_THROWS_AS(cayley_sgd<float>(0), spinquant::error);
    CHECK_THROWS_AS(cayley_sgd<float>(std::span<const stiefel_shape>{}), spinquant::error);
    CHECK_THROWS_AS(cayley_adam<double>(8, {.beta1 = 1.0}), spinquant::error);
    CHECK_THROWS_AS(cayley_adam<double>(8, {.beta2 = -0.1}), spinquant::error);
    CHECK_THROWS_AS(cayley_adam<double>(8, {.epsilon = 0}), spinquant::error);
}

TEMPLATE_TEST_CASE("step rejects bad input before writing any parameter", "[stiefel][errors]", cayley_sgd<double>, cayley_adam<double>)
{
    std::mt19937_64 rng(61);
    Eigen::MatrixXd r1 = spinquant::random_orthogonal<double>(6, rng), r2 = spinquant::random_orthogonal<double>(3, rng);
    Eigen::MatrixXd g1 = gaussian(6, 6, rng), g2 = gaussian(3, 3, rng);
    const Eigen::MatrixXd r1_before = r1, r2_before = r2;
    TestType opt({{6, 6}, {3, 3}});
    std::vector<matrix_view<double>> pv = {spinquant::as_matrix_view(r1), spinquant::as_matrix_view(r2)};
    std::vector<matrix_view<const double>> gv = {spinquant::as_matrix_view(g1), spinquant::as_matrix_view(g2)};
    SECTION("missing gradient")
    {
        gv.pop_back();
        CHECK_THROWS_AS(opt.step(pv, gv), spinquant::error);
    }
    SECTION("gradient of the wrong shape")
    {
        const Eigen::MatrixXd wrong = Eigen::MatrixXd::Zero(3, 4);
        gv[1] = spinquant::as_matrix_view(wrong);
        CHECK_THROWS_WITH(opt.step(pv, gv), Catch::Contains("gradient 1 is 3x4, expected 3x3"));
    }
    SECTION("NaN in the last gradient")
    {
        g2(2, 1) = std::numeric_limits<double>::quiet_NaN();
        CHECK_THROWS_WITH(opt.step(pv, gv), Catch::Contains("gradient 1 has a non-finite value"));
    }
    SECTION("the last parameter is not a rotation")
    {
        r2 *= 2;
        CHECK_THROWS_WITH(opt.step(pv, gv), Catch::Contains("parameter 1 does not have orthonormal rows"));
        CHECK(r2 == 2 * r2_before);
        r2 = r2_before;
    }
    CHECK(r1 == r1_before);
    CHECK(r2 == r2_before);
    CHECK(opt.steps_taken() == 0);
}

TEST_CASE("a single-parameter step refuses an optimizer built for several", "[stiefel][errors]")
{
    Eigen::MatrixXd p = Eigen::MatrixXd::Identity(4, 4), g = Eigen::MatrixXd::Ones(4, 4);
    cayley_sgd<double> opt({{4, 4}, {4, 4}});
    CHECK_THROWS_AS(opt.step(p, g), spinquant::error);
    CHECK(p == Eigen::MatrixXd::Identity(4, 4));
}

TEST_CASE("optimizer steps allocate nothing after construction", "[stiefel][allocation]")
{
    std::mt19937_64 rng(71);
    // 32 x 32 and 8 x 32: small enough that Eigen's products and LU keep their packing buffers on
    // the stack (bigger ones take them from the heap inside Eigen's GEMM).
    Eigen::MatrixXf r1 = spinquant::random_orthogonal<float>(32, rng);
    Eigen::MatrixXf r2 = spinquant::random_orthogonal<float>(32, rng).topRows(8);
    const Eigen::MatrixXf g1 = gaussian(32, 32, rng).cast<float>(), g2 = gaussian(8, 32, rng).cast<float>();
    const std::vector<matrix_view<float>> pv = {spinquant::as_matrix_view(r1), spinquant::as_matrix_view(r2)};
    const std::vector<matrix_view<const float>> gv = {spinquant::as_matrix_view(g1), spinquant::as_matrix_view(g2)};
    cayley_sgd<float> sgd({{32, 32}, {8, 32}}, {.lr = 0.01, .momentum = 0.9, .max_grad_norm = 1.0, .schedule = {.total_steps = 50}});
    cayley_sgd<float> reference({{32, 32}, {8, 32}}, {.lr = 0.01, .mode = cayley_mode::reference, .qr_probability = 0});
    cayley_adam<float> adam({{32, 32}, {8, 32}}, {.lr = 0.05});
    const auto run = [&](auto& opt) {
        return spinquant::test::allocations_during([&] {
            Eigen::internal::set_is_malloc_allowed(false);
            for (int k = 0; k < 40; ++k) opt.step(pv, gv);  // crosses the polish at step 32
            Eigen::internal::set_is_malloc_allowed(true);
        });
    };
    CHECK(run(sgd) == 0);
    CHECK(run(reference) == 0);
    CHECK(run(adam) == 0);
    // The counter does count.
    std::vector<int> probe;
    CHECK(spinquant::test::allocations_during([&] { probe.assign(100, 1); }) > 0);
    CHECK(probe.size() == 100);
    CHECK(spinquant::max_orthonormality_error(r1) < 1e-5);
}
