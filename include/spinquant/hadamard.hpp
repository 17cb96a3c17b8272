#pragma once
/// The Walsh-Hadamard transform for every LLM dimension (the online rotations R3/R4 of SpinQuant,
/// arXiv 2405.16406, and the Hadamard part of R1/R2): `fwht` for n = 2^k, `hadamard_plan` for
/// n = K * 2^k, and dense Hadamard matrices for merging into weights. Eigen-free (xsimd only).
///
/// Semantics (SpinQuant's `matmul_hadU`): for n = K m with m = 2^k, x is viewed as a K x m
/// row-major matrix; every row gets the natural-order (Sylvester) transform H_m, with
/// H_m[u][v] = (-1)^popcount(u & v); then H_K mixes the rows (row i becomes sum_k H_K[i][k] row k);
/// finally everything is divided by d = sqrt(n). As a matrix acting on a column vector x:
///     apply(x) = (H_K (x) H_m) diag(s) x / d,        apply_inverse(x) = diag(s) (H_K^T (x) H_m) x / d,
/// where s are the optional random signs (all +1 without them). Both are orthogonal, so
/// apply_inverse(apply(x)) == x up to rounding. The reference's functions act on row vectors:
/// its matmul_hadU(X) is apply on every row of X, matmul_hadUt(X) is apply_inverse on every row,
/// and its hadamard_matrix(n) / random_hadamard_matrix(n) equal the transpose of
/// hadamard_plan::matrix() (with the same signs).
#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <xsimd/xsimd.hpp>

#include "concepts.hpp"
#include "error.hpp"
#include "detail/checks.hpp"
#include "detail/fwht_kernel.hpp"
#include "detail/fwht_mix.hpp"
// GCC 12 at -O2 reports a "potential null pointer dereference" in sylvester_hadamard for k = 0,
// which no caller passes; kept out of -Werror builds here until the header says so itself.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wnull-dereference"
#endif
#include "detail/hadamard_construct.hpp"
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#include "detail/random.hpp"

// See fwht_kernel.hpp: GCC 12's false "uninitialized" report inside _mm512_permutexvar_ps.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

/// Stack bytes hadamard_plan::apply may use for the K x K mixing stage when the caller passes no
/// workspace (define before including to change it; at least 32768). With the default, K up to
/// about 900 runs the fast kernel with AVX-512 floats (K up to about 1900 with AVX2), which covers
/// every LLM dimension we know of (the largest, Qwen2-72B's 29568, has K = 924); larger K fall
/// back to a scalar O(K^2) column product unless the caller passes a workspace of
/// workspace_size() elements. Rows whose power-of-two part is shorter than a register (n = K m,
/// m < L) need a tile of L n / m elements besides: K up to about 470 with AVX-512 floats and m = 1
/// (the R4 size 172 = K has room to spare). Define it the same in every translation unit of a
/// program: it changes inline functions.
#ifndef SPINQUANT_HADAMARD_STACK_BYTES
#define SPINQUANT_HADAMARD_STACK_BYTES 65536
#endif

