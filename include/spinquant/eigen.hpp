#pragma once
/// Adapts Eigen dense objects to the library's vocabulary, and back.
///
/// Any Eigen dense object with direct access (Matrix, Array, Map, Ref, Block of those; row- or
/// column-major; any strides) is a matrix; one with one compile-time dimension equal to 1 and
/// unit inner stride is also a vector. Eigen 3.4's vectors are not std::ranges::contiguous_range,
/// hence the explicit vector_traits. `as_eigen(view)` maps a matrix_view back to an Eigen::Map.
#include <cstddef>
#include <span>
#include <type_traits>

#include <Eigen/Core>

#include "concepts.hpp"

namespace spinquant {
namespace detail {

// Matches any Eigen dense object, including those whose CRTP base names another type
// (VectorBlock derives from DenseBase<Block<...>>).
template <class D>
void eigen_dense_probe(const Eigen::DenseBase<D>&);

template <class M>
concept eigen_direct_access = requires(const M& m) { detail::eigen_dense_probe(m); } &&
                              ((int(M::Flags) & Eigen::DirectAccessBit) != 0) && real_scalar<typename M::Scalar>;

template <class M>
concept eigen_unit_stride_vector = eigen_direct_access<M> && (M::IsVectorAtCompileTime != 0) &&
                                   (int(M::InnerStrideAtCompileTime) == 1);

/// Element type of the view of an Eigen object: const when the object is read-only (a const
/// object, a Map<const ...>, a Ref<const ...>, or a block of those).
template <class M, class Obj>
using eigen_element_t = std::remove_pointer_t<decltype(std::declval<Obj&>().data())>;

}  // namespace detail

/// Eigen vectors with unit inner stride as spans.
template <class M>
    requires detail::eigen_unit_stride_vector<M>
struct vector_traits<M> {
    template <class Obj>
    static auto as_span(Obj& v) noexcept
    {
        using E = detail::eigen_element_t<M, Obj>;
        return std::span<E>(v.data(), static_cast<std::size_t>(v.size()));
    }
};

/// Eigen dense objects with direct access as matrix views (strides taken from Eigen at run time).
template <class M>
    requires detail::eigen_direct_access<M>
struct matrix_traits<M> {
    template <class Obj>
    static auto view(Obj& m) noexcept
    {
        using E = detail::eigen_element_t<M, Obj>;
        const auto rows = static_cast<std::size_t>(m.rows());
        const auto cols = static_cast<std::size_t>(m.cols());
        const auto inner = static_cast<std::size_t>(m.innerStride());
        const auto outer = static_cast<std::size_t>(m.outerStride());
        if constexpr (M::IsRowMajor)
            return matrix_view<E>{m.data(), rows, cols, outer, inner};
        else
            return matrix_view<E>{m.data(), rows, cols, inner, outer};
    }
};

/// The Eigen type `as_eigen` returns for a matrix_view<T>: a row-major Map with run-time strides.
template <class T>
using eigen_map_t =
    Eigen::Map<std::conditional_t<std::is_const_v<T>,
                                  const Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>,
                                  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>,
               Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;

/// Maps a matrix_view as an Eigen expression over the same storage (no copy).
template <class T>
[[nodiscard]] eigen_map_t<T> as_eigen(matrix_view<T> m) noexcept
{
    // A row-major Map's outer stride is the distance between rows, its inner stride between columns.
    // Eigen asserts strides > 0 even for empty or single-row/column maps, so give it a harmless 1.
    const auto outer = static_cast<Eigen::Index>(m.row_stride == 0 ? 1 : m.row_stride);
    const auto inner = static_cast<Eigen::Index>(m.col_stride == 0 ? 1 : m.col_stride);
    return eigen_map_t<T>(m.data, static_cast<Eigen::Index>(m.rows), static_cast<Eigen::Index>(m.cols),
                          Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(outer, inner));
}

}  // namespace spinquant
