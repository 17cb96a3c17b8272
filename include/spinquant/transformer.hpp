#pragma once
/// The SpinQuant recipe over any LLaMA-like model: fuse the RMSNorm weights, untie a tied
/// embedding, merge R1 (residual stream) and each layer's R2 (attention heads) into the weights,
/// merge the offline half of the online R4 into down_proj, and quantize the linear layers' weights.
///
/// A model takes part by specialising `transformer_traits` (the library's one customisation
/// mechanism, as vector_traits and matrix_traits): it says how many layers there are, the head
/// size, and where each weight lives, as matrix views [out, in] and norm spans. Views may point
/// into fused storage (one QKV matrix, one gate/up matrix), be column-major or strided: every
/// function here works through matrix_view only.
///
/// ```
/// template <> struct spinquant::transformer_traits<engine::model> {
///     static std::size_t layer_count(const engine::model& m) { return m.layers.size(); }
///     static std::size_t head_dim(const engine::model& m) { return m.head_dim; }
///     static spinquant::matrix_view<float> embedding(engine::model& m);   // [vocab, hidden]
///     static spinquant::matrix_view<float> lm_head(engine::model& m);     // [vocab, hidden]
///     static std::span<float> final_norm(engine::model& m);               // [hidden]
///     static spinquant::transformer_layer<float> layer(engine::model& m, std::size_t l);
///     static void untie(engine::model& m);  // optional: give lm_head its own storage
/// };
/// ```
///
/// Semantics (REFERENCE.md §1c; every product in double, rounded once to the weights' type):
///   fuse_norms      q/k/v ← W·diag(attention_norm), gate/up ← W·diag(ffn_norm),
///                   lm_head ← W·diag(final_norm), then the three norms ← 1 (no embedding
///                   mean-centring: that changes an RMSNorm model's function; see
///                   center_embedding_rows in rotation.hpp for the reference's behaviour).
///   rotate_residual embedding ← E·R1; q/k/v, gate/up, lm_head ← W·R1; o_proj, down_proj ← R1ᵀ·W.
///   rotate_heads    v_proj ← diag(R2,…)ᵀ·W (output side, per kv head); o_proj ← W·diag(R2,…).
///   merge_online_r4 down_proj ← down_proj·Mᵀ, where plan.apply(x) = M·x is what the engine
///                   applies online to down_proj's input.
/// The full-precision model computes the same function after each step (to rounding).
#include <array>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "concepts.hpp"
#include "detail/checks.hpp"
#include "detail/rotation_fuse.hpp"
#include "eigen.hpp"
#include "error.hpp"
#include "hadamard.hpp"
#include "quantizer.hpp"
#include "rotation.hpp"

