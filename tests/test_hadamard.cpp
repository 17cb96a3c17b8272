#include "support/allocation_counter.hpp"  // first: replaces operator new for this executable
#include "support/catch.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <spinquant/eigen.hpp>
#include <spinquant/hadamard.hpp>

#include "support/hadamard_reference.hpp"
#include "support/json.hpp"
#include "support/shared_data.hpp"


namespace {

using spinquant::errc;
using spinquant::hadamard_matrix;
using spinquant::hadamard_normaliser;
using spinquant::hadamard_options;
using spinquant::hadamard_plan;
using spinquant::hadamard_source;
using spinquant::test::dense_hadamard;
using spinquant::test::random_vector;

/// The dense reference of a plan: its K, its H_K (checked to be Hadamard separately) and signs.
template <class T, class Arch>
dense_hadamard reference_of(const hadamard_plan<T, Arch>& plan, double divisor)
{
    dense_hadamard d;
    d.n = plan.size();
    d.k = plan.order();
    d.hk.assign(plan.order_matrix().begin(), plan.order_matrix().end());
    for (const T s : plan.signs()) d.signs.push_back(static_cast<double>(s));
    d.divisor = divisor;
    return d;
}

/// True when `text` contains `part` (Catch2 v2 and v3 name their string matcher differently).
bool contains(const char* text, const std::string& part) { return std::string(text).find(part) != std::string::npos; }

double exact_divisor(std::size_t n) { return std::sqrt(static_cast<double>(n)); }

template <class T>
double sum_abs(const std::vector<T>& x)
{
    double s = 0;
    for (const T v : x) s += std::abs(static_cast<double>(v));
    return s;
}

/// Outputs checked against the dense reference: all of them up to `full` elements, else
/// `samples` spread over the vector (first, last, and evenly in between).
std::vector<std::size_t> checked_outputs(std::size_t n, std::size_t full = 2048, std::size_t samples = 24)
{
    std::vector<std::size_t> idx;
    if (n <= full) {
        for (std::size_t i = 0; i < n; ++i) idx.push_back(i);
    } else {
        for (std::size_t s = 0; s < samples; ++s) idx.push_back(s * (n - 1) / (samples - 1));
    }
    return idx;
}

/// Applies `plan` (forward or inverse) to x and compares with the dense reference.
template <class T, class Arch>
void check_plan_against_dense(const hadamard_plan<T, Arch>& plan, bool inverse, std::uint64_t seed,
                              std::size_t full = 2048)
{
    const std::size_t n = plan.size();
    const auto x = random_vector<T>(n, seed);
    const dense_hadamard ref = reference_of(plan, exact_divisor(n));
    auto y = x;
    if (inverse)
        plan.apply_inverse(y);
    else
        plan.apply(y);
    const double tol = spinquant::test::transform_tolerance<T>(sum_abs(x), ref.divisor,
                                                               spinquant::test::transform_depth(n, plan.order()));
    for (const std::size_t i : checked_outputs(n, full)) {
        INFO("n = " << n << ", K = " << plan.order() << ", output " << i << (inverse ? ", inverse" : ""));
        REQUIRE_THAT(static_cast<double>(y[i]),
                     Catch::Matchers::WithinAbs(ref.output(std::span<const T>(x), i, inverse), tol));
    }
}

/// Exact integer check H H^T = K I of a plan's K x K matrix.
bool is_hadamard(std::span<const std::int8_t> h, std::size_t k)
{
    for (std::size_t i = 0; i < k; ++i)
        for (std::size_t j = i; j < k; ++j) {
            long dot = 0;
            for (std::size_t c = 0; c < k; ++c) dot += h[i * k + c] * h[j * k + c];
            if (dot != (i == j ? static_cast<long>(k) : 0)) return false;
        }
    return true;
}

/// A matrix of random rows stored at offset + r * row_stride + c * col_stride of a buffer whose
/// other elements hold a sentinel; apply_rows (or apply_inverse_rows) on it is compared row by row
/// with the dense reference `dense` (the plan's operator from reference_of, n x n row-major), and
/// everything outside the matrix must stay as it was.
template <class T, class Arch>
void check_rows_against_dense(const hadamard_plan<T, Arch>& plan, const std::vector<double>& dense,
                              std::size_t rows, std::size_t row_stride, std::size_t col_stride, std::size_t offset,
                              bool inverse, std::uint64_t seed)
{
    const std::size_t n = plan.size();
    INFO("n = " << n << " (K = " << plan.order() << "), " << rows << " rows, strides " << row_stride << " and "
                << col_stride << ", offset " << offset << (inverse ? ", inverse" : "")
                << (plan.signs().empty() ? "" : ", signs"));
    const std::size_t extent = rows == 0 ? 0 : offset + (rows - 1) * row_stride + (n - 1) * col_stride + 1;
    std::vector<T> buffer(extent + 3, T(7));
    std::vector<std::vector<T>> x(rows);
    for (std::size_t r = 0; r < rows; ++r) {
        x[r] = random_vector<T>(n, seed + r);
        for (std::size_t c = 0; c < n; ++c) buffer[offset + r * row_stride + c * col_stride] = x[r][c];
    }
    std::vector<bool> inside(buffer.size(), false);
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < n; ++c) inside[offset + r * row_stride + c * col_stride] = true;
    const spinquant::matrix_view<T> view{buffer.data() + offset, rows, n, row_stride, col_stride};
    if (inverse)
        plan.apply_inverse_rows(view);
    else
        plan.apply_rows(view);
    const double depth = spinquant::test::transform_depth(n, plan.order());
    for (std::size_t r = 0; r < rows; ++r) {
        const double tol = spinquant::test::transform_tolerance<T>(sum_abs(x[r]), exact_divisor(n), depth);
        for (std::size_t i = 0; i < n; ++i) {
            const double got = static_cast<double>(buffer[offset + r * row_stride + i * col_stride]);
            double expected = 0;
            for (std::size_t j = 0; j < n; ++j)
                expected += dense[inverse ? j * n + i : i * n + j] * static_cast<double>(x[r][j]);
            if (std::abs(got - expected) > tol)  // one assertion per matrix below, not one per element
                FAIL("row " << r << ", output " << i << ": " << got << ", expected " << expected << " +- " << tol);
        }
    }
    for (std::size_t e = 0; e < buffer.size(); ++e)
        if (!inside[e] && buffer[e] != T(7)) FAIL("element " << e << " outside the matrix was written");
    SUCCEED();
}

/// Row counts around the tile kernel's widths: 1, L - 1, L, L + 1 (L lanes of Arch), then 37
/// and 256 (`more`: 1 for 37, 2 for both).
template <class T, class Arch>
std::vector<std::size_t> row_counts(int more)
{
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    // Built without insert/erase: GCC 12 at -O2 reports a false "potential null pointer
    // dereference" inside vector::insert here.
    std::vector<std::size_t> counts{1};
    for (const std::size_t c : {lanes - 1, lanes, lanes + 1})
        if (c != 1) counts.push_back(c);  // L = 2: 1 once
    if (more >= 1) counts.push_back(37);
    if (more >= 2) counts.push_back(256);
    return counts;
}

