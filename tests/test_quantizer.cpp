#include "support/catch.hpp"

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <xsimd/xsimd.hpp>

#include <spinquant/detail/random.hpp>
#include <spinquant/eigen.hpp>
#include <spinquant/quantizer.hpp>

#include "support/json.hpp"
#include "support/quant_reference.hpp"
#include "support/shared_data.hpp"

using namespace spinquant;
using spinquant::test::json;

namespace {

/// Same bits (so -0.0 and 0.0 differ): the golden files are bit-exact.
bool same_bits(float a, float b) { return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b); }

template <class T>
std::vector<T> gaussian(std::size_t n, std::uint64_t seed, double sigma = 1.0)
{
    std::mt19937_64 g(seed);
    detail::normal_sampler normal;
    std::vector<T> v(n);
    for (T& x : v) x = static_cast<T>(sigma * normal(g));
    return v;
}

/// Every spec shape the properties are checked on.
std::vector<quant_spec> property_specs(std::size_t cols)
{
    std::vector<quant_spec> specs;
    for (int bits : {2, 3, 4, 8, 16})
        for (bool sym : {false, true})
            for (quant_role role : {quant_role::activation, quant_role::weight})
                for (granularity g : {granularity::tensor, granularity::row, granularity::column, granularity::group}) {
                    quant_spec s;
                    s.bits = bits;
                    s.symmetric = sym;
                    s.role = role;
                    s.granularity = g;
                    s.group_size = g == granularity::group ? cols / 4 : 0;
                    specs.push_back(s);
                }
    return specs;
}

std::string describe(const quant_spec& s)
{
    return "bits " + std::to_string(s.bits) + (s.symmetric ? " sym" : " asym") +
           (s.role == quant_role::weight ? " weight" : " activation") + " granularity " +
           std::to_string(static_cast<int>(s.granularity)) + " group " + std::to_string(s.group_size) + " clip " +
           std::to_string(s.clip_ratio) + (s.clip_search ? " mse" : "") + (s.reference_compat ? " compat" : "");
}

template <class... A, class F>
void for_each_arch(xsimd::arch_list<A...>, F&& f)
{
    (f(A{}), ...);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Golden files

TEST_CASE("activation quantization matches ActQuantizer bit for bit on all 16 golden cases", "[quantizer][golden]")
{
    const auto path = spinquant::test::shared_path_or_skip("golden/act_quant_spinquant.json");
    if (!path) return;
    const json g = json::parse_file(path->string());
    const std::vector<float> input = g["input"].floats();
    const std::size_t rows = 6, cols = 64;
    REQUIRE(input.size() == rows * cols);
    REQUIRE(g["cases"].size() == 16);
    for (const json& c : g["cases"].items()) {
        const int gs = c["groupsize"].integer();
        for (bool compat : {false, true}) {
            quant_spec spec = quant_spec::activation(c["bits"].integer(), c["sym"].boolean(),
                                                     gs > 0 ? static_cast<std::size_t>(gs) : 0,
                                                     c["clip_ratio"].number());
            spec.reference_compat = compat;
            INFO(describe(spec));
            REQUIRE(spec.qmax() == c["maxq"].integer());
            const auto m = as_matrix_view(input.data(), rows, cols);

            std::vector<quant_params<float>> p(param_count(spec, rows, cols));
            find_params(m, spec, std::span(p));
            const auto scale = c["scale"].floats(), zero = c["zero"].floats(), qint = c["q_int"].floats(),
                       fq = c["fake_quant"].floats();
            const auto q = quantize(m, spec);
            std::vector<float> out(input.size());
            fake_quantize(m, as_matrix_view(out.data(), rows, cols), spec);
            std::vector<float> deq(input.size());
            dequantize(q, as_matrix_view(deq.data(), rows, cols));
            for (std::size_t i = 0; i < rows; ++i)
                for (std::size_t j = 0; j < cols; ++j) {
                    const std::size_t e = i * cols + j;
                    const quant_params<float> pe = q.params(i, j);
                    INFO("row " << i << " col " << j);
                    REQUIRE(same_bits(pe.scale, scale[e]));
                    REQUIRE(same_bits(pe.zero, zero[e]));
                    REQUIRE(same_bits(p[q.unit_of(i, j)].scale, scale[e]));
                    REQUIRE(same_bits(p[q.unit_of(i, j)].zero, zero[e]));
                    REQUIRE(static_cast<float>(q.code(i, j)) == qint[e]);
                    REQUIRE(same_bits(out[e], fq[e]));
                    REQUIRE(deq[e] == fq[e]);  // value equality: a code 0 cannot carry the sign of -0.0
                }
        }
    }
}

TEST_CASE("weight quantization matches WeightQuantizer bit for bit, including its symmetric-only fake_quantize",
          "[quantizer][golden]")
{
    const auto path = spinquant::test::shared_path_or_skip("golden/weight_quant_spinquant.json");
    if (!path) return;
    const json g = json::parse_file(path->string());
    const std::vector<float> input = g["input"].floats();
    const std::size_t rows = 8, cols = 64;
    REQUIRE(input.size() == rows * cols);
    REQUIRE(g["cases"].size() >= 5);
    bool saw_asym = false, saw_mse = false, saw_group = false;
    for (const json& c : g["cases"].items()) {
        const int gs = c["weight_groupsize"].integer();
        const bool sym = c["sym"].boolean();
        quant_spec spec =
            quant_spec::weight(c["bits"].integer(), sym, gs > 0 ? static_cast<std::size_t>(gs) : 0, c["mse"].boolean());
        INFO(describe(spec));
        saw_asym = saw_asym || !sym;
        saw_mse = saw_mse || c["mse"].boolean();
        saw_group = saw_group || gs > 0;
        REQUIRE(spec.qmax() == c["maxq"].integer());
        const auto m = as_matrix_view(input.data(), rows, cols);
        const auto scale = c["scale"].floats(), zero = c["zero"].floats();
        const auto train_fq = c["quantize"].floats(), eval_fq = c["fake_quantize"].floats(),
                   eval_int = c["fake_quantize_int"].floats();
        const std::size_t scale_cols = static_cast<std::size_t>(c["scale_shape"][1].integer());

        const auto q = quantize(m, spec);
        std::vector<float> correct(input.size()), compat(input.size()), deq(input.size());
        fake_quantize(m, as_matrix_view(correct.data(), rows, cols), spec);
        quant_spec cspec = spec;
        cspec.reference_compat = true;
        fake_quantize(m, as_matrix_view(compat.data(), rows, cols), cspec);
        dequantize(q, as_matrix_view(deq.data(), rows, cols));
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t j = 0; j < cols; ++j) {
                const std::size_t e = i * cols + j;
                const std::size_t se = i * scale_cols + (scale_cols == 1 ? 0 : j);
                INFO("row " << i << " col " << j);
                REQUIRE(same_bits(q.params(i, j).scale, scale[se]));
                REQUIRE(same_bits(q.params(i, j).zero, zero[se]));
                // The training path (WeightQuantizer.quantize) is what our default mode computes.
                REQUIRE(same_bits(correct[e], train_fq[e]));
                REQUIRE(deq[e] == train_fq[e]);
                // The eval path (fake_quantize, always symmetric) is reference_compat.
                REQUIRE(same_bits(compat[e], eval_fq[e]));
                if (sym) REQUIRE(static_cast<float>(q.code(i, j)) == eval_int[e]);
            }
    }
    CHECK(saw_asym);
    CHECK(saw_mse);
    CHECK(saw_group);
}