namespace spinquant {

/// The divisor d of the transform. Either way the kernels multiply by 1/d rounded once to T where
/// the reference divides by d: a difference of rounding only.
enum class hadamard_normaliser {
    exact,      ///< d = sqrt(n): the orthonormal transform
    reference,  ///< d = float32(sqrt(n)), as SpinQuant's torch.tensor(n).sqrt() computes it, even
                ///< for double data (so the transform is orthogonal only to float precision)
};

/// Where the K x K matrix comes from.
enum class hadamard_source {
    cheapest,   ///< the smallest K with a known Hadamard matrix of order K (least work); for K among
                ///< the reference's 12 orders this is the reference's matrix
    reference,  ///< SpinQuant's get_hadK: its order for n (e.g. 40 for n = 160, not 20) and its
                ///< matrices, so results match the reference up to floating-point rounding (summation
                ///< order, 1/d as a product); only the sizes the reference supports
};

/// Options of a hadamard_plan / hadamard_matrix.
struct hadamard_options {
    hadamard_normaliser normaliser = hadamard_normaliser::exact;
    hadamard_source source = hadamard_source::cheapest;
    /// Randomized Hadamard: x is multiplied by random signs s before the transform (see the top of
    /// this file). The signs are detail::random_sign draws from std::mt19937_64(seed), one per
    /// element in order, so they are the same on every platform and standard library.
    bool random_signs = false;
    std::uint64_t seed = 0;
};

namespace detail {

/// The largest K a plan uses (so the scalar fallback's K-element column fits the stack budget).
inline constexpr std::size_t max_plan_order = 4096;
inline constexpr std::size_t hadamard_stack_bytes = SPINQUANT_HADAMARD_STACK_BYTES;
static_assert(hadamard_stack_bytes >= max_plan_order * sizeof(double), "SPINQUANT_HADAMARD_STACK_BYTES too small");

/// The K a plan of size n uses (1 for powers of two), or 0 when n is not supported.
/// cheapest: the smallest known K <= max_plan_order with n / K a power of two.
[[nodiscard]] inline std::size_t hadamard_order_for(std::size_t n, hadamard_source source) noexcept
{
    if (n == 0) return 0;
    if (source == hadamard_source::reference) return reference_dispatch_order(n);
    const auto twos = std::countr_zero(n);
    for (int j = twos; j >= 0; --j) {  // K = n / 2^j grows as j falls
        const std::size_t k = n >> j;
        if (k > max_plan_order) break;
        if (hadamard_order_known(k)) return k;
    }
    return 0;
}

/// " (nearest supported sizes: a and b)" for an unsupported n: the largest supported size below n
/// (left out when there is none) and the smallest above. Every supported size is K 2^j for one of
/// the orders K a plan may use, so the candidates are enumerated order by order: O(max_plan_order
/// log n) cheap queries, whatever n is.
[[nodiscard]] inline std::string hadamard_nearest_sizes(std::size_t n, hadamard_source source)
{
    constexpr std::size_t top = ~std::size_t{0};
    std::size_t below = 0, above = top;
    const auto consider = [&](std::size_t k) {
        for (std::size_t v = k; v != 0; v = v <= top / 2 ? 2 * v : 0) {
            if (hadamard_order_for(v, source) == 0) continue;  // the reference rejects some K 2^j
            if (v < n && v > below) below = v;
            if (v > n && v < above) above = v;
        }
    };
    consider(1);
    if (source == hadamard_source::reference) {
        for (const std::size_t k : reference_dispatch_orders) consider(k);
    } else {
        for (std::size_t k = 4; k <= max_plan_order; k += 4)
            if (!std::has_single_bit(k) && hadamard_order_known(k)) consider(k);
    }
    std::string s = " (nearest supported sizes: ";
    if (below != 0) s += std::to_string(below) + " and ";
    return s + (above != top ? std::to_string(above) : std::string("none above")) + ")";
}

[[noreturn]] inline void fail_unsupported_hadamard(std::string_view where, std::size_t n, hadamard_source source)
{
    std::string why = "no Hadamard transform of size " + std::to_string(n);
    why += source == hadamard_source::reference
               ? " in the reference's get_hadK (n = 2^j, or K 2^j for its first K dividing n among "
                 "172, 156, 140, 108, 60, 52, 36, 28, 44, 40, 20, 12)"
               : " (n = K 2^j needs a known Hadamard matrix of order K <= " + std::to_string(max_plan_order) + ")";
    fail(errc::unsupported_size, where, why + hadamard_nearest_sizes(n, source));
}

}  // namespace detail

/// True when a hadamard_plan of size n can be built with `source` (n = 2^j, or K * 2^j with a
/// known Hadamard matrix of order K). Cheap (no matrix is built).
[[nodiscard]] inline bool has_hadamard(std::size_t n, hadamard_source source = hadamard_source::cheapest) noexcept
{
    return detail::hadamard_order_for(n, source) != 0;
}

/// Applies the orthonormal Walsh-Hadamard transform H_n / sqrt(n) (natural order) to `x` in place.
/// Throws spinquant::error (errc::unsupported_size), with `x` untouched, unless size(x) is a power
/// of two (use hadamard_plan for other sizes). Allocation-free; O(n log n).
/// Involution: fwht(fwht(x)) == x up to rounding.
template <mutable_real_vector V>
void fwht(V&& x)
{
    const auto s = spinquant::as_span(x);
    if (!std::has_single_bit(s.size()))
        detail::fail(errc::unsupported_size, "fwht",
                     "length " + std::to_string(s.size()) + " is not a power of two");
    using T = typename decltype(s)::element_type;
    const detail::fwht_multiplier<T> scale{detail::fwht_scale::scalar,
                                           static_cast<T>(1.0 / std::sqrt(static_cast<double>(s.size()))), nullptr};
    detail::fwht_pow2_scaled<T>(s, scale, {}, detail::fwht_rows_window<T>(s.size(), {s.data(), s.size()}));
}

/// A Walsh-Hadamard transform of one size n = K * 2^k, built once and applied many times: the
/// online rotation of an inference engine (R3 on queries/keys, R4 before down_proj) or the
/// randomized Hadamard of QuaRot/SpinQuant. Semantics at the top of this file.
///
/// Construction picks K (hadamard_source), builds H_K and, if asked, the signs; it allocates
/// O(K^2 + n). apply* are const, allocation-free and safe to call from several threads on one
/// plan. Cost per vector: O(n log n) for the power-of-two part plus about n K / 4 adds for the
/// mix (K = 1 for powers of two). Any alignment works; rows that start on a 64-byte boundary run
/// fastest (with AVX-512 a misaligned row makes every register straddle two cache lines: 20-30%
/// slower at n = 8192, BENCHMARKS.md).
///
/// `Arch` is the xsimd instruction set of the kernels (the best the compiler flags enable by
/// default); name another one to build per-ISA plans for runtime dispatch. As with any xsimd
/// dispatch, each Arch must be instantiated in a translation unit compiled with flags that enable
/// it (xsimd rejects the others at compile time). Caveat of header-only SIMD code: the plan's
/// helpers that are not templates on Arch (building H_K and its tables) are inline functions, and
/// the linker keeps one of their copies, possibly one compiled with the widest flags; a program
/// that must also run on CPUs without that ISA should keep such translation units in a separate
/// shared library, or check the instructions of the copy its linker kept.
///
/// **Example**
/// @code
/// spinquant::hadamard_plan<float> r4(11008);        // Llama-2-7B FFN: K = 172, 2^6
/// r4.apply_rows(activations);                        // every token, in place
/// std::vector<float> m = r4.matrix();                // or merge M into down_proj's weight
/// @endcode
template <real_scalar T, class Arch = xsimd::default_arch>
class hadamard_plan {
public:
    /// The element type the plan transforms.
    using value_type = std::remove_cv_t<T>;
    /// The xsimd instruction set of its kernels.
    using arch_type = Arch;

