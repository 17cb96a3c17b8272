#pragma once
/// The forward pass of a LLaMA-architecture model in float, as llama2.c's run.c computes it
/// (RMSNorm, RoPE on interleaved pairs, grouped-query attention, SwiGLU, classifier), batched
/// over the tokens of a window, with a key/value cache for incremental decoding.
///
/// Quantization and online rotations enter through `activation_hooks`: one callback per site
/// where SpinQuant's reference places a quantizer or an online Hadamard (REFERENCE.md §1a/§1c).
/// Empty hooks give the full-precision model. A `layer_trace` records, per block, every tensor a
/// backward pass needs (inputs of each linear before and after its hook, RMS scales, attention
/// probabilities), so gradients with straight-through quantizers can be added on top.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <spinquant/concepts.hpp>
#include <spinquant/eigen.hpp>
#include <spinquant/error.hpp>

#include "model.hpp"

namespace llama {

/// Activations: one row per token, row-major (the layout of matrix_view's fast path).
using rows = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// An in-place transform of the activations at one site of one block: `x` has one row per token.
/// It must not change the shape; it may be called from several threads at once when the
/// caller evaluates in parallel, so it must not mutate shared state without synchronisation.
using activation_hook = std::function<void(std::size_t layer, spinquant::matrix_view<float> x)>;

/// What the forward pass does at each quantization site (empty = nothing, full precision).
/// Sites follow SpinQuant's `ptq_model`: activations are quantized per token at every linear
/// input except lm_head; o_proj's input with per-head groups; K after RoPE and R3; V per head.
struct activation_hooks {
    activation_hook attn_input;  ///< [T, dim]    input of q/k/v_proj, after RMSNorm
    activation_hook query;       ///< [T, dim]    q after RoPE: online R3 (q is never quantized)
    activation_hook key;         ///< [T, kv_dim] k after RoPE: online R3, then the K-cache quantizer
    activation_hook value;       ///< [T, kv_dim] v_proj output: the V-cache quantizer (per head)
    activation_hook o_input;     ///< [T, dim]    attention output = o_proj input (per-head groups)
    activation_hook ffn_input;   ///< [T, dim]    input of gate/up_proj (w1/w3), after RMSNorm
    activation_hook down_input;  ///< [T, hidden] input of down_proj (w2): online R4, then quantizer
};

/// RoPE tables of run.c: for position p and pair j of a head, angle p * 10000^(-2j/head_size),
/// computed in float exactly as run.c does, so greedy decoding reproduces its output.
struct rope_table {
    std::size_t pairs = 0;   ///< head_size / 2
    std::vector<float> cos;  ///< [seq_len, pairs]
    std::vector<float> sin;

    explicit rope_table(const model_config& c) : pairs(c.head_size() / 2), cos(c.seq_len * pairs), sin(c.seq_len * pairs)
    {
        const float hs = static_cast<float>(c.head_size());
        for (std::size_t p = 0; p < c.seq_len; ++p)
            for (std::size_t j = 0; j < pairs; ++j) {
                const float freq = 1.0f / std::pow(10000.0f, static_cast<float>(2 * j) / hs);
                const float angle = static_cast<float>(p) * freq;
                cos[p * pairs + j] = std::cos(angle);
                sin[p * pairs + j] = std::sin(angle);
            }
    }
};

/// Keys and values of the positions processed so far, per block, as the attention reads them
/// (after the key/value hooks: rotated and quantized when those are set).
struct kv_cache {
    std::vector<rows> keys;    ///< per layer [capacity, kv_dim]
    std::vector<rows> values;  ///< per layer [capacity, kv_dim]
    std::size_t length = 0;    ///< positions filled

    explicit kv_cache(const model_config& c) : kv_cache(c, c.seq_len) {}
    kv_cache(const model_config& c, std::size_t capacity)
        : keys(c.n_layers, rows(static_cast<Eigen::Index>(capacity), static_cast<Eigen::Index>(c.kv_dim()))),
          values(keys)
    {
    }
    [[nodiscard]] std::size_t capacity() const noexcept
    {
        return keys.empty() ? 0 : static_cast<std::size_t>(keys.front().rows());
    }
    /// Forgets every position (no deallocation).
    void clear() noexcept { length = 0; }
};

/// What one block computed for a window, everything a backward pass needs. "raw" tensors are
/// the values before the site's hook, the others after it (what the next operation consumed).
struct layer_trace {
    rows input;                 ///< [T, dim] residual stream entering the block
    Eigen::VectorXf attn_rms;   ///< [T] 1 / sqrt(mean(x^2) + eps) of the attention RMSNorm
    rows attn_in_raw, attn_in;  ///< [T, dim]
    rows q_raw, q;              ///< [T, dim] after RoPE
    rows k_raw, k;              ///< [T, kv_dim] after RoPE
    rows v_raw, v;              ///< [T, kv_dim]
    std::vector<rows> probs;    ///< per query head [T, pos0 + T] attention probabilities (0 above the diagonal)
    rows o_raw, o;              ///< [T, dim]
    rows mid;                   ///< [T, dim] residual stream after attention
    Eigen::VectorXf ffn_rms;    ///< [T]
    rows ffn_in_raw, ffn_in;    ///< [T, dim]
    rows gate, up;              ///< [T, hidden] w1 x and w3 x
    rows down_in_raw, down_in;  ///< [T, hidden] silu(gate) * up, before / after the down_input hook
};

/// A whole forward pass: one trace per block plus the classifier's input.
struct forward_trace {
    std::vector<layer_trace> layers;
    rows final_input;           ///< [T, dim] residual stream after the last block
    Eigen::VectorXf final_rms;  ///< [T]
    rows final_normed;          ///< [T, dim] classifier input
};

/// Buffers for one forward pass of up to any number of tokens; reused between calls, so a steady
/// loop of same-sized windows allocates nothing. One per thread.
struct workspace {
    rope_table rope;
    rows x, xn, q, k, v, o, scores, gate, up;
    Eigen::VectorXf rms;

