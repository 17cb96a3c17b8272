#pragma once
/// The forward pass of a LLaMA-architecture model, as llama2.c's run.c computes it (RMSNorm,
/// RoPE on interleaved pairs, grouped-query attention, SwiGLU, classifier), batched over the
/// tokens of a window, with a key/value cache for incremental decoding.
///
/// Quantization and online rotations enter through `activation_hooks`: one callback per site
/// where SpinQuant's reference places a quantizer or an online Hadamard (REFERENCE.md §1a/§1c).
/// Empty hooks give the full-precision model. A `layer_trace` records, per block, every tensor a
/// backward pass needs (inputs of each linear before and after its hook, RMS scales, attention
/// probabilities), so gradients with straight-through quantizers can be added on top
/// (backward.hpp does).
///
/// Scalar type. Everything is a template on the element type T (float or double), deduced from
/// the activations; the float names (`rows`, `activation_hooks`, `kv_cache`, `workspace`,
/// `layer_trace`, `forward_trace`) are the T = float instances, and llama::model is the float
/// model. A double instance runs on `basic_model<double>` (see model_cast): the same arithmetic in
/// double, which is what finite-difference checks of the gradients need.
#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <functional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <spinquant/concepts.hpp>
#include <spinquant/eigen.hpp>
#include <spinquant/error.hpp>

#include "model.hpp"

namespace llama {

/// Activations in T: one row per token, row-major (the layout of matrix_view's fast path).
template <spinquant::real_scalar T>
using basic_rows = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// Float activations.
using rows = basic_rows<float>;
/// A column of T (per-token scalars such as RMS scales).
template <spinquant::real_scalar T>
using basic_vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

// ---------------------------------------------------------------------------------------------
// Weights in another scalar type

/// An owned row-major matrix of T: llama::matrix for any element type.
template <spinquant::real_scalar T>
struct basic_matrix {
    std::vector<T> data;   ///< rows * cols elements, row by row
    std::size_t rows = 0;  ///< output channels for weights
    std::size_t cols = 0;  ///< input features for weights

    /// An empty matrix.
    basic_matrix() = default;
    /// A zero r x c matrix (allocates r * c elements).
    basic_matrix(std::size_t r, std::size_t c) : data(r * c, T(0)), rows(r), cols(c) {}