    /// Plan for size n. Throws errc::unsupported_size (naming the nearest supported sizes) when n
    /// is not supported by `options.source`.
    explicit hadamard_plan(std::size_t n, const hadamard_options& options = {}) : hadamard_plan(n, options, 0)
    {
        if (options.random_signs) {
            std::mt19937_64 engine(options.seed);
            signs_.resize(n_);
            for (auto& s : signs_) s = static_cast<value_type>(detail::random_sign(engine));
            finish_signs();
        }
    }

    /// Plan for size n with the caller's signs s (size n, every entry exactly +1 or -1), e.g. a
    /// saved rotation's diagonal. Throws errc::bad_shape on a wrong length, errc::bad_argument on
    /// an entry that is not +-1 or when options.random_signs is also set, and
    /// errc::unsupported_size as above.
    template <real_vector S>
    hadamard_plan(std::size_t n, const S& signs, const hadamard_options& options = {}) : hadamard_plan(n, options, 0)
    {
        const auto s = spinquant::as_span(signs);
        if (options.random_signs)
            detail::fail(errc::bad_argument, "hadamard_plan", "signs given and options.random_signs set; choose one");
        detail::require_size(s.size(), n_, "hadamard_plan", "signs");
        for (std::size_t i = 0; i < s.size(); ++i)
            if (s[i] != 1 && s[i] != -1)
                detail::fail(errc::bad_argument, "hadamard_plan",
                             "signs[" + std::to_string(i) + "] = " + std::to_string(static_cast<double>(s[i])) +
                                 ", expected +1 or -1");
        signs_.assign(s.begin(), s.end());
        finish_signs();
    }

