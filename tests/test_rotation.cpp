// Tests of rotation.hpp: generators (Haar orthogonal, random Hadamard, block diagonal) and the
// fusion of norms and rotations into weights, against dense double references, the golden files,
// and a small LLaMA-like model that must compute the same logits before and after fusion.
#include "support/catch.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <Eigen/Core>
#include <Eigen/LU>

#include <spinquant/rotation.hpp>

#include "support/gaussian_matrix.hpp"
#include "support/json.hpp"
#include "support/shared_data.hpp"
#include "support/stiefel_llama.hpp"

using spinquant::matrix_view;
using spinquant::rotation_matrix;

namespace {

template <class T>
using row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

using spinquant::test::gaussian;

double max_abs(const Eigen::MatrixXd& m) { return m.cwiseAbs().maxCoeff(); }

// A "random" engine that replays given 64-bit values: lets a test choose the signs random_sign draws.
struct replay_engine {
    using result_type = std::uint64_t;
    std::vector<std::uint64_t> values;
    std::size_t next = 0;
    static constexpr result_type min() { return 0; }
    static constexpr result_type max() { return ~result_type{0}; }
    result_type operator()() { return values.at(next++); }
};

// Largest |a − b| relative to the float spacing of b: 1 means "one unit in the last place".
double max_ulps(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b)
{
    double worst = 0;
    for (Eigen::Index i = 0; i < a.size(); ++i) {
        const double ref = b.data()[i];
        const double ulp = std::max(std::abs(ref), 1e-30) * static_cast<double>(std::numeric_limits<float>::epsilon());
        worst = std::max(worst, std::abs(a.data()[i] - ref) / ulp);
    }
    return worst;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Generators

TEMPLATE_TEST_CASE("random_orthogonal returns an orthogonal matrix, reproducibly from the seed", "[rotation]", float, double)
{
    using T = TestType;
    const auto n = GENERATE(as<std::size_t>{}, 1, 2, 7, 64);
    std::mt19937_64 a(3), b(3), c(4);
    const rotation_matrix<T> q = spinquant::random_orthogonal<T>(n, a);
    const rotation_matrix<T> same = spinquant::random_orthogonal<T>(n, b);
    const rotation_matrix<T> other = spinquant::random_orthogonal<T>(n, c);
    const double eps = static_cast<double>(std::numeric_limits<T>::epsilon());
    const Eigen::MatrixXd qd = q.template cast<double>();
    CHECK(max_abs(qd.transpose() * qd - Eigen::MatrixXd::Identity(qd.rows(), qd.cols())) <= 4 * eps * std::sqrt(double(n)) + 2 * eps);
    CHECK(q == same);
    if (n > 1) CHECK(q != other);  // order 1: the sign fix makes it [1]
    // 32-bit engines work too (two draws per 64 bits).
    std::mt19937 small(3);
    const rotation_matrix<T> q32 = spinquant::random_orthogonal<T>(n, small);
    const Eigen::MatrixXd q32d = q32.template cast<double>();
    CHECK(max_abs(q32d * q32d.transpose() - Eigen::MatrixXd::Identity(q32d.rows(), q32d.cols())) <= 8 * eps * std::sqrt(double(n)) + 2 * eps);
}

TEST_CASE("random_orthogonal is Haar distributed: moments of the trace, entries and determinant", "[rotation]")
{
    // For Haar Q on O(n), n >= 4: E tr Q = 0, E (tr Q)² = 1, E (tr Q)⁴ = 3, E Q₀₀² = 1/n,
    // P(det Q = 1) = 1/2 (Diaconis & Shahshahani 1994). Bounds are 5 standard errors.
    const std::size_t n = 6;
    const int samples = 3000;
    std::mt19937_64 rng(2024);
    double tr = 0, tr2 = 0, q00 = 0;
    int positive = 0;
    for (int s = 0; s < samples; ++s) {
        const rotation_matrix<double> q = spinquant::random_orthogonal<double>(n, rng);
        const double t = q.trace();
        tr += t;
        tr2 += t * t;
        q00 += q(0, 0) * q(0, 0);
        positive += q.determinant() > 0 ? 1 : 0;
    }
    const double count = samples;
    CHECK(std::abs(tr / count) < 5 * std::sqrt(1.0 / count));
    CHECK(std::abs(tr2 / count - 1) < 5 * std::sqrt(2.0 / count));
    // Var Q₀₀² = E Q₀₀⁴ − 1/n² = 3/(n(n+2)) − 1/n².
    CHECK(std::abs(q00 / count - 1.0 / double(n)) < 5 * std::sqrt((3.0 / double(n * (n + 2)) - 1.0 / double(n * n)) / count));
    CHECK(std::abs(positive / count - 0.5) < 5 * 0.5 / std::sqrt(count));
}

TEST_CASE("random_orthogonal rejects n = 0", "[rotation][errors]")
{
    std::mt19937_64 rng(1);
    CHECK_THROWS_AS(spinquant::random_orthogonal<float>(0, rng), spinquant::error);
}

TEST_CASE("random_hadamard is diag(s) times the transposed Hadamard matrix, with the signs drawn from the engine", "[rotation]")
{
    const std::size_t n = GENERATE(as<std::size_t>{}, 1, 8, 12, 40, 64);
    std::mt19937_64 rng(9), replay(9);
    const rotation_matrix<double> r = spinquant::random_hadamard<double>(n, rng);
    CHECK(max_abs(r * r.transpose() - Eigen::MatrixXd::Identity(r.rows(), r.cols())) < 1e-14);
    const std::vector<double> m = spinquant::hadamard_matrix<double>(n);
    const Eigen::Map<const row_matrix<double>> mm(m.data(), static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(n));
    for (Eigen::Index i = 0; i < r.rows(); ++i) {
        const double s = spinquant::detail::random_sign(replay);
        CHECK(max_abs(r.row(i) - s * mm.col(i).transpose()) == 0.0);
    }
    std::mt19937_64 again(9);
    CHECK(spinquant::random_hadamard<double>(n, again) == r);
}

TEST_CASE("random_hadamard with the reference options equals SpinQuant's random_hadamard_matrix (golden)", "[rotation][golden]")
{
    const auto path = spinquant::test::shared_path_or_skip("golden/wht_spinquant.json");
    if (!path) return;
    const auto golden = spinquant::test::json::parse_file(path->string());
    const auto& cases = golden["random_hadamard_matrix"]["cases"];
    REQUIRE(cases.size() >= 3);
    for (const auto& c : cases.items()) {
        const auto n = static_cast<std::size_t>(c["n"].integer());
        INFO("n = " << n);
        replay_engine engine;
        for (const double s : c["diag_signs"].doubles()) engine.values.push_back(s < 0 ? ~std::uint64_t{0} : 0);
        const rotation_matrix<double> r =
            spinquant::random_hadamard<double>(n, engine, {.normaliser = spinquant::hadamard_normaliser::reference,
                                                           .source = spinquant::hadamard_source::reference});
        const std::vector<double> expected = c["matrix_row_major"].doubles();
        const Eigen::Map<const row_matrix<double>> e(expected.data(), r.rows(), r.cols());
        CHECK(max_abs(r - e) < 1e-15);
        CHECK(std::abs(max_abs(r.transpose() * r - Eigen::MatrixXd::Identity(r.rows(), r.cols())) - c["max_abs_MtM_minus_I"].number()) < 1e-12);
    }
}

TEST_CASE("random_hadamard rejects unsupported orders and conflicting sign options", "[rotation][errors]")
{
    std::mt19937_64 rng(1);
    CHECK_THROWS_WITH(spinquant::random_hadamard<float>(0, rng), Catch::Contains("random_hadamard"));
    CHECK_THROWS_AS(spinquant::random_hadamard<float>(8, rng, {.random_signs = true}), spinquant::error);
    // No Hadamard matrix of order 6 (or 3) exists.
    CHECK_THROWS_WITH(spinquant::random_hadamard<float>(6, rng), Catch::Contains("order 6"));
}

TEST_CASE("block_diagonal repeats a rotation along the diagonal", "[rotation]")
{
    std::mt19937_64 rng(5);
    const rotation_matrix<float> r = spinquant::random_orthogonal<float>(3, rng);
    const rotation_matrix<float> b = spinquant::block_diagonal(r, 4);
    REQUIRE(b.rows() == 12);
    for (Eigen::Index i = 0; i < 4; ++i)
        for (Eigen::Index j = 0; j < 4; ++j) {
            if (i == j)
                CHECK(b.block(3 * i, 3 * j, 3, 3) == r);
            else
                CHECK(b.block(3 * i, 3 * j, 3, 3).isZero(0));
        }
    CHECK_THROWS_AS(spinquant::block_diagonal(r, 0), spinquant::error);
    const Eigen::MatrixXf wide(2, 3);
    CHECK_THROWS_AS(spinquant::block_diagonal(wide, 2), spinquant::error);
}

// ---------------------------------------------------------------------------------------------
// Fusion against dense references

TEMPLATE_TEST_CASE("rotate_input_side and rotate_output_side equal W·R and Rᵀ·W in double, for any layout", "[rotation]", float, double)
{
    using T = TestType;
    const Eigen::MatrixXd w0 = gaussian(5, 8, 1), r8 = gaussian(8, 8, 2), r5 = gaussian(5, 5, 3);
    const Eigen::VectorXd b0 = gaussian(5, 1, 4);
    const double tol = static_cast<double>(std::numeric_limits<T>::epsilon()) * 16;
    SECTION("input side, row-major W, column-major R")
    {
        row_matrix<T> w = w0.cast<T>();
        const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> r = r8.cast<T>();
        const Eigen::MatrixXd expected = w.template cast<double>() * r.template cast<double>();
        spinquant::rotate_input_side(w, r);
        CHECK(max_abs(w.template cast<double>() - expected) <= tol * max_abs(expected));
    }
    SECTION("output side with bias, column-major W (strided rows)")
    {
        Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> w = w0.cast<T>();
        Eigen::Matrix<T, Eigen::Dynamic, 1> b = b0.cast<T>();
        const row_matrix<T> r = r5.cast<T>();
        const Eigen::MatrixXd expected = r.template cast<double>().transpose() * w.template cast<double>();
        const Eigen::VectorXd expected_b = r.template cast<double>().transpose() * b.template cast<double>();
        spinquant::rotate_output_side(w, b, r);
        CHECK(max_abs(w.template cast<double>() - expected) <= tol * max_abs(expected));
        CHECK(max_abs(b.template cast<double>() - expected_b) <= tol * max_abs(expected_b));
    }
    SECTION("embedding, a block of a larger matrix")
    {
        row_matrix<T> big = gaussian(7, 12, 5).cast<T>();
        const row_matrix<T> before = big;
        auto block = big.block(1, 2, 5, 8);
        const Eigen::MatrixXd expected = block.template cast<double>() * r8;
        spinquant::rotate_embedding(block, r8);  // R in double, weights in T
        CHECK(max_abs(big.block(1, 2, 5, 8).template cast<double>() - expected) <= tol * max_abs(expected));
        CHECK(big.leftCols(2) == before.leftCols(2));
        CHECK(big.row(0) == before.row(0));
    }
}

TEMPLATE_TEST_CASE("per-head rotations equal the rotation by the block-diagonal matrix", "[rotation]", float, double)
{
    using T = TestType;
    std::mt19937_64 rng(6);
    const rotation_matrix<double> r2 = spinquant::random_orthogonal<double>(4, rng);
    const Eigen::MatrixXd full = spinquant::block_diagonal(r2, 3);
    const double tol = static_cast<double>(std::numeric_limits<T>::epsilon()) * 16;
    SECTION("input side (o_proj)")
    {
        row_matrix<T> w = gaussian(6, 12, 7).cast<T>();
        const Eigen::MatrixXd expected = w.template cast<double>() * full;
        spinquant::rotate_input_side_per_head(w, r2);
        CHECK(max_abs(w.template cast<double>() - expected) <= tol * max_abs(expected));
    }
    SECTION("output side with bias (v_proj)")
    {
        row_matrix<T> w = gaussian(12, 5, 8).cast<T>();
        Eigen::Matrix<T, Eigen::Dynamic, 1> b = gaussian(12, 1, 9).cast<T>();
        const Eigen::MatrixXd expected = full.transpose() * w.template cast<double>();
        const Eigen::VectorXd expected_b = full.transpose() * b.template cast<double>();
        spinquant::rotate_output_side_per_head(w, b, r2);
        CHECK(max_abs(w.template cast<double>() - expected) <= tol * max_abs(expected));
        CHECK(max_abs(b.template cast<double>() - expected_b) <= tol * max_abs(expected_b));
    }
}

TEST_CASE("per-head fusion matches SpinQuant's apply_exact_had_to_linear (golden)", "[rotation][golden]")
{
    const auto path = spinquant::test::shared_path_or_skip("golden/linear_rotation_spinquant.json");
    if (!path) return;
    const auto golden = spinquant::test::json::parse_file(path->string());
    const auto& cases = golden["cases"];
    REQUIRE(cases.size() >= 3);
    const auto load = [](const spinquant::test::json& c, const char* key) {
        const auto shape = c["weight_shape"].doubles();
        const std::vector<double> v = c[key].doubles();
        return Eigen::MatrixXd(Eigen::Map<const row_matrix<double>>(v.data(), Eigen::Index(shape[0]), Eigen::Index(shape[1])));
    };
    SECTION("R4 on the input side, had_dim = -1: W ← W·Mᵀ (float32 arithmetic in the reference)")
    {
        const auto& c = cases[0];
        row_matrix<float> w = load(c, "weight_in").cast<float>();
        const std::vector<float> m = spinquant::hadamard_matrix<float>(
            48, {.normaliser = spinquant::hadamard_normaliser::reference, .source = spinquant::hadamard_source::reference});
        const matrix_view<const float> mt{m.data(), 48, 48, 1, 48};  // Mᵀ: the transposed view of row-major M
        spinquant::rotate_input_side(w, mt);
        const Eigen::MatrixXd expected = load(c, "weight_out");
        CHECK(max_abs(w.cast<double>() - expected) <= 4e-7 * max_abs(expected));
    }
    SECTION("R2 on v_proj (output side) and o_proj (input side), float64 arithmetic: within one float ulp")
    {
        for (int k = 1; k <= 2; ++k) {
            const auto& c = cases[static_cast<std::size_t>(k)];
            INFO(c["call"].string());
            const std::vector<double> rv = c["R2"].doubles();
            const Eigen::Map<const row_matrix<double>> r2(rv.data(), 8, 8);
            row_matrix<float> w = load(c, "weight_in").cast<float>();
            if (k == 1)
                spinquant::rotate_output_side_per_head(w, r2);
            else
                spinquant::rotate_input_side_per_head(w, r2);
            CHECK(max_ulps(w.cast<double>(), load(c, "weight_out")) <= 1.0);
        }
    }
}

TEST_CASE("fuse_rms_norm scales the readers' columns by the norm weight and resets it to one", "[rotation]")
{
    Eigen::VectorXf alpha = gaussian(6, 1, 11).cast<float>();
    row_matrix<float> a = gaussian(4, 6, 12).cast<float>();
    Eigen::MatrixXd b = gaussian(3, 6, 13);  // another layout and type
    const Eigen::MatrixXd expected_a = a.cast<double>() * alpha.cast<double>().asDiagonal();
    const Eigen::MatrixXd expected_b = b * alpha.cast<double>().asDiagonal();
    spinquant::fuse_rms_norm(alpha, a, b);
    CHECK(max_abs(a.cast<double>() - expected_a) <= 1e-7 * max_abs(expected_a));
    CHECK(max_abs(b - expected_b) <= 1e-15 * max_abs(expected_b));
    CHECK(alpha.isOnes(0));
}

TEST_CASE("center_embedding_rows removes each row's mean, and only when asked", "[rotation]")
{
    row_matrix<double> e = gaussian(5, 8, 14);
    e.array() += 3;
    spinquant::center_embedding_rows(e);
    CHECK(e.rowwise().sum().cwiseAbs().maxCoeff() < 1e-13);
    const row_matrix<double> once = e;
    spinquant::center_embedding_rows(e);
    CHECK(max_abs(e - once) < 1e-15);
}

// ---------------------------------------------------------------------------------------------
// The whole model

TEMPLATE_TEST_CASE("a LLaMA-like model computes the same logits after fusing its norms, R1 and R2", "[rotation]", float, double)
{
    using T = TestType;
    const spinquant::test::llama_config cfg;
    const bool hadamard_r1 = GENERATE(false, true);
    auto model = spinquant::test::random_llama<T>(cfg, 77);
    const auto original = model;
    const std::vector<Eigen::Index> tokens = {1, 5, 2, 12, 0, 7, 7, 3};
    const Eigen::MatrixXd before = spinquant::test::llama_logits(model, tokens);

    std::mt19937_64 rng(78);
    const auto dim = static_cast<std::size_t>(cfg.dim);
    const rotation_matrix<T> r1 = hadamard_r1 ? spinquant::random_hadamard<T>(dim, rng) : spinquant::random_orthogonal<T>(dim, rng);
    // The order of SpinQuant's ptq_model: fold the norms, then rotate.
    for (auto& layer : model.layers) {
        spinquant::fuse_rms_norm(layer.attn_norm, layer.wq, layer.wk, layer.wv);
        spinquant::fuse_rms_norm(layer.ffn_norm, layer.w_gate, layer.w_up);
    }
    spinquant::fuse_rms_norm(model.final_norm, model.lm_head);
    CHECK(max_abs(spinquant::test::llama_logits(model, tokens) - before) < 1e-5 * max_abs(before));

    spinquant::rotate_embedding(model.embedding, r1);
    for (auto& layer : model.layers) {
        const rotation_matrix<T> r2 = spinquant::random_orthogonal<T>(static_cast<std::size_t>(cfg.head_dim), rng);
        for (auto* w : {&layer.wq, &layer.wk, &layer.wv, &layer.w_gate, &layer.w_up}) spinquant::rotate_input_side(*w, r1);
        spinquant::rotate_output_side(layer.wo, layer.bo, r1);
        spinquant::rotate_output_side(layer.w_down, r1);
        spinquant::rotate_output_side_per_head(layer.wv, layer.bv, r2);
        spinquant::rotate_input_side_per_head(layer.wo, r2);
    }
    spinquant::rotate_input_side(model.lm_head, r1);

    const Eigen::MatrixXd after = spinquant::test::llama_logits(model, tokens);
    const double tol = std::is_same_v<T, float> ? 2e-5 : 1e-12;
    CHECK(max_abs(after - before) < tol * max_abs(before));
    // The norms are now ones and every weight really changed (else the test would pass trivially).
    CHECK(model.layers[0].attn_norm.isOnes(0));
    CHECK(max_abs((model.layers[1].wv - original.layers[1].wv).template cast<double>()) > 0.1);
    CHECK(max_abs((model.layers[1].wo - original.layers[1].wo).template cast<double>()) > 0.1);
    CHECK(max_abs((model.embedding - original.embedding).template cast<double>()) > 0.1);

    // The reference's embedding mean-centring changes an RMSNorm model's function (SpinQuant#14).
    spinquant::center_embedding_rows(model.embedding);
    CHECK(max_abs(spinquant::test::llama_logits(model, tokens) - before) > 1e-3 * max_abs(before));
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST_CASE("fusion rejects bad shapes and non-finite values before writing anything", "[rotation][errors]")
{
    row_matrix<float> w = gaussian(4, 6, 21).cast<float>();
    const row_matrix<float> w_before = w;
    Eigen::VectorXf alpha = Eigen::VectorXf::Constant(6, 2.0f);
    const Eigen::VectorXf alpha_before = alpha;
    const Eigen::MatrixXd r6 = gaussian(6, 6, 22), r4 = gaussian(4, 4, 23), r5 = gaussian(5, 5, 24);
    SECTION("rotation of the wrong order")
    {
        CHECK_THROWS_WITH(spinquant::rotate_input_side(w, r4), Catch::Contains("rotate_input_side: r is 4x4, expected 6x6"));
        CHECK_THROWS_AS(spinquant::rotate_output_side(w, r6), spinquant::error);
        CHECK_THROWS_AS(spinquant::rotate_embedding(w, r5), spinquant::error);
        CHECK_THROWS_WITH(spinquant::rotate_input_side_per_head(w, r4), Catch::Contains("multiple of r's order 4"));
        CHECK_THROWS_AS(spinquant::rotate_output_side_per_head(w, r6), spinquant::error);
    }
    SECTION("non-square rotation")
    {
        const Eigen::MatrixXd r = gaussian(6, 3, 25);
        CHECK_THROWS_AS(spinquant::rotate_input_side_per_head(w, r), spinquant::error);
    }
    SECTION("bias of the wrong length, or NaN in the bias")
    {
        Eigen::VectorXf b(3);
        b.setZero();
        CHECK_THROWS_WITH(spinquant::rotate_output_side(w, b, r4), Catch::Contains("bias has 3 elements, expected 4"));
        Eigen::VectorXf b4 = Eigen::VectorXf::Zero(4);
        b4(2) = std::numeric_limits<float>::quiet_NaN();
        CHECK_THROWS_AS(spinquant::rotate_output_side(w, b4, r4), spinquant::error);
    }
    SECTION("NaN in the rotation or the weight")
    {
        Eigen::MatrixXd bad = r6;
        bad(3, 3) = std::numeric_limits<double>::infinity();
        CHECK_THROWS_WITH(spinquant::rotate_input_side(w, bad), Catch::Contains("non-finite"));
        row_matrix<float> w_nan = w;
        w_nan(0, 0) = std::numeric_limits<float>::quiet_NaN();
        const row_matrix<float> w_nan_before = w_nan;
        CHECK_THROWS_AS(spinquant::rotate_input_side(w_nan, r6), spinquant::error);
        CHECK(w_nan.bottomRows(3) == w_nan_before.bottomRows(3));
    }
    SECTION("fuse_rms_norm: a later linear of the wrong width leaves the earlier ones and alpha alone")
    {
        row_matrix<float> narrow = gaussian(2, 5, 26).cast<float>();
        CHECK_THROWS_WITH(spinquant::fuse_rms_norm(alpha, w, narrow), Catch::Contains("linear 1 is 2x5, expected 6 columns"));
        alpha(1) = std::numeric_limits<float>::quiet_NaN();
        CHECK_THROWS_AS(spinquant::fuse_rms_norm(alpha, w), spinquant::error);
        alpha(1) = 2.0f;
    }
    CHECK(w == w_before);
    CHECK(alpha == alpha_before);
}

template <class W, class R>
concept can_rotate_input = requires(W&& w, const R& r) { spinquant::rotate_input_side(static_cast<W&&>(w), r); };
template <class W, class R>
concept can_rotate_heads_output = requires(W&& w, const R& r) { spinquant::rotate_output_side_per_head(static_cast<W&&>(w), r); };

TEST_CASE("fusion helpers accept writable matrices only", "[rotation][concepts]")
{
    using M = row_matrix<float>;
    STATIC_REQUIRE(can_rotate_input<M&, M>);
    STATIC_REQUIRE(can_rotate_input<M&, const Eigen::MatrixXd>);
    STATIC_REQUIRE_FALSE(can_rotate_input<const M&, M>);
    STATIC_REQUIRE(can_rotate_heads_output<matrix_view<float>, M>);
    STATIC_REQUIRE_FALSE(can_rotate_heads_output<matrix_view<const float>, M>);
}