    /// The library's view of this matrix (packed row-major).
    [[nodiscard]] spinquant::matrix_view<T> view() noexcept { return {data.data(), rows, cols, cols, 1}; }
    [[nodiscard]] spinquant::matrix_view<const T> view() const noexcept { return {data.data(), rows, cols, cols, 1}; }
};

/// The weights of one block in T, member for member as llama::layer_weights.
template <spinquant::real_scalar T>
struct basic_layer_weights {
    std::vector<T> attn_norm;        ///< RMSNorm before attention [dim]
    basic_matrix<T> wq, wk, wv, wo;  ///< [dim, dim], [kv_dim, dim], [kv_dim, dim], [dim, dim]
    std::vector<T> ffn_norm;         ///< RMSNorm before the feed-forward layer [dim]
    basic_matrix<T> w1, w2, w3;      ///< gate [hidden, dim], down [dim, hidden], up [hidden, dim]
};

/// A whole model in T, member for member as llama::model (whose matrices are float). Float code
/// uses llama::model itself; model_of<T> names the right type for each T.
template <spinquant::real_scalar T>
struct basic_model {
    model_config config;                         ///< the shape
    basic_matrix<T> token_embedding;             ///< [vocab, dim]
    std::vector<basic_layer_weights<T>> layers;  ///< one per block
    std::vector<T> final_norm;                   ///< [dim]
    basic_matrix<T> classifier;                  ///< [vocab, dim], its own matrix
};

/// The model type the forward pass in T runs on: llama::model for float, basic_model<T> otherwise.
template <spinquant::real_scalar T>
using model_of = std::conditional_t<std::is_same_v<T, float>, model, basic_model<T>>;

namespace detail {

/// The element type of a model's weights.
template <class Model>
using weight_scalar_t = std::remove_cvref_t<decltype(std::declval<const Model&>().classifier.data[0])>;

template <class To, class From>
void convert_matrix(const From& in, To& out)
{
    using T = std::remove_cvref_t<decltype(out.data[0])>;
    out.rows = in.rows;
    out.cols = in.cols;
    out.data.assign(in.data.size(), T(0));
    for (std::size_t i = 0; i < in.data.size(); ++i) out.data[i] = static_cast<T>(in.data[i]);
}

template <class T, class U>
void convert_vector(const std::vector<U>& in, std::vector<T>& out)
{
    out.assign(in.size(), T(0));
    for (std::size_t i = 0; i < in.size(); ++i) out[i] = static_cast<T>(in[i]);
}

}  // namespace detail

/// A model whose weights are T: llama::model (float) or basic_model<T> (what model_cast makes).
template <class Model, class T>
concept model_weights_of = requires(const Model& m) {
    { m.config } -> std::convertible_to<const model_config&>;
    m.token_embedding.data;
    m.layers[0].wq.data;
    m.final_norm[0];
} && std::same_as<detail::weight_scalar_t<Model>, T>;

/// A copy of `m` with every weight converted to T (exact for float -> double). For T = float it
/// is a plain copy of the llama::model. Allocates the whole model.
template <spinquant::real_scalar T>
[[nodiscard]] model_of<T> model_cast(const model& m)
{
    if constexpr (std::is_same_v<T, float>) {
        return m;
    } else {
        basic_model<T> out;
        out.config = m.config;
        detail::convert_matrix(m.token_embedding, out.token_embedding);
        out.layers.resize(m.layers.size());
        for (std::size_t l = 0; l < m.layers.size(); ++l) {
            const layer_weights& a = m.layers[l];
            basic_layer_weights<T>& b = out.layers[l];
            detail::convert_vector(a.attn_norm, b.attn_norm);
            detail::convert_vector(a.ffn_norm, b.ffn_norm);
            detail::convert_matrix(a.wq, b.wq);
            detail::convert_matrix(a.wk, b.wk);
            detail::convert_matrix(a.wv, b.wv);
            detail::convert_matrix(a.wo, b.wo);
            detail::convert_matrix(a.w1, b.w1);
            detail::convert_matrix(a.w2, b.w2);
            detail::convert_matrix(a.w3, b.w3);
        }
        detail::convert_vector(m.final_norm, out.final_norm);
        detail::convert_matrix(m.classifier, out.classifier);
        return out;
    }
}

// ---------------------------------------------------------------------------------------------
// Hooks, caches and traces

/// An in-place transform of the activations at one site of one block: `x` has one row per token.
/// It must not change the shape; it may be called from several threads at once when the
/// caller evaluates in parallel, so it must not mutate shared state without synchronisation.
template <spinquant::real_scalar T>
using basic_activation_hook = std::function<void(std::size_t layer, spinquant::matrix_view<T> x)>;
/// The float hook.
using activation_hook = basic_activation_hook<float>;

/// What the forward pass does at each quantization site (empty = nothing, full precision).
/// Sites follow SpinQuant's `ptq_model`: activations are quantized per token at every linear
/// input except lm_head; o_proj's input with per-head groups; K after RoPE and R3; V per head.
template <spinquant::real_scalar T>
struct basic_activation_hooks {
    basic_activation_hook<T> attn_input;  ///< [T, dim]    input of q/k/v_proj, after RMSNorm
    basic_activation_hook<T> query;       ///< [T, dim]    q after RoPE: online R3 (q is never quantized)
    basic_activation_hook<T> key;         ///< [T, kv_dim] k after RoPE: online R3, then the K-cache quantizer
    basic_activation_hook<T> value;       ///< [T, kv_dim] v_proj output: the V-cache quantizer (per head)
    basic_activation_hook<T> o_input;     ///< [T, dim]    attention output = o_proj input (per-head groups)
    basic_activation_hook<T> ffn_input;   ///< [T, dim]    input of gate/up_proj (w1/w3), after RMSNorm
    basic_activation_hook<T> down_input;  ///< [T, hidden] input of down_proj (w2): online R4, then quantizer
};
/// The float hooks.
using activation_hooks = basic_activation_hooks<float>;

/// RoPE tables of run.c: for position p and pair j of a head, angle p * 10000^(-2j/head_size),
/// computed in T exactly as run.c does in float, so greedy decoding reproduces its output.
template <spinquant::real_scalar T>
struct basic_rope_table {
    std::size_t pairs = 0;  ///< head_size / 2
    std::vector<T> cos;     ///< [seq_len, pairs]
    std::vector<T> sin;

