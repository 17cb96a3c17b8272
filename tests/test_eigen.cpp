#include "support/catch.hpp"

#include <Eigen/Core>

#include <spinquant/eigen.hpp>

using namespace spinquant;

TEST_CASE("Eigen vectors are vectors; const ones are read-only", "[eigen][concepts]")
{
    STATIC_REQUIRE(mutable_real_vector<Eigen::VectorXf>);
    STATIC_REQUIRE(mutable_real_vector<Eigen::RowVectorXd>);
    STATIC_REQUIRE(mutable_real_vector<Eigen::Vector4f>);
    STATIC_REQUIRE(mutable_real_vector<Eigen::Map<Eigen::VectorXf>>);
    STATIC_REQUIRE(mutable_real_vector<Eigen::Ref<Eigen::VectorXd>>);
    STATIC_REQUIRE(real_vector<const Eigen::VectorXf>);
    STATIC_REQUIRE(real_vector<Eigen::Ref<const Eigen::VectorXf>>);
    STATIC_REQUIRE_FALSE(mutable_real_vector<const Eigen::VectorXf>);
    STATIC_REQUIRE_FALSE(mutable_real_vector<Eigen::Ref<const Eigen::VectorXf>>);
    STATIC_REQUIRE_FALSE(mutable_real_vector<Eigen::Map<const Eigen::VectorXf>>);
    STATIC_REQUIRE_FALSE(real_vector<Eigen::VectorXi>);
    STATIC_REQUIRE_FALSE(real_vector<Eigen::MatrixXf>);  // not a vector at compile time
    // A row of a column-major matrix has a non-unit stride: not a span.
    STATIC_REQUIRE_FALSE(real_vector<decltype(std::declval<Eigen::MatrixXf&>().row(0))>);

    Eigen::VectorXf v = Eigen::VectorXf::LinSpaced(5, 0.0f, 4.0f);
    auto s = as_span(v);
    CHECK(s.size() == 5);
    CHECK(s.data() == v.data());
    auto seg = v.segment(1, 3);
    CHECK(as_span(seg)[0] == 1.0f);
}

TEST_CASE("Eigen dense objects are matrices with the right strides", "[eigen][concepts]")
{
    STATIC_REQUIRE(mutable_real_matrix<Eigen::MatrixXf>);
    STATIC_REQUIRE(mutable_real_matrix<Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>);
    STATIC_REQUIRE(mutable_real_matrix<Eigen::Map<Eigen::MatrixXd>>);
    STATIC_REQUIRE(mutable_real_matrix<Eigen::Ref<Eigen::MatrixXf>>);
    STATIC_REQUIRE(mutable_real_matrix<Eigen::Block<Eigen::MatrixXf>>);
    STATIC_REQUIRE(real_matrix<const Eigen::MatrixXf>);
    STATIC_REQUIRE_FALSE(mutable_real_matrix<const Eigen::MatrixXf>);
    STATIC_REQUIRE_FALSE(mutable_real_matrix<Eigen::Ref<const Eigen::MatrixXf>>);
    STATIC_REQUIRE_FALSE(real_matrix<Eigen::MatrixXi>);
    // Expressions without storage are not matrices.
    STATIC_REQUIRE_FALSE(real_matrix<decltype(Eigen::MatrixXf() + Eigen::MatrixXf())>);

    Eigen::MatrixXd cm(3, 4);  // column-major
    for (Eigen::Index i = 0; i < 3; ++i)
        for (Eigen::Index j = 0; j < 4; ++j) cm(i, j) = double(10 * i + j);
    const auto v = as_matrix_view(cm);
    CHECK(v.rows == 3);
    CHECK(v.cols == 4);
    CHECK(v.row_stride == 1);
    CHECK(v.col_stride == 3);
    CHECK(v(2, 3) == 23.0);

    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> rm = cm;
    const auto r = as_matrix_view(rm);
    CHECK(r.row_stride == 4);
    CHECK(r.col_stride == 1);
    CHECK(r(1, 2) == 12.0);

    auto blk = cm.block(1, 1, 2, 3);
    const auto b = as_matrix_view(blk);
    CHECK(b.rows == 2);
    CHECK(b(0, 0) == 11.0);
    CHECK(b(1, 2) == 23.0);

    Eigen::Ref<const Eigen::MatrixXd> cref = cm;
    const auto c = as_matrix_view(cref);
    STATIC_REQUIRE(std::is_same_v<decltype(c), const matrix_view<const double>>);
    CHECK(c(1, 3) == 13.0);
}

TEST_CASE("as_eigen maps a view back without copying, in both orders", "[eigen]")
{
    Eigen::MatrixXf cm = Eigen::MatrixXf::Random(5, 7);
    auto view = as_matrix_view(cm);
    auto map = as_eigen(view);
    CHECK(map.rows() == 5);
    CHECK(map.cols() == 7);
    CHECK((map - cm).cwiseAbs().maxCoeff() == 0.0f);
    map(4, 6) = 42.0f;
    CHECK(cm(4, 6) == 42.0f);

    const auto tv = view.transposed();
    const Eigen::MatrixXf t = as_eigen(tv);
    CHECK((t - cm.transpose()).cwiseAbs().maxCoeff() == 0.0f);

    const matrix_view<const float> cv = view;
    const auto cmap = as_eigen(cv);
    CHECK(cmap(0, 0) == cm(0, 0));
}
