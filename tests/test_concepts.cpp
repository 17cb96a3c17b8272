#include "support/catch.hpp"

#include <array>
#include <list>
#include <span>
#include <string>
#include <vector>

#include <spinquant/concepts.hpp>

#include "support/archetypes.hpp"

using namespace spinquant;

TEST_CASE("real_scalar accepts float and double only", "[concepts]")
{
    STATIC_REQUIRE(real_scalar<float>);
    STATIC_REQUIRE(real_scalar<double>);
    STATIC_REQUIRE(real_scalar<const float>);
    STATIC_REQUIRE_FALSE(real_scalar<int>);
    STATIC_REQUIRE_FALSE(real_scalar<long double>);
    STATIC_REQUIRE_FALSE(real_scalar<float*>);
}

TEST_CASE("vector concepts accept std containers and spans, and reject const where we write", "[concepts]")
{
    STATIC_REQUIRE(mutable_real_vector<std::vector<float>>);
    STATIC_REQUIRE(mutable_real_vector<std::vector<double>&>);
    STATIC_REQUIRE(mutable_real_vector<std::array<float, 4>>);
    STATIC_REQUIRE(mutable_real_vector<std::span<float>>);
    STATIC_REQUIRE(mutable_real_vector<float[8]>);
    STATIC_REQUIRE(real_vector<const std::vector<float>>);
    STATIC_REQUIRE_FALSE(mutable_real_vector<const std::vector<float>>);
    STATIC_REQUIRE_FALSE(mutable_real_vector<std::span<const float>>);
    STATIC_REQUIRE_FALSE(real_vector<std::vector<int>>);
    STATIC_REQUIRE_FALSE(real_vector<std::list<float>>);  // not contiguous
    STATIC_REQUIRE_FALSE(real_vector<float>);
}

TEST_CASE("vector_traits adapts a user tensor type", "[concepts]")
{
    STATIC_REQUIRE(mutable_real_vector<engine::tensor>);
    STATIC_REQUIRE(real_vector<engine::const_tensor>);
    STATIC_REQUIRE_FALSE(mutable_real_vector<engine::const_tensor>);
    std::vector<float> storage{1, 2, 3};
    engine::tensor t{storage.data(), storage.size()};
    const auto s = as_span(t);
    CHECK(s.data() == storage.data());
    CHECK(s.size() == 3);
    STATIC_REQUIRE(std::is_same_v<element_t<engine::tensor>, float>);
    STATIC_REQUIRE(std::is_same_v<element_t<const std::vector<double>>, const double>);
}

TEST_CASE("matrix_view addresses elements through its strides", "[concepts]")
{
    std::vector<double> a(12);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = double(i);
    const auto rm = as_matrix_view(a.data(), 3, 4);  // row-major 3x4
    CHECK(rm(1, 2) == 6.0);
    CHECK(rm.is_contiguous());
    CHECK(rm.row(2)[3] == 11.0);
    const auto t = rm.transposed();  // 4x3, column-major storage
    CHECK(t.rows == 4);
    CHECK(t(2, 1) == 6.0);
    CHECK_FALSE(t.has_contiguous_rows());
    const auto b = rm.block(1, 1, 2, 2);
    CHECK(b(0, 0) == 5.0);
    CHECK(b(1, 1) == 10.0);
    CHECK_FALSE(b.is_contiguous());
    CHECK(b.has_contiguous_rows());
    const matrix_view<const double> cv = rm;  // read-only conversion
    CHECK(cv(2, 3) == 11.0);
    const auto strided = as_matrix_view(a.data(), 2, 3, 6);  // every other row of a 4x3 buffer... rows 6 apart
    CHECK(strided(1, 2) == 8.0);
}

TEST_CASE("as_matrix_view over a vector checks the element count", "[concepts][errors]")
{
    std::vector<float> v(12, 1.0f);
    const auto m = as_matrix_view(v, 3, 4);
    CHECK(m.rows == 3);
    CHECK(m.cols == 4);
    try {
        (void)as_matrix_view(v, 5, 3);
        FAIL("expected spinquant::error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == errc::bad_shape);
        CHECK(std::string(e.what()) == "spinquant::as_matrix_view: vector of 12 elements cannot be viewed as 5x3");
    }
}

TEST_CASE("matrix concepts accept views and user matrices, and reject const where we write", "[concepts]")
{
    STATIC_REQUIRE(mutable_real_matrix<matrix_view<float>>);
    STATIC_REQUIRE(real_matrix<matrix_view<const double>>);
    STATIC_REQUIRE_FALSE(mutable_real_matrix<matrix_view<const double>>);
    STATIC_REQUIRE(mutable_real_matrix<engine::tensor2d>);
    STATIC_REQUIRE(real_matrix<const engine::tensor2d>);
    STATIC_REQUIRE_FALSE(mutable_real_matrix<const engine::tensor2d>);
    STATIC_REQUIRE_FALSE(real_matrix<std::vector<float>>);  // a vector has no shape
    STATIC_REQUIRE_FALSE(real_matrix<matrix_view<int>>);

    engine::tensor2d t(2, 3, 5);
    const auto v = as_matrix_view(t);
    CHECK(v.rows == 2);
    CHECK(v.cols == 3);
    CHECK(v.row_stride == 5);
    v(1, 2) = 7.0f;
    CHECK(t.storage[1 * 5 + 2] == 7.0f);
}
