#pragma once
/// Hadamard matrices of order K: the +-1 matrices H with H H^T = K I that hadamard_plan uses to mix
/// the K rows of x viewed as K x 2^k (internals of hadamard.hpp; Eigen-free).
///
/// A Hadamard matrix of order K > 2 needs K = 4m. construct_hadamard(K) builds one by the first of
/// these that applies (hadamard_construction_for(K) says which, without building anything):
///   reference  K in {12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172}: SpinQuant's own matrix
///              (get_hadK), stored as data, so that transforms match the reference bit for bit.
///              Nine of them are also what the constructions below give (tested): 12, 20, 44, 60,
///              108 and 140 are our Paley I, 28 and 36 our Paley II, 40 = H_2 (x) H_20. 52, 156 and
///              172 are Williamson-type matrices that only the data provides.
///   sylvester  K = 2^a (1, 2, 4, ...): H[i][j] = (-1)^popcount(i & j), the natural order of fwht.
///   paley1     K = q + 1 for a prime power q = 3 (mod 4): H = I + S with the skew matrix
///              S = [[0, -1^T], [1, Q]], Q[x][y] = chi(x - y) over GF(q), chi the quadratic
///              character. Skew-Hadamard (H + H^T = 2I); first column all +1, first row +1 then -1.
///   paley2     K = 2(q + 1) for a prime power q = 1 (mod 4): with the symmetric conference matrix
///              C = [[0, 1^T], [1, Q]], H = [[C + I, C - I], [C - I, -C - I]] (symmetric).
///   table      K in {92, 116}: the Williamson array of four symmetric circulant matrices of order
///              K/4 whose first rows are tabulated (found by scripts/gen_hadamard_tables.py).
///   kronecker  K = a b with a, b known: H_a (x) H_b for the smallest such a >= 2. Otherwise
///              K = a b / 2 with a, b >= 4 known (the halved product, Agaian and Sarukhanyan's
///              multiplication theorem): split H_a into column halves U, V and H_b into row halves
///              S, T; then ((U + V)/2) (x) S + ((U - V)/2) (x) T is Hadamard of order a b / 2.
/// Paley matrices use real GF(p^k) arithmetic (galois_field): every prime power q is covered, not
/// only primes, e.g. GF(49) for K = 100 (Paley II) and GF(27) for K = 28 (Paley I; the reference
/// order 28 is served by its Paley II matrix first).
///
/// Coverage: orders up to max_hadamard_order (2^16). Every multiple of 4 up to 1024 is known except
/// these 50. All but 668 (the smallest order for which no Hadamard matrix is known at all) have
/// matrices in the literature, from constructions this file does not implement (Goethals-Seidel
/// arrays, Williamson and T-matrix searches beyond order 116, and others):
///   188 236 260 268 292 324 356 372 376 404 412 428 436 452 472 476 508 532 536 584 596 604 612
///   652 668 712 716 732 756 764 772 808 836 852 856 872 876 892 904 932 940 944 956 964 980 988
///   996 1004 1012 1016
/// Every K an LLM dimension needs is known (hadamard_plan picks K = 4m, 8m, ... for n = m 2^j):
/// 12 ... 172, 116 (14848, 59392 = 29 * 2^j; 464 is Paley I too), 284 (4544, 18176 = 71 * 2^j),
/// 684 (10944), 924 (29568) among others; the tests list the models and their dimensions.
///
/// Cost: construct_hadamard(K) allocates the K x K matrix (K^2 bytes) and takes O(K^2) time
/// (Paley needs GF(q) tables of O(q) size first): a few milliseconds for K near 2048 at -O2.
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "../config.hpp"
#include "hadamard_tables.hpp"

namespace spinquant::detail {

/// A Hadamard matrix of order `order`: row-major entries +1/-1, H * H^T == order * I.
struct sign_matrix {
    std::size_t order = 0;
    std::vector<std::int8_t> entries;  // order*order, row-major