/// apply_rows / apply_inverse_rows in every layout: packed, padded and misaligned, column-major,
/// and with a column stride; forward and inverse, with and without signs. Fewer and shorter
/// matrices for the larger sizes and the other layouts (the reference is O(n^2) per row).
template <class T, class Arch>
void check_rows_every_layout(std::size_t n, std::uint64_t seed, bool long_matrices = true)
{
    for (const bool signs : {false, true}) {
        hadamard_options o;
        o.random_signs = signs;
        o.seed = seed;
        const hadamard_plan<T, Arch> plan(n, o);
        const dense_hadamard ref = reference_of(plan, exact_divisor(n));
        std::vector<double> dense(n * n);
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t j = 0; j < n; ++j) dense[i * n + j] = ref.entry(i, j, false);
        const bool small = long_matrices && n <= 172;
        for (const bool inverse : {false, true}) {
            const std::uint64_t s = seed + (inverse ? 1000 : 0);
            for (const std::size_t rows : row_counts<T, Arch>(small ? 2 : 1))
                check_rows_against_dense(plan, dense, rows, n, 1, 0, inverse, s + rows);  // packed
            for (const std::size_t rows : row_counts<T, Arch>(small ? 1 : 0)) {
                check_rows_against_dense(plan, dense, rows, n + 3, 1, 1, inverse, s + rows);      // padded, misaligned
                check_rows_against_dense(plan, dense, rows, 1, rows, 0, inverse, s + rows);       // column-major
                check_rows_against_dense(plan, dense, rows, 2 * n + 1, 2, 1, inverse, s + rows);  // every other column
            }
        }
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// fwht

TEMPLATE_TEST_CASE("fwht matches the dense orthonormal Sylvester matrix for every power of two up to 2^14",
                   "[hadamard]", float, double)
{
    for (std::size_t n = 1; n <= (std::size_t{1} << 14); n *= 2) {
        auto x = random_vector<TestType>(n, n);
        const auto original = x;
        spinquant::fwht(x);
        const double tol = spinquant::test::transform_tolerance<TestType>(sum_abs(original), exact_divisor(n),
                                                                          std::log2(static_cast<double>(n)));
        for (const std::size_t i : checked_outputs(n, 1024, 40)) {
            double expected = 0;
            for (std::size_t j = 0; j < n; ++j)
                expected += spinquant::test::sylvester_entry(i, j) * static_cast<double>(original[j]);
            expected /= exact_divisor(n);
            INFO("n = " << n << ", output " << i);
            REQUIRE_THAT(static_cast<double>(x[i]), Catch::Matchers::WithinAbs(expected, tol));
        }
    }
}

TEST_CASE("the factorised power-of-two reference equals the dense one, with and without signs, both ways",
          "[hadamard][reference]")
{
    // dense_hadamard::apply_pow2 checks every output of the long rows; here it is checked itself
    // against the entry-by-entry product, for odd and even log2(n).
    for (std::size_t n = 1; n <= 512; n *= 2)
        for (const bool with_signs : {false, true})
            for (const bool inverse : {false, true}) {
                INFO("n = " << n << (with_signs ? ", signs" : "") << (inverse ? ", inverse" : ""));
                const auto x = random_vector<double>(n, n);
                dense_hadamard d;
                d.n = n;
                d.divisor = exact_divisor(n);
                if (with_signs) {
                    const auto r = random_vector<double>(n, n + 1);
                    for (const double v : r) d.signs.push_back(v < 0 ? -1.0 : 1.0);
                }
                const auto want = d.apply(std::span<const double>(x), inverse);
                const auto got = d.apply_pow2(std::span<const double>(x), inverse);
                for (std::size_t i = 0; i < n; ++i) REQUIRE_THAT(got[i], Catch::Matchers::WithinAbs(want[i], 1e-12));
            }
}

TEMPLATE_TEST_CASE("fwht is an involution and preserves the norm", "[hadamard]", float, double)
{
    const std::size_t n = GENERATE(as<std::size_t>{}, 2, 64, 4096, 65536);
    auto x = random_vector<TestType>(n, 7);
    const auto original = x;
    spinquant::fwht(x);
    double before = 0, after = 0;
    for (std::size_t i = 0; i < n; ++i) {
        before += static_cast<double>(original[i]) * static_cast<double>(original[i]);
        after += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    }
    const double eps = static_cast<double>(std::numeric_limits<TestType>::epsilon());
    CHECK_THAT(after, Catch::Matchers::WithinRel(before, 4 * eps * std::log2(2.0 * static_cast<double>(n))));
    spinquant::fwht(x);
    const double tol = spinquant::test::transform_tolerance<TestType>(sum_abs(original), 1.0,
                                                                      2 * std::log2(static_cast<double>(n)));
    for (std::size_t i = 0; i < n; ++i) REQUIRE_THAT(static_cast<double>(x[i]), Catch::Matchers::WithinAbs(static_cast<double>(original[i]), tol));
}

TEST_CASE("fwht rejects a length that is not a power of two and leaves the data alone", "[hadamard][errors]")
{
    // Around the SIMD widths (4, 8, 16 lanes) and the other usual suspects.
    const std::size_t n = GENERATE(as<std::size_t>{}, 0, 3, 7, 9, 12, 15, 17, 31, 33, 4095, 11008);
    auto x = random_vector<float>(n, 1);
    const auto before = x;
    try {
        spinquant::fwht(x);
        FAIL("no error for length " << n);
    } catch (const spinquant::error& e) {
        CHECK(e.code() == errc::unsupported_size);
        CHECK(contains(e.what(), "spinquant::fwht"));
        CHECK(contains(e.what(), "length " + std::to_string(n)));
    }
    CHECK(x == before);
}

TEST_CASE("fwht works on misaligned data and on spans into larger buffers", "[hadamard]")
{
    const std::size_t n = 1024;
    std::vector<float> buffer = random_vector<float>(n + 2, 3);
    const auto original = buffer;
    std::span<float> middle(buffer.data() + 1, n);  // starts 4 bytes past an allocation boundary
    spinquant::fwht(middle);
    CHECK(buffer.front() == original.front());
    CHECK(buffer.back() == original.back());
    std::vector<float> aligned(original.begin() + 1, original.end() - 1);
    spinquant::fwht(aligned);
    for (std::size_t i = 0; i < n; ++i) REQUIRE(middle[i] == aligned[i]);  // same arithmetic, same bits
}

TEST_CASE("hadamard_plan works on misaligned data with the same results as on aligned data", "[hadamard]")
{
    for (const std::size_t n : std::vector<std::size_t>{14336, 11008, 96, 4096}) {
        INFO("n = " << n);
        const hadamard_plan<float> plan(n);
        std::vector<float> buffer = random_vector<float>(n + 2, n);
        const auto original = buffer;
        const std::span<float> middle(buffer.data() + 1, n);
        plan.apply(middle);
        CHECK(buffer.front() == original.front());
        CHECK(buffer.back() == original.back());
        std::vector<float> aligned(original.begin() + 1, original.end() - 1);
        plan.apply(aligned);
        for (std::size_t i = 0; i < n; ++i) REQUIRE(middle[i] == aligned[i]);  // same arithmetic, same bits
    }
}

// ---------------------------------------------------------------------------------------------
// hadamard_plan: sizes, K, coverage

TEST_CASE("hadamard_plan picks the cheapest K, and the reference's K with hadamard_source::reference",
          "[hadamard]")
{
    CHECK(hadamard_plan<float>(4096).order() == 1);
    CHECK(hadamard_plan<float>(1).order() == 1);
    CHECK(hadamard_plan<float>(160).order() == 20);  // 20 * 8; the reference uses 40 * 4
    hadamard_options ref;
    ref.source = hadamard_source::reference;
    CHECK(hadamard_plan<float>(160, ref).order() == 40);
    CHECK(hadamard_plan<float>(11008).order() == 172);
    CHECK(hadamard_plan<float>(11008).pow2_length() == 64);
    CHECK(hadamard_plan<float>(14336).order() == 28);
    CHECK(hadamard_plan<float>(18944).order() == 148);
    CHECK(hadamard_plan<float>(4864).order() == 76);
    CHECK(hadamard_plan<float>(29568).order() == 924);
    CHECK(hadamard_plan<float>(25600).order() == 100);
    CHECK(hadamard_plan<float>(10944).order() == 684);
    CHECK(hadamard_plan<float>(4544).order() == 284);
    // The cheapest K is the smallest order with n / K a power of two that has a matrix.
    for (std::size_t n = 4; n <= 1024; n += 4) {
        if (!spinquant::has_hadamard(n)) continue;
        const std::size_t k = hadamard_plan<double>(n).order();
        INFO("n = " << n);
        REQUIRE(n % k == 0);
        REQUIRE(std::has_single_bit(n / k));
        for (std::size_t smaller = k; smaller % 2 == 0;) {
            smaller /= 2;
            if (smaller == 1)
                REQUIRE_FALSE(std::has_single_bit(n));
            else
                REQUIRE_FALSE(spinquant::detail::hadamard_order_known(smaller));
        }
    }
}

TEST_CASE("every K a plan uses up to 256, and K = 284, is a Hadamard matrix (exact integer H H^T = K I)",
          "[hadamard]")
{
    // The construction of every order is tested exhaustively with the matrices themselves; this
    // checks that plans hold such matrices. Larger K (684, 924) are covered by the norm tests.
    std::vector<std::size_t> orders;
    for (std::size_t k = 4; k <= 256; k += 4) orders.push_back(k);
    orders.push_back(284);
    std::size_t checked = 0;
    for (const std::size_t n : orders) {
        if (!spinquant::has_hadamard(n)) continue;
        const hadamard_plan<float> plan(n);
        const std::size_t k = plan.order();
        if (k != n) continue;  // n = K' 2^j for a smaller K', checked on its own
        INFO("K = " << k);
        REQUIRE(plan.order_matrix().size() == k * k);
        REQUIRE(is_hadamard(plan.order_matrix(), k));
        ++checked;
    }
    CHECK(checked >= 30);
}

// Every hidden (d), intermediate/FFN (f) and head (h) dimension of the listed model families.
// LLaMA-2 7B d4096 f11008 h128, 13B d5120 f13824, 70B d8192 f28672; LLaMA-3/3.1 8B d4096 f14336,
// 70B d8192 f28672, 405B d16384 f53248; LLaMA-3.2 1B d2048 f8192 h64, 3B d3072 f8192 h128;
// Mistral 7B d4096 f14336; Mixtral 8x7B d4096 f14336, 8x22B d6144 f16384; Qwen2 0.5B d896 f4864
// h64, 1.5B d1536 f8960, 7B d3584 f18944, 72B d8192 f29568; Qwen2.5 3B d2048 f11008, 14B d5120
// f13824, 32B d5120 f27648 (others as Qwen2); Qwen3 0.6B d1024 f3072, 1.7B d2048 f6144, 4B d2560
// f9728, 8B d4096 f12288, 14B d5120 f17408, 32B d5120 f25600; Gemma-2 2B d2304 f9216 h256, 9B
// d3584 f14336, 27B d4608 f36864 h128; Gemma-3 1B d1152 f6912, 4B d2560 f10240, 12B d3840 f15360,
// 27B d5376 f21504; Phi-3 mini d3072 f8192 h96, small d4096 f14336, medium d5120 f17920; Phi-4
// d5120 f17920 h128; TinyLlama d2048 f5632 h64; SmolLM2 135M d576 f1536 h64, 360M d960 f2560,
// 1.7B d2048 f8192; Falcon 7B d4544 f18176 h64, 40B d8192 f32768; DeepSeek-V2-Lite d2048 f10944,
// MoE f1408, heads 128 + 64 (rope) = 192, kv_lora 512.
const std::vector<std::size_t> llm_dimensions{
    64,    96,    128,   192,   256,   512,   576,   896,   960,   1024,  1152,  1408,  1536,  2048,
    2304,  2560,  3072,  3584,  3840,  4096,  4544,  4608,  4864,  5120,  5376,  5632,  6144,  6912,
    8192,  8960,  9216,  9728,  10240, 10944, 11008, 12288, 13824, 14336, 15360, 16384, 17408, 17920,
    18176, 18944, 21504, 25600, 27648, 28672, 29568, 32768, 36864, 53248};

TEST_CASE("every LLM dimension is supported and transforms like the dense double product", "[hadamard][llm]")
{
    for (const std::size_t n : llm_dimensions) {
        INFO("n = " << n);
        REQUIRE(spinquant::has_hadamard(n));
        const hadamard_plan<double> plan(n);
        check_plan_against_dense(plan, false, n, 256);
        check_plan_against_dense(plan, true, n + 1, 256);
    }
}

TEST_CASE("float plans for the LLM dimensions match the dense double product", "[hadamard][llm]")
{
    for (const std::size_t n : llm_dimensions) {
        INFO("n = " << n);
        check_plan_against_dense(hadamard_plan<float>(n), false, n, 128);
    }
}

TEST_CASE("the reference supports none of the six dimensions beyond it, the library all of them", "[hadamard][llm]")
{
    for (const std::size_t n : std::vector<std::size_t>{18944, 4864, 29568, 25600, 10944, 4544}) {
        CHECK(spinquant::has_hadamard(n));
        CHECK_FALSE(spinquant::has_hadamard(n, hadamard_source::reference));
    }
    CHECK(spinquant::has_hadamard(11008, hadamard_source::reference));
    CHECK(spinquant::has_hadamard(14336, hadamard_source::reference));
}

// ---------------------------------------------------------------------------------------------
// hadamard_plan: properties

TEMPLATE_TEST_CASE("hadamard_plan matches the dense reference around the SIMD widths, with and without signs",
                   "[hadamard]", float, double)
{
    // m = n / K from 1 to 64 takes the scalar column mix (m below a register), one-register
    // and two-register strips; K = 1 the plain FWHT.
    const std::size_t k = GENERATE(as<std::size_t>{}, 1, 12, 20, 28, 76);
    const std::size_t m = GENERATE(as<std::size_t>{}, 1, 2, 4, 8, 16, 32, 64);
    const bool signs = GENERATE(false, true);
    hadamard_options o;
    o.random_signs = signs;
    o.seed = 11;
    const hadamard_plan<TestType> plan(k * m, o);
    REQUIRE(plan.order() == k);
    check_plan_against_dense(plan, false, 5);
    check_plan_against_dense(plan, true, 6);
}

TEMPLATE_TEST_CASE("apply_inverse undoes apply, and both preserve the norm", "[hadamard]", float, double)
{
    const std::size_t n = GENERATE(as<std::size_t>{}, 8, 48, 1024, 11008, 14336, 10944, 29568);
    const bool signs = GENERATE(false, true);
    hadamard_options o;
    o.random_signs = signs;
    o.seed = 3;
    const hadamard_plan<TestType> plan(n, o);
    const auto x = random_vector<TestType>(n, 9);
    auto y = x;
    plan.apply(y);
    double nx = 0, ny = 0;
    for (std::size_t i = 0; i < n; ++i) {
        nx += static_cast<double>(x[i]) * static_cast<double>(x[i]);
        ny += static_cast<double>(y[i]) * static_cast<double>(y[i]);
    }
    const double depth = spinquant::test::transform_depth(n, plan.order());
    const double eps = static_cast<double>(std::numeric_limits<TestType>::epsilon());
    CHECK_THAT(ny, Catch::Matchers::WithinRel(nx, 4 * eps * (depth + 2)));
    plan.apply_inverse(y);
    const double tol = 2 * spinquant::test::transform_tolerance<TestType>(sum_abs(x), 1.0, depth);
    for (std::size_t i = 0; i < n; ++i) REQUIRE_THAT(static_cast<double>(y[i]), Catch::Matchers::WithinAbs(static_cast<double>(x[i]), tol));
}

TEST_CASE("without signs a power-of-two plan is its own inverse and equals fwht", "[hadamard]")
{
    const hadamard_plan<float> plan(2048);
    auto x = random_vector<float>(2048, 4);
    auto y = x, z = x;
    plan.apply(y);
    plan.apply_inverse(z);
    spinquant::fwht(x);
    CHECK(y == z);
    CHECK(y == x);
}

TEST_CASE("random signs are detail::random_sign draws from mt19937_64(seed), reproducible and seed dependent",
          "[hadamard]")
{
    hadamard_options o;
    o.random_signs = true;
    o.seed = 1234;
    const hadamard_plan<double> a(448, o), b(448, o);
    REQUIRE(a.signs().size() == 448);
    CHECK(std::equal(a.signs().begin(), a.signs().end(), b.signs().begin()));
    std::mt19937_64 engine(1234);
    for (const double s : a.signs()) REQUIRE(s == ((engine() >> 63) != 0 ? -1.0 : 1.0));  // independent re-derivation
    o.seed = 1235;
    const hadamard_plan<double> c(448, o);
    CHECK_FALSE(std::equal(a.signs().begin(), a.signs().end(), c.signs().begin()));
    CHECK(hadamard_plan<double>(448).signs().empty());
}

TEST_CASE("explicit signs give x -> H diag(s) x / d, and matrix() is that operator", "[hadamard]")
{
    const std::size_t n = 24;
    std::vector<double> s(n);
    for (std::size_t i = 0; i < n; ++i) s[i] = (i * 7 + 3) % 5 < 2 ? -1.0 : 1.0;
    const hadamard_plan<double> plan(n, s);
    const std::vector<double> m = plan.matrix();
    const dense_hadamard ref = reference_of(plan, exact_divisor(n));
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t j = 0; j < n; ++j) REQUIRE_THAT(m[i * n + j], Catch::Matchers::WithinAbs(ref.entry(i, j, false), 1e-15));
    // M x == apply(x), and M is orthogonal.
    const auto x = random_vector<double>(n, 2);
    auto y = x;
    plan.apply(y);
    for (std::size_t i = 0; i < n; ++i) {
        double mx = 0;
        for (std::size_t j = 0; j < n; ++j) mx += m[i * n + j] * x[j];
        REQUIRE_THAT(y[i], Catch::Matchers::WithinAbs(mx, 1e-14));
    }
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t j = 0; j < n; ++j) {
            double dot = 0;
            for (std::size_t c = 0; c < n; ++c) dot += m[i * n + c] * m[j * n + c];
            REQUIRE_THAT(dot, Catch::Matchers::WithinAbs(i == j ? 1.0 : 0.0, 1e-14));
        }
    CHECK(hadamard_matrix<double>(n) == hadamard_plan<double>(n).matrix());
}

