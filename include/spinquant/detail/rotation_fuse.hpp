#pragma once
// The one kernel behind every fusion helper of rotation.hpp: right-multiplication of a matrix, or
// of each consecutive column block of it, by a square matrix, computed in double and written back
// in the matrix's own element type. Output-side rotations reuse it on the transposed view.
#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>

#include <Eigen/Core>

#include "../concepts.hpp"
#include "../eigen.hpp"
#include "../error.hpp"
#include "checks.hpp"

namespace spinquant::detail {

/// Fails unless `r` is square, non-empty and finite.
template <class U>
void require_square_rotation(matrix_view<const U> r, std::string_view where, std::string_view what)
{
    if (r.rows != r.cols || r.rows == 0)
        fail(errc::bad_shape, where,
             std::string(what) + " is " + shape_string(r.rows, r.cols) + ", expected a non-empty square matrix");
    require_finite(r, where, what);
}

/// Fails unless `cols` (the dimension a rotation acts on) is a positive multiple of the block
/// size `block`, which it is for a full rotation (block == cols) or a per-head one.
inline void require_blocks(std::size_t cols, std::size_t block, std::string_view where, std::string_view what,
                           std::string_view rotation)
{
    if (block == 0 || cols % block != 0 || cols == 0)
        fail(errc::bad_shape, where,
             std::string(what) + " has " + std::to_string(cols) + " columns on the rotated side, expected a positive multiple of " +
                 std::string(rotation) + "'s order " + std::to_string(block));
}

/// Rows processed per pass: bounds the double copy to about 1 MiB for wide matrices.
[[nodiscard]] inline std::size_t fuse_rows_per_pass(std::size_t cols) noexcept
{
    return std::max<std::size_t>(1, (std::size_t{1} << 17) / std::max<std::size_t>(1, cols));
}

/// x <- x · diag(R, R, ..., R): each consecutive block of r.rows columns of x is right-multiplied
/// by r, in double, then rounded once to x's element type. No checks (callers validated).
/// Allocates an r.rows² double copy of r and a bounded row-chunk buffer.
template <class T, class U>
void right_multiply_blocks(matrix_view<T> x, matrix_view<const U> r)
{
    using dmat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const auto b = static_cast<Eigen::Index>(r.rows);
    const dmat rd = spinquant::as_eigen(r).template cast<double>();
    const std::size_t chunk = fuse_rows_per_pass(x.cols);
    dmat in(static_cast<Eigen::Index>(std::min(chunk, x.rows)), static_cast<Eigen::Index>(x.cols));
    dmat out(in.rows(), in.cols());
    for (std::size_t r0 = 0; r0 < x.rows; r0 += chunk) {
        const std::size_t nr = std::min(chunk, x.rows - r0);
        auto xs = spinquant::as_eigen(x.block(r0, 0, nr, x.cols));
        const auto rows = static_cast<Eigen::Index>(nr);
        in.topRows(rows) = xs.template cast<double>();
        for (Eigen::Index c0 = 0; c0 < in.cols(); c0 += b)
            out.block(0, c0, rows, b).noalias() = in.block(0, c0, rows, b) * rd;
        xs = out.topRows(rows).template cast<T>();
    }
}

}  // namespace spinquant::detail
