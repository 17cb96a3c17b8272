#pragma once
/// The vocabulary every kernel speaks: spans over the user's vectors, matrix_view over the user's
/// matrices, and the traits a user specialises to adapt a tensor type the library does not know.
#include <concepts>
#include <cstddef>
#include <iterator>
#include <ranges>
#include <span>
#include <string>
#include <type_traits>

#include "config.hpp"
#include "error.hpp"

namespace spinquant {

/// The element types the library computes with: float and double (cv-qualified or not).
template <class T>
concept real_scalar = std::same_as<std::remove_cv_t<T>, float> || std::same_as<std::remove_cv_t<T>, double>;

/// Names an axis of a [rows, cols] matrix explicitly (rows are tokens for activations and output
/// channels for weights), instead of the ambiguous "per channel".
enum class axis { row, column };

// ---------------------------------------------------------------------------------------------
// Vectors

/// Customisation point: specialise for a vector type you cannot change, with
/// `static std::span<E> as_span(V&)`. The primary template is left undefined.
template <class V>
struct vector_traits;

namespace detail {
template <class V>
concept has_vector_traits = requires(V& v) { vector_traits<std::remove_cvref_t<V>>::as_span(v); };
template <class V>
concept contiguous_sized = std::ranges::contiguous_range<V&> && std::ranges::sized_range<V&>;
}  // namespace detail

/// The one way the library looks at a user vector: a std::span over its elements.
/// Accepts contiguous sized ranges (std::vector, std::array, std::span, C arrays) and any type
/// with a vector_traits specialisation (Eigen vectors through <spinquant/eigen.hpp>).
template <class V>
    requires detail::contiguous_sized<V> || detail::has_vector_traits<V>
[[nodiscard]] constexpr auto as_span(V& v) noexcept
{
    if constexpr (detail::has_vector_traits<V>)
        return vector_traits<std::remove_cvref_t<V>>::as_span(v);
    else
        return std::span(v);
}

/// The element type a vector exposes through as_span (const-qualified for read-only vectors).
template <class V>
using element_t = typename decltype(spinquant::as_span(std::declval<V&>()))::element_type;

/// A vector of float or double, read-only or not.
template <class V>
concept real_vector = requires(V& v) { spinquant::as_span(v); } && real_scalar<element_t<V>>;

/// A vector of float or double the library may write to (const types are rejected).
template <class V>
concept mutable_real_vector = real_vector<V> && !std::is_const_v<element_t<V>>;

// ---------------------------------------------------------------------------------------------
// Matrices

/// A non-owning, BLAS-style view of a rows x cols matrix: element (i, j) sits at
/// data[i * row_stride + j * col_stride] (strides in elements). Row-major contiguous storage has
/// row_stride = cols and col_stride = 1; column-major has row_stride = 1 and col_stride = rows.
/// This is the one matrix type kernels see. `T` is const for read-only views.
template <class T>
struct matrix_view {
    using element_type = T;
    using value_type = std::remove_cv_t<T>;

    T* data = nullptr;
    std::size_t rows = 0;
    std::size_t cols = 0;
    std::size_t row_stride = 0;
    std::size_t col_stride = 1;

