#pragma once
/// Rotations for SpinQuant: generators (Haar-random orthogonal, random Hadamard, per-head block
/// diagonal) and the offline fusion of rotations and RMSNorm weights into a model's linear layers.
///
/// Conventions (those of SpinQuant, PyTorch and llama2.c): weights are [out, in], row = output
/// channel, so a linear layer computes y = x·Wᵀ (+ b) for a row of activations x. Embedding tables
/// are [vocab, hidden] (row = token). With a rotation R1 of the residual stream (h → h·R1):
///   - readers of the residual stream (q/k/v, gate/up, lm_head) rotate their input side, W ← W·R1;
///   - writers (o_proj, down_proj) rotate their output side, W ← R1ᵀ·W and b ← R1ᵀ·b;
///   - the embedding rotates like a writer of rows, E ← E·R1;
///   - a per-head R2 rotates each head_dim chunk: v_proj's output side, o_proj's input side.
/// Fold the RMSNorm weights first (fuse_rms_norm), since RMSNorm only commutes with rotations
/// once its weight is 1. Every fusion is computed in double and rounded once to the weights' type.
///
/// Tied embeddings: a model whose lm_head shares storage with the embedding table must be untied
/// (lm_head copied) by the caller before fusion; otherwise the table is rotated twice, once as an
/// embedding and once as lm_head (SpinQuant issue #13).
#include <cmath>
#include <cstddef>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <Eigen/QR>

#include "concepts.hpp"
#include "detail/checks.hpp"
#include "detail/random.hpp"
#include "detail/rotation_fuse.hpp"
#include "eigen.hpp"
#include "error.hpp"
#include "hadamard.hpp"