    /// Entry (i, j), +1 or -1. Precondition: i, j < order (SPINQUANT_ASSERT).
    [[nodiscard]] std::int8_t operator()(std::size_t i, std::size_t j) const noexcept
    {
        SPINQUANT_ASSERT(i < order && j < order);
        return entries[i * order + j];
    }
};

/// How construct_hadamard builds an order; see the comment at the top of this file.
enum class hadamard_construction { sylvester, paley1, paley2, kronecker, table, reference, none };

/// The largest order hadamard_construction_for / construct_hadamard consider (a matrix of 4 GiB);
/// larger orders are reported unknown, which keeps the queries cheap.
inline constexpr std::size_t max_hadamard_order = std::size_t{1} << 16;

/// How construct_hadamard(k) would build order k (cheap; no construction). `none` when unknown.
[[nodiscard]] inline hadamard_construction hadamard_construction_for(std::size_t k) noexcept;

/// True when construct_hadamard(k) produces a matrix.
[[nodiscard]] inline bool hadamard_order_known(std::size_t k) noexcept
{
    return hadamard_construction_for(k) != hadamard_construction::none;
}

// ---------------------------------------------------------------------------------------------
// Prime powers and the finite field GF(p^k)

/// q = p^k with p prime.
struct prime_power {
    std::uint32_t p = 0;
    unsigned k = 0;
};

/// (p, k) with q = p^k, p prime and k >= 1, or nullopt when q is not a prime power. O(sqrt(q)).
[[nodiscard]] constexpr std::optional<prime_power> as_prime_power(std::size_t q) noexcept
{
    if (q < 2 || q > 0xFFFFFFFFu) return std::nullopt;
    for (std::size_t p = 2; p <= q / p; ++p) {
        if (q % p != 0) continue;
        unsigned k = 0;
        while (q % p == 0) {
            q /= p;
            ++k;
        }
        if (q != 1) return std::nullopt;
        return prime_power{static_cast<std::uint32_t>(p), k};
    }
    return prime_power{static_cast<std::uint32_t>(q), 1};
}

/// The finite field GF(q), q = p^k <= max_hadamard_order. Element e in [0, q) stands for the
/// polynomial sum_d e_d x^d over GF(p), e_d the base-p digits of e (constant term lowest), so 0 and
/// 1 are the field's zero and one and the prime field is [0, p). Products are reduced modulo the
/// monic irreducible polynomial of degree k found by search: the first in the order of the
/// integer formed by its lower coefficients (for k = 1 that is x, i.e. arithmetic mod p).
class galois_field {
public:
    using element = std::uint32_t;

    /// GF(q). Precondition: q is a prime power <= max_hadamard_order (SPINQUANT_ASSERT).
    /// Builds digit tables of size q k and searches the modulus: O(q k + p^k k^2) at most.
    explicit galois_field(std::size_t q) : q_(q)
    {
        const auto pk = as_prime_power(q);
        SPINQUANT_ASSERT(pk.has_value() && q <= max_hadamard_order);
        p_ = pk->p;
        k_ = pk->k;
        digits_.resize(q_ * k_);
        for (std::size_t e = 0; e < q_; ++e) {
            std::size_t v = e;
            for (unsigned d = 0; d < k_; ++d) {
                digits_[e * k_ + d] = static_cast<element>(v % p_);
                v /= p_;
            }
        }
        modulus_ = find_modulus();
    }

    [[nodiscard]] std::size_t order() const noexcept { return q_; }
    [[nodiscard]] element characteristic() const noexcept { return p_; }
    [[nodiscard]] unsigned degree() const noexcept { return k_; }
    /// Coefficients m_0 .. m_k (m_k = 1) of the modulus polynomial, constant term first.
    [[nodiscard]] const std::vector<element>& modulus() const noexcept { return modulus_; }

    /// Base-p digit d of element e (coefficient of x^d). Precondition: e < q, d < k.
    [[nodiscard]] element digit(element e, unsigned d) const noexcept { return digits_[std::size_t{e} * k_ + d]; }