    /// n.
    [[nodiscard]] std::size_t size() const noexcept { return n_; }
    /// K, the order of the matrix that mixes the rows (1 when n is a power of two).
    [[nodiscard]] std::size_t order() const noexcept { return k_; }
    /// m = n / K, the power-of-two length of each row.
    [[nodiscard]] std::size_t pow2_length() const noexcept { return m_; }
    /// 1 / d, the factor every output is multiplied by.
    [[nodiscard]] value_type scale() const noexcept { return scale_; }
    /// The signs s (+1/-1), empty when the plan has none.
    [[nodiscard]] std::span<const value_type> signs() const noexcept { return signs_; }
    /// H_K as +1/-1 entries, row-major (empty when K = 1).
    [[nodiscard]] std::span<const std::int8_t> order_matrix() const noexcept { return hk_; }

    /// Elements of workspace that let apply(x, workspace) and apply_rows(m, workspace) run the fast
    /// mixing kernel in one round (0 when K = 1: no workspace is ever needed then).
    [[nodiscard]] std::size_t workspace_size() const noexcept
    {
        if (k_ == 1) return 0;
        if (tile_)
            return detail::hadamard_tile_workspace<value_type, Arch>(
                &mix_, m_, mix_.groups, detail::hadamard_tile_strip_registers<value_type, Arch>(k_, m_));
        const std::size_t w = detail::hadamard_mix_strip_width<value_type, Arch>(mix_, m_, ~std::size_t{0});
        return w == 0 ? k_ : detail::hadamard_mix_workspace<value_type, Arch>(mix_, w, mix_.groups);
    }

    /// x <- M x (see the top of this file), in place. Throws errc::bad_shape, with x untouched,
    /// unless size(x) == size(). Allocation-free (uses up to SPINQUANT_HADAMARD_STACK_BYTES of stack when K > 1).
    template <mutable_real_vector V>
        requires std::same_as<std::remove_cv_t<element_t<V>>, value_type>
    void apply(V&& x) const
    {
        run_checked(spinquant::as_span(x), false, "hadamard_plan::apply");
    }
    /// Same with the caller's workspace (at least workspace_size() elements, else errc::bad_shape).
    template <mutable_real_vector V>
        requires std::same_as<std::remove_cv_t<element_t<V>>, value_type>
    void apply(V&& x, std::span<value_type> workspace) const
    {
        run_checked(spinquant::as_span(x), false, workspace, "hadamard_plan::apply");
    }
    /// x <- M^T x = M^-1 x, in place (the reference's matmul_hadUt without signs). Errors as apply.
    template <mutable_real_vector V>
        requires std::same_as<std::remove_cv_t<element_t<V>>, value_type>
    void apply_inverse(V&& x) const
    {
        run_checked(spinquant::as_span(x), true, "hadamard_plan::apply_inverse");
    }
    /// Same with the caller's workspace.
    template <mutable_real_vector V>
        requires std::same_as<std::remove_cv_t<element_t<V>>, value_type>
    void apply_inverse(V&& x, std::span<value_type> workspace) const
    {
        run_checked(spinquant::as_span(x), true, workspace, "hadamard_plan::apply_inverse");
    }