    /// Element (i, j); no bounds check beyond SPINQUANT_ASSERT.
    [[nodiscard]] constexpr T& operator()(std::size_t i, std::size_t j) const noexcept
    {
        SPINQUANT_ASSERT(i < rows && j < cols);
        return data[i * row_stride + j * col_stride];
    }
    [[nodiscard]] constexpr std::size_t size() const noexcept { return rows * cols; }
    [[nodiscard]] constexpr bool empty() const noexcept { return rows == 0 || cols == 0; }
    /// True when each row is a contiguous run of cols elements (the kernels' fast path).
    [[nodiscard]] constexpr bool has_contiguous_rows() const noexcept { return col_stride == 1 || cols <= 1; }
    /// True when the whole matrix is one contiguous row-major block.
    [[nodiscard]] constexpr bool is_contiguous() const noexcept
    {
        return has_contiguous_rows() && (row_stride == cols || rows <= 1);
    }
    /// Row i as a span; precondition has_contiguous_rows().
    [[nodiscard]] constexpr std::span<T> row(std::size_t i) const noexcept
    {
        SPINQUANT_ASSERT(i < rows && has_contiguous_rows());
        return {data + i * row_stride, cols};
    }
    /// The r x c sub-matrix starting at (r0, c0); precondition it lies inside this view.
    [[nodiscard]] constexpr matrix_view block(std::size_t r0, std::size_t c0, std::size_t r, std::size_t c) const noexcept
    {
        SPINQUANT_ASSERT(r0 + r <= rows && c0 + c <= cols);
        return {data + r0 * row_stride + c0 * col_stride, r, c, row_stride, col_stride};
    }
    /// The same storage seen as its transpose (no copy).
    [[nodiscard]] constexpr matrix_view transposed() const noexcept { return {data, cols, rows, col_stride, row_stride}; }
    /// A read-only view of the same storage.
    [[nodiscard]] constexpr operator matrix_view<const T>() const noexcept
        requires(!std::is_const_v<T>)
    {
        return {data, rows, cols, row_stride, col_stride};
    }
};

/// Customisation point: specialise for a matrix type you cannot change, with
/// `static matrix_view<E> view(M&)`. The primary template is left undefined.
template <class M>
struct matrix_traits;

namespace detail {
template <class M>
concept has_matrix_traits = requires(M& m) { matrix_traits<std::remove_cvref_t<M>>::view(m); };
[[nodiscard]] inline std::string shape_string(std::size_t rows, std::size_t cols)
{
    return std::to_string(rows) + "x" + std::to_string(cols);
}
}  // namespace detail

/// The one way the library looks at a user matrix: a matrix_view. Accepts matrix_view itself
/// and any type with a matrix_traits specialisation (Eigen dense objects with direct access,
/// row- or column-major, Map, Ref, Block, through <spinquant/eigen.hpp>).
template <class T>
[[nodiscard]] constexpr matrix_view<T> as_matrix_view(matrix_view<T> m) noexcept
{
    return m;
}
template <class M>
    requires detail::has_matrix_traits<M>
[[nodiscard]] constexpr auto as_matrix_view(M& m) noexcept
{
    return matrix_traits<std::remove_cvref_t<M>>::view(m);
}

/// A row-major view of rows x cols elements at `data`, each row `row_stride` elements apart
/// (default: packed, row_stride = cols).
template <real_scalar T>
[[nodiscard]] constexpr matrix_view<T> as_matrix_view(T* data, std::size_t rows, std::size_t cols) noexcept
{
    return {data, rows, cols, cols, 1};
}
template <real_scalar T>
[[nodiscard]] constexpr matrix_view<T> as_matrix_view(T* data, std::size_t rows, std::size_t cols,
                                                      std::size_t row_stride) noexcept
{
    return {data, rows, cols, row_stride, 1};
}

/// A packed row-major rows x cols view of a vector (std::vector, span, ...).
/// Throws errc::bad_shape unless the vector holds exactly rows * cols elements.
template <real_vector V>
[[nodiscard]] constexpr auto as_matrix_view(V& v, std::size_t rows, std::size_t cols)
{
    const auto s = spinquant::as_span(v);
    if (s.size() != rows * cols)
        detail::fail(errc::bad_shape, "as_matrix_view",
                     "vector of " + std::to_string(s.size()) + " elements cannot be viewed as " +
                         detail::shape_string(rows, cols));
    return matrix_view<typename decltype(s)::element_type>{s.data(), rows, cols, cols, 1};
}

/// The element type of a matrix as the library sees it (const for read-only matrices).
template <class M>
using matrix_element_t = typename decltype(spinquant::as_matrix_view(std::declval<M&>()))::element_type;

/// A matrix of float or double, read-only or not.
template <class M>
concept real_matrix = requires(M& m) { spinquant::as_matrix_view(m); } && real_scalar<matrix_element_t<M>>;

/// A matrix of float or double the library may write to (const types are rejected).
template <class M>
concept mutable_real_matrix = real_matrix<M> && !std::is_const_v<matrix_element_t<M>>;

}  // namespace spinquant