    [[nodiscard]] element add(element a, element b) const noexcept
    {
        element r = 0, w = 1;
        for (unsigned d = 0; d < k_; ++d, w *= p_) {
            element s = digit(a, d) + digit(b, d);
            if (s >= p_) s -= p_;
            r += s * w;
        }
        return r;
    }
    [[nodiscard]] element sub(element a, element b) const noexcept
    {
        element r = 0, w = 1;
        for (unsigned d = 0; d < k_; ++d, w *= p_) {
            const element x = digit(a, d), y = digit(b, d);
            r += (x >= y ? x - y : x + p_ - y) * w;
        }
        return r;
    }
    [[nodiscard]] element neg(element a) const noexcept { return sub(0, a); }
    [[nodiscard]] element mul(element a, element b) const noexcept
    {
        // Schoolbook product of the two polynomials, then reduction by the monic modulus from the top.
        std::array<std::uint64_t, 2 * max_degree> prod{};
        for (unsigned i = 0; i < k_; ++i) {
            const std::uint64_t ai = digit(a, i);
            if (ai == 0) continue;
            for (unsigned j = 0; j < k_; ++j) prod[i + j] = (prod[i + j] + ai * digit(b, j)) % p_;
        }
        for (unsigned top = 2 * k_ - 1; top-- > k_;) {
            const std::uint64_t c = prod[top];
            if (c == 0) continue;
            // x^top = x^(top-k) * x^k and x^k = -(m_0 + ... + m_{k-1} x^{k-1}).
            for (unsigned j = 0; j < k_; ++j)
                prod[top - k_ + j] = (prod[top - k_ + j] + c * (p_ - modulus_[j])) % p_;
            prod[top] = 0;
        }
        element r = 0, w = 1;
        for (unsigned d = 0; d < k_; ++d, w *= p_) r += static_cast<element>(prod[d]) * w;
        return r;
    }

    /// chi(e) for every element e: 0 for e = 0, +1 for a nonzero square, -1 for a non-square
    /// (computed as the set of squares x * x). For odd q exactly (q - 1)/2 entries are +1.
    [[nodiscard]] std::vector<std::int8_t> quadratic_character() const
    {
        std::vector<std::int8_t> chi;
        chi.reserve(q_);
        chi.push_back(0);      // (not chi(q_, -1) then chi[0] = 0: g++ 12 -Wnull-dereference misfires on that)
        chi.resize(q_, -1);
        for (element x = 1; x < q_; ++x) chi[mul(x, x)] = 1;
        return chi;
    }

private:
    static constexpr unsigned max_degree = 16;  // 2^16 = max_hadamard_order

    // Remainder of the monic polynomial `f` (coefficients, constant first) divided by the monic `g`.
    [[nodiscard]] bool divides(const std::vector<element>& g, std::vector<element> f) const
    {
        const std::size_t dg = g.size() - 1;
        for (std::size_t top = f.size() - 1; top >= dg; --top) {
            const element c = f[top];
            if (c != 0)
                for (std::size_t j = 0; j <= dg; ++j) {
                    const element t = static_cast<element>((std::uint64_t{c} * g[j]) % p_);
                    element& fj = f[top - dg + j];
                    fj = fj >= t ? fj - t : fj + p_ - t;
                }
            if (top == dg) break;
        }
        for (std::size_t j = 0; j < dg; ++j)
            if (f[j] != 0) return false;
        return true;
    }

    // The first monic irreducible polynomial of degree k: no monic factor of degree 1 .. k/2.
    [[nodiscard]] std::vector<element> find_modulus() const
    {
        std::vector<element> f(k_ + 1, 0), g;
        f[k_] = 1;
        for (std::size_t code = 0;; ++code) {
            for (unsigned d = 0; d < k_; ++d) f[d] = digit(static_cast<element>(code), d);
            bool irreducible = true;
            for (unsigned dg = 1; irreducible && 2 * dg <= k_; ++dg) {
                std::size_t count = 1;  // p^dg monic polynomials of degree dg
                for (unsigned i = 0; i < dg; ++i) count *= p_;
                g.assign(dg + 1, 0);
                g[dg] = 1;
                for (std::size_t gcode = 0; gcode < count; ++gcode) {
                    for (unsigned d = 0; d < dg; ++d) g[d] = digit(static_cast<element>(gcode), d);
                    if (divides(g, f)) {
                        irreducible = false;
                        break;
                    }
                }
            }
            if (irreducible) return f;
            SPINQUANT_ASSERT(code + 1 < q_);  // an irreducible polynomial of every degree exists
        }
    }