// ---------------------------------------------------------------------------------------------
// Independent reference and properties

TEMPLATE_TEST_CASE("fake_quantize and find_params equal the element-by-element reference for every spec",
                   "[quantizer]", float, double)
{
    using T = TestType;
    const std::size_t rows = 5, cols = 48;
    auto x = gaussian<T>(rows * cols, 11);
    x[7] = T(9);            // an outlier
    x[cols + 3] = T(-0.5);  // row 1 has a negative extreme
    for (std::size_t j = 0; j < cols; ++j) x[2 * cols + j] = std::fabs(x[2 * cols + j]) + T(0.25);  // all positive
    for (std::size_t j = 0; j < cols; ++j) x[3 * cols + j] = T(0);                                   // all zero
    for (quant_spec spec : property_specs(cols))
        for (double clip : {1.0, 0.9}) {
            spec.clip_ratio = clip;
            INFO(describe(spec));
            const auto ref_p = test::ref_find_params(x, rows, cols, spec);
            std::vector<quant_params<T>> p(param_count(spec, rows, cols));
            find_params(as_matrix_view(x.data(), rows, cols), spec, std::span(p));
            REQUIRE(p.size() == ref_p.size());
            for (std::size_t k = 0; k < p.size(); ++k) {
                REQUIRE(p[k].scale == ref_p[k].scale);
                REQUIRE(p[k].zero == ref_p[k].zero);
            }
            const auto expected = test::ref_fake_quantize(x, rows, cols, spec);
            auto y = x;
            fake_quantize(as_matrix_view(y.data(), rows, cols), spec);
            for (std::size_t e = 0; e < y.size(); ++e) REQUIRE(y[e] == expected[e]);
        }
}

TEMPLATE_TEST_CASE("the MSE clip search equals a brute-force search and never increases the error", "[quantizer]",
                   float, double)
{
    using T = TestType;
    const std::size_t rows = 4, cols = 64;
    auto x = gaussian<T>(rows * cols, 12);
    x[5] = T(6);  // an outlier makes shrinking worthwhile
    x[cols + 9] = T(-4);
    for (bool sym : {true, false})
        for (std::size_t gs : {std::size_t{0}, std::size_t{16}})
            for (quant_role role : {quant_role::weight, quant_role::activation}) {
                quant_spec spec = quant_spec::weight(3, sym, gs, true);
                spec.role = role;
                INFO(describe(spec));
                const auto ref_p = test::ref_find_params(x, rows, cols, spec);
                std::vector<quant_params<T>> p(param_count(spec, rows, cols)), p2(p.size());
                find_params(as_matrix_view(x.data(), rows, cols), spec, std::span(p));
                quant_spec plain = spec;
                plain.clip_search.reset();
                search_clip(as_matrix_view(x.data(), rows, cols), plain, std::span(p2));
                std::vector<quant_params<T>> p0(p.size());
                find_params(as_matrix_view(x.data(), rows, cols), plain, std::span(p0));
                bool some_shrunk = false;
                for (std::size_t k = 0; k < p.size(); ++k) {
                    REQUIRE(p[k].scale == ref_p[k].scale);
                    REQUIRE(p[k].zero == ref_p[k].zero);
                    REQUIRE(p2[k].scale == p[k].scale);
                    REQUIRE(p2[k].zero == p[k].zero);
                    some_shrunk = some_shrunk || p[k].scale < p0[k].scale;
                }
                CHECK(some_shrunk);
                // The searched parameters are never worse in the searched norm than the plain ones.
                const auto units = test::ref_units(rows, cols, spec);
                for (std::size_t k = 0; k < units.size(); ++k) {
                    double e_search = 0, e_plain = 0;
                    for (auto [i, j] : units[k]) {
                        const T v = x[i * cols + j];
                        e_search += std::pow(std::fabs(double(fake_quantize_value(v, p[k], spec) - v)), 2.4);
                        e_plain += std::pow(std::fabs(double(fake_quantize_value(v, p0[k], spec) - v)), 2.4);
                    }
                    CHECK(e_search <= e_plain);
                }
            }
}