    /// apply() to every row of a rows x size() matrix (tokens x features for activations,
    /// [out, in] weights for merging: W <- W M^T), in place. Rows with unit column stride take the
    /// fast path; any other layout (e.g. a column-major Eigen matrix) is handled correctly by a
    /// scalar strided path, much slower. Short rows (pow2_length() below the SIMD width, e.g.
    /// n = 172 = K) are transformed a block of rows at a time with the lanes running across rows,
    /// in any layout (fastest with unit column stride). Throws errc::bad_shape, with m untouched,
    /// unless cols == size().
    template <mutable_real_matrix M>
        requires std::same_as<std::remove_cv_t<matrix_element_t<M>>, value_type>
    void apply_rows(M&& m) const
    {
        run_rows_checked(spinquant::as_matrix_view(m), false, "hadamard_plan::apply_rows");
    }
    /// Same with the caller's workspace.
    template <mutable_real_matrix M>
        requires std::same_as<std::remove_cv_t<matrix_element_t<M>>, value_type>
    void apply_rows(M&& m, std::span<value_type> workspace) const
    {
        run_rows_checked(spinquant::as_matrix_view(m), false, workspace, "hadamard_plan::apply_rows");
    }
    /// apply_inverse() to every row; as apply_rows.
    template <mutable_real_matrix M>
        requires std::same_as<std::remove_cv_t<matrix_element_t<M>>, value_type>
    void apply_inverse_rows(M&& m) const
    {
        run_rows_checked(spinquant::as_matrix_view(m), true, "hadamard_plan::apply_inverse_rows");
    }
    /// Same with the caller's workspace.
    template <mutable_real_matrix M>
        requires std::same_as<std::remove_cv_t<matrix_element_t<M>>, value_type>
    void apply_inverse_rows(M&& m, std::span<value_type> workspace) const
    {
        run_rows_checked(spinquant::as_matrix_view(m), true, workspace, "hadamard_plan::apply_inverse_rows");
    }

    /// The dense n x n matrix M with apply(x) == M x, row-major: M[i][j] = H_K[i/m][j/m] *
    /// H_m[i%m][j%m] * s_j / d. Entries are exactly +-scale(). Allocates n^2 elements; throws
    /// errc::unsupported_size where n^2 exceeds std::vector's max_size() (n above about 2^30 on
    /// 64-bit targets, 2^14 on 32-bit ones) instead of letting n * n wrap around.
    /// Its transpose is the reference's hadamard_matrix / random_hadamard_matrix.
    [[nodiscard]] std::vector<value_type> matrix() const
    {
        if (n_ > std::vector<value_type>().max_size() / n_)
            detail::fail(errc::unsupported_size, "hadamard_plan::matrix",
                         "the dense matrix of n = " + std::to_string(n_) + " has n^2 elements, more than a "
                         "std::vector holds on this target; apply the plan instead");
        std::vector<value_type> out(n_ * n_);
        for (std::size_t i = 0; i < n_; ++i)
            for (std::size_t j = 0; j < n_; ++j) {
                int sign = (std::popcount((i % m_) & (j % m_)) & 1) != 0 ? -1 : 1;
                if (k_ > 1) sign *= hk_[(i / m_) * k_ + j / m_];
                if (!signs_.empty() && signs_[j] < 0) sign = -sign;
                out[i * n_ + j] = sign > 0 ? scale_ : -scale_;
            }
        return out;
    }

private:
    // Shared part of the constructors: size, K, H_K, the mixing tables and the scale.
    hadamard_plan(std::size_t n, const hadamard_options& options, int) : n_(n)
    {
        k_ = detail::hadamard_order_for(n, options.source);
        if (k_ == 0) detail::fail_unsupported_hadamard("hadamard_plan", n, options.source);
        m_ = n / k_;
        if (k_ > 1) {
            auto h = options.source == hadamard_source::reference ? detail::reference_hadamard(k_)
                                                                   : detail::construct_hadamard(k_);
            SPINQUANT_ASSERT(h.has_value() && h->order == k_);
            hk_ = std::move(h->entries);
            constexpr std::size_t lanes = xsimd::batch<value_type, Arch>::size;
            mix_ = detail::make_hadamard_mix_table(hk_, k_, false, lanes);
            mix_inverse_ = detail::make_hadamard_mix_table(hk_, k_, true, lanes);
        }
        // Rows shorter than a register in their power-of-two part go through the tile kernel
        // (lanes across rows; detail/fwht_mix.hpp).
        tile_ = m_ < xsimd::batch<value_type, Arch>::size;
        const double d = options.normaliser == hadamard_normaliser::reference
                             ? static_cast<double>(std::sqrt(static_cast<float>(n)))
                             : std::sqrt(static_cast<double>(n));
        scale_ = static_cast<value_type>(1.0 / d);
    }