namespace spinquant {

/// Where one block's weights live. Linear weights are [out, in] (row = output channel):
/// q_proj [heads·d, hidden], k_proj and v_proj [kv_heads·d, hidden], o_proj [hidden, heads·d],
/// gate_proj and up_proj [ffn, hidden], down_proj [hidden, ffn]; norms have `hidden` entries.
template <real_scalar T>
struct transformer_layer {
    std::span<T> attention_norm;
    std::span<T> ffn_norm;
    matrix_view<T> q_proj, k_proj, v_proj, o_proj;
    matrix_view<T> gate_proj, up_proj, down_proj;
};

/// Specialise for a model type to use the recipe (see the header comment). Primary undefined.
template <class M>
struct transformer_traits;

namespace detail {
template <class M>
using transformer_traits_of = transformer_traits<std::remove_cvref_t<M>>;
template <class M>
concept has_untie = requires(std::remove_cvref_t<M>& m) { transformer_traits_of<M>::untie(m); };
}  // namespace detail

/// A model the recipe can work on: transformer_traits<M> gives layer_count, head_dim, embedding,
/// lm_head, final_norm and layer(l) with one mutable real element type throughout.
template <class M>
concept transformer_model = requires(std::remove_cvref_t<M>& m, const std::remove_cvref_t<M>& cm, std::size_t l) {
    { detail::transformer_traits_of<M>::layer_count(cm) } -> std::convertible_to<std::size_t>;
    { detail::transformer_traits_of<M>::head_dim(cm) } -> std::convertible_to<std::size_t>;
    typename decltype(detail::transformer_traits_of<M>::embedding(m))::element_type;
    requires real_scalar<typename decltype(detail::transformer_traits_of<M>::embedding(m))::element_type>;
    requires !std::is_const_v<typename decltype(detail::transformer_traits_of<M>::embedding(m))::element_type>;
    {
        detail::transformer_traits_of<M>::lm_head(m)
    } -> std::same_as<decltype(detail::transformer_traits_of<M>::embedding(m))>;
    {
        detail::transformer_traits_of<M>::final_norm(m)
    } -> std::same_as<std::span<typename decltype(detail::transformer_traits_of<M>::embedding(m))::element_type>>;
    {
        detail::transformer_traits_of<M>::layer(m, l)
    } -> std::same_as<transformer_layer<typename decltype(detail::transformer_traits_of<M>::embedding(m))::element_type>>;
};

/// The weights' element type of a transformer_model.
template <transformer_model M>
using transformer_scalar_t = typename decltype(detail::transformer_traits_of<M>::embedding(std::declval<std::remove_cvref_t<M>&>()))::element_type;

/// The shape of a model, as its views give it (checked consistent by every recipe function).
struct transformer_shape {
    std::size_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, ffn = 0, vocab = 0;
};

/// Rotations learned or drawn for a model: R1 (hidden x hidden) and one R2 (head_dim x head_dim)
/// per layer; an empty matrix means "no rotation" at that place.
template <real_scalar T>
struct rotation_set {
    rotation_matrix<T> r1;
    std::vector<rotation_matrix<T>> r2;
};

namespace detail {

template <class T>
void require_view_shape(matrix_view<T> w, std::size_t rows, std::size_t cols, std::size_t layer, std::string_view name,
                        std::string_view where)
{
    if (w.rows != rows || w.cols != cols)
        fail(errc::bad_shape, where,
             "layer " + std::to_string(layer) + " " + std::string(name) + " is " + std::to_string(w.rows) + "x" +
                 std::to_string(w.cols) + ", expected " + std::to_string(rows) + "x" + std::to_string(cols));
}

/// Reads the shape off the views and checks that every view agrees with it (errc::bad_shape).
template <transformer_model M>
transformer_shape checked_shape(M& m, std::string_view where)
{
    using tr = transformer_traits_of<M>;
    transformer_shape s;
    s.layers = tr::layer_count(std::as_const(m));
    s.head_dim = tr::head_dim(std::as_const(m));
    const auto e = tr::embedding(m);
    s.vocab = e.rows;
    s.hidden = e.cols;
    if (s.layers == 0) fail(errc::bad_shape, where, "the model has no layers");
    if (s.head_dim == 0 || s.hidden == 0) fail(errc::bad_shape, where, "head_dim and the hidden size must be positive");
    const auto head = tr::lm_head(m);
    if (head.cols != s.hidden)
        fail(errc::bad_shape, where, "lm_head has " + std::to_string(head.cols) + " columns, expected hidden = " + std::to_string(s.hidden));
    if (tr::final_norm(m).size() != s.hidden)
        fail(errc::bad_shape, where, "final_norm has " + std::to_string(tr::final_norm(m).size()) + " entries, expected " + std::to_string(s.hidden));
    for (std::size_t l = 0; l < s.layers; ++l) {
        const auto ly = tr::layer(m, l);
        if (l == 0) {
            if (ly.q_proj.rows % s.head_dim != 0 || ly.k_proj.rows % s.head_dim != 0 || ly.k_proj.rows == 0)
                fail(errc::bad_shape, where,
                     "q_proj and k_proj rows (" + std::to_string(ly.q_proj.rows) + ", " + std::to_string(ly.k_proj.rows) +
                         ") must be positive multiples of head_dim = " + std::to_string(s.head_dim));
            s.heads = ly.q_proj.rows / s.head_dim;
            s.kv_heads = ly.k_proj.rows / s.head_dim;
            s.ffn = ly.gate_proj.rows;
        }
        const std::size_t qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
        if (ly.attention_norm.size() != s.hidden || ly.ffn_norm.size() != s.hidden)
            fail(errc::bad_shape, where, "layer " + std::to_string(l) + " norms must have hidden = " + std::to_string(s.hidden) + " entries");
        require_view_shape(ly.q_proj, qd, s.hidden, l, "q_proj", where);
        require_view_shape(ly.k_proj, kvd, s.hidden, l, "k_proj", where);
        require_view_shape(ly.v_proj, kvd, s.hidden, l, "v_proj", where);
        require_view_shape(ly.o_proj, s.hidden, qd, l, "o_proj", where);
        require_view_shape(ly.gate_proj, s.ffn, s.hidden, l, "gate_proj", where);
        require_view_shape(ly.up_proj, s.ffn, s.hidden, l, "up_proj", where);
        require_view_shape(ly.down_proj, s.hidden, s.ffn, l, "down_proj", where);
    }
    return s;
}

/// Calls f(view) for every matrix the rotations touch (embedding, lm_head, all layer linears).
template <transformer_model M, class F>
void for_each_weight(M& m, F&& f)
{
    using tr = transformer_traits_of<M>;
    f(tr::embedding(m));
    f(tr::lm_head(m));
    for (std::size_t l = 0; l < tr::layer_count(std::as_const(m)); ++l) {
        const auto ly = tr::layer(m, l);
        for (const auto& w : {ly.q_proj, ly.k_proj, ly.v_proj, ly.o_proj, ly.gate_proj, ly.up_proj, ly.down_proj}) f(w);
    }
}

/// Whether two views share any element (same storage, overlapping address ranges).
template <class T>
[[nodiscard]] bool views_overlap(matrix_view<T> a, matrix_view<T> b) noexcept
{
    const auto extent = [](matrix_view<T> v) {
        const T* lo = v.data;
        const T* hi = v.data + (v.rows - 1) * v.row_stride + (v.cols - 1) * v.col_stride + 1;
        return std::pair{lo, hi};
    };
    if (a.rows == 0 || a.cols == 0 || b.rows == 0 || b.cols == 0) return false;
    const auto [a0, a1] = extent(a);
    const auto [b0, b1] = extent(b);
    return a0 < b1 && b0 < a1;
}

template <transformer_model M>
void require_untied(M& m, std::string_view where)
{
    using tr = transformer_traits_of<M>;
    if (views_overlap(tr::embedding(m), tr::lm_head(m)))
        fail(errc::bad_argument, where,
             "lm_head shares storage with the embedding (tied); call untie_embeddings first, or the table is rotated twice");
}

template <transformer_model M>
void require_finite_weights(M& m, std::string_view where)
{
    using T = transformer_scalar_t<M>;
    for_each_weight(m, [&](matrix_view<T> w) { require_finite(matrix_view<const T>(w), where, "a weight"); });
}

template <class T>
[[nodiscard]] bool all_ones(std::span<const T> v) noexcept
{
    for (const T x : v)
        if (x != T(1)) return false;
    return true;
}

}  // namespace detail

/// The shape of `m` (layers, hidden, heads, kv_heads, head_dim, ffn, vocab), after checking that
/// every view agrees with it. Throws errc::bad_shape naming the layer and matrix that does not.
template <transformer_model M>
[[nodiscard]] transformer_shape shape_of(M& m)
{
    return detail::checked_shape(m, "shape_of");
}

/// Gives a tied lm_head its own storage, through transformer_traits<M>::untie, when lm_head and
/// the embedding share storage; returns whether it did. Untying is what the reference does for
/// Llama 3.2 (forgetting it rotates the table twice, SpinQuant issue #13). Throws
/// errc::bad_argument when the model is tied and its traits have no untie, or untie left it tied.
template <transformer_model M>
bool untie_embeddings(M& m)
{
    using tr = detail::transformer_traits_of<M>;
    if (!detail::views_overlap(tr::embedding(m), tr::lm_head(m))) return false;
    if constexpr (detail::has_untie<M>) {
        tr::untie(m);
        detail::require_untied(m, "untie_embeddings");
        return true;
    } else {
        detail::fail(errc::bad_argument, "untie_embeddings",
                     "lm_head shares storage with the embedding and transformer_traits has no untie(model)");
    }
}

/// Folds every RMSNorm weight into the linear layers that read it and sets the norms to 1 (see
/// the header comment). Throws (nothing written): errc::bad_shape for inconsistent views,
/// errc::bad_argument for a tied lm_head, errc::non_finite for NaN/Inf in a norm or weight.
template <transformer_model M>
void fuse_norms(M& m)
{
    using tr = detail::transformer_traits_of<M>;
    using T = transformer_scalar_t<M>;
    constexpr std::string_view where = "fuse_norms";
    const transformer_shape s = detail::checked_shape(m, where);
    detail::require_untied(m, where);
    detail::require_finite_weights(m, where);
    for (std::size_t l = 0; l < s.layers; ++l) {
        const auto ly = tr::layer(m, l);
        detail::require_finite(std::span<const T>(ly.attention_norm), where, "attention_norm");
        detail::require_finite(std::span<const T>(ly.ffn_norm), where, "ffn_norm");
    }
    detail::require_finite(std::span<const T>(tr::final_norm(m)), where, "final_norm");
    for (std::size_t l = 0; l < s.layers; ++l) {
        const auto ly = tr::layer(m, l);
        fuse_rms_norm(ly.attention_norm, ly.q_proj, ly.k_proj, ly.v_proj);
        fuse_rms_norm(ly.ffn_norm, ly.gate_proj, ly.up_proj);
    }
    fuse_rms_norm(tr::final_norm(m), tr::lm_head(m));
}

/// Merges R1 (hidden x hidden, orthogonal) into the model (see the header comment). The norms
/// must be fused first: RMSNorm commutes with a rotation only once its weight is 1.
/// Throws (nothing written): errc::bad_shape (R1 not hidden x hidden, inconsistent views),
/// errc::bad_argument (a norm weight is not all ones, or lm_head is tied), errc::non_finite.
/// O(hidden² · (vocab + layers · (4·hidden + 3·ffn))).
template <transformer_model M, real_matrix R>
void rotate_residual(M& m, const R& r1)
{
    using tr = detail::transformer_traits_of<M>;
    using T = transformer_scalar_t<M>;
    using U = std::remove_const_t<matrix_element_t<R>>;
    constexpr std::string_view where = "rotate_residual";
    const transformer_shape s = detail::checked_shape(m, where);
    const matrix_view<const U> rv = spinquant::as_matrix_view(r1);
    detail::require_square_rotation(rv, where, "r1");
    if (rv.rows != s.hidden)
        detail::fail(errc::bad_shape, where, "r1 is " + std::to_string(rv.rows) + "x" + std::to_string(rv.cols) + ", expected hidden = " + std::to_string(s.hidden));
    detail::require_untied(m, where);
    bool fused = detail::all_ones(std::span<const T>(tr::final_norm(m)));
    for (std::size_t l = 0; l < s.layers && fused; ++l) {
        const auto ly = tr::layer(m, l);
        fused = detail::all_ones(std::span<const T>(ly.attention_norm)) && detail::all_ones(std::span<const T>(ly.ffn_norm));
    }
    if (!fused) detail::fail(errc::bad_argument, where, "the norm weights are not all 1: call fuse_norms first");
    detail::require_finite_weights(m, where);
    detail::right_multiply_blocks(tr::embedding(m), rv);
    detail::right_multiply_blocks(tr::lm_head(m), rv);
    for (std::size_t l = 0; l < s.layers; ++l) {
        const auto ly = tr::layer(m, l);
        for (const auto& w : {ly.q_proj, ly.k_proj, ly.v_proj, ly.gate_proj, ly.up_proj}) detail::right_multiply_blocks(w, rv);
        for (const auto& w : {ly.o_proj, ly.down_proj}) detail::right_multiply_blocks(w.transposed(), rv);  // (Rᵀ·W)ᵀ = Wᵀ·R
    }
}

/// Merges layer l's R2 (head_dim x head_dim, orthogonal) into its attention: every head of
/// v_proj's output and the matching chunk of o_proj's input (one R2 for all heads of the layer,
/// which with grouped-query attention also serves every kv head). Throws (nothing written):
/// errc::bad_shape (R2 not head_dim square, l out of range, inconsistent views), errc::non_finite.
template <transformer_model M, real_matrix R>
void rotate_heads(M& m, std::size_t l, const R& r2)
{
    using tr = detail::transformer_traits_of<M>;
    using T = transformer_scalar_t<M>;
    using U = std::remove_const_t<matrix_element_t<R>>;
    constexpr std::string_view where = "rotate_heads";
    const transformer_shape s = detail::checked_shape(m, where);
    if (l >= s.layers) detail::fail(errc::bad_shape, where, "layer " + std::to_string(l) + " of " + std::to_string(s.layers));
    const matrix_view<const U> rv = spinquant::as_matrix_view(r2);
    detail::require_square_rotation(rv, where, "r2");
    if (rv.rows != s.head_dim)
        detail::fail(errc::bad_shape, where, "r2 is " + std::to_string(rv.rows) + "x" + std::to_string(rv.cols) + ", expected head_dim = " + std::to_string(s.head_dim));
    const auto ly = tr::layer(m, l);
    detail::require_finite(matrix_view<const T>(ly.v_proj), where, "v_proj");
    detail::require_finite(matrix_view<const T>(ly.o_proj), where, "o_proj");
    detail::right_multiply_blocks(ly.v_proj.transposed(), rv);
    detail::right_multiply_blocks(ly.o_proj, rv);
}

/// Merges the offline half of an online Hadamard R4 into every down_proj: each row w of
/// down_proj becomes plan.apply(w), so that down_proj'·(M·x) = down_proj·x when the engine
/// applies plan.apply to down_proj's input online. Throws (nothing written): errc::bad_shape when
/// plan.size() differs from the ffn width or views are inconsistent, errc::non_finite.
template <transformer_model M, real_scalar P>
    requires std::same_as<P, transformer_scalar_t<M>>
void merge_online_r4(M& m, const hadamard_plan<P>& plan)
{
    using tr = detail::transformer_traits_of<M>;
    constexpr std::string_view where = "merge_online_r4";
    const transformer_shape s = detail::checked_shape(m, where);
    if (plan.size() != s.ffn)
        detail::fail(errc::bad_shape, where, "the plan has size " + std::to_string(plan.size()) + ", expected ffn = " + std::to_string(s.ffn));
    for (std::size_t l = 0; l < s.layers; ++l)
        detail::require_finite(matrix_view<const P>(tr::layer(m, l).down_proj), where, "down_proj");
    for (std::size_t l = 0; l < s.layers; ++l) plan.apply_rows(tr::layer(m, l).down_proj);
}

/// The whole offline part of the recipe, in the reference's order: untie_embeddings (when tied),
/// fuse_norms, rotate_residual with rotations.r1 (unless empty), rotate_heads with each
/// rotations.r2[l] (unless the vector or that entry is empty), and merge_online_r4 with `r4`
/// (unless null). Weights are not quantized here: call quantize_weights (RTN) or run GPTQ with
/// your own calibration forward pass afterwards. Throws as the steps do; every rotation and shape
/// is checked before the first step writes anything.
template <transformer_model M>
void apply_rotations(M& m, const rotation_set<transformer_scalar_t<M>>& rotations,
                     const hadamard_plan<transformer_scalar_t<M>>* r4 = nullptr)
{
    constexpr std::string_view where = "apply_rotations";
    const transformer_shape s = detail::checked_shape(m, where);
    const auto check = [&](const auto& r, std::size_t n, const std::string& what) {
        if (r.size() == 0) return;
        if (static_cast<std::size_t>(r.rows()) != n || static_cast<std::size_t>(r.cols()) != n)
            detail::fail(errc::bad_shape, where, what + " is " + std::to_string(r.rows()) + "x" + std::to_string(r.cols()) + ", expected " + std::to_string(n) + " square");
        if (!r.allFinite()) detail::fail(errc::non_finite, where, what + " has a non-finite value");
    };
    check(rotations.r1, s.hidden, "r1");
    if (!rotations.r2.empty() && rotations.r2.size() != s.layers)
        detail::fail(errc::bad_shape, where, std::to_string(rotations.r2.size()) + " R2 rotations for " + std::to_string(s.layers) + " layers");
    for (std::size_t l = 0; l < rotations.r2.size(); ++l) check(rotations.r2[l], s.head_dim, "r2[" + std::to_string(l) + "]");
    if (r4 != nullptr && r4->size() != s.ffn)
        detail::fail(errc::bad_shape, where, "r4 has size " + std::to_string(r4->size()) + ", expected ffn = " + std::to_string(s.ffn));
    detail::require_finite_weights(m, where);
    untie_embeddings(m);
    fuse_norms(m);
    if (rotations.r1.size() != 0) rotate_residual(m, rotations.r1);
    for (std::size_t l = 0; l < rotations.r2.size(); ++l)
        if (rotations.r2[l].size() != 0) rotate_heads(m, l, rotations.r2[l]);
    if (r4 != nullptr) merge_online_r4(m, *r4);
}

/// RTN: fake-quantizes every layer's linear weights (q/k/v/o, gate/up/down; not the embedding or
/// lm_head, which the reference keeps in full precision) with `spec` (a weight spec: per output
/// channel or per group, optional MSE clip search). Throws (nothing written): the spec's errors,
/// errc::bad_shape for inconsistent views or a group size that does not divide a row,
/// errc::non_finite.
template <transformer_model M>
void quantize_weights(M& m, const quant_spec& spec)
{
    using tr = detail::transformer_traits_of<M>;
    using T = transformer_scalar_t<M>;
    constexpr std::string_view where = "quantize_weights";
    spec.validate();
    const transformer_shape s = detail::checked_shape(m, where);
    if (spec.granularity == granularity::group)
        for (const std::size_t in : {s.hidden, s.heads * s.head_dim, s.ffn})
            if (spec.group_size == 0 || in % spec.group_size != 0)
                detail::fail(errc::bad_shape, where, "group_size " + std::to_string(spec.group_size) + " does not divide an input width of " + std::to_string(in));
    for (std::size_t l = 0; l < s.layers; ++l) {
        const auto ly = tr::layer(m, l);
        for (const auto& w : {ly.q_proj, ly.k_proj, ly.v_proj, ly.o_proj, ly.gate_proj, ly.up_proj, ly.down_proj})
            detail::require_finite(matrix_view<const T>(w), where, "a weight");
    }
    for (std::size_t l = 0; l < s.layers; ++l) {
        const auto ly = tr::layer(m, l);
        for (const auto& w : {ly.q_proj, ly.k_proj, ly.v_proj, ly.o_proj, ly.gate_proj, ly.up_proj, ly.down_proj})
            fake_quantize(w, spec);
    }
}

// ---------------------------------------------------------------------------------------------
// Rotation files

namespace detail {
inline constexpr std::array<char, 8> rotation_file_magic = {'S', 'P', 'Q', 'R', 'O', 'T', '1', '\n'};

template <class W>
void write_u32(std::ofstream& f, W v)
{
    const auto u = static_cast<std::uint32_t>(v);
    char b[4];
    for (int i = 0; i < 4; ++i) b[i] = static_cast<char>((u >> (8 * i)) & 0xffu);
    f.write(b, 4);
}
}  // namespace detail

/// Writes `rotations` to `path` in a small binary format: the 8 bytes "SPQROT1\n", then a
/// little-endian uint32 count of matrices (1 + number of R2), then for each matrix uint32 rows,
/// uint32 cols and rows·cols float64 values, row-major, little-endian (R1 first, then R2 of layer
/// 0, 1, ...; an absent rotation is stored as 0 x 0). Values are stored in double whatever T is,
/// so a float set round-trips exactly. Throws errc::bad_file when the file cannot be written.
template <real_scalar T>
void save_rotations(const std::filesystem::path& path, const rotation_set<T>& rotations)
{
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    if (!f) detail::fail(errc::bad_file, "save_rotations", "cannot open '" + path.string() + "' for writing");
    f.write(detail::rotation_file_magic.data(), detail::rotation_file_magic.size());
    detail::write_u32(f, 1 + rotations.r2.size());
    const auto put = [&](const rotation_matrix<T>& r) {
        detail::write_u32(f, r.rows());
        detail::write_u32(f, r.cols());
        for (Eigen::Index i = 0; i < r.rows(); ++i)
            for (Eigen::Index j = 0; j < r.cols(); ++j) {
                const auto bits = std::bit_cast<std::uint64_t>(static_cast<double>(r(i, j)));
                char b[8];
                for (int k = 0; k < 8; ++k) b[k] = static_cast<char>((bits >> (8 * k)) & 0xffu);
                f.write(b, 8);
            }
    };
    put(rotations.r1);
    for (const auto& r : rotations.r2) put(r);
    f.flush();
    if (!f) detail::fail(errc::bad_file, "save_rotations", "writing '" + path.string() + "' failed");
}

/// Reads a file written by save_rotations. Throws errc::bad_file (naming the file and what is
/// wrong) when it cannot be read, lacks the magic bytes, is truncated, has trailing bytes or a
/// non-square or oversized matrix, and errc::non_finite for a NaN/Inf entry.
template <real_scalar T>
[[nodiscard]] rotation_set<T> load_rotations(const std::filesystem::path& path)
{
    constexpr std::string_view where = "load_rotations";
    std::ifstream f(path, std::ios::binary);
    if (!f) detail::fail(errc::bad_file, where, "cannot open '" + path.string() + "'");
    const std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::size_t pos = 0;
    const auto bad = [&](const std::string& why) { detail::fail(errc::bad_file, where, "'" + path.string() + "': " + why); };
    const auto take = [&](std::size_t n, const char* what) {
        if (bytes.size() - pos < n) bad(std::string("truncated while reading ") + what);
        const char* p = bytes.data() + pos;
        pos += n;
        return p;
    };
    const auto u32 = [&](const char* what) {
        const char* p = take(4, what);
        std::uint32_t v = 0;
        for (int i = 0; i < 4; ++i) v |= static_cast<std::uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
        return v;
    };
    if (std::memcmp(take(8, "the magic bytes"), detail::rotation_file_magic.data(), 8) != 0) bad("not a spinquant rotation file");
    const std::uint32_t count = u32("the matrix count");
    if (count == 0 || count > (1u << 20)) bad("matrix count " + std::to_string(count) + " is out of range");
    rotation_set<T> out;
    out.r2.resize(count - 1);
    for (std::uint32_t k = 0; k < count; ++k) {
        const std::uint32_t rows = u32("a matrix shape"), cols = u32("a matrix shape");
        if (rows != cols || rows > (1u << 16)) bad("matrix " + std::to_string(k) + " is " + std::to_string(rows) + "x" + std::to_string(cols) + ", expected square and at most 65536");
        rotation_matrix<T>& r = k == 0 ? out.r1 : out.r2[k - 1];
        r.resize(rows, cols);
        const char* p = take(std::size_t{8} * rows * cols, "matrix values");
        for (std::size_t i = 0; i < std::size_t{rows} * cols; ++i) {
            std::uint64_t bits = 0;
            for (int b = 0; b < 8; ++b) bits |= static_cast<std::uint64_t>(static_cast<unsigned char>(p[8 * i + static_cast<std::size_t>(b)])) << (8 * b);
            const double v = std::bit_cast<double>(bits);
            if (!std::isfinite(v)) detail::fail(errc::non_finite, where, "'" + path.string() + "': matrix " + std::to_string(k) + " has a non-finite value");
            r.data()[i] = static_cast<T>(v);
        }
    }
    if (pos != bytes.size()) bad(std::to_string(bytes.size() - pos) + " trailing bytes");
    return out;
}

}  // namespace spinquant