TEMPLATE_TEST_CASE("fake quantization is idempotent, within half a step inside the range, and codes stay in range",
                   "[quantizer]", float, double)
{
    using T = TestType;
    const std::size_t rows = 6, cols = 40;
    const auto x = gaussian<T>(rows * cols, 13, 3.0);
    for (const quant_spec& spec : property_specs(cols)) {
        INFO(describe(spec));
        auto once = x;
        fake_quantize(as_matrix_view(once.data(), rows, cols), spec);
        auto twice = once;
        fake_quantize(as_matrix_view(twice.data(), rows, cols), spec);
        std::vector<quant_params<T>> p(param_count(spec, rows, cols));
        find_params(as_matrix_view(x.data(), rows, cols), spec, std::span(p));
        const auto q = quantize(as_matrix_view(x.data(), rows, cols), spec);
        std::vector<T> deq(x.size());
        dequantize(q, as_matrix_view(deq.data(), rows, cols));
        const T eps = std::numeric_limits<T>::epsilon();
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t j = 0; j < cols; ++j) {
                const std::size_t e = i * cols + j;
                const quant_params<T> pe = p[q.unit_of(i, j)];
                // A second pass recomputes the scale from the quantized range: equal up to the
                // rounding of that recomputation (a few ulps of the value). At 16 bits float32
                // resolves x / scale only to ~1e-2 of a step, so a near-tie extreme can land one
                // step inside and the second pass re-grids with a scale 1/qmax smaller.
                const T tol = spec.bits == 16 && sizeof(T) == 4 ? pe.scale : 4 * eps * std::fabs(once[e]);
                REQUIRE(std::fabs(twice[e] - once[e]) <= tol);
                REQUIRE(deq[e] == once[e]);
                const std::int32_t c = q.code(i, j);
                REQUIRE(c >= spec.qmin());
                REQUIRE(c <= spec.qmax());
                REQUIRE(c == quantize_value(x[e], pe, spec));
                REQUIRE(dequantize_value(c, pe, spec) == once[e]);
                REQUIRE(fake_quantize_value(x[e], pe, spec) == once[e]);
                const T t = x[e] / pe.scale + (spec.symmetric ? T(0) : pe.zero);
                if (t >= T(spec.qmin()) && t <= T(spec.qmax()))
                    REQUIRE(std::fabs(x[e] - once[e]) <= pe.scale * (T(0.5) + 8 * eps) + 8 * eps * std::fabs(x[e]));
            }
    }
}

TEST_CASE("every enabled SIMD architecture gives the same bits as the default one", "[quantizer][simd]")
{
    // Lengths around the lane counts (4, 8, 16) and misaligned starts.
    for (std::size_t cols : {std::size_t{1}, std::size_t{3}, std::size_t{15}, std::size_t{16}, std::size_t{17},
                             std::size_t{33}, std::size_t{130}}) {
        const std::size_t rows = 3;
        std::vector<float> buf(rows * cols + 1);
        const auto g = gaussian<float>(buf.size(), 14 + cols);
        std::copy(g.begin(), g.end(), buf.begin());
        float* x = buf.data() + 1;  // misaligned
        std::vector<quant_spec> specs = {quant_spec::activation(4), quant_spec::activation(8, true),
                                         quant_spec::weight(4), quant_spec::weight(3, false, 0, true)};
        if (cols % 3 == 0) specs.push_back(quant_spec::activation(4, false, cols / 3));
        for (const quant_spec& spec : specs) {
            INFO(describe(spec) << " cols " << cols);
            const auto ref = test::ref_fake_quantize(std::vector<float>(x, x + rows * cols), rows, cols, spec);
            for_each_arch(xsimd::supported_architectures{}, [&](auto arch) {
                using A = decltype(arch);
                INFO("arch " << A::name());
                std::vector<float> y(x, x + rows * cols);
                fake_quantize<A>(as_matrix_view(y.data(), rows, cols), spec);
                for (std::size_t e = 0; e < y.size(); ++e) REQUIRE(y[e] == ref[e]);
                const auto q = quantize<A>(as_matrix_view(x, rows, cols), spec);
                std::vector<float> d(rows * cols);
                dequantize<A>(q, as_matrix_view(d.data(), rows, cols));
                for (std::size_t e = 0; e < y.size(); ++e) REQUIRE(d[e] == ref[e]);
                std::vector<float> grad(rows * cols, 1.0f);
                fake_quantize_backward<A>(as_matrix_view(x, rows, cols), as_matrix_view(grad.data(), rows, cols), spec);
                if (!spec.clip_search)
                    for (float v : grad) REQUIRE(v == 1.0f);  // clip 1, no search: nothing clipped
            });
        }
    }
}