    /// The tables for every position below c.seq_len.
    explicit basic_rope_table(const model_config& c) : pairs(c.head_size() / 2), cos(c.seq_len * pairs), sin(c.seq_len * pairs)
    {
        const T hs = static_cast<T>(c.head_size());
        for (std::size_t p = 0; p < c.seq_len; ++p)
            for (std::size_t j = 0; j < pairs; ++j) {
                const T freq = T(1) / std::pow(T(10000), static_cast<T>(2 * j) / hs);
                const T angle = static_cast<T>(p) * freq;
                cos[p * pairs + j] = std::cos(angle);
                sin[p * pairs + j] = std::sin(angle);
            }
    }
};
/// The float RoPE tables.
using rope_table = basic_rope_table<float>;

/// Keys and values of the positions processed so far, per block, as the attention reads them
/// (after the key/value hooks: rotated and quantized when those are set).
template <spinquant::real_scalar T>
struct basic_kv_cache {
    std::vector<basic_rows<T>> keys;    ///< per layer [capacity, kv_dim]
    std::vector<basic_rows<T>> values;  ///< per layer [capacity, kv_dim]
    std::size_t length = 0;             ///< positions filled

    /// A cache for the model's whole context.
    explicit basic_kv_cache(const model_config& c) : basic_kv_cache(c, c.seq_len) {}
    /// A cache for `capacity` positions.
    basic_kv_cache(const model_config& c, std::size_t capacity)
        : keys(c.n_layers, basic_rows<T>(static_cast<Eigen::Index>(capacity), static_cast<Eigen::Index>(c.kv_dim()))),
          values(keys)
    {
    }
    /// Positions the cache can hold.
    [[nodiscard]] std::size_t capacity() const noexcept
    {
        return keys.empty() ? 0 : static_cast<std::size_t>(keys.front().rows());
    }
    /// Forgets every position (no deallocation).
    void clear() noexcept { length = 0; }
};
/// The float cache.
using kv_cache = basic_kv_cache<float>;

/// What one block computed for a window, everything a backward pass needs. "raw" tensors are
/// the values before the site's hook, the others after it (what the next operation consumed).
template <spinquant::real_scalar T>
struct basic_layer_trace {
    basic_rows<T> input;                ///< [T, dim] residual stream entering the block
    basic_vector<T> attn_rms;           ///< [T] 1 / sqrt(mean(x^2) + eps) of the attention RMSNorm
    basic_rows<T> attn_in_raw, attn_in; ///< [T, dim]
    basic_rows<T> q_raw, q;             ///< [T, dim] after RoPE
    basic_rows<T> k_raw, k;             ///< [T, kv_dim] after RoPE
    basic_rows<T> v_raw, v;             ///< [T, kv_dim]
    std::vector<basic_rows<T>> probs;   ///< per query head [T, pos0 + T] attention probabilities (0 above the diagonal)
    basic_rows<T> o_raw, o;             ///< [T, dim]
    basic_rows<T> mid;                  ///< [T, dim] residual stream after attention
    basic_vector<T> ffn_rms;            ///< [T]
    basic_rows<T> ffn_in_raw, ffn_in;   ///< [T, dim]
    basic_rows<T> gate, up;             ///< [T, hidden] w1 x and w3 x
    basic_rows<T> down_in_raw, down_in; ///< [T, hidden] silu(gate) * up, before / after the down_input hook
};
/// The float block trace.
using layer_trace = basic_layer_trace<float>;

/// A whole forward pass: one trace per block plus the classifier's input.
template <spinquant::real_scalar T>
struct basic_forward_trace {
    std::vector<basic_layer_trace<T>> layers;
    basic_rows<T> final_input;  ///< [T, dim] residual stream after the last block
    basic_vector<T> final_rms;  ///< [T]
    basic_rows<T> final_normed; ///< [T, dim] classifier input
};
/// The float trace.
using forward_trace = basic_forward_trace<float>;

/// Buffers for one forward pass of up to any number of tokens; reused between calls, so a steady
/// loop of same-sized windows allocates nothing. One per thread.
template <spinquant::real_scalar T>
struct basic_workspace {
    basic_rope_table<T> rope;                            ///< the model's RoPE angles
    basic_rows<T> x, xn, q, k, v, o, scores, gate, up;   ///< activations of the block being run
    basic_vector<T> rms;                                 ///< inverse RMS of the last norm