TEST_CASE("matrix() of a size whose n^2 elements no vector holds is refused, not wrapped around", "[hadamard]")
{
    // A supported transform length (K = 1) whose plan costs nothing to build, but n * n wraps to 0
    // in size_t: 2^32 on 64-bit targets, 2^16 on 32-bit ones.
    const std::size_t n = std::size_t{1} << (sizeof(std::size_t) >= 8 ? 32 : 16);
    REQUIRE(spinquant::has_hadamard(n));
    const hadamard_plan<float> plan(n);
    try {
        (void)plan.matrix();
        FAIL("no error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == errc::unsupported_size);
        CHECK(contains(e.what(), "hadamard_plan::matrix"));
        CHECK(contains(e.what(), "n = " + std::to_string(n)));
    }
    CHECK_THROWS_AS(hadamard_matrix<double>(n), spinquant::error);
}

TEST_CASE("the reference normaliser divides by float32(sqrt(n)), the exact one by sqrt(n)", "[hadamard]")
{
    hadamard_options ref;
    ref.normaliser = hadamard_normaliser::reference;
    CHECK(hadamard_plan<double>(8, ref).scale() == 1.0 / 2.8284270763397217);  // torch.tensor(8).sqrt()
    CHECK(hadamard_plan<double>(8).scale() == 1.0 / std::sqrt(8.0));
    CHECK(hadamard_plan<double>(16, ref).scale() == 0.25);
    CHECK(hadamard_plan<float>(8, ref).scale() == static_cast<float>(1.0 / static_cast<double>(std::sqrt(8.0f))));
}

TEST_CASE("the workspace overloads give the same result and reject a short workspace with the data untouched",
          "[hadamard][errors]")
{
    for (const std::size_t n : std::vector<std::size_t>{11008, 29568, 48}) {
        const hadamard_plan<float> plan(n);
        auto x = random_vector<float>(n, 8);
        auto y = x;
        std::vector<float> work(plan.workspace_size());
        plan.apply(x);
        plan.apply(y, work);
        const double tol = spinquant::test::transform_tolerance<float>(
            static_cast<double>(n), exact_divisor(n), 2 * spinquant::test::transform_depth(n, plan.order()));
        for (std::size_t i = 0; i < n; ++i) REQUIRE_THAT(static_cast<double>(y[i]), Catch::Matchers::WithinAbs(static_cast<double>(x[i]), tol));
        if (plan.workspace_size() > 0) {
            std::vector<float> short_work(plan.workspace_size() - 1);
            const auto before = y;
            CHECK_THROWS_AS(plan.apply(y, short_work), spinquant::error);
            CHECK(y == before);
        }
    }
    CHECK(hadamard_plan<float>(4096).workspace_size() == 0);
}

// ---------------------------------------------------------------------------------------------
// Rows, layouts, threads, allocation

TEMPLATE_TEST_CASE("apply_rows transforms every row of padded, column-major and Eigen matrices",
                   "[hadamard]", float, double)
{
    const std::size_t n = GENERATE(as<std::size_t>{}, 64, 96, 688);
    const std::size_t rows = 5;
    const hadamard_plan<TestType> plan(n);
    std::vector<std::vector<TestType>> expected(rows), inverse(rows);
    for (std::size_t r = 0; r < rows; ++r) {
        expected[r] = random_vector<TestType>(n, 100 + r);
        inverse[r] = expected[r];
    }
    // Padded row-major storage: row_stride > cols; the padding must stay untouched.
    const std::size_t stride = n + 3;
    std::vector<TestType> padded(rows * stride, TestType(7));
    for (std::size_t r = 0; r < rows; ++r) std::copy(expected[r].begin(), expected[r].end(), padded.begin() + static_cast<std::ptrdiff_t>(r * stride));
    // Column-major storage of the same matrix (the strided path).
    std::vector<TestType> colmajor(rows * n);
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < n; ++c) colmajor[c * rows + r] = expected[r][c];
    Eigen::Matrix<TestType, Eigen::Dynamic, Eigen::Dynamic> eig(static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(n));
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < n; ++c) eig(static_cast<Eigen::Index>(r), static_cast<Eigen::Index>(c)) = expected[r][c];

    for (std::size_t r = 0; r < rows; ++r) {
        plan.apply(expected[r]);
        plan.apply_inverse(inverse[r]);
    }
    const spinquant::matrix_view<TestType> padded_view{padded.data(), rows, n, stride, 1};
    plan.apply_rows(padded_view);
    const spinquant::matrix_view<TestType> col_view{colmajor.data(), rows, n, 1, rows};
    plan.apply_rows(col_view);
    plan.apply_rows(eig);

    const double tol = spinquant::test::transform_tolerance<TestType>(static_cast<double>(n), exact_divisor(n),
                                                                      2 * spinquant::test::transform_depth(n, plan.order()));
    for (std::size_t r = 0; r < rows; ++r) {
        for (std::size_t c = 0; c < n; ++c) {
            REQUIRE(padded[r * stride + c] == expected[r][c]);  // same kernel, same bits
            REQUIRE_THAT(static_cast<double>(colmajor[c * rows + r]), Catch::Matchers::WithinAbs(static_cast<double>(expected[r][c]), tol));
            REQUIRE_THAT(static_cast<double>(eig(static_cast<Eigen::Index>(r), static_cast<Eigen::Index>(c))),
                         Catch::Matchers::WithinAbs(static_cast<double>(expected[r][c]), tol));
        }
        for (std::size_t c = n; c < stride; ++c) REQUIRE(padded[r * stride + c] == TestType(7));
    }
    // apply_inverse_rows on column-major storage is apply_inverse on every row.
    std::vector<TestType> back(rows * n);
    for (std::size_t r = 0; r < rows; ++r) {
        const auto original = random_vector<TestType>(n, 100 + r);
        for (std::size_t c = 0; c < n; ++c) back[c * rows + r] = original[c];
    }
    plan.apply_inverse_rows(spinquant::matrix_view<TestType>{back.data(), rows, n, 1, rows});
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < n; ++c)
            REQUIRE_THAT(static_cast<double>(back[c * rows + r]), Catch::Matchers::WithinAbs(static_cast<double>(inverse[r][c]), tol));
}