    void finish_signs()
    {
        scaled_signs_.resize(n_);
        for (std::size_t i = 0; i < n_; ++i) scaled_signs_[i] = signs_[i] * scale_;
        if (tile_) tile_signs_ = detail::hadamard_tile_multiplier<value_type, Arch>(scaled_signs_, k_, m_);
    }


    void check_workspace(std::span<value_type> workspace, const char* where) const
    {
        if (workspace.size() < workspace_size())
            detail::fail(errc::bad_shape, where,
                         "workspace has " + std::to_string(workspace.size()) + " elements, expected at least " +
                             std::to_string(workspace_size()));
    }

    void run_checked(std::span<value_type> x, bool inverse, const char* where) const
    {
        detail::require_size(x.size(), n_, where, "x");
        if (k_ == 1)
            run(x, inverse, {}, {x.data(), n_});
        else
            run_on_stack(x, inverse);
    }
    void run_checked(std::span<value_type> x, bool inverse, std::span<value_type> workspace, const char* where) const
    {
        detail::require_size(x.size(), n_, where, "x");
        check_workspace(workspace, where);
        run(x, inverse, workspace, {x.data(), n_});
    }

    void run_rows_checked(matrix_view<value_type> a, bool inverse, const char* where) const
    {
        require_columns(a, where);
        if (k_ == 1)
            run_rows(a, inverse, {});
        else
            run_rows_on_stack(a, inverse);
    }
    void run_rows_checked(matrix_view<value_type> a, bool inverse, std::span<value_type> workspace,
                          const char* where) const
    {
        require_columns(a, where);
        check_workspace(workspace, where);
        run_rows(a, inverse, workspace);
    }

    void require_columns(const matrix_view<value_type>& a, const char* where) const
    {
        if (a.cols != n_)
            detail::fail(errc::bad_shape, where,
                         "matrix is " + detail::shape_string(a.rows, a.cols) + ", expected " + std::to_string(n_) +
                             " columns");
    }

    // The stack workspace lives in its own frame, entered only when K > 1. It is written before
    // it is read, so it is left uninitialised.
    using stack_buffer = std::array<value_type, detail::hadamard_stack_bytes / sizeof(value_type)>;
    [[gnu::noinline]] void run_on_stack(std::span<value_type> x, bool inverse) const noexcept
    {
        stack_buffer stack;
        run(x, inverse, stack, {x.data(), n_});
    }
    [[gnu::noinline]] void run_rows_on_stack(matrix_view<value_type> a, bool inverse) const noexcept
    {
        stack_buffer stack;
        run_rows(a, inverse, stack);
    }

    void run_rows(matrix_view<value_type> a, bool inverse, std::span<value_type> work) const noexcept
    {
        if (a.rows == 0) return;
        if (a.rows == 1 && a.has_contiguous_rows()) {  // one vector: exactly as apply()
            run(a.row(0), inverse, work, {a.data, n_});
            return;
        }
        if (run_tile(a.data, a.rows, a.row_stride, a.col_stride, inverse, work)) return;
        if (a.has_contiguous_rows()) {
            const std::size_t extent = (a.rows - 1) * a.row_stride + n_;  // the view's memory, row 0 to the end
            if (k_ == 1) {  // the kernel's row loop: the multipliers are chosen once
                const auto [in, out] = pow2_multipliers(inverse);
                detail::fwht_pow2_rows<value_type, Arch>(a.data, n_, a.rows, a.row_stride, in, out,
                                                         detail::fwht_rows_window<value_type>(n_, {a.data, extent}));
                return;
            }
            for (std::size_t r = 0; r < a.rows; ++r) {
                const std::size_t offset = r * a.row_stride;
                run(a.row(r), inverse, work, detail::fwht_window<value_type>{a.data, extent}.advanced(offset));
            }
        } else {
            for (std::size_t r = 0; r < a.rows; ++r) run_strided(a.data + r * a.row_stride, a.col_stride, inverse, work);
        }
    }