    explicit workspace(const model_config& c) : rope(c) {}
};

namespace detail {

[[nodiscard]] inline Eigen::Map<const rows> map(const matrix& m) noexcept
{
    return {m.data.data(), static_cast<Eigen::Index>(m.rows), static_cast<Eigen::Index>(m.cols)};
}

/// out = x / sqrt(mean(x^2) + 1e-5) * weight, row by row, as run.c's rmsnorm (float sums).
inline void rms_norm(const rows& x, std::span<const float> weight, rows& out, Eigen::VectorXf& inv_rms)
{
    out.resize(x.rows(), x.cols());
    inv_rms.resize(x.rows());
    const auto n = static_cast<std::size_t>(x.cols());
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
        const float* in = x.row(t).data();
        float ss = 0.0f;
        for (std::size_t j = 0; j < n; ++j) ss += in[j] * in[j];
        const float s = 1.0f / std::sqrt(ss / static_cast<float>(n) + 1e-5f);
        inv_rms[t] = s;
        float* o = out.row(t).data();
        for (std::size_t j = 0; j < n; ++j) o[j] = weight[j] * (s * in[j]);
    }
}

/// Rotates the interleaved pairs (2j, 2j+1) of every head of `x` by the angles of its position.
inline void apply_rope(rows& x, std::size_t head_size, std::size_t pos0, const rope_table& rope) noexcept
{
    const auto width = static_cast<std::size_t>(x.cols());
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
        float* r = x.row(t).data();
        const float* c = &rope.cos[(pos0 + static_cast<std::size_t>(t)) * rope.pairs];
        const float* s = &rope.sin[(pos0 + static_cast<std::size_t>(t)) * rope.pairs];
        for (std::size_t h = 0; h < width; h += head_size)
            for (std::size_t j = 0; j < rope.pairs; ++j) {
                const float a = r[h + 2 * j], b = r[h + 2 * j + 1];
                r[h + 2 * j] = a * c[j] - b * s[j];
                r[h + 2 * j + 1] = a * s[j] + b * c[j];
            }
    }
}

inline void run_hook(const activation_hook& hook, std::size_t layer, rows& x)
{
    if (hook) hook(layer, spinquant::as_matrix_view(x));
}

}  // namespace detail

/// Checks what forward()/forward_layer() need before anything is written: every token id below
/// vocab_size (errc::bad_argument), cache.length == pos0 (errc::bad_argument: positions must be
/// processed in order) and pos0 + T within the cache capacity and the model's seq_len
/// (errc::bad_shape).
inline void check_forward_input(const model& m, std::span<const int> tokens, std::size_t pos0, const kv_cache& cache,
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
inline void embed(const model& m, std::span<const int> tokens, rows& x)
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
inline void forward_layer(const model& m, std::size_t l, rows& x, std::size_t pos0, kv_cache& cache,
                          const activation_hooks& hooks, workspace& ws, layer_trace* trace = nullptr)
{
    const model_config& c = m.config;
    const layer_weights& w = m.layers[l];
    const auto T = x.rows();
    const std::size_t hs = c.head_size();
    const auto ehs = static_cast<Eigen::Index>(hs);
    const auto S = static_cast<Eigen::Index>(pos0) + T;  // positions visible to the last token
    if (trace) trace->input = x;

    // Attention: RMSNorm, q/k/v projections, RoPE, then the sites of R3 and the K/V quantizers.
    detail::rms_norm(x, w.attn_norm, ws.xn, ws.rms);
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
    rows& kc = cache.keys[l];
    rows& vc = cache.values[l];
    kc.middleRows(static_cast<Eigen::Index>(pos0), T) = ws.k;
    vc.middleRows(static_cast<Eigen::Index>(pos0), T) = ws.v;

    // Scaled dot-product attention per query head; head h reads key/value head h / kv_group.
    const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
    ws.o.resize(T, static_cast<Eigen::Index>(c.dim));
    for (std::size_t h = 0; h < c.n_heads; ++h) {
        const auto qh = static_cast<Eigen::Index>(h * hs);
        const auto kh = static_cast<Eigen::Index>((h / c.kv_group()) * hs);
        ws.scores.noalias() = ws.q.middleCols(qh, ehs) * kc.topRows(S).middleCols(kh, ehs).transpose();
        ws.scores *= scale;
        for (Eigen::Index t = 0; t < T; ++t) {
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
    detail::rms_norm(x, w.ffn_norm, ws.xn, ws.rms);
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
    ws.gate.array() = ws.gate.array() / ((-ws.gate.array()).exp() + 1.0f) * ws.up.array();
    if (trace) trace->down_in_raw = ws.gate;
    detail::run_hook(hooks.down_input, l, ws.gate);
    if (trace) trace->down_in = ws.gate;
    x.noalias() += ws.gate * detail::map(w.w2).transpose();
}

/// logits [T, vocab] <- classifier(RMSNorm(x)); the classifier input is never quantized.
inline void classify(const model& m, const rows& x, rows& logits, workspace& ws, forward_trace* trace = nullptr)
{
    detail::rms_norm(x, m.final_norm, ws.xn, ws.rms);
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
inline void forward(const model& m, std::span<const int> tokens, std::size_t pos0, kv_cache& cache,
                    const activation_hooks& hooks, workspace& ws, rows& logits, forward_trace* trace = nullptr)
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