    /// Buffers for a model of shape c (RoPE tables for its seq_len; activations grow on first use).
    explicit basic_workspace(const model_config& c) : rope(c) {}
};
/// The float workspace.
using workspace = basic_workspace<float>;

namespace detail {

/// A weight matrix (llama::matrix or basic_matrix) as a read-only Eigen row-major map.
template <class M>
[[nodiscard]] auto map(const M& m) noexcept
{
    using T = std::remove_cvref_t<decltype(m.data[0])>;
    return Eigen::Map<const basic_rows<T>>(m.data.data(), static_cast<Eigen::Index>(m.rows),
                                           static_cast<Eigen::Index>(m.cols));
}

/// out = x / sqrt(mean(x^2) + 1e-5) * weight, row by row, as run.c's rmsnorm (sums in T).
template <spinquant::real_scalar T>
void rms_norm(const basic_rows<T>& x, std::type_identity_t<std::span<const T>> weight, basic_rows<T>& out,
              basic_vector<T>& inv_rms)
{
    out.resize(x.rows(), x.cols());
    inv_rms.resize(x.rows());
    const auto n = static_cast<std::size_t>(x.cols());
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
        const T* in = x.row(t).data();
        T ss = T(0);
        for (std::size_t j = 0; j < n; ++j) ss += in[j] * in[j];
        const T s = T(1) / std::sqrt(ss / static_cast<T>(n) + static_cast<T>(1e-5));
        inv_rms[t] = s;
        T* o = out.row(t).data();
        for (std::size_t j = 0; j < n; ++j) o[j] = weight[j] * (s * in[j]);
    }
}

/// Rotates the interleaved pairs (2j, 2j+1) of every head of `x` by the angles of its position.
template <spinquant::real_scalar T>
void apply_rope(basic_rows<T>& x, std::size_t head_size, std::size_t pos0, const basic_rope_table<T>& rope) noexcept
{
    const auto width = static_cast<std::size_t>(x.cols());
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
        T* r = x.row(t).data();
        const T* c = &rope.cos[(pos0 + static_cast<std::size_t>(t)) * rope.pairs];
        const T* s = &rope.sin[(pos0 + static_cast<std::size_t>(t)) * rope.pairs];
        for (std::size_t h = 0; h < width; h += head_size)
            for (std::size_t j = 0; j < rope.pairs; ++j) {
                const T a = r[h + 2 * j], b = r[h + 2 * j + 1];
                r[h + 2 * j] = a * c[j] - b * s[j];
                r[h + 2 * j + 1] = a * s[j] + b * c[j];
            }
    }
}

