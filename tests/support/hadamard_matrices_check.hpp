#pragma once
// Exact checks of +-1 matrices for the Hadamard tests: H H^T = k I in integer arithmetic, fast
// enough for every order up to 1024 in a Debug build. Rows are packed into 64-bit words (a set bit
// is -1); two rows are orthogonal exactly when they differ in k/2 places, i.e. when
// popcount(row_i XOR row_j) summed over the words is k/2.
#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <spinquant/detail/hadamard_construct.hpp>

namespace spinquant::test {

/// Empty when `h` is a Hadamard matrix of order h.order (entries +-1, H H^T = order I, entries
/// sized order^2), else what is wrong first.
inline std::string hadamard_defect(const spinquant::detail::sign_matrix& h)
{
    const std::size_t k = h.order, words = (k + 63) / 64;
    if (h.entries.size() != k * k)
        return "entries has " + std::to_string(h.entries.size()) + " elements for order " + std::to_string(k);
    std::vector<std::uint64_t> packed(k * words, 0);
    for (std::size_t i = 0; i < k; ++i)
        for (std::size_t j = 0; j < k; ++j) {
            const int v = h.entries[i * k + j];
            if (v == -1)
                packed[i * words + j / 64] |= std::uint64_t{1} << (j % 64);
            else if (v != 1)
                return "entry (" + std::to_string(i) + ", " + std::to_string(j) + ") is " + std::to_string(v);
        }
    for (std::size_t i = 0; i < k; ++i)
        for (std::size_t j = i + 1; j < k; ++j) {
            const std::uint64_t* a = packed.data() + i * words;
            const std::uint64_t* b = packed.data() + j * words;
            std::size_t differ = 0;
            for (std::size_t w = 0; w < words; ++w) differ += static_cast<std::size_t>(std::popcount(a[w] ^ b[w]));
            if (2 * differ != k)
                return "rows " + std::to_string(i) + " and " + std::to_string(j) + " have inner product " +
                       std::to_string(static_cast<long long>(k) - 2 * static_cast<long long>(differ));
        }
    return {};
}

/// The +-1 matrix from rows of '+' and '-' (the golden files' encoding).
inline spinquant::detail::sign_matrix sign_matrix_from_rows(const std::vector<std::string>& rows)
{
    spinquant::detail::sign_matrix h{rows.size(), {}};
    h.entries.reserve(rows.size() * rows.size());
    for (const auto& r : rows)
        for (const char c : r) h.entries.push_back(c == '+' ? std::int8_t{1} : c == '-' ? std::int8_t{-1} : std::int8_t{0});
    return h;
}

}  // namespace spinquant::test
