#pragma once
// User tensor types the library has never heard of, adapted the documented way (traits
// specialisation), to prove the customisation points work for types outside std and Eigen.
#include <cstddef>
#include <span>
#include <vector>

#include <spinquant/concepts.hpp>

namespace engine {

/// A 1-D tensor as an engine might own it: a pointer and a length, no begin()/end().
struct tensor {
    float* ptr = nullptr;
    std::size_t n = 0;
};

/// A read-only 1-D tensor of doubles.
struct const_tensor {
    const double* ptr = nullptr;
    std::size_t n = 0;
};

/// A 2-D tensor with its own strides, e.g. a row-major [rows, cols] slice of a bigger buffer.
struct tensor2d {
    std::vector<float> storage;
    std::size_t rows = 0, cols = 0, ld = 0;
    tensor2d(std::size_t r, std::size_t c, std::size_t leading) : storage(r * leading), rows(r), cols(c), ld(leading) {}
};

}  // namespace engine

template <>
struct spinquant::vector_traits<engine::tensor> {
    static std::span<float> as_span(const engine::tensor& t) noexcept { return {t.ptr, t.n}; }
};
template <>
struct spinquant::vector_traits<engine::const_tensor> {
    static std::span<const double> as_span(const engine::const_tensor& t) noexcept { return {t.ptr, t.n}; }
};
template <>
struct spinquant::matrix_traits<engine::tensor2d> {
    static spinquant::matrix_view<float> view(engine::tensor2d& t) noexcept
    {
        return {t.storage.data(), t.rows, t.cols, t.ld, 1};
    }
    static spinquant::matrix_view<const float> view(const engine::tensor2d& t) noexcept
    {
        return {t.storage.data(), t.rows, t.cols, t.ld, 1};
    }
};