TEMPLATE_TEST_CASE("apply_rows on power-of-two rows (one kernel call for all the rows) matches the dense reference in "
                   "every layout",
                   "[hadamard][rows]", float, double)
{
    // From one register to a leaf pair and past it (K = 1, n >= L: the kernel's own row loop for
    // row-major views, with the multipliers chosen once, and packed rows of at most one leaf
    // without signs as one leaf pass over all of them; the strided path for the other views).
    const std::size_t n = GENERATE(as<std::size_t>{}, 16, 32, 64, 256, 512, 1024);
    check_rows_every_layout<TestType, xsimd::default_arch>(n, 7 * n);
}

TEMPLATE_TEST_CASE("apply_rows on short rows (m below a register) matches the dense reference in every layout",
                   "[hadamard][rows]", float, double)
{
    // K m with m = 1 to 8 (the tile kernel wherever m is below the register width, the strip
    // kernel elsewhere), the R4 sizes 172 m, and K = 1 rows shorter than a register.
    const std::size_t n = GENERATE(as<std::size_t>{}, 1, 2, 4, 8, 12, 24, 48, 96, 20, 40, 80, 160, 28, 56, 112, 224,
                                   156, 172, 344, 688);
    check_rows_every_layout<TestType, xsimd::default_arch>(n, n);
}