    // The tile kernel for rows with m < L (any layout), when the workspace has room for it (the
    // stack buffer has, for K up to a few hundred); false when it does not run.
    bool run_tile(value_type* data, std::size_t rows, std::size_t row_stride, std::size_t col_stride, bool inverse,
                  std::span<value_type> work) const noexcept
    {
        if (!tile_) return false;
        using detail::fwht_scale;
        using multiplier = detail::fwht_multiplier<value_type>;
        // Forward: the scaled signs (or the scale) on the way in; inverse: the scaled signs on the way out.
        const multiplier signs{fwht_scale::vector, value_type(1), tile_signs_.data()};
        const multiplier in = signs_.empty() ? scale_multiplier() : (inverse ? multiplier{} : signs);
        const multiplier out = !signs_.empty() && inverse ? signs : multiplier{};
        if (k_ == 1) {
            // n < L: a small tile, and no mix.
            std::array<value_type, small_tile_size()> small;
            detail::hadamard_tile_rows<value_type, Arch>(data, rows, row_stride, col_stride, m_, nullptr, small, in,
                                                         out);
            return true;
        }
        const auto& table = inverse ? mix_inverse_ : mix_;
        if (work.size() < detail::hadamard_tile_workspace<value_type, Arch>(&table, m_, 1)) return false;
        detail::hadamard_tile_rows<value_type, Arch>(data, rows, row_stride, col_stride, m_, &table, work, in, out);
        return true;
    }

    // The workspace of the tile kernel for K = 1 (n < L), whatever n.
    static constexpr std::size_t small_tile_size() noexcept
    {
        std::size_t most = 0;
        for (std::size_t m = 1; m < xsimd::batch<value_type, Arch>::size; m *= 2)
            most = std::max(most, detail::hadamard_tile_workspace<value_type, Arch>(nullptr, m, 1));
        return most;
    }

    // The normalising scale, and the signs times the scale, as kernel multipliers.
    detail::fwht_multiplier<value_type> scale_multiplier() const noexcept
    {
        return {detail::fwht_scale::scalar, scale_, nullptr};
    }
    detail::fwht_multiplier<value_type> scaled_signs_multiplier() const noexcept
    {
        return {detail::fwht_scale::vector, value_type(1), scaled_signs_.data()};
    }

    // K = 1: the multipliers (in, out) of the power-of-two transform. Forward: the signs (and the
    // scale) on the way in; inverse: the scaled signs on the way out, or without signs the scale in.
    std::pair<detail::fwht_multiplier<value_type>, detail::fwht_multiplier<value_type>>
    pow2_multipliers(bool inverse) const noexcept
    {
        using multiplier = detail::fwht_multiplier<value_type>;
        if (signs_.empty()) return {scale_multiplier(), {}};
        return inverse ? std::pair{multiplier{}, scaled_signs_multiplier()}
                       : std::pair{scaled_signs_multiplier(), multiplier{}};
    }

