#include "support/catch.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <spinquant/gptq.hpp>

#include "support/gaussian_matrix.hpp"
#include "support/json.hpp"
#include "support/quant_gptq_reference.hpp"
#include "support/shared_data.hpp"

using namespace spinquant;
using spinquant::test::json;

namespace {

using row_major_f = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

using spinquant::test::gaussian;

/// Calibration inputs with correlated features (a random mixing of fewer latent factors) and,
/// optionally, a few outlier features: what makes GPTQ's error propagation matter.
Eigen::MatrixXd calibration(Eigen::Index tokens, Eigen::Index features, std::uint64_t seed, bool outliers)
{
    const Eigen::MatrixXd latent = gaussian(tokens, features / 2, seed);
    const Eigen::MatrixXd mix = gaussian(features / 2, features, seed + 1);
    Eigen::MatrixXd x = latent * mix + 0.3 * gaussian(tokens, features, seed + 2);
    if (outliers)
        for (Eigen::Index j = 0; j < features; j += 9) x.col(j) *= 12.0;
    return x;
}

Eigen::MatrixXd hessian_of(const Eigen::MatrixXd& x)
{
    hessian_accumulator acc(static_cast<std::size_t>(x.cols()));
    acc.add_batch(x);
    return acc.hessian();
}

row_major_f rtn(const row_major_f& w, const quant_spec& spec)
{
    row_major_f q = w;
    fake_quantize(q, spec);
    return q;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Golden file

TEST_CASE("the Hessian running average matches add_batch, which counts sequences", "[gptq][golden]")
{
    const auto path = spinquant::test::shared_path_or_skip("golden/gptq_spinquant.json");
    if (!path) return;
    const json g = json::parse_file(path->string());
    const json& check = g["add_batch_check"];
    hessian_accumulator acc(16);
    for (const json& call : check["calls"].items()) {
        const auto shape = call["shape"].doubles();
        const auto values = call["values"].floats();
        // A [batch, tokens, 16] call adds `batch` samples; a 2-D call is one sequence.
        const std::size_t batch = shape.size() == 3 ? static_cast<std::size_t>(shape[0]) : 1;
        const std::size_t tokens = values.size() / 16;
        acc.add_batch(as_matrix_view(values.data(), tokens, 16), batch);
    }
    REQUIRE(acc.samples() == static_cast<std::size_t>(check["nsamples"].integer()));
    const Eigen::MatrixXd h = acc.hessian();
    const auto expected = check["H"].doubles();
    for (Eigen::Index i = 0; i < 16; ++i)
        for (Eigen::Index j = 0; j < 16; ++j) {
            const double e = expected[std::size_t(i * 16 + j)];
            REQUIRE(std::fabs(h(i, j) - e) <= 2e-6 * (std::fabs(e) + 1.0));  // the reference sums in float32
        }
}

TEST_CASE("reference-compatible GPTQ matches fasterquant on every golden case", "[gptq][golden]")
{
    const auto path = spinquant::test::shared_path_or_skip("golden/gptq_spinquant.json");
    if (!path) return;
    const json g = json::parse_file(path->string());
    const std::size_t rows = 8, cols = 256;
    const auto wv = g["layer"]["weight_input"].floats();
    const auto hv = g["H"]["values"].floats();
    const auto w = as_matrix_view(wv.data(), rows, cols);
    const auto h = as_matrix_view(hv.data(), cols, cols);
    REQUIRE(g["cases"].size() >= 3);
    for (const json& c : g["cases"].items()) {
        const int gsz = c["groupsize"].integer();
        const quant_spec spec = quant_spec::weight(c["bits"].integer(), true, gsz > 0 ? std::size_t(gsz) : 0,
                                                   c["w_clip_mse"].boolean());
        gptq_options o;
        o.reference_compat = true;
        o.act_order = c["act_order"].boolean();
        INFO("bits " << spec.bits << " group " << gsz << " act_order " << o.act_order);
        const auto r = gptq(w, h, spec, o);
        const auto qw = c["Q_weight"].floats(), iw = c["int_weight"].floats(), sc = c["scale_per_column"].floats();
        // README: ~1e-5 relative, allowing an occasional 1-LSB code flip at a rounding tie
        // (float32 LAPACK there, double here).
        std::size_t flips = 0;
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t k = 0; k < cols; ++k) {
                const std::size_t e = i * cols + k;
                const float ours = r.weight(Eigen::Index(i), Eigen::Index(k));
                // The exported buffers are in processing order under act_order, as ours are.
                const std::int32_t code = r.quantized.code(i, k);
                const float scale = r.quantized.params(i, k).scale;
                INFO("row " << i << " col " << k);
                REQUIRE(std::fabs(scale - sc[e]) <= 1e-5f * sc[e]);
                if (std::fabs(ours - qw[e]) <= 1e-5f * std::fabs(qw[e]) + 1e-12f && float(code) == iw[e]) continue;
                ++flips;
                REQUIRE(std::fabs(ours - qw[e]) <= scale * 1.0001f);  // one step, no more
                REQUIRE(std::abs(float(code) - iw[e]) == 1.0f);
            }
        CHECK(flips <= 2);
        // The dead input column 200 is zero.
        for (Eigen::Index i = 0; i < Eigen::Index(rows); ++i) REQUIRE(r.weight(i, 200) == 0.0f);
    }
}

// ---------------------------------------------------------------------------------------------
// Independent reference and properties

TEST_CASE("blocked GPTQ equals the unblocked textbook algorithm for every block size and setting", "[gptq]")
{
    const Eigen::Index rows = 12, cols = 96;
    const Eigen::MatrixXd x = calibration(300, cols, 31, true);
    Eigen::MatrixXd h = hessian_of(x);
    h.row(5).setZero();  // a dead input
    h.col(5).setZero();
    const Eigen::MatrixXf w = gaussian(rows, cols, 32).cast<float>();
    for (const quant_spec& spec : {quant_spec::weight(4), quant_spec::weight(3, true, 0, true), quant_spec::weight(4, true, 16),
                                   quant_spec::weight(4, false, 32), quant_spec::weight(3, true, 48)})
        for (bool act_order : {false, true}) {
            const auto ref = test::naive_gptq(w, h, spec, act_order);
            for (std::size_t bs : {std::size_t{1}, std::size_t{7}, std::size_t{40}, std::size_t{128}}) {
                gptq_options o;
                o.act_order = act_order;
                o.block_size = bs;
                INFO("bits " << spec.bits << " group " << spec.group_size << " sym " << spec.symmetric << " act_order "
                             << act_order << " block " << bs);
                const auto r = gptq(w, h, spec, o);
                std::vector<float> d(std::size_t(rows * cols));
                dequantize(r.quantized, as_matrix_view(d.data(), std::size_t(rows), std::size_t(cols)));
                for (Eigen::Index i = 0; i < rows; ++i)
                    for (Eigen::Index j = 0; j < cols; ++j) {
                        REQUIRE(double(r.quantized.code(std::size_t(i), std::size_t(j))) == ref.codes(i, j));
                        REQUIRE(std::fabs(double(r.weight(i, j)) - ref.q(i, j)) <= 1e-6 * std::fabs(ref.q(i, j)));
                        REQUIRE(d[std::size_t(i * cols + j)] == r.weight(i, j));  // codes + parameters = weight
                    }
                if (act_order) {
                    REQUIRE(r.permutation.size() == std::size_t(cols));
                    for (std::size_t k = 0; k < r.permutation.size(); ++k) REQUIRE(r.permutation[k] == ref.perm[k]);
                }
            }
        }
}

TEST_CASE("with a diagonal Hessian GPTQ is round-to-nearest", "[gptq]")
{
    const Eigen::Index rows = 6, cols = 64;
    const row_major_f w = gaussian(rows, cols, 33).cast<float>();
    Eigen::MatrixXd h = Eigen::MatrixXd::Zero(cols, cols);
    for (Eigen::Index j = 0; j < cols; ++j) h(j, j) = 1.0 + double(j % 5);
    for (bool act_order : {false, true}) {
        gptq_options o;
        o.act_order = act_order;
        const auto r = gptq(w, h, quant_spec::weight(4), o);
        CHECK(r.weight == rtn(w, quant_spec::weight(4)));
        // GPTQ groups take the range over the group's columns including 0 (the reference's
        // per-channel quantizer on a slice): round-to-nearest of each slice per row. (Under
        // act-order, dynamic groups are runs of the permuted order; static ones keep the slices.)
        o.static_groups = act_order;
        const auto rg = gptq(w, h, quant_spec::weight(4, true, 16), o);
        for (Eigen::Index g = 0; g < cols / 16; ++g) {
            row_major_f slice = w.middleCols(g * 16, 16);
            fake_quantize(slice, quant_spec::weight(4));
            CHECK(rg.weight.middleCols(g * 16, 16) == slice);
        }
        CHECK(r.loss >= 0.0);
    }
}

TEST_CASE("GPTQ's layer error is at most round-to-nearest's on correlated inputs, and clearly lower", "[gptq]")
{
    const Eigen::Index rows = 32, cols = 128;
    const Eigen::MatrixXd x = calibration(512, cols, 34, false);
    const Eigen::MatrixXd h = hessian_of(x);
    const row_major_f w = (0.05 * gaussian(rows, cols, 35)).cast<float>();
    for (const quant_spec& spec : {quant_spec::weight(4), quant_spec::weight(3), quant_spec::weight(4, true, 32),
                                   quant_spec::weight(4, false, 32)}) {
        INFO("bits " << spec.bits << " group " << spec.group_size << " sym " << spec.symmetric);
        const auto r = gptq(w, h, spec);
        const double e_gptq = layer_error(w, r.weight, h);
        const double e_rtn = layer_error(w, rtn(w, spec), h);
        CHECK(e_gptq < 0.8 * e_rtn);
        // And the layer output error, measured directly on the calibration tokens.
        const Eigen::MatrixXd dq = (w - r.weight).cast<double>(), dr = (w - rtn(w, spec)).cast<double>();
        CHECK((x * dq.transpose()).squaredNorm() < (x * dr.transpose()).squaredNorm());
    }
}

TEST_CASE("act-order does at least as well as the natural order when a few inputs are outliers", "[gptq]")
{
    const Eigen::Index rows = 32, cols = 128;
    const Eigen::MatrixXd x = calibration(512, cols, 36, true);
    const Eigen::MatrixXd h = hessian_of(x);
    const row_major_f w = (0.05 * gaussian(rows, cols, 37)).cast<float>();
    for (const quant_spec& spec : {quant_spec::weight(4), quant_spec::weight(3)}) {
        gptq_options plain, ordered;
        ordered.act_order = true;
        const double e_plain = layer_error(w, gptq(w, h, spec, plain).weight, h);
        const double e_ordered = layer_error(w, gptq(w, h, spec, ordered).weight, h);
        INFO("bits " << spec.bits << " plain " << e_plain << " act-order " << e_ordered);
        CHECK(e_ordered <= e_plain);
    }
}

TEST_CASE("rows are independent: permuting W's rows permutes the result", "[gptq]")
{
    const Eigen::Index rows = 10, cols = 64;
    const Eigen::MatrixXd h = hessian_of(calibration(200, cols, 38, true));
    const row_major_f w = gaussian(rows, cols, 39).cast<float>();
    const row_major_f wr = w.colwise().reverse();
    for (const quant_spec& spec : {quant_spec::weight(4), quant_spec::weight(4, false, 16)}) {
        gptq_options o;
        o.act_order = true;
        const auto a = gptq(w, h, spec, o);
        const auto b = gptq(wr, h, spec, o);
        for (Eigen::Index i = 0; i < rows; ++i)
            for (Eigen::Index j = 0; j < cols; ++j) {
                REQUIRE(std::fabs(a.weight(i, j) - b.weight(rows - 1 - i, j)) <= 1e-6f * std::fabs(a.weight(i, j)));
                REQUIRE(a.quantized.code(std::size_t(i), std::size_t(j)) ==
                        b.quantized.code(std::size_t(rows - 1 - i), std::size_t(j)));
            }
    }
}

TEST_CASE("a single column and a single row are quantized", "[gptq][edge]")
{
    {
        const row_major_f w = gaussian(5, 1, 40).cast<float>();
        const Eigen::MatrixXd h = Eigen::MatrixXd::Constant(1, 1, 3.0);
        const auto r = gptq(w, h, quant_spec::weight(4));
        CHECK(r.weight == rtn(w, quant_spec::weight(4)));
        CHECK(r.quantized.row_bytes == 1);
    }
    {
        const row_major_f w = gaussian(1, 40, 41).cast<float>();
        const Eigen::MatrixXd h = hessian_of(calibration(100, 40, 42, false));
        const auto r = gptq(w, h, quant_spec::weight(4, true, 8));
        const auto ref = test::naive_gptq(w, h, quant_spec::weight(4, true, 8), false);
        for (Eigen::Index j = 0; j < 40; ++j) REQUIRE(std::fabs(double(r.weight(0, j)) - ref.q(0, j)) <= 1e-6);
    }
}

TEST_CASE("dead inputs are zeroed and, by default, do not widen the per-row range", "[gptq][edge]")
{
    const Eigen::Index rows = 4, cols = 32;
    Eigen::MatrixXd h = hessian_of(calibration(100, cols, 43, false));
    h.row(3).setZero();
    h.col(3).setZero();
    row_major_f w = (0.1 * gaussian(rows, cols, 44)).cast<float>();
    w.col(3).setConstant(5.0f);  // a huge weight on an input that is never active
    gptq_options compat;
    compat.reference_compat = true;
    const auto a = gptq(w, h, quant_spec::weight(4));
    const auto b = gptq(w, h, quant_spec::weight(4), compat);
    for (Eigen::Index i = 0; i < rows; ++i) {
        CHECK(a.weight(i, 3) == 0.0f);
        CHECK(b.weight(i, 3) == 0.0f);
        CHECK(a.quantized.scales[std::size_t(i)] < 0.1f);            // from the live weights
        CHECK(b.quantized.scales[std::size_t(i)] == 5.0f / 7.0f);  // the reference: from the dead 5.0
    }
    CHECK(layer_error(w, a.weight, h) < layer_error(w, b.weight, h));
}

TEST_CASE("reference_compat reproduces stale group parameters inside a block and the permuted export", "[gptq]")
{
    const Eigen::Index rows = 8, cols = 128;
    const Eigen::MatrixXd h = hessian_of(calibration(300, cols, 45, true));
    const row_major_f w = gaussian(rows, cols, 46).cast<float>();
    const quant_spec spec = quant_spec::weight(4, true, 32);
    gptq_options compat;
    compat.reference_compat = true;
    const auto a = gptq(w, h, spec);
    const auto b = gptq(w, h, spec, compat);
    // Group 0 starts the block: identical. Groups 1..3 start inside the 128-column block: the
    // reference scales them from weights without this block's updates.
    for (Eigen::Index i = 0; i < rows; ++i) {
        CHECK(a.quantized.scales[std::size_t(i * 4)] == b.quantized.scales[std::size_t(i * 4)]);
        CHECK(a.weight.row(i).head(32) == b.weight.row(i).head(32));
    }
    bool stale = false;
    for (std::size_t k = 0; k < a.quantized.scales.size(); ++k) stale = stale || a.quantized.scales[k] != b.quantized.scales[k];
    CHECK(stale);
    CHECK(layer_error(w, a.weight, h) <= layer_error(w, b.weight, h) * 1.05);

    for (bool static_groups : {false, true}) {
        gptq_options o;
        o.act_order = true;
        o.static_groups = static_groups;
        const auto r = gptq(w, h, spec, o);
        std::vector<float> d(std::size_t(rows * cols));
        dequantize(r.quantized, as_matrix_view(d.data(), std::size_t(rows), std::size_t(cols)));
        CHECK(!r.permuted_export);
        CHECK(r.quantized.group_index.empty() == static_groups);
        for (Eigen::Index i = 0; i < rows; ++i)
            for (Eigen::Index j = 0; j < cols; ++j) REQUIRE(d[std::size_t(i * cols + j)] == r.weight(i, j));

        o.reference_compat = true;
        const auto rc = gptq(w, h, spec, o);
        CHECK(rc.permuted_export);
        dequantize(rc.quantized, as_matrix_view(d.data(), std::size_t(rows), std::size_t(cols)));
        for (Eigen::Index i = 0; i < rows; ++i)
            for (Eigen::Index k = 0; k < cols; ++k)
                REQUIRE(d[std::size_t(i * cols + k)] == rc.weight(i, Eigen::Index(rc.permutation[std::size_t(k)])));
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST_CASE("bad Hessians and options are rejected with a clear message", "[gptq][errors]")
{
    const row_major_f w = gaussian(4, 8, 47).cast<float>();
    const Eigen::MatrixXd h = hessian_of(calibration(50, 8, 48, false));
    const auto message = [&](auto&& f) -> std::pair<errc, std::string> {
        try {
            f();
        } catch (const spinquant::error& e) {
            return {e.code(), e.what()};
        }
        return {errc::bad_file, "no error"};
    };
    {
        const Eigen::MatrixXd hs = Eigen::MatrixXd::Identity(8, 7);
        const auto [code, what] = message([&] { (void)gptq(w, hs, quant_spec::weight(4)); });
        CHECK(code == errc::bad_shape);
        CHECK(what == "spinquant::gptq: hessian is 8x7, expected square");
    }
    {
        const Eigen::MatrixXd hs = Eigen::MatrixXd::Identity(9, 9);
        const auto [code, what] = message([&] { (void)gptq(w, hs, quant_spec::weight(4)); });
        CHECK(code == errc::bad_shape);
        CHECK(what.find("expected 8x8") != std::string::npos);
    }
    {
        Eigen::MatrixXd hn = h;
        hn(2, 3) = std::numeric_limits<double>::quiet_NaN();
        CHECK(message([&] { (void)gptq(w, hn, quant_spec::weight(4)); }).first == errc::non_finite);
        row_major_f wn = w;
        wn(1, 1) = std::numeric_limits<float>::infinity();
        CHECK(message([&] { (void)gptq(wn, h, quant_spec::weight(4)); }).first == errc::non_finite);
    }
    {
        Eigen::MatrixXd hneg = -Eigen::MatrixXd::Identity(8, 8);
        const auto [code, what] = message([&] { (void)gptq(w, hneg, quant_spec::weight(4)); });
        CHECK(code == errc::not_positive_definite);
        CHECK(what.find("damp") != std::string::npos);
    }
    {
        // Indefinite only slightly: the first dampening is too small, tenfold retries fix it.
        Eigen::MatrixXd hi = Eigen::MatrixXd::Identity(8, 8);
        hi(7, 7) = -0.05;
        gptq_options o;
        CHECK(message([&] { (void)gptq(w, hi, quant_spec::weight(4), o); }).first == errc::not_positive_definite);
        o.damp_retries = 3;
        const auto r = gptq(w, hi, quant_spec::weight(4), o);
        CHECK(r.damp > 0.05);
        CHECK(r.damp < 1.0);
    }
    {
        quant_spec s = quant_spec::weight(4);
        s.granularity = granularity::tensor;
        CHECK(message([&] { (void)gptq(w, h, s); }).first == errc::bad_argument);
        CHECK(message([&] { (void)gptq(w, h, quant_spec::weight(4, true, 3)); }).first == errc::bad_shape);
        CHECK(message([&] { (void)gptq(w, h, quant_spec::weight(0)); }).first == errc::bits_out_of_range);
        gptq_options o;
        o.damp_ratio = -0.1;
        CHECK(message([&] { (void)gptq(w, h, quant_spec::weight(4), o); }).first == errc::bad_argument);
        o.damp_ratio = 0.01;
        o.block_size = 0;
        CHECK(message([&] { (void)gptq(w, h, quant_spec::weight(4), o); }).first == errc::bad_argument);
    }
}

TEST_CASE("the Hessian accumulator averages 2 x x^T over rows or over the samples it is told", "[gptq]")
{
    const Eigen::MatrixXd a = gaussian(30, 6, 49), b = gaussian(12, 6, 50);
    hessian_accumulator acc(6);
    CHECK_THROWS_AS((void)acc.hessian(), spinquant::error);
    acc.add_batch(a);
    const Eigen::MatrixXf bf = b.cast<float>();
    acc.add_batch(bf);
    CHECK(acc.samples() == 42);
    const Eigen::MatrixXd bd = bf.cast<double>();  // the float batch, exactly
    const Eigen::MatrixXd expected = 2.0 / 42.0 * (a.transpose() * a + bd.transpose() * bd);
    CHECK((acc.hessian() - expected).cwiseAbs().maxCoeff() <= 1e-12 * expected.cwiseAbs().maxCoeff());
    CHECK(acc.hessian() == acc.hessian().transpose());
    acc.reset();
    acc.add_batch(a, 3);  // e.g. 3 sequences of 10 tokens, counted as the reference counts
    CHECK((acc.hessian() - 2.0 / 3.0 * a.transpose() * a).cwiseAbs().maxCoeff() <= 1e-12 * a.squaredNorm());
    const Eigen::MatrixXd wrong = gaussian(3, 5, 51);
    CHECK_THROWS_AS(acc.add_batch(wrong), spinquant::error);
    Eigen::MatrixXd nan = a;
    nan(0, 0) = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_AS(acc.add_batch(nan), spinquant::error);
    CHECK(acc.samples() == 3);
}
