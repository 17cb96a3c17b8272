// Test inputs: dense matrices of standard normal draws, reproducible on every platform.
#pragma once

#include <cstdint>
#include <random>

#include <Eigen/Core>

#include <spinquant/detail/random.hpp>

namespace spinquant::test {

/// rows x cols standard normal draws from a 64-bit Mersenne twister seeded with `seed`, filled
/// row by row through the library's portable normal sampler (same values on every platform).
inline Eigen::MatrixXd gaussian(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed)
{
    std::mt19937_64 rng(seed);
    spinquant::detail::normal_sampler normal;
    Eigen::MatrixXd m(rows, cols);
    for (Eigen::Index i = 0; i < rows; ++i)
        for (Eigen::Index j = 0; j < cols; ++j) m(i, j) = normal(rng);
    return m;
}

}  // namespace spinquant::test