template <spinquant::real_scalar T>
void run_hook(const basic_activation_hook<T>& hook, std::size_t layer, basic_rows<T>& x)
{
    if (hook) hook(layer, spinquant::as_matrix_view(x));
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// The forward pass

/// Checks what forward()/forward_layer() need before anything is written: every token id below
/// vocab_size (errc::bad_argument), cache.length == pos0 (errc::bad_argument: positions must be
/// processed in order) and pos0 + T within the cache capacity and the model's seq_len
/// (errc::bad_shape).
template <class Model, spinquant::real_scalar T>
void check_forward_input(const Model& m, std::span<const int> tokens, std::size_t pos0, const basic_kv_cache<T>& cache,
                         std::string_view where)
{
    using spinquant::errc;
    for (std::size_t i = 0; i < tokens.size(); ++i)
        if (tokens[i] < 0 || static_cast<std::size_t>(tokens[i]) >= m.config.vocab_size)
            spinquant::detail::fail(errc::bad_argument, where,
                                    "tokens[" + std::to_string(i) + "] = " + std::to_string(tokens[i]) +
                                        ", expected 0.." + std::to_string(m.config.vocab_size - 1));
    if (cache.length != pos0)
        spinquant::detail::fail(errc::bad_argument, where,
                                "pos0 is " + std::to_string(pos0) + " but the cache holds " +
                                    std::to_string(cache.length) + " positions (process positions in order)");
    const std::size_t limit = std::min(cache.capacity(), m.config.seq_len);
    if (pos0 + tokens.size() > limit)
        spinquant::detail::fail(errc::bad_shape, where,
                                "positions " + std::to_string(pos0) + ".." + std::to_string(pos0 + tokens.size()) +
                                    " exceed the context of " + std::to_string(limit) + " (cache capacity / seq_len)");
    if (cache.keys.size() != m.config.n_layers ||
        static_cast<std::size_t>(cache.keys.front().cols()) != m.config.kv_dim())
        spinquant::detail::fail(errc::bad_shape, where, "the cache was built for another model configuration");
}

/// x (one row per token) <- the token embeddings.
template <class Model, spinquant::real_scalar T>
    requires model_weights_of<Model, T>
void embed(const Model& m, std::span<const int> tokens, basic_rows<T>& x)
{
    const auto d = static_cast<Eigen::Index>(m.config.dim);
    x.resize(static_cast<Eigen::Index>(tokens.size()), d);
    const auto e = detail::map(m.token_embedding);
    for (std::size_t t = 0; t < tokens.size(); ++t) x.row(static_cast<Eigen::Index>(t)) = e.row(tokens[t]);
}

/// Runs block `l` over the T rows of `x` (the residual stream of positions pos0..pos0+T-1) in
/// place, appending its keys and values to `cache` at rows pos0.. (the caller advances
/// cache.length once every block has run; forward() does). Fills `trace` when given.
/// Preconditions (checked by forward(), not here): check_forward_input passed, x is [T, dim].
/// Complexity O(T * (dim^2 + dim * hidden) + T * (pos0 + T) * dim).
template <class Model, spinquant::real_scalar T>
    requires model_weights_of<Model, T>
void forward_layer(const Model& m, std::size_t l, basic_rows<T>& x, std::size_t pos0, basic_kv_cache<T>& cache,
                   const std::type_identity_t<basic_activation_hooks<T>>& hooks, basic_workspace<T>& ws,
                   std::type_identity_t<basic_layer_trace<T>>* trace = nullptr)
{
    const model_config& c = m.config;
    const auto& w = m.layers[l];
    const auto T_ = x.rows();
    const std::size_t hs = c.head_size();
    const auto ehs = static_cast<Eigen::Index>(hs);
    const auto S = static_cast<Eigen::Index>(pos0) + T_;  // positions visible to the last token
    if (trace) trace->input = x;

    // Attention: RMSNorm, q/k/v projections, RoPE, then the sites of R3 and the K/V quantizers.
    detail::rms_norm<T>(x, w.attn_norm, ws.xn, ws.rms);
    if (trace) {
        trace->attn_rms = ws.rms;
        trace->attn_in_raw = ws.xn;
    }
    detail::run_hook(hooks.attn_input, l, ws.xn);
    if (trace) trace->attn_in = ws.xn;
    ws.q.noalias() = ws.xn * detail::map(w.wq).transpose();
    ws.k.noalias() = ws.xn * detail::map(w.wk).transpose();
    ws.v.noalias() = ws.xn * detail::map(w.wv).transpose();
    detail::apply_rope(ws.q, hs, pos0, ws.rope);
    detail::apply_rope(ws.k, hs, pos0, ws.rope);
    if (trace) {
        trace->q_raw = ws.q;
        trace->k_raw = ws.k;
        trace->v_raw = ws.v;
    }
    detail::run_hook(hooks.query, l, ws.q);
    detail::run_hook(hooks.key, l, ws.k);
    detail::run_hook(hooks.value, l, ws.v);
    if (trace) {
        trace->q = ws.q;
        trace->k = ws.k;
        trace->v = ws.v;
        trace->probs.resize(c.n_heads);
    }
    basic_rows<T>& kc = cache.keys[l];
    basic_rows<T>& vc = cache.values[l];
    kc.middleRows(static_cast<Eigen::Index>(pos0), T_) = ws.k;
    vc.middleRows(static_cast<Eigen::Index>(pos0), T_) = ws.v;

    // Scaled dot-product attention per query head; head h reads key/value head h / kv_group.
    const T scale = T(1) / std::sqrt(static_cast<T>(hs));
    ws.o.resize(T_, static_cast<Eigen::Index>(c.dim));
    for (std::size_t h = 0; h < c.n_heads; ++h) {
        const auto qh = static_cast<Eigen::Index>(h * hs);
        const auto kh = static_cast<Eigen::Index>((h / c.kv_group()) * hs);
        ws.scores.noalias() = ws.q.middleCols(qh, ehs) * kc.topRows(S).middleCols(kh, ehs).transpose();
        ws.scores *= scale;
        for (Eigen::Index t = 0; t < T_; ++t) {
            const Eigen::Index visible = static_cast<Eigen::Index>(pos0) + t + 1;  // causal mask
            auto r = ws.scores.row(t);
            auto seen = r.head(visible).array();
            seen = (seen - seen.maxCoeff()).exp();  // Eigen's vectorised exp: within an ulp or two of expf
            seen /= seen.sum();
            r.tail(S - visible).setZero();
        }
        ws.o.middleCols(qh, ehs).noalias() = ws.scores * vc.topRows(S).middleCols(kh, ehs);
        if (trace) trace->probs[h] = ws.scores;
    }
    if (trace) trace->o_raw = ws.o;
    detail::run_hook(hooks.o_input, l, ws.o);
    if (trace) trace->o = ws.o;
    x.noalias() += ws.o * detail::map(w.wo).transpose();
    if (trace) trace->mid = x;

    // SwiGLU feed-forward: w2(silu(w1 x) * w3 x), with the site of R4 and its quantizer before w2.
    detail::rms_norm<T>(x, w.ffn_norm, ws.xn, ws.rms);
    if (trace) {
        trace->ffn_rms = ws.rms;
        trace->ffn_in_raw = ws.xn;
    }
    detail::run_hook(hooks.ffn_input, l, ws.xn);
    if (trace) trace->ffn_in = ws.xn;
    ws.gate.noalias() = ws.xn * detail::map(w.w1).transpose();
    ws.up.noalias() = ws.xn * detail::map(w.w3).transpose();
    if (trace) {
        trace->gate = ws.gate;
        trace->up = ws.up;
    }
    // silu(g) * u = g / (1 + exp(-g)) * u, vectorised over the whole block.
    ws.gate.array() = ws.gate.array() / ((-ws.gate.array()).exp() + T(1)) * ws.up.array();
    if (trace) trace->down_in_raw = ws.gate;
    detail::run_hook(hooks.down_input, l, ws.gate);
    if (trace) trace->down_in = ws.gate;
    x.noalias() += ws.gate * detail::map(w.w2).transpose();
}

/// logits [T, vocab] <- classifier(RMSNorm(x)); the classifier input is never quantized.
template <class Model, spinquant::real_scalar T>
    requires model_weights_of<Model, T>
void classify(const Model& m, const basic_rows<T>& x, basic_rows<T>& logits, basic_workspace<T>& ws,
              std::type_identity_t<basic_forward_trace<T>>* trace = nullptr)
{
    detail::rms_norm<T>(x, m.final_norm, ws.xn, ws.rms);
    if (trace) {
        trace->final_input = x;
        trace->final_rms = ws.rms;
        trace->final_normed = ws.xn;
    }
    logits.noalias() = ws.xn * detail::map(m.classifier).transpose();
}

/// Runs `tokens` at positions pos0.. through the whole model: logits [T, vocab], one row per
/// token (row t predicts the token after tokens[t]). Keys and values are appended to `cache`
/// (cache.length advances by T). pos0 = 0 with an empty cache is a fresh window; T = 1 steps a
/// decoder. Fills `trace` (one layer_trace per block) when given.
/// Errors (checked before anything is written): see check_forward_input.
template <class Model, spinquant::real_scalar T>
    requires model_weights_of<Model, T>
void forward(const Model& m, std::span<const int> tokens, std::size_t pos0, basic_kv_cache<T>& cache,
             const std::type_identity_t<basic_activation_hooks<T>>& hooks, basic_workspace<T>& ws,
             basic_rows<T>& logits, std::type_identity_t<basic_forward_trace<T>>* trace = nullptr)
{
    check_forward_input(m, tokens, pos0, cache, "llama::forward");
    embed(m, tokens, ws.x);
    if (trace) trace->layers.resize(m.config.n_layers);
    for (std::size_t l = 0; l < m.config.n_layers; ++l)
        forward_layer(m, l, ws.x, pos0, cache, hooks, ws, trace ? &trace->layers[l] : nullptr);
    cache.length = pos0 + tokens.size();
    classify(m, ws.x, logits, ws, trace);
}

}  // namespace llama