TEMPLATE_TEST_CASE("short rows: apply is apply_rows on one row, the workspace overloads agree, and the inverse undoes",
                   "[hadamard][rows]", float, double)
{
    const std::size_t n = GENERATE(as<std::size_t>{}, 12, 48, 172, 688);
    hadamard_options o;
    o.random_signs = true;
    o.seed = 4;
    const hadamard_plan<TestType> plan(n, o);
    const std::size_t rows = 37;
    const auto x = random_vector<TestType>(rows * n, 12);
    auto by_rows = x, by_rows_work = x, one_row = x, by_vector = x, by_vector_work = x, inverse = x, inverse_work = x;
    std::vector<TestType> work(plan.workspace_size());
    plan.apply_rows(spinquant::as_matrix_view(by_rows.data(), rows, n));
    plan.apply_rows(spinquant::as_matrix_view(by_rows_work.data(), rows, n), work);
    plan.apply_inverse_rows(spinquant::as_matrix_view(inverse.data(), rows, n));
    plan.apply_inverse_rows(spinquant::as_matrix_view(inverse_work.data(), rows, n), work);
    for (std::size_t r = 0; r < rows; ++r) {
        plan.apply_rows(spinquant::as_matrix_view(one_row.data() + r * n, 1, n));
        plan.apply(std::span<TestType>(by_vector.data() + r * n, n));
        plan.apply(std::span<TestType>(by_vector_work.data() + r * n, n), work);
    }
    // One row is one vector, the workspace changes nothing: the same kernels, the same bits.
    CHECK(one_row == by_vector);
    CHECK(by_vector == by_vector_work);
    CHECK(by_rows == by_rows_work);
    CHECK(inverse == inverse_work);
    // Many rows (a block kernel) and one vector at a time (for m = 1 another kernel) agree to rounding.
    const double depth = spinquant::test::transform_depth(n, plan.order());
    const double tol = 2 * spinquant::test::transform_tolerance<TestType>(static_cast<double>(n), exact_divisor(n), depth);
    for (std::size_t i = 0; i < x.size(); ++i)
        REQUIRE_THAT(static_cast<double>(by_rows[i]),
                     Catch::Matchers::WithinAbs(static_cast<double>(by_vector[i]), tol));
    // And back.
    plan.apply_inverse_rows(spinquant::as_matrix_view(by_rows.data(), rows, n));
    const double back = 2 * spinquant::test::transform_tolerance<TestType>(static_cast<double>(n), 1.0, depth);
    for (std::size_t i = 0; i < x.size(); ++i)
        REQUIRE_THAT(static_cast<double>(by_rows[i]), Catch::Matchers::WithinAbs(static_cast<double>(x[i]), back));
    CHECK(plan.workspace_size() > 0);
}

TEMPLATE_TEST_CASE("single short vectors (m = 1: scalar sign tables) match the dense reference", "[hadamard][rows]",
                   float, double)
{
    for (const std::size_t n : std::vector<std::size_t>{12, 20, 28, 36, 44, 52, 60, 76, 108, 140, 156, 172, 284, 444}) {
        for (const bool signs : {false, true}) {
            hadamard_options o;
            o.random_signs = signs;
            o.seed = n;
            const hadamard_plan<TestType> plan(n, o);
            REQUIRE(plan.pow2_length() == 1);
            check_plan_against_dense(plan, false, n);
            check_plan_against_dense(plan, true, n + 1);
        }
    }
}