    std::size_t q_ = 0;
    element p_ = 0;
    unsigned k_ = 0;
    std::vector<element> digits_;  // q * k base-p digits
    std::vector<element> modulus_;
};

// ---------------------------------------------------------------------------------------------
// The constructions (each returns a matrix with H H^T = order I; the tests check every one)

/// Sylvester's matrix of order k = 2^a: H[i][j] = (-1)^popcount(i & j). Precondition: k a power of two.
[[nodiscard]] inline sign_matrix sylvester_hadamard(std::size_t k)
{
    SPINQUANT_ASSERT(std::has_single_bit(k));
    sign_matrix h{k, std::vector<std::int8_t>(k * k)};
    // H_2m = [[H_m, H_m], [H_m, -H_m]], grown in place from H_1 = [1] (block copies, no popcount).
    h.entries[0] = 1;
    for (std::size_t m = 1; m < k; m *= 2)
        for (std::size_t i = 0; i < m; ++i) {
            std::int8_t* top = h.entries.data() + i * k;
            std::int8_t* bottom = top + m * k;
            for (std::size_t j = 0; j < m; ++j) {
                top[j + m] = top[j];
                bottom[j] = top[j];
                bottom[j + m] = static_cast<std::int8_t>(-top[j]);
            }
        }
    return h;
}

/// The Jacobsthal matrix entries Q[x][y] = chi(x - y) of GF(q), written through `put(x, y, value)`
/// in row-major order.
template <class Put>
void for_each_jacobsthal_entry(const galois_field& f, Put&& put)
{
    const std::vector<std::int8_t> chi = f.quadratic_character();
    const std::size_t q = f.order();
    if (f.degree() == 1) {
        // Prime field: x - y is an integer difference, no digit arithmetic needed.
        for (std::size_t x = 0; x < q; ++x)
            for (std::size_t y = 0; y < q; ++y) put(x, y, chi[x >= y ? x - y : x + q - y]);
        return;
    }
    // Subtraction is digit-wise, so split each element into low digits (base lo = p^(k/2)) and high
    // digits and subtract each half through a small table: x - y = sub_lo[xl][yl] + lo sub_hi[xh][yh].
    // That keeps the O(q^2) loop free of per-entry digit loops and divisions.
    std::size_t lo = 1;
    for (unsigned d = 0; d < f.degree() / 2; ++d) lo *= f.characteristic();
    const std::size_t hi = q / lo;
    std::vector<std::uint32_t> sub_lo(lo * lo), sub_hi(hi * hi);
    using element = galois_field::element;
    for (std::size_t a = 0; a < lo; ++a)
        for (std::size_t b = 0; b < lo; ++b) sub_lo[a * lo + b] = f.sub(static_cast<element>(a), static_cast<element>(b));
    for (std::size_t a = 0; a < hi; ++a)
        for (std::size_t b = 0; b < hi; ++b)
            sub_hi[a * hi + b] = f.sub(static_cast<element>(a * lo), static_cast<element>(b * lo));  // a multiple of lo
    for (std::size_t x = 0; x < q; ++x) {
        const std::uint32_t* row_lo = sub_lo.data() + (x % lo) * lo;
        const std::uint32_t* row_hi = sub_hi.data() + (x / lo) * hi;
        for (std::size_t yh = 0; yh < hi; ++yh)
            for (std::size_t yl = 0; yl < lo; ++yl) put(x, yh * lo + yl, chi[row_lo[yl] + row_hi[yh]]);
    }
}

/// Paley I matrix of order q + 1 over `f` = GF(q), q = 3 (mod 4): H = I + [[0, -1^T], [1, Q]].
/// Skew-Hadamard: H + H^T = 2I. Precondition: q = 3 (mod 4) (SPINQUANT_ASSERT).
[[nodiscard]] inline sign_matrix paley1_hadamard(const galois_field& f)
{
    const std::size_t q = f.order(), k = q + 1;
    SPINQUANT_ASSERT(q % 4 == 3);
    sign_matrix h{k, std::vector<std::int8_t>(k * k)};
    for (std::size_t j = 0; j < k; ++j) h.entries[j] = j == 0 ? 1 : -1;
    for (std::size_t i = 1; i < k; ++i) h.entries[i * k] = 1;
    for_each_jacobsthal_entry(f, [&](std::size_t x, std::size_t y, std::int8_t chi) {
        h.entries[(x + 1) * k + y + 1] = x == y ? std::int8_t{1} : chi;
    });
    return h;
}

/// Paley II matrix of order 2(q + 1) over `f` = GF(q), q = 1 (mod 4): with C = [[0, 1^T], [1, Q]],
/// H = [[C + I, C - I], [C - I, -C - I]]. Symmetric. Precondition: q = 1 (mod 4) (SPINQUANT_ASSERT).
[[nodiscard]] inline sign_matrix paley2_hadamard(const galois_field& f)
{
    const std::size_t q = f.order(), c = q + 1, k = 2 * c;
    SPINQUANT_ASSERT(q % 4 == 1);
    sign_matrix h{k, std::vector<std::int8_t>(k * k)};
    // Entry (i, j) of C, i, j < c, placed in the four blocks; C's zero diagonal becomes +1 -1 / -1 -1.
    const auto place = [&](std::size_t i, std::size_t j, std::int8_t cij) {
        const bool diag = i == j;
        h.entries[i * k + j] = diag ? std::int8_t{1} : cij;
        h.entries[i * k + j + c] = diag ? std::int8_t{-1} : cij;
        h.entries[(i + c) * k + j] = diag ? std::int8_t{-1} : cij;
        h.entries[(i + c) * k + j + c] = diag ? std::int8_t{-1} : static_cast<std::int8_t>(-cij);
    };
    place(0, 0, 0);
    for (std::size_t j = 1; j < c; ++j) {
        place(0, j, 1);
        place(j, 0, 1);
    }
    for_each_jacobsthal_entry(f, [&](std::size_t x, std::size_t y, std::int8_t chi) { place(x + 1, y + 1, chi); });
    return h;
}

/// The Hadamard matrix of order 4n of the Williamson array
///   [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]
/// for the symmetric circulants A..D with the first rows of `w` ('+' = +1).
[[nodiscard]] inline sign_matrix williamson_hadamard(const williamson_quadruple& w)
{
    const std::size_t n = w.n, k = 4 * n;
    const std::array<std::string_view, 4> first_rows{w.a, w.b, w.c, w.d};
    SPINQUANT_ASSERT(w.a.size() == n && w.b.size() == n && w.c.size() == n && w.d.size() == n);
    static constexpr std::array<std::array<int, 4>, 4> which{{{0, 1, 2, 3}, {1, 0, 3, 2}, {2, 3, 0, 1}, {3, 2, 1, 0}}};
    static constexpr std::array<std::array<int, 4>, 4> sign{{{1, 1, 1, 1}, {-1, 1, -1, 1}, {-1, 1, 1, -1}, {-1, -1, 1, 1}}};
    sign_matrix h{k, std::vector<std::int8_t>(k * k)};
    for (std::size_t bi = 0; bi < 4; ++bi)
        for (std::size_t bj = 0; bj < 4; ++bj) {
            const std::string_view row = first_rows[static_cast<std::size_t>(which[bi][bj])];
            const int s = sign[bi][bj];
            for (std::size_t r = 0; r < n; ++r)
                for (std::size_t c = 0; c < n; ++c) {
                    const int v = row[c >= r ? c - r : c + n - r] == '+' ? s : -s;  // circulant: depends on c - r
                    h.entries[(bi * n + r) * k + bj * n + c] = static_cast<std::int8_t>(v);
                }
        }
    return h;
}

/// The Kronecker product a (x) b: entry (i b + r, j b + s) = a(i, j) b(r, s). Order a.order * b.order.
[[nodiscard]] inline sign_matrix kronecker_product(const sign_matrix& a, const sign_matrix& b)
{
    const std::size_t na = a.order, nb = b.order, k = na * nb;
    sign_matrix h{k, std::vector<std::int8_t>(k * k)};
    for (std::size_t i = 0; i < na; ++i)
        for (std::size_t r = 0; r < nb; ++r) {
            std::int8_t* out = h.entries.data() + (i * nb + r) * k;
            const std::int8_t* brow = b.entries.data() + r * nb;
            for (std::size_t j = 0; j < na; ++j) {
                const std::int8_t s = a(i, j);
                for (std::size_t c = 0; c < nb; ++c) out[j * nb + c] = static_cast<std::int8_t>(s * brow[c]);
            }
        }
    return h;
}

/// The halved product of Hadamard matrices of even orders a and b, of order a b / 2: with U, V the
/// left and right column halves of `a` and S, T the top and bottom row halves of `b`,
/// X = (U + V)/2 and Y = (U - V)/2 have disjoint supports and X X^T + Y Y^T = (a/2) I, while
/// S S^T = T T^T = b I and S T^T = 0, so X (x) S + Y (x) T is +-1 with H H^T = (a b / 2) I.
/// Row (i, r) = i b/2 + r, column (j, c) = j b + c. Precondition: both orders even (SPINQUANT_ASSERT).
[[nodiscard]] inline sign_matrix halved_kronecker_product(const sign_matrix& a, const sign_matrix& b)
{
    const std::size_t na = a.order, nb = b.order, k = na * nb / 2;
    SPINQUANT_ASSERT(na % 2 == 0 && nb % 2 == 0);
    sign_matrix h{k, std::vector<std::int8_t>(k * k)};
    for (std::size_t i = 0; i < na; ++i)
        for (std::size_t r = 0; r < nb / 2; ++r) {
            std::int8_t* out = h.entries.data() + (i * (nb / 2) + r) * k;
            for (std::size_t j = 0; j < na / 2; ++j) {
                const std::int8_t u = a(i, j);
                // Where U and V agree X carries the sign and S the row; where they differ, Y and T.
                const std::int8_t* brow = b.entries.data() + (u == a(i, j + na / 2) ? r : r + nb / 2) * nb;
                for (std::size_t c = 0; c < nb; ++c) out[j * nb + c] = static_cast<std::int8_t>(u * brow[c]);
            }
        }
    return h;
}

/// A +-1 matrix from the hex packing of hadamard_tables.hpp.
[[nodiscard]] inline sign_matrix unpack_hadamard(const packed_hadamard& packed)
{
    const std::size_t k = packed.order, digits = (k + 3) / 4;
    SPINQUANT_ASSERT(packed.hex.size() == k * digits);
    sign_matrix h{k, std::vector<std::int8_t>(k * k)};
    for (std::size_t i = 0; i < k; ++i)
        for (std::size_t j = 0; j < k; ++j) {
            const char ch = packed.hex[i * digits + j / 4];
            const unsigned nibble = static_cast<unsigned>(ch <= '9' ? ch - '0' : ch - 'a' + 10);
            h.entries[i * k + j] = ((nibble >> (3 - j % 4)) & 1u) != 0 ? -1 : 1;
        }
    return h;
}

// ---------------------------------------------------------------------------------------------
// Dispatch

/// The orders of the reference's matrices, in its get_hadK test order.
inline constexpr std::array<std::size_t, 12> reference_dispatch_orders{172, 156, 140, 108, 60, 52, 36, 28, 44, 40, 20, 12};

/// How a Kronecker-type order splits: a (x) b, or the halved product of a and b when `halved`.
struct kronecker_split {
    std::size_t a = 0, b = 0;
    bool halved = false;
};

/// The split construct_hadamard uses for k: a b = k with a, b known and the smallest a >= 2; else
/// a b = 2k with a, b >= 4 known and the smallest a. nullopt when neither exists.
[[nodiscard]] inline std::optional<kronecker_split> find_kronecker_split(std::size_t k) noexcept
{
    // Hadamard orders are 1, 2 or multiples of 4, so only such factors can work.
    const auto candidate = [](std::size_t a) { return a == 2 || a % 4 == 0; };
    for (std::size_t a = 2; a <= k / a; ++a)
        if (k % a == 0 && candidate(a) && candidate(k / a) && hadamard_order_known(a) && hadamard_order_known(k / a))
            return kronecker_split{a, k / a, false};
    for (std::size_t a = 4; a <= 2 * k / a; a += 4)
        if ((2 * k) % a == 0 && (2 * k / a) % 4 == 0 && hadamard_order_known(a) && hadamard_order_known(2 * k / a))
            return kronecker_split{a, 2 * k / a, true};
    return std::nullopt;
}

inline hadamard_construction hadamard_construction_for(std::size_t k) noexcept
{
    if (k == 0 || k > max_hadamard_order) return hadamard_construction::none;
    for (const auto& t : reference_hadamard_data)
        if (t.order == k) return hadamard_construction::reference;
    if (std::has_single_bit(k)) return hadamard_construction::sylvester;
    if (k % 4 != 0) return hadamard_construction::none;
    if (as_prime_power(k - 1)) return hadamard_construction::paley1;          // k - 1 = 3 (mod 4)
    if (k % 8 == 4 && as_prime_power(k / 2 - 1)) return hadamard_construction::paley2;  // k/2 - 1 = 1 (mod 4)
    for (const auto& w : williamson_data)
        if (4 * w.n == k) return hadamard_construction::table;
    if (find_kronecker_split(k)) return hadamard_construction::kronecker;
    return hadamard_construction::none;
}

/// SpinQuant's own matrix for k in {12,20,28,36,40,44,52,60,108,140,156,172} (bit-identical to the
/// reference's get_hadK matrices / golden/hadamard_matrices_spinquant.json); nullopt otherwise.
[[nodiscard]] inline std::optional<sign_matrix> reference_hadamard(std::size_t k)
{
    for (const auto& t : reference_hadamard_data)
        if (t.order == k) return unpack_hadamard(t);
    return std::nullopt;
}

/// A Hadamard matrix of order k: the reference's matrix when k is one of its 12 orders, else Sylvester (k = 2^a,
/// incl. 1 and 2), Paley I, Paley II, tabulated data, or a Kronecker product of known orders; nullopt if none known.
/// Deterministic (the same matrix on every platform). Allocates k^2 bytes; O(k^2) time.
[[nodiscard]] inline std::optional<sign_matrix> construct_hadamard(std::size_t k)
{
    switch (hadamard_construction_for(k)) {
    case hadamard_construction::reference: return reference_hadamard(k);
    case hadamard_construction::sylvester: return sylvester_hadamard(k);
    case hadamard_construction::paley1: return paley1_hadamard(galois_field(k - 1));
    case hadamard_construction::paley2: return paley2_hadamard(galois_field(k / 2 - 1));
    case hadamard_construction::table:
        for (const auto& w : williamson_data)
            if (4 * w.n == k) return williamson_hadamard(w);
        break;
    case hadamard_construction::kronecker: {
        const auto split = find_kronecker_split(k);
        SPINQUANT_ASSERT(split.has_value());
        const auto a = construct_hadamard(split->a), b = construct_hadamard(split->b);
        return split->halved ? halved_kronecker_product(*a, *b) : kronecker_product(*a, *b);
    }
    case hadamard_construction::none: break;
    }
    return std::nullopt;
}

/// The reference's get_hadK dispatch: the K it would pick for n (first of 172,156,140,108,60,52,36,28,44,40,20,12
/// dividing n with n/K a power of two; 1 if n is a power of two), or 0 when the reference cannot do n.
[[nodiscard]] inline std::size_t reference_dispatch_order(std::size_t n) noexcept
{
    if (n == 0) return 0;
    for (const std::size_t k : reference_dispatch_orders)
        if (n % k == 0) return std::has_single_bit(n / k) ? k : 0;  // the reference asserts on the first divisor
    return std::has_single_bit(n) ? 1 : 0;
}

}  // namespace spinquant::detail
