// Tests of objective.hpp: values against dense formulas, gradients against finite differences
// (of the exact loss, and of the straight-through surrogate when quantizers are on), optimisation
// with the Cayley optimizers, user-supplied objectives, errors and allocation.
#include "support/allocation_counter.hpp"  // first: replaces operator new, forbids Eigen mallocs on request

#include "support/catch.hpp"

#include <cmath>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include <Eigen/Core>

#include <spinquant/objective.hpp>
#include <spinquant/quantizer.hpp>
#include <spinquant/rotation.hpp>
#include <spinquant/stiefel.hpp>

#include "support/gaussian_matrix.hpp"
#include "support/stiefel_problems.hpp"

using spinquant::matrix_view;
using spinquant::quant_spec;
using spinquant::test::row_matrix;
using Catch::Matchers::WithinAbs;

namespace {

using spinquant::test::gaussian;

// Activations with a few massive outlier channels, as LLM activations have.
row_matrix<double> outlier_activations(Eigen::Index t, Eigen::Index n, std::uint64_t seed)
{
    row_matrix<double> x = gaussian(t, n, seed);
    x.col(3) *= 25;
    x.col(n - 2) *= 12;
    return x;
}

// Calls an objective with one rotation; returns the loss, writes the gradient.
template <class F, class T>
double evaluate(F& f, const row_matrix<T>& r, row_matrix<T>& g)
{
    const matrix_view<const T> rv[1] = {spinquant::as_matrix_view(r)};
    const matrix_view<T> gv[1] = {spinquant::as_matrix_view(g)};
    return f(std::span<const matrix_view<const T>>(rv), std::span<const matrix_view<T>>(gv));
}

// Central differences of `loss` at r along direction d.
template <class L>
double directional_difference(L&& loss, const Eigen::MatrixXd& r, const Eigen::MatrixXd& d, double h)
{
    return (loss(Eigen::MatrixXd(r + h * d)) - loss(Eigen::MatrixXd(r - h * d))) / (2 * h);
}

struct layers {
    std::vector<row_matrix<double>> w;
    std::vector<matrix_view<const double>> views;
    explicit layers(std::vector<row_matrix<double>> ws) : w(std::move(ws))
    {
        for (const auto& m : w) views.push_back(spinquant::as_matrix_view(m));
    }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// linear_quantization_error

TEST_CASE("linear_quantization_error without quantizers is the exact loss, zero at rotations, with its exact gradient",
          "[objective]")
{
    const Eigen::Index t = 20, n = 8;
    const row_matrix<double> x = gaussian(t, n, 1);
    const layers ws({gaussian(5, n, 2), gaussian(3, n, 3)});
    spinquant::linear_quantization_error<double> f(x, ws.views, std::nullopt, std::nullopt);
    const auto dense_loss = [&](const Eigen::MatrixXd& r) {
        double sum = 0;
        for (const auto& w : ws.w) sum += (x * r * (w * r).transpose() - x * w.transpose()).squaredNorm();
        return sum / (double(t) * 8.0);
    };
    // Any matrix, not only rotations.
    const row_matrix<double> r = Eigen::MatrixXd::Identity(n, n) + 0.2 * gaussian(n, n, 4);
    row_matrix<double> g(n, n);
    const double loss = evaluate(f, r, g);
    CHECK_THAT(loss, WithinAbs(dense_loss(r), 1e-12 * dense_loss(r)));
    for (std::uint64_t s = 0; s < 5; ++s) {
        const Eigen::MatrixXd d = gaussian(n, n, 100 + s);
        const double fd = directional_difference(dense_loss, r, d, 1e-5);
        CHECK_THAT((g.array() * d.array()).sum(), WithinAbs(fd, 1e-7 * std::max(1.0, std::abs(fd))));
    }
    std::mt19937_64 rng(5);
    const row_matrix<double> q = spinquant::random_orthogonal<double>(std::size_t(n), rng);
    CHECK(evaluate(f, q, g) < 1e-25);
    CHECK(g.cwiseAbs().maxCoeff() < 1e-12);
}

TEST_CASE("linear_quantization_error with quantizers: the value is the dense formula over the fake-quantized factors",
          "[objective]")
{
    const Eigen::Index t = 16, n = 8;
    const row_matrix<double> x = outlier_activations(t, n, 6);
    const layers ws({gaussian(6, n, 7), gaussian(4, n, 8)});
    const quant_spec qa = quant_spec::activation(4), qw = quant_spec::weight(4);
    spinquant::linear_quantization_error<double> f(x, ws.views, qa, qw);
    std::mt19937_64 rng(9);
    const row_matrix<double> r = spinquant::random_orthogonal<double>(std::size_t(n), rng);
    row_matrix<double> a = x * r;
    spinquant::fake_quantize(a, qa);
    double sum = 0;
    for (const auto& w : ws.w) {
        row_matrix<double> b = w * r;
        spinquant::fake_quantize(b, qw);
        sum += (a * b.transpose() - x * w.transpose()).squaredNorm();
    }
    row_matrix<double> g(n, n);
    const double loss = evaluate(f, r, g);
    CHECK(loss > 1e-3);  // quantization does lose something
    CHECK_THAT(loss, WithinAbs(sum / (double(t) * 10.0), 1e-12 * loss));
}

TEST_CASE("linear_quantization_error's gradient is the exact derivative of its straight-through surrogate", "[objective]")
{
    // Straight-through: Q(A(R)) ≈ Q(A₀) + M ⊙ (A(R) − A₀) around R₀, with M the mask of elements
    // the clamp did not cut off. The surrogate loss built that way, in double, must have exactly
    // the returned gradient at R₀. Clip ratios below 1 make the masks non-trivial.
    const Eigen::Index t = 24, n = 8;
    const row_matrix<double> x = outlier_activations(t, n, 10);
    const layers ws({gaussian(6, n, 11), gaussian(5, n, 12)});
    const quant_spec qa = quant_spec::activation(3, false, 0, 0.7);
    quant_spec qw = quant_spec::weight(3);
    qw.clip_ratio = 0.8;
    spinquant::linear_quantization_error<double> f(x, ws.views, qa, qw);
    std::mt19937_64 rng(13);
    const row_matrix<double> r0 = spinquant::random_orthogonal<double>(std::size_t(n), rng);
    row_matrix<double> g(n, n);
    (void)evaluate(f, r0, g);

    const auto linearise = [](const row_matrix<double>& v, const quant_spec& spec) {
        row_matrix<double> q = v;
        spinquant::fake_quantize(q, spec);
        row_matrix<double> mask = row_matrix<double>::Ones(v.rows(), v.cols());
        spinquant::fake_quantize_backward(v, mask, spec);
        return std::pair{q, mask};
    };
    const row_matrix<double> a0 = x * r0;
    const auto a_lin = linearise(a0, qa);  // (Q(A₀), mask); clang 14 cannot capture structured bindings
    const row_matrix<double>& a_hat = a_lin.first;
    const row_matrix<double>& a_mask = a_lin.second;
    CHECK(a_mask.sum() < double(a_mask.size()));  // some activations are clipped
    std::vector<row_matrix<double>> b0, b_hat, b_mask;
    for (const auto& w : ws.w) {
        b0.push_back(w * r0);
        auto [q, m] = linearise(b0.back(), qw);
        b_hat.push_back(q);
        b_mask.push_back(m);
    }
    double masked_w = 0;
    for (const auto& m : b_mask) masked_w += double(m.size()) - m.sum();
    CHECK(masked_w > 0);  // some weights are clipped

    const auto surrogate = [&](const Eigen::MatrixXd& r) {
        const Eigen::MatrixXd a = a_hat + a_mask.cwiseProduct(x * r - a0);
        double sum = 0;
        for (std::size_t l = 0; l < ws.w.size(); ++l) {
            const Eigen::MatrixXd b = b_hat[l] + b_mask[l].cwiseProduct(ws.w[l] * r - b0[l]);
            sum += (a * b.transpose() - x * ws.w[l].transpose()).squaredNorm();
        }
        return sum / (double(t) * 11.0);
    };
    for (std::uint64_t s = 0; s < 5; ++s) {
        const Eigen::MatrixXd d = gaussian(n, n, 200 + s);
        const double fd = directional_difference(surrogate, r0, d, 1e-6);
        CHECK_THAT((g.array() * d.array()).sum(), WithinAbs(fd, 1e-7 * std::max(1.0, std::abs(fd))));
    }
}

TEST_CASE("linear_quantization_error in float agrees with double", "[objective]")
{
    const Eigen::Index t = 32, n = 16;
    const row_matrix<double> x = outlier_activations(t, n, 14);
    const row_matrix<double> w = gaussian(8, n, 15);
    const row_matrix<float> xf = x.cast<float>(), wf = w.cast<float>();
    const matrix_view<const double> wd[1] = {spinquant::as_matrix_view(w)};
    const matrix_view<const float> wfv[1] = {spinquant::as_matrix_view(wf)};
    // 8-bit: far from rounding ties, so float and double round the same way almost everywhere.
    spinquant::linear_quantization_error<double> fd(x, wd, quant_spec::activation(8), quant_spec::weight(8));
    spinquant::linear_quantization_error<float> ff(xf, wfv, quant_spec::activation(8), quant_spec::weight(8));
    std::mt19937_64 rng(16);
    const row_matrix<double> r = spinquant::random_orthogonal<double>(std::size_t(n), rng);
    const row_matrix<float> rf = r.cast<float>();
    row_matrix<double> g(n, n);
    row_matrix<float> gf(n, n);
    const double ld = evaluate(fd, r, g), lf = evaluate(ff, rf, gf);
    CHECK_THAT(lf, WithinAbs(ld, 0.02 * ld));
    CHECK((gf.cast<double>() - g).norm() < 0.05 * g.norm());
}

TEST_CASE("minimize drives Cayley SGD on the quantization error, keeping the rotation orthonormal", "[objective]")
{
    // Straight-through gradients of a quantization error are noisy (the scales get no gradient),
    // so this checks the plumbing and the bookkeeping, not a rate: the loss history is the
    // objective's value at each iterate, and the iterate stays a rotation.
    const Eigen::Index t = 64, n = 16;
    const row_matrix<double> x = outlier_activations(t, n, 17);
    const layers ws({gaussian(8, n, 18), gaussian(12, n, 19)});
    spinquant::linear_quantization_error<double> f(x, ws.views, quant_spec::activation(4), quant_spec::weight(4));
    std::mt19937_64 rng(21);
    row_matrix<double> r = spinquant::random_hadamard<double>(std::size_t(n), rng);
    const row_matrix<double> r0 = r;
    spinquant::cayley_sgd<double> opt(std::size_t(n), {.lr = 1.5, .max_grad_norm = 1.0, .schedule = {.total_steps = 20}});
    const std::vector<double> losses = spinquant::minimize(opt, f, r, 20);
    REQUIRE(losses.size() == 21);
    row_matrix<double> g(n, n);
    CHECK(losses.front() == evaluate(f, r0, g));
    CHECK(losses.back() == evaluate(f, r, g));
    CHECK(opt.steps_taken() == 20);
    CHECK((r - r0).cwiseAbs().maxCoeff() > 1e-3);
    CHECK(spinquant::max_orthonormality_error(r) < 1e-12);
}

// ---------------------------------------------------------------------------------------------
// activation_kurtosis

TEST_CASE("activation_kurtosis is the mean token kurtosis with its exact gradient", "[objective]")
{
    const Eigen::Index t = 12, n = 6;
    row_matrix<double> x = outlier_activations(t, n, 30);
    x.row(4).setZero();  // a dead token contributes 0
    spinquant::activation_kurtosis<double> f(x);
    const auto dense = [&](const Eigen::MatrixXd& r) {
        const Eigen::MatrixXd a = x * r;
        double sum = 0;
        for (Eigen::Index i = 0; i < t; ++i) {
            const double s2 = a.row(i).squaredNorm();
            if (s2 > 0) sum += double(n) * a.row(i).array().pow(4).sum() / (s2 * s2);
        }
        return sum / double(t);
    };
    const row_matrix<double> r = Eigen::MatrixXd::Identity(n, n) + 0.3 * gaussian(n, n, 31);
    row_matrix<double> g(n, n);
    CHECK_THAT(evaluate(f, r, g), WithinAbs(dense(r), 1e-12 * dense(r)));
    for (std::uint64_t s = 0; s < 5; ++s) {
        const Eigen::MatrixXd d = gaussian(n, n, 300 + s);
        const double fd = directional_difference(dense, r, d, 1e-6);
        CHECK_THAT((g.array() * d.array()).sum(), WithinAbs(fd, 1e-7 * std::max(1.0, std::abs(fd))));
    }
    // A one-hot token has kurtosis n, a flat one 1.
    row_matrix<double> two(2, n);
    two.setZero();
    two(0, 2) = 5;
    two.row(1).setConstant(-0.5);
    spinquant::activation_kurtosis<double> k2(two);
    const row_matrix<double> id = Eigen::MatrixXd::Identity(n, n);
    CHECK_THAT(evaluate(k2, id, g), WithinAbs((double(n) + 1.0) / 2.0, 1e-14));
}

TEST_CASE("minimising kurtosis with Cayley SGD spreads outlier channels", "[objective]")
{
    const Eigen::Index t = 200, n = 16;
    const row_matrix<double> x = outlier_activations(t, n, 32);
    spinquant::activation_kurtosis<double> f(x);
    row_matrix<double> r = Eigen::MatrixXd::Identity(n, n);
    spinquant::cayley_sgd<double> opt(std::size_t(n), {.lr = 0.5, .momentum = 0.9});
    const std::vector<double> losses = spinquant::minimize(opt, f, r, 200);
    INFO("kurtosis before " << losses.front() << ", after " << losses.back());
    CHECK(losses.front() > 8);
    CHECK(losses.back() < 3.5);  // Gaussian tokens have 3
    CHECK(spinquant::max_orthonormality_error(r) < 1e-12);

    // Spreading the outliers is what makes 4-bit per-token activations work: the layers' output
    // error from activation quantization drops with the kurtosis.
    const layers ws({gaussian(8, n, 33), gaussian(12, n, 34)});
    spinquant::linear_quantization_error<double> error(x, ws.views, quant_spec::activation(4), std::nullopt);
    row_matrix<double> g(n, n);
    const row_matrix<double> id = Eigen::MatrixXd::Identity(n, n);
    const double before = evaluate(error, id, g), after = evaluate(error, r, g);
    INFO("4-bit output error at identity " << before << ", after minimising kurtosis " << after);
    CHECK(after < 0.6 * before);
}

// ---------------------------------------------------------------------------------------------
// User objectives, minimize, errors, allocation

TEST_CASE("a user-supplied objective over two rotations plugs into minimize", "[objective]")
{
    std::mt19937_64 rng(40);
    const spinquant::test::procrustes p1{gaussian(16, 8, 41), gaussian(16, 8, 42)}, p2{gaussian(8, 4, 43), gaussian(8, 4, 44)};
    const auto objective = [&](std::span<const matrix_view<const double>> r, std::span<const matrix_view<double>> g) {
        const Eigen::MatrixXd r1 = spinquant::as_eigen(r[0]), r2 = spinquant::as_eigen(r[1]);
        spinquant::as_eigen(g[0]) = p1.gradient(r1);
        spinquant::as_eigen(g[1]) = p2.gradient(r2);
        return p1.loss(r1) + p2.loss(r2);
    };
    STATIC_REQUIRE(spinquant::rotation_objective<decltype(objective), double>);
    STATIC_REQUIRE_FALSE(spinquant::rotation_objective<decltype(objective), float>);
    Eigen::MatrixXd r1 = spinquant::random_orthogonal<double>(8, rng), r2 = spinquant::random_orthogonal<double>(4, rng);
    const Eigen::MatrixXd o1 = p1.optimum(r1.determinant()), o2 = p2.optimum(r2.determinant());
    const std::vector<matrix_view<double>> rotations = {spinquant::as_matrix_view(r1), spinquant::as_matrix_view(r2)};
    spinquant::cayley_sgd<double> opt({{8, 8}, {4, 4}}, {.lr = 0.03, .momentum = 0.9});
    const std::vector<double> losses = spinquant::minimize<double>(opt, objective, rotations, 800);
    CHECK_THAT(losses.back(), WithinAbs(p1.loss(o1) + p2.loss(o2), 1e-9));
    CHECK((r1 - o1).cwiseAbs().maxCoeff() < 1e-7);
    CHECK((r2 - o2).cwiseAbs().maxCoeff() < 1e-7);
}

TEST_CASE("objectives reject bad input, leaving the gradient untouched", "[objective][errors]")
{
    const row_matrix<double> x = gaussian(10, 8, 50);
    const layers ws({gaussian(4, 8, 51)});
    spinquant::linear_quantization_error<double> f(x, ws.views, quant_spec::activation(4), std::nullopt);
    spinquant::activation_kurtosis<double> k(x);
    row_matrix<double> g = row_matrix<double>::Constant(8, 8, 7.0);
    const row_matrix<double> g_before = g;
    SECTION("rotation of the wrong order")
    {
        const row_matrix<double> r = Eigen::MatrixXd::Identity(6, 6);
        CHECK_THROWS_WITH(evaluate(f, r, g), Catch::Contains("rotation is 6x6, expected 8x8"));
        CHECK_THROWS_AS(evaluate(k, r, g), spinquant::error);
    }
    SECTION("NaN in the rotation")
    {
        row_matrix<double> r = Eigen::MatrixXd::Identity(8, 8);
        r(2, 5) = std::numeric_limits<double>::quiet_NaN();
        CHECK_THROWS_AS(evaluate(f, r, g), spinquant::error);
        CHECK_THROWS_AS(evaluate(k, r, g), spinquant::error);
    }
    SECTION("two rotations for a one-rotation objective")
    {
        const row_matrix<double> r = Eigen::MatrixXd::Identity(8, 8);
        const matrix_view<const double> rv[2] = {spinquant::as_matrix_view(r), spinquant::as_matrix_view(r)};
        const matrix_view<double> gv[2] = {spinquant::as_matrix_view(g), spinquant::as_matrix_view(g)};
        CHECK_THROWS_AS(f(rv, gv), spinquant::error);
    }
    CHECK(g == g_before);
    SECTION("construction")
    {
        const layers narrow({gaussian(4, 7, 52)});
        CHECK_THROWS_WITH(spinquant::linear_quantization_error<double>(x, narrow.views, std::nullopt, std::nullopt),
                          Catch::Contains("weight 0 is 4x7"));
        CHECK_THROWS_WITH(spinquant::linear_quantization_error<double>(x, ws.views, quant_spec::activation(4, false, 3), std::nullopt),
                          Catch::Contains("group_size 3 does not divide n = 8"));
        CHECK_THROWS_AS(spinquant::linear_quantization_error<double>(x, ws.views, quant_spec::activation(0), std::nullopt),
                        spinquant::error);
        CHECK_THROWS_AS(spinquant::linear_quantization_error<double>(x, std::span<const matrix_view<const double>>{},
                                                                     std::nullopt, std::nullopt),
                        spinquant::error);
        row_matrix<double> bad = x;
        bad(0, 0) = std::numeric_limits<double>::infinity();
        CHECK_THROWS_AS(spinquant::activation_kurtosis<double>(bad), spinquant::error);
    }
}

TEST_CASE("evaluating an objective allocates nothing after construction", "[objective][allocation]")
{
    const row_matrix<float> x = outlier_activations(64, 32, 60).cast<float>();
    const row_matrix<float> w1 = gaussian(16, 32, 61).cast<float>(), w2 = gaussian(32, 32, 62).cast<float>();
    const matrix_view<const float> ws[2] = {spinquant::as_matrix_view(w1), spinquant::as_matrix_view(w2)};
    spinquant::linear_quantization_error<float> f(x, ws, quant_spec::activation(4, false, 8, 0.9), quant_spec::weight(4, true, 0, true));
    spinquant::activation_kurtosis<float> k(x);
    std::mt19937_64 rng(63);
    const row_matrix<float> r = spinquant::random_orthogonal<float>(32, rng);
    row_matrix<float> g(32, 32);
    double a = 0, b = 0;
    const long allocations = spinquant::test::allocations_during([&] {
        Eigen::internal::set_is_malloc_allowed(false);
        a = evaluate(f, r, g);
        b = evaluate(k, r, g);
        Eigen::internal::set_is_malloc_allowed(true);
    });
    CHECK(allocations == 0);
    CHECK(a > 0);
    CHECK(b > 0);
}