TEST_CASE("apply_rows and apply reject a wrong size with the data untouched", "[hadamard][errors]")
{
    const hadamard_plan<float> plan(48);
    std::vector<float> x = random_vector<float>(47, 1);
    const auto before = x;
    try {
        plan.apply(x);
        FAIL("no error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == errc::bad_shape);
        CHECK(contains(e.what(), "hadamard_plan::apply"));
        CHECK(contains(e.what(), "47 elements, expected 48"));
    }
    CHECK(x == before);
    std::vector<float> m = random_vector<float>(3 * 40, 2);
    const auto m_before = m;
    try {
        plan.apply_rows(spinquant::as_matrix_view(m.data(), 3, 40));
        FAIL("no error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == errc::bad_shape);
        CHECK(contains(e.what(), "hadamard_plan::apply_rows"));
        CHECK(contains(e.what(), "3x40, expected 48 columns"));
    }
    CHECK(m == m_before);
}

TEST_CASE("unsupported sizes are rejected naming the nearest supported sizes", "[hadamard][errors]")
{
    const auto check_message = [](std::size_t n, hadamard_source source) {
        INFO("n = " << n);
        hadamard_options o;
        o.source = source;
        try {
            (void)hadamard_plan<float>(n, o);
            FAIL("no error");
        } catch (const spinquant::error& e) {
            CHECK(e.code() == errc::unsupported_size);
            const std::string what = e.what();
            const auto at = what.find("nearest supported sizes: ");
            REQUIRE(at != std::string::npos);
            std::istringstream in(what.substr(at + 25));
            std::size_t below = 0, above = 0;
            std::string word;
            if (n > 1) in >> below >> word;
            in >> above;
            if (n > 1) {
                CHECK(word == "and");
                CHECK(below < n);
                CHECK(spinquant::has_hadamard(below, source));
                for (std::size_t v = below + 1; v < n; ++v) CHECK_FALSE(spinquant::has_hadamard(v, source));
            }
            CHECK(above > n);
            CHECK(spinquant::has_hadamard(above, source));
            for (std::size_t v = n + 1; v < above; ++v) CHECK_FALSE(spinquant::has_hadamard(v, source));
        }
    };
    for (const std::size_t n : std::vector<std::size_t>{3, 6, 10, 302, 668, 4100})
        check_message(n, hadamard_source::cheapest);
    for (const std::size_t n : std::vector<std::size_t>{18944, 336, 100}) check_message(n, hadamard_source::reference);
    CHECK_THROWS_AS(hadamard_plan<float>(0), spinquant::error);
    // Far beyond any plan: the nearest sizes are found without walking the integers.
    const std::size_t huge = (std::size_t{1} << 40) + 4;
    CHECK_FALSE(spinquant::has_hadamard(huge));
    try {
        (void)hadamard_plan<float>(huge);
        FAIL("no error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == errc::unsupported_size);
        CHECK(contains(e.what(), "nearest supported sizes: " + std::to_string(std::size_t{1} << 40) + " and "));
    }
    CHECK_FALSE(spinquant::has_hadamard(0));
    CHECK_FALSE(spinquant::has_hadamard(668));  // no Hadamard matrix of order 668 is known
}

TEST_CASE("explicit signs are validated", "[hadamard][errors]")
{
    std::vector<double> s(16, 1.0);
    s[5] = 0.5;
    try {
        (void)hadamard_plan<double>(16, s);
        FAIL("no error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == errc::bad_argument);
        CHECK(contains(e.what(), "signs[5] = 0.5"));
    }
    s[5] = -1.0;
    CHECK_NOTHROW(hadamard_plan<double>(16, s));
    try {
        (void)hadamard_plan<double>(12, s);
        FAIL("no error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == errc::bad_shape);
    }
    hadamard_options o;
    o.random_signs = true;
    try {
        (void)hadamard_plan<double>(16, s, o);
        FAIL("no error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == errc::bad_argument);
    }
}

namespace {
template <class P, class V>
concept can_apply = requires(const P& p, V&& v) { p.apply(std::forward<V>(v)); };
template <class P, class M>
concept can_apply_rows = requires(const P& p, M&& m) { p.apply_rows(std::forward<M>(m)); };
template <class V>
concept can_fwht = requires(V&& v) { spinquant::fwht(std::forward<V>(v)); };
}  // namespace

TEST_CASE("apply only accepts mutable vectors of the plan's element type", "[hadamard]")
{
    using plan = hadamard_plan<float>;
    STATIC_REQUIRE(can_apply<plan, std::vector<float>&>);
    STATIC_REQUIRE(can_apply<plan, std::span<float>>);
    STATIC_REQUIRE_FALSE(can_apply<plan, const std::vector<float>&>);
    STATIC_REQUIRE_FALSE(can_apply<plan, std::span<const float>>);
    STATIC_REQUIRE_FALSE(can_apply<plan, std::vector<double>&>);
    STATIC_REQUIRE(can_apply_rows<plan, Eigen::MatrixXf&>);
    STATIC_REQUIRE_FALSE(can_apply_rows<plan, const Eigen::MatrixXf&>);
    STATIC_REQUIRE_FALSE(can_apply_rows<plan, Eigen::MatrixXd&>);
    STATIC_REQUIRE(can_fwht<std::vector<double>&>);
    STATIC_REQUIRE_FALSE(can_fwht<const std::vector<float>&>);
}

TEST_CASE("one plan is used from several threads at once", "[hadamard]")
{
    hadamard_options o;
    o.random_signs = true;
    const hadamard_plan<float> plan(11008, o);
    constexpr std::size_t threads = 4;
    std::vector<std::vector<float>> data(threads), expected(threads);
    for (std::size_t t = 0; t < threads; ++t) {
        data[t] = random_vector<float>(11008 * 3, t);
        expected[t] = data[t];
        plan.apply_rows(spinquant::as_matrix_view(expected[t], 3, 11008));
    }
    std::vector<std::thread> pool;
    for (std::size_t t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            for (int repeat = 0; repeat < 3; ++repeat) {
                auto copy = data[t];
                plan.apply_rows(spinquant::as_matrix_view(copy, 3, 11008));
                if (repeat == 2) data[t] = copy;
            }
        });
    for (auto& th : pool) th.join();
    for (std::size_t t = 0; t < threads; ++t) CHECK(data[t] == expected[t]);
}

TEST_CASE("one short-row plan is used from several threads at once", "[hadamard][rows]")
{
    hadamard_options o;
    o.random_signs = true;
    const hadamard_plan<float> plan(172, o);
    constexpr std::size_t threads = 4, rows = 53;
    std::vector<std::vector<float>> data(threads), expected(threads);
    for (std::size_t t = 0; t < threads; ++t) {
        data[t] = random_vector<float>(172 * rows, t);
        expected[t] = data[t];
        plan.apply_rows(spinquant::as_matrix_view(expected[t].data(), rows, 172));
    }
    std::vector<std::thread> pool;
    for (std::size_t t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            for (int repeat = 0; repeat < 3; ++repeat) {
                auto copy = data[t];
                plan.apply_rows(spinquant::as_matrix_view(copy.data(), rows, 172));
                if (repeat == 2) data[t] = copy;
            }
        });
    for (auto& th : pool) th.join();
    for (std::size_t t = 0; t < threads; ++t) CHECK(data[t] == expected[t]);
}

TEST_CASE("fwht and every apply are allocation-free", "[hadamard]")
{
    std::vector<float> x = random_vector<float>(29568 * 2, 1);
    std::vector<float> p2 = random_vector<float>(1 << 16, 2);
    hadamard_options o;
    o.random_signs = true;
    const hadamard_plan<float> big(29568, o), ffn(11008), small(96), pow2(1 << 16, o);
    std::vector<float> work(ffn.workspace_size());
    const hadamard_plan<float> r4(172, o), r4x4(688, o), k12(12), tiny(4, o);
    const hadamard_plan<double> tiny_d(8, o);
    std::vector<float> short_work(r4x4.workspace_size());
    std::vector<double> y = random_vector<double>(17 * 8, 3);
    const std::span<float> row(x.data(), 29568);
    const std::span<float> ffn_row(x.data(), 11008);
    const long allocations = spinquant::test::allocations_during([&] {
        spinquant::fwht(p2);
        pow2.apply(p2);
        pow2.apply_inverse(p2);
        big.apply(row);
        big.apply_inverse(row);
        big.apply_rows(spinquant::as_matrix_view(x, 2, 29568));
        ffn.apply(ffn_row, work);
        ffn.apply_inverse_rows(spinquant::matrix_view<float>{x.data(), 4, 11008, 11008, 1});
        small.apply_rows(spinquant::matrix_view<float>{x.data(), 96, 96, 1, 96});  // column-major
        // Short rows (the tile kernel): R4 sizes, small K, K = 1 below a register, every layout.
        r4.apply_rows(spinquant::as_matrix_view(x.data(), 256, 172));
        r4.apply_inverse_rows(spinquant::as_matrix_view(x.data() + 1, 37, 172, 180));
        r4.apply(std::span<float>(x.data(), 172));
        r4.apply_rows(spinquant::matrix_view<float>{x.data(), 37, 172, 1, 37});  // column-major
        r4x4.apply_rows(spinquant::as_matrix_view(x.data(), 64, 688));
        r4x4.apply_inverse(std::span<float>(x.data(), 688), short_work);
        k12.apply_rows(spinquant::as_matrix_view(x.data(), 33, 12));
        tiny.apply_rows(spinquant::as_matrix_view(x.data(), 33, 4));
        tiny_d.apply_inverse_rows(spinquant::as_matrix_view(y.data(), 17, 8));
    });
    CHECK(allocations == 0);
}

// ---------------------------------------------------------------------------------------------
// Every SIMD architecture the build enables, in one binary

namespace {

template <class T, class Arch>
void check_arch()
{
    INFO("arch " << Arch::name() << ", " << sizeof(T) * 8 << "-bit");
    constexpr std::size_t lanes = xsimd::batch<T, Arch>::size;
    // The lane permutation of the in-register stages (immediate shuffles on AVX-512): lane i ^ H.
    if constexpr (spinquant::detail::fwht_lane_method_for<T, Arch> == spinquant::detail::fwht_lane_method::swizzle) {
        std::array<T, lanes> in{}, out{};
        for (std::size_t i = 0; i < lanes; ++i) in[i] = static_cast<T>(i + 1);
        const auto x = xsimd::batch<T, Arch>::load_unaligned(in.data());
        const auto check = [&]<std::size_t H>() {
            if constexpr (H < lanes) {
                spinquant::detail::fwht_lane_partner<H>(x).store_unaligned(out.data());
                for (std::size_t i = 0; i < lanes; ++i) {
                    INFO("distance " << H << ", lane " << i);
                    REQUIRE(out[i] == in[i ^ H]);
                }
            }
        };
        [&]<std::size_t... B>(std::index_sequence<B...>) {
            (check.template operator()<std::size_t{1} << B>(), ...);
        }(std::make_index_sequence<4>{});
    }
    // The plan table: every length's passes cover each index bit above the leaf once, within the
    // radix caps; split plans where they save a pass (on AVX-512: 2^16 floats, 2^15 doubles) and
    // where they tie on rows of fwht_split_tie_spans spans (128 KiB: 2^15 floats, 2^14 doubles).
    {
        namespace d = spinquant::detail;
        constexpr unsigned leaf = d::fwht_leaf_bits<T, Arch>;
        for (unsigned bits = leaf + 2; bits <= 40; ++bits) {
            INFO("2^" << bits);
            const d::fwht_pass_plan& plan = d::fwht_plans<T, Arch>[bits];
            const d::fwht_pass_plan contiguous = d::fwht_plan_range<T, Arch>(leaf, bits);
            const unsigned top = plan.span_bits == 0 ? bits : plan.span_bits;
            REQUIRE(plan.first == (plan.span_bits == 0 ? leaf : leaf + 1));
            REQUIRE(d::fwht_bits_below(plan, plan.count) == top);
            for (unsigned p = 0; p < plan.count; ++p) {
                REQUIRE(plan.radix[p] >= 1);
                REQUIRE(plan.radix[p] <= d::fwht_radix_cap<T, Arch>(d::fwht_bits_below(plan, p)));
            }
            if (plan.span_bits != 0) {
                REQUIRE(plan.span_bits < bits);
                REQUIRE(1 + bits - plan.span_bits <= d::fwht_max_radix_log2<Arch>);  // the last pass
                const bool long_row = (std::size_t{1} << (bits - plan.span_bits)) >= d::fwht_split_tie_spans;
                REQUIRE((plan.count + 1 < contiguous.count || (plan.count + 1 == contiguous.count && long_row)));
            }
            const unsigned tie_bits = sizeof(T) == 4 ? 15u : 14u;  // 128 KiB, on every architecture
            const bool split_expected = bits == tie_bits || (std::is_base_of_v<xsimd::avx512f, Arch> && bits == tie_bits + 1);
            CHECK((plan.span_bits != 0) == split_expected);
        }
    }
    // The unnormalised kernel against the Sylvester definition, around the register width.
    for (std::size_t n = 1; n <= (std::size_t{1} << 13); n *= 2) {
        auto x = random_vector<T>(n, n + lanes);
        const auto original = x;
        spinquant::detail::fwht_pow2<T, Arch>(std::span<T>(x));
        const double tol = spinquant::test::transform_tolerance<T>(sum_abs(original), 1.0, std::log2(static_cast<double>(n)));
        for (const std::size_t i : checked_outputs(n, 512, 16)) {
            double expected = 0;
            for (std::size_t j = 0; j < n; ++j) expected += spinquant::test::sylvester_entry(i, j) * static_cast<double>(original[j]);
            INFO("n = " << n << ", output " << i);
            REQUIRE_THAT(static_cast<double>(x[i]), Catch::Matchers::WithinAbs(expected, tol));
        }
    }
    // Long rows, every output: the plans beyond the L1 blocks and spans (AVX-512: 2^16 floats and
    // 2^15 doubles run split plans), the kernel alone and whole plans with signs both ways (the
    // signs ride in the first pass forward and in the last one inverse).
    for (const std::size_t n : {std::size_t{1} << 14, std::size_t{1} << 15, std::size_t{1} << 16}) {
        INFO("n = " << n);
        const auto x = random_vector<T>(n, n + lanes);
        const double tol = spinquant::test::transform_tolerance<T>(sum_abs(x), 1.0, std::log2(static_cast<double>(n)));
        auto y = x;
        spinquant::detail::fwht_pow2<T, Arch>(std::span<T>(y));
        dense_hadamard unnormalised;
        unnormalised.n = n;
        const auto expected = unnormalised.apply_pow2(std::span<const T>(x), false);
        for (std::size_t i = 0; i < n; ++i)
            if (std::abs(static_cast<double>(y[i]) - expected[i]) > tol) FAIL("kernel, output " << i << ": " << y[i] << " != " << expected[i]);
        hadamard_options o;
        o.random_signs = true;
        o.seed = n;
        const hadamard_plan<T, Arch> plan(n, o);
        const dense_hadamard ref = reference_of(plan, exact_divisor(n));
        const double ptol = spinquant::test::transform_tolerance<T>(sum_abs(x), exact_divisor(n), std::log2(static_cast<double>(n)));
        for (const bool inverse : {false, true}) {
            auto z = x;
            inverse ? plan.apply_inverse(z) : plan.apply(z);
            const auto want = ref.apply_pow2(std::span<const T>(x), inverse);
            for (std::size_t i = 0; i < n; ++i)
                if (std::abs(static_cast<double>(z[i]) - want[i]) > ptol)
                    FAIL((inverse ? "inverse" : "forward") << " plan with signs, output " << i << ": " << z[i] << " != " << want[i]);
        }
    }
    // Whole plans (kernel, signs, both mixes) for K * m with m around the strip widths, up to two
    // leaves (the fused leaf pair) and at least 16 registers.
    const std::size_t largest_m = std::max(4 * lanes * 4, 2 * spinquant::detail::fwht_leaf_size<T, Arch>);
    for (const std::size_t k : {std::size_t{1}, std::size_t{12}, std::size_t{28}})
        for (std::size_t m = 1; m <= largest_m; m *= 2) {
            hadamard_options o;
            o.random_signs = (m & 1) == 0;
            o.seed = m;
            const hadamard_plan<T, Arch> plan(k * m, o);
            check_plan_against_dense(plan, false, m, 512);
            check_plan_against_dense(plan, true, m + 1, 512);
        }
    // Short rows, m below the register (the tile kernel), with row counts around its widths.
    for (const std::size_t n : {std::size_t{2}, std::size_t{12}, std::size_t{24}, std::size_t{56}, std::size_t{172},
                                std::size_t{344}})
        if (n / hadamard_plan<T, Arch>(n).order() < lanes || n == 172) check_rows_every_layout<T, Arch>(n, n + lanes, false);
}

template <class... A>
std::size_t each(xsimd::arch_list<A...>)
{
    (check_arch<float, A>(), ...);
    (check_arch<double, A>(), ...);
    return sizeof...(A);
}

}  // namespace

TEST_CASE("the kernels agree with the definition on every SIMD architecture the build enables", "[hadamard][simd]")
{
    const std::size_t tested = each(xsimd::supported_architectures{});
    CHECK(tested >= 1);
}

TEMPLATE_TEST_CASE("rows of at most one L1 block read in order do not prefetch; longer rows keep their window",
                   "[hadamard]", float, double)
{
    namespace detail = spinquant::detail;
    using T = TestType;
    std::vector<T> memory(4 * detail::fwht_block_bytes / sizeof(T));
    const detail::fwht_window<T> region{memory.data(), memory.size()};
    const std::size_t block = detail::fwht_block_bytes / sizeof(T);
    for (const std::size_t n : {std::size_t{1}, std::size_t{64}, block / 2, block}) {
        const auto w = detail::fwht_rows_window<T>(n, region);
        CHECK(w.data == nullptr);
        CHECK(w.size == 0);
    }
    for (const std::size_t n : {2 * block, 4 * block}) {
        const auto w = detail::fwht_rows_window<T>(n, region);
        CHECK(w.data == region.data);
        CHECK(w.size == region.size);
    }
}

// ---------------------------------------------------------------------------------------------
// Golden files from the reference

TEST_CASE("matmul_hadU and matmul_hadUt of the reference are apply and apply_inverse with its dispatch and normaliser",
          "[hadamard][golden]")
{
    const auto path = spinquant::test::shared_path_or_skip("golden/wht_spinquant.json");
    if (!path) return;
    const auto doc = spinquant::test::json::parse_file(path->string());
    hadamard_options o;
    o.source = hadamard_source::reference;
    o.normaliser = hadamard_normaliser::reference;
    REQUIRE(doc["cases"].size() > 0);
    for (const auto& c : doc["cases"].items()) {
        const auto n = static_cast<std::size_t>(c["n"].integer());
        INFO("n = " << n);
        const hadamard_plan<double> plan(n, o);
        CHECK(plan.order() == static_cast<std::size_t>(c["K"].integer()));
        CHECK(plan.pow2_length() == static_cast<std::size_t>(c["pow2_part"].integer()));
        CHECK(plan.scale() == 1.0 / c["normaliser_divisor"].number());
        const auto input = c["input"].doubles();
        const auto forward = c["matmul_hadU"].doubles();
        const auto backward = c["matmul_hadUt"].doubles();
        const std::size_t rows = input.size() / n;
        auto y = input, z = input;
        plan.apply_rows(spinquant::as_matrix_view(y, rows, n));
        plan.apply_inverse_rows(spinquant::as_matrix_view(z, rows, n));
        for (std::size_t i = 0; i < input.size(); ++i) {
            REQUIRE_THAT(y[i], Catch::Matchers::WithinAbs(forward[i], 1e-12));
            REQUIRE_THAT(z[i], Catch::Matchers::WithinAbs(backward[i], 1e-12));
        }
    }
}

TEST_CASE("the reference's hadamard_matrix and random_hadamard_matrix are the transpose of matrix()",
          "[hadamard][golden]")
{
    const auto path = spinquant::test::shared_path_or_skip("golden/wht_spinquant.json");
    if (!path) return;
    const auto doc = spinquant::test::json::parse_file(path->string());
    hadamard_options o;
    o.source = hadamard_source::reference;
    o.normaliser = hadamard_normaliser::reference;
    for (const auto& c : doc["hadamard_matrix"]["cases"].items()) {
        const auto n = static_cast<std::size_t>(c["n"].integer());
        INFO("hadamard_matrix n = " << n);
        const auto golden = c["matrix_row_major"].floats();  // float32, exact
        const std::vector<float> m = hadamard_matrix<float>(n, o);
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t j = 0; j < n; ++j)
                REQUIRE_THAT(m[j * n + i], Catch::Matchers::WithinULP(golden[i * n + j], 1));  // 1/d vs reciprocal
    }
    for (const auto& c : doc["random_hadamard_matrix"]["cases"].items()) {
        const auto n = static_cast<std::size_t>(c["n"].integer());
        INFO("random_hadamard_matrix n = " << n);
        const auto golden = c["matrix_row_major"].doubles();
        const auto signs = c["diag_signs"].doubles();
        const std::vector<double> m = hadamard_plan<double>(n, signs, o).matrix();
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t j = 0; j < n; ++j)
                REQUIRE_THAT(m[j * n + i], Catch::Matchers::WithinAbs(golden[i * n + j], 1e-15));
    }
}

TEST_CASE("plans with hadamard_source::reference use the reference's 12 matrices", "[hadamard][golden]")
{
    const auto path = spinquant::test::shared_path_or_skip("golden/hadamard_matrices_spinquant.json");
    if (!path) return;
    const auto doc = spinquant::test::json::parse_file(path->string());
    hadamard_options o;
    o.source = hadamard_source::reference;
    std::size_t count = 0;
    for (const auto& [order, entry] : doc["matrices"].members()) {
        const auto k = static_cast<std::size_t>(std::stoul(order));
        INFO("K = " << k);
        const hadamard_plan<float> plan(k, o);
        REQUIRE(plan.order() == k);
        const auto& rows = entry["rows"].items();
        REQUIRE(rows.size() == k);
        for (std::size_t i = 0; i < k; ++i)
            for (std::size_t j = 0; j < k; ++j)
                REQUIRE(plan.order_matrix()[i * k + j] == (rows[i].string()[j] == '+' ? 1 : -1));
        ++count;
    }
    CHECK(count == 12);
}