    // The contiguous core: x (n elements) <- M x or M^T x. `region`: the memory from x on that the
    // caller transforms now and next, for prefetching (see detail::fwht_window).
    void run(std::span<value_type> x, bool inverse, std::span<value_type> work,
             const detail::fwht_window<value_type>& region) const noexcept
    {
        using detail::fwht_scale;
        using multiplier = detail::fwht_multiplier<value_type>;
        const bool has_signs = !signs_.empty();
        const multiplier scalar = scale_multiplier();
        const multiplier scaled_signs = scaled_signs_multiplier();
        if (k_ == 1) {
            const auto [in, out] = pow2_multipliers(inverse);
            detail::fwht_pow2_scaled<value_type, Arch>(x, in, out, detail::fwht_rows_window(n_, region));
            return;
        }
        // m = 1 (n = K): the sign tables in scalars. Other short rows: the tile kernel with one row.
        if (m_ == 1 && work.size() >= detail::hadamard_mix_vector_workspace(mix_)) {
            const auto& table = inverse ? mix_inverse_ : mix_;
            if (!inverse && has_signs)
                for (std::size_t i = 0; i < n_; ++i) x[i] *= scaled_signs_[i];
            const multiplier out = !has_signs ? scalar : inverse ? scaled_signs : multiplier{};
            detail::hadamard_mix_vector<value_type, Arch>(x.data(), table, work, out);
            return;
        }
        if (run_tile(x.data(), 1, n_, 1, inverse, work)) return;
        // K > 1: the K row transforms (forward: signs on the way in), then the mix, which applies
        // the scale (and, inverse, the signs) on its way out.
        for (std::size_t r = 0; r < k_; ++r) {
            multiplier in{};
            if (!inverse && has_signs) in = multiplier{fwht_scale::vector, value_type(1), signs_.data() + r * m_};
            // Each row prefetches ahead within x (the rows after it); the mix prefetches what follows x.
            const auto row_region = region.advanced(r * m_);
            detail::fwht_pow2_scaled<value_type, Arch>(x.subspan(r * m_, m_), in, {},
                                                       {row_region.data, std::min(row_region.size, n_ - r * m_)});
        }
        const multiplier out = inverse && has_signs ? scaled_signs : scalar;
        const auto& table = inverse ? mix_inverse_ : mix_;
        if (detail::hadamard_mix_strip_width<value_type, Arch>(table, m_, work.size()) > 0)
            detail::hadamard_mix_strips<value_type, Arch>(x.data(), m_, table, work, out, region.advanced(n_));
        else
            detail::hadamard_mix_columns<value_type>(x.data(), m_, 1, hk_, k_, inverse, work, out);
    }

    // Any layout: element i of the vector is x[i * step]. Scalar.
    void run_strided(value_type* x, std::size_t step, bool inverse, std::span<value_type> work) const noexcept
    {
        const bool has_signs = !signs_.empty();
        if (!inverse && has_signs)
            for (std::size_t i = 0; i < n_; ++i) x[i * step] *= signs_[i];
        for (std::size_t r = 0; r < k_; ++r) detail::fwht_pow2_strided(x + r * m_ * step, m_, step);
        using detail::fwht_scale;
        const detail::fwht_multiplier<value_type> out =
            inverse && has_signs ? scaled_signs_multiplier() : scale_multiplier();
        if (k_ > 1) {
            detail::hadamard_mix_columns<value_type>(x, m_, step, hk_, k_, inverse, work, out);
        } else {
            for (std::size_t i = 0; i < n_; ++i)
                x[i * step] *= out.kind == fwht_scale::vector ? out.values[i] : out.scalar;
        }
    }

    std::size_t n_ = 0, k_ = 1, m_ = 0;
    value_type scale_ = value_type(1);
    bool tile_ = false;  // m < L: rows go through detail::hadamard_tile_rows
    std::vector<value_type> signs_, scaled_signs_;
    std::vector<value_type> tile_signs_;  // scaled_signs_ in the tile layout (tile_ and signs only)
    std::vector<std::int8_t> hk_;
    detail::hadamard_mix_table mix_, mix_inverse_;
};

/// The dense n x n Hadamard matrix M of hadamard_plan<T>(n, options): apply(x) == M x, row-major
/// (see hadamard_plan::matrix), for merging a rotation into weights. Errors as hadamard_plan.
/// Allocates n^2 elements.
template <real_scalar T>
[[nodiscard]] std::vector<T> hadamard_matrix(std::size_t n, const hadamard_options& options = {})
{
    return hadamard_plan<T>(n, options).matrix();
}

}  // namespace spinquant

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