namespace spinquant {

/// The dense matrix type the generators return: row-major, like the weights it multiplies (pass
/// `.data()` straight to an engine). Any Eigen or user matrix works wherever a rotation is read.
template <real_scalar T>
using rotation_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// ---------------------------------------------------------------------------------------------
// Generators

/// A Haar-distributed (uniform) random orthogonal n x n matrix: the Q factor of the QR
/// decomposition of a matrix of independent standard normal draws, with each column of Q
/// multiplied by the sign of the matching diagonal entry of R. Without that sign fix the result is
/// orthogonal but not uniformly distributed. Same construction as SpinQuant's
/// `random_orthogonal_matrix` (which uses torch's RNG, so the values differ).
///
/// The normal draws come from `rng` in row-major order through detail::normal_sampler, so a given
/// engine state gives the same draws on every platform (up to the last bit of libm's log) and the
/// same matrix up to the rounding of the QR, computed in double and rounded once to T. Determinant +1 or −1, each with
/// probability 1/2. Throws errc::bad_argument if n == 0. Allocates; O(n³).
///
/// **Example**
/// ```
/// std::mt19937_64 rng(42);
/// const auto r1 = spinquant::random_orthogonal<float>(4096, rng);
/// ```
template <real_scalar T, std::uniform_random_bit_generator G>
[[nodiscard]] rotation_matrix<T> random_orthogonal(std::size_t n, G& rng)
{
    if (n == 0) detail::fail(errc::bad_argument, "random_orthogonal", "n is 0, expected at least 1");
    const auto m = static_cast<Eigen::Index>(n);
    Eigen::MatrixXd gauss(m, m);
    detail::normal_sampler normal;
    for (Eigen::Index i = 0; i < m; ++i)
        for (Eigen::Index j = 0; j < m; ++j) gauss(i, j) = normal(rng);
    const Eigen::HouseholderQR<Eigen::MatrixXd> qr(gauss);
    Eigen::MatrixXd q = qr.householderQ();
    // Haar measure needs R with a positive diagonal (Mezzadri 2007): flip the columns of Q whose
    // R_jj is negative. R_jj == 0 has probability zero; keep +1 there.
    for (Eigen::Index j = 0; j < m; ++j)
        if (qr.matrixQR()(j, j) < 0) q.col(j) = -q.col(j);
    return q.cast<T>();
}

/// A random Hadamard rotation of order n: diag(s)·Mᵀ with M the orthonormal Hadamard matrix of
/// hadamard_plan<T>(n, options) (H_K ⊗ H_m / d) and s independent random signs drawn from `rng`
/// (detail::random_sign, one per row in order, so the same engine state gives the same matrix on
/// every platform). This is SpinQuant's `random_hadamard_matrix` (its default R1/R2
/// initialisation, QuaRot's R1): with options.source = hadamard_source::reference and
/// options.normaliser = hadamard_normaliser::reference and the same signs it equals the
/// reference's matrix, whose float32 √n makes it orthogonal only to ~1e-7 for non-square-number n;
/// the default options give an orthogonal matrix to rounding. Rows are tokens' coordinates as for
/// every rotation here: x ↦ x·R.
///
/// Throws errc::unsupported_size (naming the nearest supported sizes) when no Hadamard matrix of
/// order n is known for options.source, errc::bad_argument if options.random_signs is set (the
/// signs come from `rng`). Allocates; O(n²).
template <real_scalar T, std::uniform_random_bit_generator G>
[[nodiscard]] rotation_matrix<T> random_hadamard(std::size_t n, G& rng, const hadamard_options& options = {})
{
    if (options.random_signs)
        detail::fail(errc::bad_argument, "random_hadamard", "options.random_signs is set, but the signs come from rng");
    if (!has_hadamard(n, options.source))
        detail::fail(errc::unsupported_size, "random_hadamard",
                     "no Hadamard matrix of order " + std::to_string(n) + " is known" +
                         detail::hadamard_nearest_sizes(n, options.source));
    std::vector<T> signs(n);
    for (T& v : signs) v = static_cast<T>(detail::random_sign(rng));
    const std::vector<T> m = hadamard_plan<T>(n, signs, options).matrix();  // M·diag(s)
    // (M·diag(s))ᵀ = diag(s)·Mᵀ.
    return Eigen::Map<const rotation_matrix<T>>(m.data(), static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(n)).transpose();
}

/// The block-diagonal matrix diag(R, R, ..., R) with `count` copies of the square matrix `r`: the
/// full-size matrix of a per-head rotation (R2 applied to each of `count` heads), useful to check
/// or to apply a per-head rotation with a generic routine. Throws errc::bad_shape unless r is
/// square and non-empty, errc::bad_argument if count == 0, errc::non_finite for NaN/Inf in r.
/// Allocates the (count·d)² result.
template <real_matrix M>
[[nodiscard]] rotation_matrix<std::remove_const_t<matrix_element_t<M>>> block_diagonal(const M& r, std::size_t count)
{
    using T = std::remove_const_t<matrix_element_t<M>>;
    const matrix_view<const T> rv = spinquant::as_matrix_view(r);
    detail::require_square_rotation(rv, "block_diagonal", "r");
    if (count == 0) detail::fail(errc::bad_argument, "block_diagonal", "count is 0, expected at least 1");
    const auto d = static_cast<Eigen::Index>(rv.rows);
    rotation_matrix<T> out = rotation_matrix<T>::Zero(d * static_cast<Eigen::Index>(count), d * static_cast<Eigen::Index>(count));
    for (Eigen::Index h = 0; h < static_cast<Eigen::Index>(count); ++h) out.block(h * d, h * d, d, d) = spinquant::as_eigen(rv);
    return out;
}

// ---------------------------------------------------------------------------------------------
// Fusion

namespace detail {

template <class M>
using fuse_scalar_t = std::remove_const_t<matrix_element_t<M>>;

// Shared body of the input-side helpers: W <- W·diag(R, ..., R) over W's columns.
template <class T, class U>
void rotate_columns_checked(matrix_view<T> w, matrix_view<const U> r, std::string_view where)
{
    require_square_rotation(r, where, "r");
    require_blocks(w.cols, r.rows, where, "w", "r");
    require_finite(matrix_view<const T>(w), where, "w");
    right_multiply_blocks(w, r);
}

// Shared body of the output-side helpers: W <- diag(R, ..., R)ᵀ·W, and b <- diag(R, ..., R)ᵀ·b
// unless `bias` is nullptr.
template <class T, class U, class B>
void rotate_rows_checked(matrix_view<T> w, matrix_view<const U> r, B&& bias, std::string_view where)
{
    constexpr bool has_bias = !std::is_same_v<std::remove_cvref_t<B>, std::nullptr_t>;
    require_square_rotation(r, where, "r");
    require_blocks(w.rows, r.rows, where, "w (transposed)", "r");
    require_finite(matrix_view<const T>(w), where, "w");
    if constexpr (has_bias) {
        const auto b = spinquant::as_span(bias);
        using E = typename decltype(b)::element_type;
        require_size(b.size(), w.rows, where, "bias");
        require_finite(std::span<const E>(b), where, "bias");
    }
    // (Rᵀ·W)ᵀ = Wᵀ·R: the same right-multiplication on the transposed view.
    right_multiply_blocks(w.transposed(), r);
    if constexpr (has_bias) {
        const auto b = spinquant::as_span(bias);
        using E = typename decltype(b)::element_type;
        right_multiply_blocks(matrix_view<E>{b.data(), 1, b.size(), b.size(), 1}, r);
    }
}

}  // namespace detail

/// Folds an RMSNorm weight α into the linear layers that read the normalised activations:
/// W ← W·diag(α) for each of `linears` ([out, in], in == size(α)), then α ← 1. The model computes
/// the same function afterwards, and the norm now commutes with a rotation of its input, which is
/// what lets R1 be merged. SpinQuant's `fuse_layer_norms`: input_layernorm into q/k/v,
/// post_attention_layernorm into gate/up, the final norm into lm_head.
///
/// It does not touch the embedding: the reference also mean-centres the embedding rows, which
/// changes the function of an RMSNorm model (see center_embedding_rows, an explicit opt-in).
/// Throws errc::bad_shape unless every linear has size(α) columns, errc::non_finite for NaN/Inf in
/// α or a weight; nothing is written then. Computed in double, rounded once to each weight's type.
///
/// **Example**
/// ```
/// spinquant::fuse_rms_norm(layer.attention_norm, layer.wq, layer.wk, layer.wv);
/// ```
template <mutable_real_vector V, mutable_real_matrix... Ms>
void fuse_rms_norm(V&& alpha, Ms&&... linears)
{
    static_assert(sizeof...(Ms) >= 1, "fuse_rms_norm needs the linear layers that read the norm's output");
    constexpr std::string_view where = "fuse_rms_norm";
    const auto a = spinquant::as_span(alpha);
    using A = typename decltype(a)::element_type;
    detail::require_finite(std::span<const A>(a), where, "alpha");
    std::size_t index = 0;
    const auto check = [&](auto w) {
        using T = typename decltype(w)::value_type;
        if (w.cols != a.size())
            detail::fail(errc::bad_shape, where,
                         "linear " + std::to_string(index) + " is " + detail::shape_string(w.rows, w.cols) + ", expected " +
                             std::to_string(a.size()) + " columns (the size of alpha)");
        detail::require_finite(matrix_view<const T>(w), where, "linear " + std::to_string(index));
        ++index;
    };
    (check(spinquant::as_matrix_view(linears)), ...);
    const auto scale = [&](auto w) {
        using T = typename decltype(w)::value_type;
        for (std::size_t i = 0; i < w.rows; ++i)
            for (std::size_t j = 0; j < w.cols; ++j) w(i, j) = static_cast<T>(static_cast<double>(w(i, j)) * static_cast<double>(a[j]));
    };
    (scale(spinquant::as_matrix_view(linears)), ...);
    for (A& v : a) v = A(1);
}

/// Subtracts from each row of the embedding table E ([vocab, hidden]) its mean over the hidden
/// dimension. This is what SpinQuant's and QuaRot's `fuse_layer_norms` do unconditionally; it is
/// exact for LayerNorm models (which remove the mean anyway) but **changes the function of an
/// RMSNorm model** such as LLaMA (SpinQuant issue #14 reports Llama-2-7B perplexity 6.8 → 6.5
/// without it; QuaRot issue #7 calls it a bug). Offered only as an explicit opt-in, to reproduce the
/// reference; fuse_rms_norm never calls it. Throws errc::non_finite for NaN/Inf in E (untouched).
/// Computed in double.
template <mutable_real_matrix M>
void center_embedding_rows(M&& embedding)
{
    const auto e = spinquant::as_matrix_view(embedding);
    using T = typename decltype(e)::value_type;
    detail::require_finite(matrix_view<const T>(e), "center_embedding_rows", "embedding");
    for (std::size_t i = 0; i < e.rows; ++i) {
        double sum = 0;
        for (std::size_t j = 0; j < e.cols; ++j) sum += static_cast<double>(e(i, j));
        const double mean = e.cols == 0 ? 0.0 : sum / static_cast<double>(e.cols);
        for (std::size_t j = 0; j < e.cols; ++j) e(i, j) = static_cast<T>(static_cast<double>(e(i, j)) - mean);
    }
}

/// W ← W·R: rotates the input side of a linear layer W ([out, in]) by R ([in, in]), so that the
/// layer computes the same function of a rotated input x·R: (x·R)(W·R)ᵀ = x·Wᵀ for orthogonal R.
/// For R1 on q/k/v, gate/up and lm_head. Throws errc::bad_shape unless R is square with
/// R.rows == W.cols, errc::non_finite for NaN/Inf in W or R; W is untouched then.
/// Computed in double and rounded once to W's type; allocates O(in²) doubles; O(out·in²).
template <mutable_real_matrix M, real_matrix R>
void rotate_input_side(M&& w, const R& r)
{
    const auto wv = spinquant::as_matrix_view(w);
    const matrix_view<const detail::fuse_scalar_t<R>> rv = spinquant::as_matrix_view(r);
    if (rv.rows != wv.cols)
        detail::fail(errc::bad_shape, "rotate_input_side",
                     "r is " + detail::shape_string(rv.rows, rv.cols) + ", expected " + detail::shape_string(wv.cols, wv.cols) +
                         " (w has " + std::to_string(wv.cols) + " input columns)");
    detail::rotate_columns_checked(wv, rv, "rotate_input_side");
}

/// E ← E·R: rotates an embedding table ([vocab, hidden]) by R1 ([hidden, hidden]), so that each
/// token's embedding enters the residual stream already rotated. Same arithmetic and errors as
/// rotate_input_side. For a tied lm_head, untie it first (see the header comment).
template <mutable_real_matrix M, real_matrix R>
void rotate_embedding(M&& embedding, const R& r)
{
    const auto ev = spinquant::as_matrix_view(embedding);
    const matrix_view<const detail::fuse_scalar_t<R>> rv = spinquant::as_matrix_view(r);
    if (rv.rows != ev.cols)
        detail::fail(errc::bad_shape, "rotate_embedding",
                     "r is " + detail::shape_string(rv.rows, rv.cols) + ", expected " + detail::shape_string(ev.cols, ev.cols) +
                         " (the embedding has " + std::to_string(ev.cols) + " columns)");
    detail::rotate_columns_checked(ev, rv, "rotate_embedding");
}

/// W ← Rᵀ·W: rotates the output side of a linear layer W ([out, in]) by R ([out, out]), so that it
/// writes rotated outputs: x·(Rᵀ·W)ᵀ = (x·Wᵀ)·R. For R1 on o_proj and down_proj. Throws
/// errc::bad_shape unless R is square with R.rows == W.rows, errc::non_finite for NaN/Inf; W is
/// untouched then. Computed in double, rounded once to W's type; O(out²·in).
template <mutable_real_matrix M, real_matrix R>
void rotate_output_side(M&& w, const R& r)
{
    const auto wv = spinquant::as_matrix_view(w);
    const matrix_view<const detail::fuse_scalar_t<R>> rv = spinquant::as_matrix_view(r);
    if (rv.rows != wv.rows)
        detail::fail(errc::bad_shape, "rotate_output_side",
                     "r is " + detail::shape_string(rv.rows, rv.cols) + ", expected " + detail::shape_string(wv.rows, wv.rows) +
                         " (w has " + std::to_string(wv.rows) + " output rows)");
    detail::rotate_rows_checked(wv, rv, nullptr, "rotate_output_side");
}

/// W ← Rᵀ·W and b ← Rᵀ·b: rotate_output_side for a layer with a bias (size out), so that
/// x·Wᵀ + b becomes (x·Wᵀ + b)·R. Also throws errc::bad_shape unless size(b) == W.rows.
template <mutable_real_matrix M, mutable_real_vector B, real_matrix R>
void rotate_output_side(M&& w, B&& bias, const R& r)
{
    const auto wv = spinquant::as_matrix_view(w);
    const matrix_view<const detail::fuse_scalar_t<R>> rv = spinquant::as_matrix_view(r);
    if (rv.rows != wv.rows)
        detail::fail(errc::bad_shape, "rotate_output_side",
                     "r is " + detail::shape_string(rv.rows, rv.cols) + ", expected " + detail::shape_string(wv.rows, wv.rows) +
                         " (w has " + std::to_string(wv.rows) + " output rows)");
    detail::rotate_rows_checked(wv, rv, bias, "rotate_output_side");
}

/// Per-head input side: each consecutive chunk of d = R.rows input columns of W ([out, heads·d])
/// is right-multiplied by R (d x d), i.e. W ← W·diag(R, ..., R). For R2 on o_proj, whose input is
/// the concatenation of the heads. Equals SpinQuant's `apply_exact_had_to_linear(o_proj, had_dim=d,
/// output=False, R2)`. Throws errc::bad_shape unless R is square and W.cols is a multiple of
/// R.rows, errc::non_finite for NaN/Inf; W untouched then. Computed in double; O(out·in·d).
template <mutable_real_matrix M, real_matrix R>
void rotate_input_side_per_head(M&& w, const R& r)
{
    const matrix_view<const detail::fuse_scalar_t<R>> rv = spinquant::as_matrix_view(r);
    detail::rotate_columns_checked(spinquant::as_matrix_view(w), rv, "rotate_input_side_per_head");
}

/// Per-head output side: each consecutive chunk of d = R.rows output rows of W ([heads·d, in]) is
/// left-multiplied by Rᵀ, i.e. W ← diag(R, ..., R)ᵀ·W, so each head's output h becomes h·R. For R2
/// on v_proj (with grouped-query attention the kv heads are chunked the same way, and one R2
/// serves all). Equals SpinQuant's `apply_exact_had_to_linear(v_proj, had_dim=d, output=True, R2)`.
/// Throws errc::bad_shape unless R is square and W.rows is a multiple of R.rows,
/// errc::non_finite for NaN/Inf; W untouched then. Computed in double; O(out·in·d).
template <mutable_real_matrix M, real_matrix R>
void rotate_output_side_per_head(M&& w, const R& r)
{
    const matrix_view<const detail::fuse_scalar_t<R>> rv = spinquant::as_matrix_view(r);
    detail::rotate_rows_checked(spinquant::as_matrix_view(w), rv, nullptr, "rotate_output_side_per_head");
}

/// rotate_output_side_per_head for a layer with a bias (size heads·d): each head's chunk of b
/// becomes Rᵀ·chunk as well. Also throws errc::bad_shape unless size(b) == W.rows.
template <mutable_real_matrix M, mutable_real_vector B, real_matrix R>
void rotate_output_side_per_head(M&& w, B&& bias, const R& r)
{
    const matrix_view<const detail::fuse_scalar_t<R>> rv = spinquant::as_matrix_view(r);
    detail::rotate_rows_checked(spinquant::as_matrix_view(w), rv, bias, "rotate_output_side_per_head");
}

}  // namespace spinquant