TEMPLATE_TEST_CASE("values within a few ulps of a rounding tie round exactly as a true division on every architecture",
                   "[quantizer][simd]", float, double)
{
    // The kernels multiply by 1/scale and fall back to a division near half-integers; the
    // reference divides. Put every element within 0..4 ulps of k + 1/2 steps, both sides.
    using T = TestType;
    const std::size_t cols = 200;
    std::vector<T> x(cols);
    x[0] = T(-7.3);  // the extremes fix the scale (asymmetric 4-bit: (hi - lo) / 15, inexact)
    x[1] = T(5.9);
    const quant_spec spec = quant_spec::activation(4);
    std::vector<quant_params<T>> p(1);
    find_params(x, spec, std::span(p));  // only the extremes matter: the rest are zero so far
    for (std::size_t j = 2; j < cols; ++j) {
        const T k = static_cast<T>(j % 13) - T(6);
        T v = (k + T(0.5)) * p[0].scale;
        const int ulps = static_cast<int>(j % 9U) - 4;
        for (int u = 0; u < std::abs(ulps); ++u)
            v = std::nextafter(v, ulps > 0 ? std::numeric_limits<T>::max() : std::numeric_limits<T>::lowest());
        x[j] = v;
    }
    std::vector<quant_params<T>> p2(1);
    find_params(x, spec, std::span(p2));
    REQUIRE(p2[0].scale == p[0].scale);
    REQUIRE(p2[0].zero == p[0].zero);
    const auto ref = test::ref_fake_quantize(x, 1, cols, spec);
    std::size_t near_ties = 0;
    for (std::size_t j = 2; j < cols; ++j) {
        const T t = x[j] / p[0].scale;
        near_ties += std::fabs(std::fabs(t - std::trunc(t)) - T(0.5)) < T(1e-4) ? std::size_t{1} : std::size_t{0};
    }
    CHECK(near_ties > cols / 2);
    for_each_arch(xsimd::supported_architectures{}, [&](auto arch) {
        using A = decltype(arch);
        INFO("arch " << A::name());
        auto y = x;
        fake_quantize<A>(y, spec);
        const auto q = quantize<A>(as_matrix_view(x.data(), 1, cols), spec);
        for (std::size_t j = 0; j < cols; ++j) {
            REQUIRE(y[j] == ref[j]);
            REQUIRE(q.code(0, j) == static_cast<std::int32_t>(test::ref_code(x[j], {p[0].scale, p[0].zero}, spec, true)));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Views, vectors, layouts

TEST_CASE("strided, column-major and Eigen views give the same result as a packed row-major matrix", "[quantizer]")
{
    const std::size_t rows = 7, cols = 24;
    const auto x = gaussian<float>(rows * cols, 15);
    for (const quant_spec& spec : {quant_spec::activation(4), quant_spec::weight(4, true, 8), quant_spec::weight(8)}) {
        INFO(describe(spec));
        auto packed = x;
        fake_quantize(as_matrix_view(packed.data(), rows, cols), spec);

        std::vector<float> wide(rows * (cols + 5), -100.0f);  // row stride cols + 5; the gap must survive
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t j = 0; j < cols; ++j) wide[i * (cols + 5) + j] = x[i * cols + j];
        fake_quantize(as_matrix_view(wide.data(), rows, cols, cols + 5), spec);

        Eigen::MatrixXf cm(rows, cols);  // column-major: rows are strided
        for (std::size_t i = 0; i < rows; ++i)
            for (std::size_t j = 0; j < cols; ++j) cm(Eigen::Index(i), Eigen::Index(j)) = x[i * cols + j];
        fake_quantize(cm, spec);
        Eigen::MatrixXf cm_out(rows, cols);
        const Eigen::MatrixXf cm_in = cm;
        fake_quantize(cm_in, cm_out, spec);  // out of place, idempotent within rounding

        const auto q = quantize(as_matrix_view(x.data(), rows, cols), spec);
        Eigen::MatrixXf deq(rows, cols);
        dequantize(q, deq);
        for (std::size_t i = 0; i < rows; ++i) {
            for (std::size_t j = 0; j < cols; ++j) {
                const float v = packed[i * cols + j];
                REQUIRE(wide[i * (cols + 5) + j] == v);
                REQUIRE(cm(Eigen::Index(i), Eigen::Index(j)) == v);
                REQUIRE(deq(Eigen::Index(i), Eigen::Index(j)) == v);
                REQUIRE(std::fabs(cm_out(Eigen::Index(i), Eigen::Index(j)) - v) <= 4e-7f * std::fabs(v));
            }
            for (std::size_t j = cols; j < cols + 5; ++j) REQUIRE(wide[i * (cols + 5) + j] == -100.0f);
        }
    }
}

TEST_CASE("column granularity is row granularity of the transpose", "[quantizer]")
{
    const std::size_t rows = 9, cols = 5;
    const auto x = gaussian<double>(rows * cols, 16);
    std::vector<double> xt(rows * cols);
    for (std::size_t i = 0; i < rows; ++i)
        for (std::size_t j = 0; j < cols; ++j) xt[j * rows + i] = x[i * cols + j];
    quant_spec spec = quant_spec::activation(4);
    spec.granularity = granularity::column;
    auto y = x;
    fake_quantize(as_matrix_view(y.data(), rows, cols), spec);
    fake_quantize(as_matrix_view(xt.data(), cols, rows), quant_spec::activation(4));
    for (std::size_t i = 0; i < rows; ++i)
        for (std::size_t j = 0; j < cols; ++j) REQUIRE(y[i * cols + j] == xt[j * rows + i]);
}

TEST_CASE("a token vector is quantized like one row, per head with group_size = head_dim", "[quantizer]")
{
    const std::size_t dim = 64, head_dim = 16;
    const auto tok = gaussian<float>(dim, 17);
    for (const quant_spec& spec : {quant_spec::activation(4), quant_spec::activation(4, false, head_dim),
                                   quant_spec::activation(8, true, head_dim, 0.9)}) {
        INFO(describe(spec));
        auto a = tok;
        fake_quantize(a, spec);
        Eigen::VectorXf b = Eigen::Map<const Eigen::VectorXf>(tok.data(), Eigen::Index(dim));
        fake_quantize(b, spec);  // an Eigen vector is a token too, not a dim x 1 matrix
        std::vector<float> c(dim);
        fake_quantize(tok, c, spec);
        const auto ref = test::ref_fake_quantize(tok, 1, dim, spec);
        for (std::size_t j = 0; j < dim; ++j) {
            REQUIRE(a[j] == ref[j]);
            REQUIRE(b[Eigen::Index(j)] == ref[j]);
            REQUIRE(c[j] == ref[j]);
        }
    }
}

TEST_CASE("codes are packed two per byte up to 4 bits, one byte up to 8 and two bytes up to 16", "[quantizer]")
{
    // Row 0: values chosen so the symmetric 4-bit codes are -8, 7, -1, 0, 3 (scale 1 from max 7... )
    const std::vector<float> x = {-8.0f, 7.0f, -1.0f, 0.0f, 3.0f};
    quant_spec s4 = quant_spec::weight(4);
    s4.clip_ratio = 1.0;
    // Symmetric weight scale = max(|-8|, 7) / 7 = 8/7, so use given params instead for exact codes.
    {
        const auto q = quantize(as_matrix_view(x.data(), 1, 5), s4);
        REQUIRE(q.row_bytes == 3);
        REQUIRE(q.codes.size() == 3);
        for (std::size_t j = 0; j < 5; ++j) {
            const std::int32_t c = q.code(0, j);
            const std::uint8_t byte = q.codes[j / 2];
            const int nib = (j % 2 == 0) ? (byte & 0xF) : (byte >> 4);
            REQUIRE(nib == (c & 0xF));  // two's complement nibble, low nibble first
        }
        REQUIRE((q.codes[2] >> 4) == 0);  // odd column count: the last high nibble is 0
        REQUIRE(q.code(0, 0) == -7);      // -8 / (8/7) = -7
        REQUIRE(q.code(0, 1) == 6);       // 7 / (8/7) = 6.125
    }
    {
        const auto q = quantize(as_matrix_view(x.data(), 1, 5), quant_spec::weight(8, false));
        REQUIRE(q.row_bytes == 5);
        for (std::size_t j = 0; j < 5; ++j) REQUIRE(q.codes[j] == static_cast<std::uint8_t>(q.code(0, j)));
        REQUIRE(q.code(0, 0) == 0);
        REQUIRE(q.code(0, 1) == 255);
    }
    {
        const auto q = quantize(as_matrix_view(x.data(), 1, 5), quant_spec::weight(12));
        REQUIRE(q.row_bytes == 10);
        for (std::size_t j = 0; j < 5; ++j) {
            const auto u = static_cast<std::uint16_t>(q.codes[2 * j] | (q.codes[2 * j + 1] << 8));
            REQUIRE(static_cast<std::int16_t>(u) == q.code(0, j));
        }
        REQUIRE(q.code(0, 0) == -2047);
    }
    // Odd group sizes put group boundaries inside a byte.
    const auto y = gaussian<float>(2 * 9, 18);
    for (int bits : {2, 4, 6, 8, 10, 16})
        for (bool sym : {true, false}) {
            const quant_spec spec = quant_spec::activation(bits, sym, 3);
            INFO(describe(spec));
            const auto q = quantize(as_matrix_view(y.data(), 2, 9), spec);
            std::vector<float> d(y.size());
            dequantize(q, as_matrix_view(d.data(), 2, 9));
            REQUIRE(d == test::ref_fake_quantize(y, 2, 9, spec));
        }
}

TEST_CASE("quantize reuses the storage of a caller's quantized_matrix", "[quantizer]")
{
    const auto x = gaussian<float>(64 * 32, 19);
    quantized_matrix<float> q;
    quantize(as_matrix_view(x.data(), 64, 32), quant_spec::weight(4, true, 8), q);
    const auto* codes = q.codes.data();
    const auto* scales = q.scales.data();
    const auto y = gaussian<float>(64 * 32, 20);
    quantize(as_matrix_view(y.data(), 64, 32), quant_spec::weight(4, true, 8), q);
    CHECK(q.codes.data() == codes);
    CHECK(q.scales.data() == scales);
    std::vector<float> d(y.size());
    dequantize(q, as_matrix_view(d.data(), 64, 32));
    CHECK(d == test::ref_fake_quantize(y, 64, 32, quant_spec::weight(4, true, 8)));
}

TEST_CASE("a group_index (act-order groups) maps each column to its group", "[quantizer]")
{
    const std::size_t rows = 3, cols = 8;
    const auto x = gaussian<float>(rows * cols, 21);
    auto q = quantize(as_matrix_view(x.data(), rows, cols), quant_spec::weight(4, false, 4));
    // Swap the two groups' parameters and point every column at the other group: the values change
    // exactly as scale_other * (code - zero_other).
    q.group_index = {1, 1, 1, 1, 0, 0, 0, 0};
    std::vector<float> d(x.size());
    dequantize(q, as_matrix_view(d.data(), rows, cols));
    for (std::size_t i = 0; i < rows; ++i)
        for (std::size_t j = 0; j < cols; ++j) {
            const std::size_t u = i * 2 + (j < 4 ? 1 : 0);
            REQUIRE(q.unit_of(i, j) == u);
            REQUIRE(d[i * cols + j] == q.scales[u] * (float(q.code(i, j)) - q.zeros[u]));
        }
    q.group_index[3] = 2;
    CHECK_THROWS_AS(dequantize(q, as_matrix_view(d.data(), rows, cols)), spinquant::error);
}

// ---------------------------------------------------------------------------------------------
// Edge cases

TEST_CASE("all-zero rows and groups quantize to zero with the reference's guards", "[quantizer][edge]")
{
    std::vector<float> z(2 * 8, 0.0f);
    for (const quant_spec& spec : {quant_spec::activation(4), quant_spec::activation(4, true),
                                   quant_spec::activation(4, false, 4), quant_spec::weight(4),
                                   quant_spec::weight(4, false), quant_spec::weight(4, true, 4)}) {
        INFO(describe(spec));
        std::vector<quant_params<float>> p(param_count(spec, 2, 8));
        find_params(as_matrix_view(z.data(), 2, 8), spec, std::span(p));
        for (const auto& pk : p) {
            if (!spec.symmetric) {  // (-1, 1) guard
                REQUIRE(pk.scale == 2.0f / float(spec.qmax()));
                REQUIRE(pk.zero == std::nearbyint(1.0f / pk.scale));
            } else if (spec.role == quant_role::activation) {
                REQUIRE(pk.scale == 1.0f);
            } else {
                REQUIRE(pk.scale == 1e-5f / 7.0f);
            }
        }
        auto y = z;
        fake_quantize(as_matrix_view(y.data(), 2, 8), spec);
        for (float v : y) REQUIRE(v == 0.0f);
    }
}

TEST_CASE("constant rows are exact and constant asymmetric groups get a finite scale", "[quantizer][edge]")
{
    for (float c : {0.75f, -3.0f}) {
        std::vector<float> x(16, c);
        for (const quant_spec& base : {quant_spec::activation(4), quant_spec::activation(4, false, 4),
                                       quant_spec::weight(4, false, 4), quant_spec::weight(4, true, 4)})
            for (bool compat : {false, true}) {
                quant_spec spec = base;
                spec.reference_compat = compat;
                INFO(describe(spec) << " c " << c);
                auto y = x;
                fake_quantize(as_matrix_view(y.data(), 2, 8), spec);
                const bool weight_clamp = compat && !spec.symmetric && spec.role == quant_role::weight &&
                                          spec.granularity == granularity::group;
                for (float v : y) {
                    REQUIRE(std::isfinite(v));
                    if (weight_clamp)  // the reference: scale 1e-5/15, zero point ignored, clamped at +-15 steps
                        REQUIRE(v == (c > 0 ? 15.0f : -16.0f) * (1e-5f / 15.0f));
                    else
                        REQUIRE(std::fabs(v - c) <= 1e-6f * std::fabs(c));
                }
                std::vector<quant_params<float>> p(param_count(spec, 2, 8));
                find_params(as_matrix_view(x.data(), 2, 8), spec, std::span(p));
                for (const auto& pk : p) {
                    REQUIRE(pk.scale > 0.0f);
                    if (weight_clamp) {
                        REQUIRE(pk.scale == 1e-5f / 15.0f);  // the reference's clamp and its huge zero point
                        REQUIRE(std::fabs(pk.zero) > 1e4f);
                    } else {
                        REQUIRE(pk.zero >= float(spec.qmin() - 0));
                        REQUIRE(pk.zero <= float(spec.qmax()));
                    }
                }
            }
    }
}

TEST_CASE("a single huge outlier takes the range and zeroes the rest of its row, as the reference does",
          "[quantizer][edge]")
{
    std::vector<float> x(64);
    for (std::size_t j = 0; j < x.size(); ++j) x[j] = 0.01f * float(j % 7) - 0.03f;
    x[10] = 1000.0f;
    auto y = x;
    fake_quantize(y, quant_spec::activation(4, true));
    const float scale = 1000.0f / 7.0f;
    REQUIRE(y[10] == scale * 7.0f);
    for (std::size_t j = 0; j < x.size(); ++j)
        if (j != 10) REQUIRE(y[j] == 0.0f * scale);
    // Groups isolate the outlier: the other groups keep their resolution.
    auto g = x;
    fake_quantize(g, quant_spec::activation(4, false, 16));
    for (std::size_t j = 16; j < 64; ++j) REQUIRE(std::fabs(g[j] - x[j]) <= 0.07f / 15.0f);
}

TEST_CASE("NaN or Inf input is reported with its position and leaves the data untouched", "[quantizer][errors]")
{
    const auto x0 = gaussian<float>(4 * 8, 22);
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
        auto x = x0;
        x[2 * 8 + 5] = bad;
        const auto before = x;
        const auto same = [&](const std::vector<float>& v) {
            return std::memcmp(v.data(), before.data(), v.size() * sizeof(float)) == 0;
        };
        const auto m = as_matrix_view(x.data(), 4, 8);
        try {
            fake_quantize(m, quant_spec::activation(4));
            FAIL("no error");
        } catch (const spinquant::error& e) {
            CHECK(e.code() == errc::non_finite);
            CHECK(std::string(e.what()).find("fake_quantize") != std::string::npos);
            CHECK(std::string(e.what()).find("(2, 5)") != std::string::npos);
        }
        CHECK(same(x));
        std::vector<float> out(x.size(), 7.0f);
        CHECK_THROWS_AS(fake_quantize(m, as_matrix_view(out.data(), 4, 8), quant_spec::weight(4)), spinquant::error);
        CHECK(out == std::vector<float>(x.size(), 7.0f));
        quantized_matrix<float> q;
        CHECK_THROWS_AS(quantize(m, quant_spec::weight(4), q), spinquant::error);
        CHECK(q.codes.empty());
        std::vector<quant_params<float>> p(4);
        CHECK_THROWS_AS(find_params(m, quant_spec::weight(4), std::span(p)), spinquant::error);
        std::vector<float> grad(x.size(), 1.0f);
        CHECK_THROWS_AS(fake_quantize_backward(m, as_matrix_view(grad.data(), 4, 8), quant_spec::weight(4)),
                        spinquant::error);
        CHECK(grad == std::vector<float>(x.size(), 1.0f));
        std::vector<float> row(x.begin() + 16, x.begin() + 24);
        const auto row_before = row;
        CHECK_THROWS_AS(fake_quantize(row, quant_spec::activation(8)), spinquant::error);
        CHECK(std::memcmp(row.data(), row_before.data(), row.size() * sizeof(float)) == 0);

        // Opting out: the other rows are quantized normally, nothing traps, codes stay in range.
        quant_spec unchecked = quant_spec::activation(4);
        unchecked.check_finite = false;
        fake_quantize(m, unchecked);
        quantize(as_matrix_view(before.data(), 4, 8), unchecked, q);
        for (std::size_t i = 0; i < 4; ++i)
            for (std::size_t j = 0; j < 8; ++j) {
                REQUIRE(q.code(i, j) >= unchecked.qmin());
                REQUIRE(q.code(i, j) <= unchecked.qmax());
            }
        const auto ref = test::ref_fake_quantize(std::vector<float>(x0.begin(), x0.begin() + 16), 2, 8, unchecked);
        for (std::size_t e = 0; e < 16; ++e) REQUIRE(x[e] == ref[e]);
    }
}

TEST_CASE("bad specs and shapes are rejected with the function, argument, expected and got", "[quantizer][errors]")
{
    auto x = gaussian<float>(4 * 6, 23);
    const auto before = x;
    const auto m = as_matrix_view(x.data(), 4, 6);
    const auto message = [&](const quant_spec& spec) -> std::pair<errc, std::string> {
        try {
            fake_quantize(m, spec);
        } catch (const spinquant::error& e) {
            return {e.code(), e.what()};
        }
        return {errc::bad_file, "no error"};
    };
    for (int bits : {0, 17, -3}) {
        quant_spec s = quant_spec::weight(4);
        s.bits = bits;
        const auto [code, what] = message(s);
        CHECK(code == errc::bits_out_of_range);
        CHECK(what == "spinquant::fake_quantize: spec.bits is " + std::to_string(bits) + ", expected 1..16");
        CHECK_THROWS_AS(s.validate(), spinquant::error);
    }
    {
        const auto [code, what] = message(quant_spec::weight(1, true));
        CHECK(code == errc::bits_out_of_range);
        CHECK(what.find("symmetric") != std::string::npos);
    }
    {
        quant_spec s = quant_spec::activation(1, false);  // 1-bit asymmetric is fine
        CHECK_NOTHROW(s.validate());
        auto y = before;
        fake_quantize(as_matrix_view(y.data(), 4, 6), s);
        CHECK(y == test::ref_fake_quantize(before, 4, 6, s));
    }
    {
        const auto [code, what] = message(quant_spec::activation(4, false, 4));
        CHECK(code == errc::bad_shape);
        CHECK(what == "spinquant::fake_quantize: m has 6 columns, not a multiple of spec.group_size 4");
    }
    {
        quant_spec s = quant_spec::activation(4);
        s.granularity = granularity::group;
        CHECK(message(s).first == errc::bad_argument);
    }
    for (double clip : {0.0, -0.5, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
        const auto [code, what] = message(quant_spec::activation(4, false, 0, clip));
        CHECK(code == errc::bad_argument);
        CHECK(what.find("clip_ratio") != std::string::npos);
    }
    for (const clip_search_options& o : {clip_search_options{0.0, 100, 0.8}, clip_search_options{2.4, 0, 0.8},
                                         clip_search_options{2.4, 100, 0.0}, clip_search_options{2.4, 100, 1.5}}) {
        quant_spec s = quant_spec::weight(4);
        s.clip_search = o;
        CHECK(message(s).first == errc::bad_argument);
    }
    CHECK(x == before);

    std::vector<float> out(4 * 5);
    try {
        fake_quantize(m, as_matrix_view(out.data(), 4, 5), quant_spec::weight(4));
        FAIL("no error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == errc::bad_shape);
        CHECK(std::string(e.what()) == "spinquant::fake_quantize: out is 4x5, expected 4x6");
    }
    std::vector<quant_params<float>> p(3);
    CHECK_THROWS_AS(find_params(m, quant_spec::weight(4), std::span(p)), spinquant::error);
    std::vector<quant_params<float>> good(4), bad_scale(4), bad_zero(4);
    find_params(m, quant_spec::weight(4), std::span(good));
    bad_scale = good;
    bad_scale[1].scale = 0.0f;
    bad_zero = good;
    bad_zero[2].zero = 0.5f;
    for (const auto& pp : {bad_scale, bad_zero}) {
        try {
            fake_quantize(m, pp, quant_spec::weight(4));
            FAIL("no error");
        } catch (const spinquant::error& e) {
            CHECK(e.code() == errc::bad_argument);
            CHECK(std::string(e.what()).find("params[") != std::string::npos);
        }
    }
    CHECK(x == before);
    fake_quantize(m, good, quant_spec::weight(4));
    CHECK(x == test::ref_fake_quantize(before, 4, 6, quant_spec::weight(4)));
}

template <class M>
concept can_fake_quantize = requires(M&& m, const quant_spec& s) { spinquant::fake_quantize(static_cast<M&&>(m), s); };
template <class In, class Out>
concept can_fake_quantize_into =
    requires(const In& in, Out&& out, const quant_spec& s) { spinquant::fake_quantize(in, static_cast<Out&&>(out), s); };
template <class M>
concept can_quantize = requires(const M& m, const quant_spec& s) { spinquant::quantize(m, s); };

TEST_CASE("only writable matrices and vectors can be fake-quantized in place", "[quantizer][concepts]")
{
    using V = std::vector<float>;
    STATIC_REQUIRE(can_fake_quantize<V&>);
    STATIC_REQUIRE_FALSE(can_fake_quantize<const V&>);
    STATIC_REQUIRE(can_fake_quantize<Eigen::MatrixXf&>);
    STATIC_REQUIRE(can_fake_quantize<matrix_view<double>>);
    STATIC_REQUIRE_FALSE(can_fake_quantize<const Eigen::MatrixXf&>);
    STATIC_REQUIRE_FALSE(can_fake_quantize<matrix_view<const float>>);
    STATIC_REQUIRE_FALSE(can_fake_quantize<Eigen::MatrixXi&>);
    STATIC_REQUIRE(can_quantize<Eigen::MatrixXf>);
    STATIC_REQUIRE(can_fake_quantize_into<Eigen::MatrixXf, Eigen::MatrixXf&>);
    STATIC_REQUIRE_FALSE(can_fake_quantize_into<Eigen::MatrixXf, const Eigen::MatrixXf&>);
    STATIC_REQUIRE_FALSE(can_fake_quantize_into<Eigen::MatrixXf, Eigen::MatrixXd&>);  // no silent conversion
}

// ---------------------------------------------------------------------------------------------
// Straight-through backward

TEST_CASE("the straight-through backward zeroes exactly the gradients of clipped elements", "[quantizer][backward]")
{
    const std::size_t rows = 4, cols = 32;
    auto x = gaussian<double>(rows * cols, 24);
    x[3] = 8.0;  // clipped at clip ratio 0.8
    for (quant_spec spec : {quant_spec::activation(4, false, 0, 0.8), quant_spec::activation(4, true, 8, 0.7),
                            quant_spec::weight(3, true, 0, true), quant_spec::weight(4, false, 16, true)}) {
        INFO(describe(spec));
        std::vector<double> grad(x.size());
        for (std::size_t e = 0; e < grad.size(); ++e) grad[e] = 1.0 + double(e);
        const auto g0 = grad;
        fake_quantize_backward(as_matrix_view(x.data(), rows, cols), as_matrix_view(grad.data(), rows, cols), spec);
        const auto p = test::ref_find_params(x, rows, cols, spec);
        const auto units = test::ref_units(rows, cols, spec);
        std::size_t zeroed = 0;
        for (std::size_t k = 0; k < units.size(); ++k)
            for (auto [i, j] : units[k]) {
                const std::size_t e = i * cols + j;
                const double t = x[e] / p[k].scale + (spec.symmetric ? 0.0 : p[k].zero);
                const bool inside = t >= spec.qmin() - 0.5 && t <= spec.qmax() + 0.5;
                REQUIRE(grad[e] == (inside ? g0[e] : 0.0));
                // Inside means the forward pass changed x by at most half a step (plus rounding).
                if (inside)
                    REQUIRE(std::fabs(fake_quantize_value(x[e], quant_params<double>{p[k].scale, p[k].zero}, spec) -
                                      x[e]) <= p[k].scale * (0.5 + 1e-12));
                zeroed += inside ? 0 : 1;
            }
        CHECK(zeroed > 0);
        CHECK(x[3] == 8.0);
        // The reference's STE passes everything.
        spec.reference_compat = true;
        auto g2 = g0;
        fake_quantize_backward(as_matrix_view(x.data(), rows, cols), as_matrix_view(g2.data(), rows, cols), spec);
        CHECK(g2 == g0);
    }
    std::vector<double> small(3);
    CHECK_THROWS_AS(fake_quantize_backward(as_matrix_view(x.data(), rows, cols), as_matrix_view(small.data(), 1, 3),
                                           quant_spec::weight(4)),
                    spinquant::error);
}

TEST_CASE("the straight-through backward with the forward pass's parameters equals the recomputing one", "[quantizer][backward]")
{
    const std::size_t rows = 6, cols = 32;
    auto x = gaussian<float>(rows * cols, 25);
    x[7] = 9.0f;
    const auto xv = as_matrix_view(std::as_const(x).data(), rows, cols);
    for (const quant_spec& spec : {quant_spec::weight(4, true, 0, true), quant_spec::weight(3, false, 16, true),
                                  quant_spec::activation(4, false, 8, 0.8)}) {
        INFO(describe(spec));
        std::vector<quant_params<float>> p(param_count(spec, rows, cols));
        find_params(xv, spec, std::span<quant_params<float>>(p));  // with the clip search where the spec asks
        std::vector<float> g_recomputed(x.size()), g_given(x.size());
        for (std::size_t e = 0; e < x.size(); ++e) g_recomputed[e] = g_given[e] = 0.5f + float(e);
        fake_quantize_backward(xv, as_matrix_view(g_recomputed.data(), rows, cols), spec);
        fake_quantize_backward(xv, as_matrix_view(g_given.data(), rows, cols), std::span<const quant_params<float>>(p), spec);
        CHECK(g_given == g_recomputed);
        CHECK(std::count(g_given.begin(), g_given.end(), 0.0f) > 0);  // something was clipped
        // Other parameters give another mask: the overload uses the ones it is given.
        auto wide = p;
        for (auto& q : wide) q.scale *= 4.0f;
        auto g_wide = g_given;
        for (std::size_t e = 0; e < x.size(); ++e) g_wide[e] = 0.5f + float(e);
        fake_quantize_backward(xv, as_matrix_view(g_wide.data(), rows, cols), std::span<const quant_params<float>>(wide), spec);
        CHECK(std::count(g_wide.begin(), g_wide.end(), 0.0f) < std::count(g_given.begin(), g_given.end(), 0.0f));
        // Bad parameters are rejected with grad untouched.
        const auto before = g_wide;
        CHECK_THROWS_AS(fake_quantize_backward(xv, as_matrix_view(g_wide.data(), rows, cols),
                                               std::span<const quant_params<float>>(p).first(p.size() - 1), spec),
                        spinquant::error);
        auto bad = p;
        bad[0].scale = 0.0f;
        CHECK_THROWS_AS(fake_quantize_backward(xv, as_matrix_view(g_wide.data(), rows, cols),
                                               std::span<const quant_params<float>>(bad), spec),
                        spinquant::error);
        CHECK(g_wide == before);
    }
}

TEST_CASE("reference_compat reproduces the symmetric-only weight fake_quantize of asymmetric weights (SpinQuant#24)",
          "[quantizer]")
{
    // An all-positive group: its zero point is negative, so ignoring it clamps the upper half away.
    std::vector<float> x(16);
    for (std::size_t j = 0; j < x.size(); ++j) x[j] = 0.5f + 0.03125f * float(j);
    quant_spec spec = quant_spec::weight(4, false, 8);
    auto correct = x;
    fake_quantize(correct, spec);
    spec.reference_compat = true;
    auto compat = x;
    fake_quantize(compat, spec);
    const auto p = test::ref_find_params(x, 1, 16, spec);
    REQUIRE(p[0].zero < 0.0f);
    for (std::size_t j = 0; j < x.size(); ++j) {
        const test::ref_params<float> pj = p[j / 8];
        REQUIRE(compat[j] == test::ref_fake_weight_compat(x[j], pj, spec));
        REQUIRE(compat[j] == fake_quantize_value(x[j], quant_params<float>{pj.scale, pj.zero}, spec));
        REQUIRE(std::fabs(correct[j] - x[j]) <= pj.scale / 2);  // the zero point puts the grid on the data
    }
    CHECK(compat[15] == 15.0f * p[1].scale);  // clamped at 2^b - 1 steps: far below x = 0.97
    CHECK(compat[15] < 0.6f);
    // The codes (quantize) always use the zero point; only the fake values follow the reference.
    const auto q = quantize(as_matrix_view(x.data(), 1, 16), spec);
    std::vector<float> d(16);
    dequantize(q, as_matrix_view(d.data(), 1, 16));
    CHECK(d == correct);
}

TEST_CASE("16 bits is a real 16-bit grid, not a no-op", "[quantizer]")
{
    const auto x = gaussian<float>(256, 25);
    for (bool sym : {false, true}) {
        auto y = x;
        fake_quantize(y, quant_spec::activation(16, sym));
        bool changed = false;
        float max_x = 0;
        for (float v : x) max_x = std::max(max_x, std::fabs(v));
        for (std::size_t j = 0; j < x.size(); ++j) {
            changed = changed || y[j] != x[j];
            REQUIRE(std::fabs(y[j] - x[j]) <= 2.0f * max_x / 32767.0f);
        }
        CHECK(changed);
    }
}
