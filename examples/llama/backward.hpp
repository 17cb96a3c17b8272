#pragma once
/// The backward pass of the quantized forward pass with respect to the rotations R1 and R2:
/// what SpinQuant's training (REFERENCE.md §1e) differentiates, with every model weight frozen.
///
/// The network. From a frozen model W (norm weights folded or not; the classifier its own
/// matrix; R4's offline half already merged into w2 when the online R4 is on) and the current
/// rotations, the weights are rotated on the fly as the reference's QuantizeLinear does:
///   embedding E·R1, classifier Wc·R1 (never quantized),
///   q/k/gate/up  Q(W·R1),  v  Q(diag(R2)ᵀ·Wv·R1),  o  Q(R1ᵀ·Wo·diag(R2)),  down  Q(R1ᵀ·W2),
/// with Q the RTN weight quantizer of quantize_weights_rtn (per output channel, the MSE clip
/// search when quant_config::w_clip) and diag(R2) one R2 per head. The activations then go
/// through llama::forward with make_quant_hooks' hooks (float) or the same hooks in T (double):
/// the training forward pass *is* the evaluated network. The loss is the mean next-token
/// cross-entropy (natural log) over all predictions of a batch, computed in double from the
/// logits.
///
/// The backward pass. Reverse mode through the classifier, the final RMSNorm, every block
/// (RMSNorm with a general weight, the linears, RoPE on interleaved pairs, grouped-query causal
/// softmax attention, SwiGLU, the online Hadamards R3/R4 by their inverse transform) and the
/// embedding. Every quantizer is straight-through: its Jacobian is the mask that
/// spinquant::fake_quantize_backward defines (1 where the element is represented up to rounding,
/// 0 where the clamp cut it off), applied at each activation site to the value the quantizer saw
/// and at each weight to the unquantized rotated weight. The gradient of each rotated weight
/// then flows to R1 and R2 through the products above; ∂/∂R1 sums the embedding, every reader
/// and writer of every block and the classifier.
///
/// Memory. One sequence at a time: forward with a trace, backward, and the weight gradients
/// accumulate across the sequences of a batch; only then are they masked and chained to the
/// rotations. What one sequence holds is sequence_bytes(tokens) (about 21 MiB in float for a
/// 256-token sequence of stories260K, three fifths of it the attention probabilities).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <spinquant/concepts.hpp>
#include <spinquant/detail/checks.hpp>
#include <spinquant/eigen.hpp>
#include <spinquant/error.hpp>
#include <spinquant/hadamard.hpp>
#include <spinquant/quantizer.hpp>

#include "forward.hpp"
#include "model.hpp"
#include "quant.hpp"

namespace llama {

/// The quantizers of a quant_config at each site, as make_quant_hooks and quantize_weights_rtn
/// build them: what the forward pass applies and the backward pass masks with.
struct quant_sites {
    spinquant::quant_spec a_token;  ///< q/k/v, gate/up and down_proj inputs (per token)
    spinquant::quant_spec a_head;   ///< o_proj input (per head)
    spinquant::quant_spec k_head;   ///< K cache after RoPE and R3 (per head)
    spinquant::quant_spec v_head;   ///< V cache (per head)
    spinquant::quant_spec weight;   ///< every linear weight except the classifier (per output channel)
    bool activations = false;       ///< a_bits < 16
    bool keys = false;              ///< k_bits < 16
    bool values = false;            ///< v_bits < 16
    bool weights = false;           ///< w_bits < 16
    bool r3 = false;                ///< online R3 on queries and keys
    bool r4 = false;                ///< online R4 on down_proj's input

    /// The sites of `q` for a model of shape `c`. Errors: errc::bits_out_of_range for bits outside
    /// 2..16, errc::bad_argument for a spec the quantizer rejects (a clip ratio outside (0, 1]).
    [[nodiscard]] static quant_sites of(const model_config& c, const quant_config& q)
    {
        constexpr const char* where = "llama::quant_sites";
        for (const auto& [bits, name] : {std::pair{q.w_bits, "w_bits"}, std::pair{q.a_bits, "a_bits"},
                                         std::pair{q.k_bits, "k_bits"}, std::pair{q.v_bits, "v_bits"}})
            detail::check_bits(bits, name, where);
        using spinquant::quant_spec;
        const std::size_t hs = c.head_size();
        quant_sites s;
        s.a_token = quant_spec::activation(q.a_bits, q.a_symmetric, 0, q.a_clip);
        s.a_head = quant_spec::activation(q.a_bits, q.a_symmetric, hs, q.a_clip);
        s.k_head = quant_spec::activation(q.k_bits, q.kv_symmetric, hs, q.k_clip);
        s.v_head = quant_spec::activation(q.v_bits, q.kv_symmetric, hs, q.v_clip);
        s.weight = quant_spec::weight(q.w_bits, q.w_symmetric, 0, q.w_clip);
        for (const auto* p : {&s.a_token, &s.a_head, &s.k_head, &s.v_head, &s.weight}) p->validate();
        s.activations = q.a_bits < 16;
        s.keys = q.k_bits < 16;
        s.values = q.v_bits < 16;
        s.weights = q.w_bits < 16;
        s.r3 = q.online_r3;
        s.r4 = q.online_r4;
        return s;
    }
};

namespace detail {

/// A [T, heads * head_size] row-major activation seen as [T * heads, head_size] (one row per
/// head of each token), for a head_size plan's apply_rows / apply_inverse_rows.
template <class T>
[[nodiscard]] spinquant::matrix_view<T> heads_as_rows(spinquant::matrix_view<T> x, std::size_t head_size) noexcept
{
    SPINQUANT_ASSERT(x.is_contiguous() && x.cols % head_size == 0);
    return {x.data, x.rows * (x.cols / head_size), head_size, head_size, 1};
}

/// make_quant_hooks in T, for instances other than float (whose hooks are make_quant_hooks'
/// own): the same sites, specs and order (R3 then the K quantizer, R4 then the quantizer).
template <class T>
[[nodiscard]] basic_activation_hooks<T> quant_hooks_in(const quant_sites& s, std::size_t hs,
                                                       const spinquant::hadamard_plan<T>* r3,
                                                       const spinquant::hadamard_plan<T>* r4)
{
    using view = spinquant::matrix_view<T>;
    const auto quantize = [](const spinquant::quant_spec& spec) {
        return [spec](std::size_t, view x) { spinquant::fake_quantize(x, spec); };
    };
    basic_activation_hooks<T> h;
    if (s.activations) {
        h.attn_input = quantize(s.a_token);
        h.o_input = quantize(s.a_head);
        h.ffn_input = quantize(s.a_token);
    }
    if (s.r3) h.query = [r3, hs](std::size_t, view x) { r3->apply_rows(heads_as_rows(x, hs)); };
    if (s.r3 || s.keys)
        h.key = [r3 = s.r3 ? r3 : nullptr, hs, qk = s.keys, spec = s.k_head](std::size_t, view x) {
            if (r3) r3->apply_rows(heads_as_rows(x, hs));
            if (qk) spinquant::fake_quantize(x, spec);
        };
    if (s.values) h.value = quantize(s.v_head);
    if (s.r4 || s.activations)
        h.down_input = [r4 = s.r4 ? r4 : nullptr, qa = s.activations, spec = s.a_token](std::size_t, view x) {
            if (r4) r4->apply_rows(x);
            if (qa) spinquant::fake_quantize(x, spec);
        };
    return h;
}

/// A mutable Eigen map of a weight matrix (llama::matrix or basic_matrix).
template <class M>
[[nodiscard]] auto map_mut(M& m) noexcept
{
    using T = std::remove_cvref_t<decltype(m.data[0])>;
    return Eigen::Map<basic_rows<T>>(m.data.data(), static_cast<Eigen::Index>(m.rows), static_cast<Eigen::Index>(m.cols));
}

/// out (+)= ∂/∂x of y = α ⊙ x·s(x), s = (mean(x²) + eps)^(-1/2), given dy, row by row:
/// dx = s·(α ⊙ dy) − x·s³/n·Σ_j α_j dy_j x_j. `s` is the forward pass's inv_rms.
template <class T>
void rms_norm_backward(const basic_rows<T>& x, const basic_vector<T>& s, std::span<const T> alpha, const basic_rows<T>& dy,
                       basic_rows<T>& out, bool accumulate) noexcept
{
    const auto n = static_cast<std::size_t>(x.cols());
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
        const T* xi = x.row(t).data();
        const T* g = dy.row(t).data();
        T* o = out.row(t).data();
        T dot = T(0);
        for (std::size_t j = 0; j < n; ++j) dot += alpha[j] * g[j] * xi[j];
        const T st = s[t];
        const T c = st * st * st * dot / static_cast<T>(n);
        for (std::size_t j = 0; j < n; ++j) {
            const T v = st * (alpha[j] * g[j]) - xi[j] * c;
            o[j] = accumulate ? o[j] + v : v;
        }
    }
}

/// The transpose of apply_rope at positions 0..T-1: each pair (a, b) was rotated by +θ, so its
/// gradient is rotated by −θ.
template <class T>
void rope_backward(basic_rows<T>& g, std::size_t head_size, const basic_rope_table<T>& rope) noexcept
{
    const auto width = static_cast<std::size_t>(g.cols());
    for (Eigen::Index t = 0; t < g.rows(); ++t) {
        T* r = g.row(t).data();
        const T* c = &rope.cos[static_cast<std::size_t>(t) * rope.pairs];
        const T* s = &rope.sin[static_cast<std::size_t>(t) * rope.pairs];
        for (std::size_t h = 0; h < width; h += head_size)
            for (std::size_t j = 0; j < rope.pairs; ++j) {
                const T da = r[h + 2 * j], db = r[h + 2 * j + 1];
                r[h + 2 * j] = da * c[j] + db * s[j];
                r[h + 2 * j + 1] = db * c[j] - da * s[j];
            }
    }
}

/// errc::bad_shape unless rows x cols is want_rows x want_cols. `name()` gives the argument's
/// name and is only called to report a failure, so a passing check builds no string.
template <class Name>
void require_matrix(std::size_t rows, std::size_t cols, std::size_t want_rows, std::size_t want_cols,
                    std::string_view where, const Name& name)
{
    if (rows != want_rows || cols != want_cols)
        spinquant::detail::fail(spinquant::errc::bad_shape, where,
                                std::string(name()) + " is " + spinquant::detail::shape_string(rows, cols) + ", expected " +
                                    spinquant::detail::shape_string(want_rows, want_cols));
}

/// errc::non_finite when an element of v is NaN or infinite; `name()` as in require_matrix.
template <class T, class Name>
void require_finite_matrix(spinquant::matrix_view<const T> v, std::string_view where, const Name& name)
{
    for (std::size_t i = 0; i < v.rows; ++i)
        for (std::size_t j = 0; j < v.cols; ++j)
            if (!std::isfinite(v(i, j)))
                spinquant::detail::fail(spinquant::errc::non_finite, where,
                                        std::string(name()) + " has a non-finite value at (" + std::to_string(i) + ", " +
                                            std::to_string(j) + ")");
}

inline void require_length(std::size_t n, std::size_t want, std::string_view where, const std::string& what)
{
    if (n != want)
        spinquant::detail::fail(spinquant::errc::bad_shape, where,
                                what + " has " + std::to_string(n) + " elements, expected " + std::to_string(want));
}

/// Every weight of `m` has the shape its config implies (errc::bad_shape otherwise).
inline void check_model_shapes(const model& m, std::string_view where)
{
    const model_config& c = m.config;
    if (c.n_layers == 0 || c.dim == 0 || c.n_heads == 0 || c.n_kv_heads == 0 || c.dim % c.n_heads != 0 ||
        c.n_heads % c.n_kv_heads != 0 || c.head_size() % 2 != 0 || c.vocab_size == 0 || c.hidden_dim == 0 || c.seq_len == 0)
        spinquant::detail::fail(spinquant::errc::bad_shape, where, "the model's configuration is inconsistent");
    if (m.layers.size() != c.n_layers)
        spinquant::detail::fail(spinquant::errc::bad_shape, where,
                                "the model has " + std::to_string(m.layers.size()) + " layers, its config says " +
                                    std::to_string(c.n_layers));
    const std::size_t d = c.dim, kv = c.kv_dim(), hid = c.hidden_dim;
    const auto named = [](const char* n) { return [n] { return std::string(n); }; };
    require_matrix(m.token_embedding.rows, m.token_embedding.cols, c.vocab_size, d, where, named("token_embedding"));
    require_matrix(m.classifier.rows, m.classifier.cols, c.vocab_size, d, where, named("classifier"));
    require_length(m.final_norm.size(), d, where, "final_norm");
    for (std::size_t l = 0; l < c.n_layers; ++l) {
        const layer_weights& w = m.layers[l];
        const std::string p = "layer " + std::to_string(l) + " ";
        const auto in_layer = [&p](const char* n) { return [&p, n] { return p + n; }; };
        require_length(w.attn_norm.size(), d, where, p + "attn_norm");
        require_length(w.ffn_norm.size(), d, where, p + "ffn_norm");
        require_matrix(w.wq.rows, w.wq.cols, d, d, where, in_layer("wq"));
        require_matrix(w.wk.rows, w.wk.cols, kv, d, where, in_layer("wk"));
        require_matrix(w.wv.rows, w.wv.cols, kv, d, where, in_layer("wv"));
        require_matrix(w.wo.rows, w.wo.cols, d, d, where, in_layer("wo"));
        require_matrix(w.w1.rows, w.w1.cols, hid, d, where, in_layer("w1"));
        require_matrix(w.w2.rows, w.w2.cols, d, hid, where, in_layer("w2"));
        require_matrix(w.w3.rows, w.w3.cols, hid, d, where, in_layer("w3"));
    }
}

/// The hadamard_options of online_rotations (the reference's matrices), for plans in T.
[[nodiscard]] inline spinquant::hadamard_options online_options() noexcept
{
    spinquant::hadamard_options o;
    o.source = spinquant::hadamard_source::reference;
    return o;
}

}  // namespace detail

/// Forward and backward passes of the rotated, quantized network in T (float, or double for
/// finite-difference checks), for one rotation point at a time:
///
///     rotation_backward<float> net(fused, q, &rot);
///     net.begin(r1, r2s);                       // rotate and quantize the weights
///     for (seq : batch) nll += net.accumulate(seq, 1.0 / predictions);
///     net.finish(g1, g2s);                      // ∂(mean CE)/∂R1, ∂/∂R2 of each layer
///
/// accumulate() runs one sequence forward (keeping its trace) and backward, adding the
/// gradients of the rotated weights; finish() applies the weight quantizers' straight-through
/// masks and the chain rule to R1/R2. Buffers are reused: after the first sequence of a given
/// length, begin/accumulate/finish allocate nothing (beyond what Eigen's GEMM may take for
/// blocks over its stack limit). Not thread-safe; one per thread.
template <spinquant::real_scalar T>
class rotation_backward {
public:
    /// The network of `m` (frozen; copied, converted to T) under `q`. `rot` supplies the online
    /// R3/R4 and is required when q.online_r3 or q.online_r4 (the float instance applies its
    /// plans, the double instance builds double plans of the same matrices); it must outlive
    /// this object. When q.online_r4, m.w2 must already hold R4's offline half (merge_r4).
    /// Errors: errc::bad_shape for a model whose weights do not match its config or rotations
    /// of the wrong sizes, errc::bits_out_of_range / errc::bad_argument as make_quant_hooks and
    /// quantize_weights_rtn. Allocates about three copies of the linear weights.
    rotation_backward(const model& m, const quant_config& q, const online_rotations* rot)
        : cfg_(checked_config(m)), sites_(quant_sites::of(m.config, q)), src_(model_cast<T>(m)), net_(src_), trace_(),
          cache_(m.config), ws_(m.config)
    {
        constexpr std::string_view where = "llama::rotation_backward";
        const activation_hooks float_hooks = make_quant_hooks(m.config, q, rot);  // validates as the evaluator does
        if (rot != nullptr && (q.online_r3 || q.online_r4)) {
            if (rot->r3.size() != cfg_.head_size() || rot->r4.size() != cfg_.hidden_dim)
                spinquant::detail::fail(spinquant::errc::bad_shape, where,
                                        "the online rotations are of sizes " + std::to_string(rot->r3.size()) + " and " +
                                            std::to_string(rot->r4.size()) + ", expected head_size " +
                                            std::to_string(cfg_.head_size()) + " and hidden_dim " +
                                            std::to_string(cfg_.hidden_dim));
        }
        if constexpr (std::is_same_v<T, float>) {
            hooks_ = float_hooks;
            if (rot != nullptr) {
                r3_ = &rot->r3;
                r4_ = &rot->r4;
            }
        } else {
            // On the heap, so that the hooks' pointers survive a move of this object.
            if (sites_.r3) {
                own_r3_ = std::make_unique<spinquant::hadamard_plan<T>>(cfg_.head_size(), detail::online_options());
                r3_ = own_r3_.get();
            }
            if (sites_.r4) {
                own_r4_ = std::make_unique<spinquant::hadamard_plan<T>>(cfg_.hidden_dim, detail::online_options());
                r4_ = own_r4_.get();
            }
            hooks_ = detail::quant_hooks_in<T>(sites_, cfg_.head_size(), r3_, r4_);
        }
        const auto d = static_cast<Eigen::Index>(cfg_.dim), hs = static_cast<Eigen::Index>(cfg_.head_size());
        const auto kv = static_cast<Eigen::Index>(cfg_.kv_dim()), hid = static_cast<Eigen::Index>(cfg_.hidden_dim);
        const auto V = static_cast<Eigen::Index>(cfg_.vocab_size);
        r1_.resize(d, d);
        g1_.resize(d, d);
        db_.resize(d, d);
        ga_.resize(kv, d);
        d_embedding_.resize(V, d);
        d_classifier_.resize(V, d);
        layers_.resize(cfg_.n_layers);
        for (layer_state& s : layers_) {
            s.r2.resize(hs, hs);
            s.g2.resize(hs, hs);
            s.v_in.resize(kv, d);
            s.o_in.resize(d, d);
            s.dq.resize(d, d);
            s.dk.resize(kv, d);
            s.dv.resize(kv, d);
            s.dwo.resize(d, d);
            s.dw1.resize(hid, d);
            s.dw2.resize(d, hid);
            s.dw3.resize(hid, d);
            if (sites_.weights) {
                s.pq.resize(d, d);
                s.pk.resize(kv, d);
                s.pv.resize(kv, d);
                s.po.resize(d, d);
                s.p1.resize(hid, d);
                s.p2.resize(d, hid);
                s.p3.resize(hid, d);
            }
        }
    }

    /// Not copyable (the hooks point at this object's plans); movable.
    rotation_backward(const rotation_backward&) = delete;
    rotation_backward& operator=(const rotation_backward&) = delete;
    /// Moves keep every plan where it is (held on the heap).
    rotation_backward(rotation_backward&&) noexcept = default;
    rotation_backward& operator=(rotation_backward&&) noexcept = default;

    /// The model's shape.
    [[nodiscard]] const model_config& config() const noexcept { return cfg_; }
    /// The quantizers at each site.
    [[nodiscard]] const quant_sites& sites() const noexcept { return sites_; }
    /// The hooks the forward pass runs (make_quant_hooks' for float).
    [[nodiscard]] const basic_activation_hooks<T>& hooks() const noexcept { return hooks_; }
    /// The weights the forward pass runs on: rotated by the rotations of the last begin() and
    /// quantized (llama::model for float, so llama::forward can evaluate exactly this network).
    [[nodiscard]] const model_of<T>& network() const noexcept { return net_; }

    /// Starts a batch at rotations r1 (dim x dim) and r2[l] (head_size x head_size, one per
    /// layer), any strides, not necessarily orthogonal: rotates and quantizes the weights and
    /// clears the gradient. Errors (nothing changed): errc::bad_shape for a wrong count or shape,
    /// errc::non_finite for NaN/Inf. Cost: the products of the header comment (O(vocab·dim² +
    /// layers·dim·(dim + hidden)·dim)) plus the weight quantizer (80 trial quantizations per row
    /// with the clip search).
    void begin(spinquant::matrix_view<const T> r1, std::span<const spinquant::matrix_view<const T>> r2)
    {
        check_rotations(r1, r2, "llama::rotation_backward::begin");
        r1_ = spinquant::as_eigen(r1);
        for (std::size_t l = 0; l < cfg_.n_layers; ++l) layers_[l].r2 = spinquant::as_eigen(r2[l]);
        build_network();
        clear_gradients();
        started_ = true;
    }

    /// Runs sequence s (s[0..n-1] predicts s[1..n], from position 0) forward and backward at the
    /// rotations of begin(), adding `scale` times the gradient of its summed cross-entropy (pass
    /// 1 / predictions of the batch for the mean). Returns the summed cross-entropy of its n
    /// predictions (natural log, computed in double). Errors (nothing accumulated):
    /// errc::bad_argument before begin(), for fewer than 2 tokens or a token out of range,
    /// errc::bad_shape for n > seq_len. Cost: about three times the forward pass.
    double accumulate(std::span<const int> s, double scale)
    {
        constexpr std::string_view where = "llama::rotation_backward::accumulate";
        check_sequence(s, where);
        const std::span<const int> in = s.first(s.size() - 1);
        cache_.clear();
        forward(net_, in, 0, cache_, hooks_, ws_, logits_, &trace_);
        const double nll = cross_entropy(s, scale, true);
        backward(in);
        return nll;
    }

    /// The summed cross-entropy of sequence s at the rotations of begin(), forward only (no
    /// trace, nothing accumulated). Errors as accumulate().
    [[nodiscard]] double loss(std::span<const int> s)
    {
        constexpr std::string_view where = "llama::rotation_backward::loss";
        check_sequence(s, where);
        cache_.clear();
        forward(net_, s.first(s.size() - 1), 0, cache_, hooks_, ws_, logits_);
        return cross_entropy(s, 0.0, false);
    }

    /// Writes the gradient accumulated since begin() into g1 (dim x dim) and g2[l] (head_size x
    /// head_size): the weight quantizers' straight-through masks, then the chain rule through
    /// every product in which R1 or R2 appears. Ends the batch (begin() again before the next).
    /// Errors (nothing written, batch kept): errc::bad_argument before begin(), errc::bad_shape
    /// for a wrong count or shape. Cost O(layers·dim·(dim + hidden)·dim + vocab·dim²).
    void finish(spinquant::matrix_view<T> g1, std::span<const spinquant::matrix_view<T>> g2)
    {
        constexpr std::string_view where = "llama::rotation_backward::finish";
        if (!started_) spinquant::detail::fail(spinquant::errc::bad_argument, where, "no batch was begun");
        check_gradients(g1, g2, where);
        chain();
        spinquant::as_eigen(g1) = g1_;
        for (std::size_t l = 0; l < cfg_.n_layers; ++l) spinquant::as_eigen(g2[l]) = layers_[l].g2;
        started_ = false;
    }

    /// Bytes of the per-sequence buffers currently held (trace, workspace, cache, logits and the
    /// backward pass's temporaries): sequence_bytes(n) after sequences of n tokens.
    [[nodiscard]] std::size_t activation_bytes() const noexcept
    {
        std::size_t n = 0;
        for (const auto& t : trace_.layers) {
            n += sizes(t.input, t.attn_rms, t.attn_in_raw, t.attn_in, t.q_raw, t.q, t.k_raw, t.k, t.v_raw, t.v, t.o_raw, t.o,
                       t.mid, t.ffn_rms, t.ffn_in_raw, t.ffn_in, t.gate, t.up, t.down_in_raw, t.down_in);
            for (const auto& p : t.probs) n += static_cast<std::size_t>(p.size());
        }
        n += sizes(trace_.final_input, trace_.final_rms, trace_.final_normed, logits_);
        n += sizes(ws_.x, ws_.xn, ws_.q, ws_.k, ws_.v, ws_.o, ws_.scores, ws_.gate, ws_.up, ws_.rms);
        n += ws_.rope.cos.size() + ws_.rope.sin.size();
        for (std::size_t l = 0; l < cache_.keys.size(); ++l) n += sizes(cache_.keys[l], cache_.values[l]);
        n += sizes(dx_, dn_, dq_, dk_, dv_, do_, dh_, dg_, du_, dp_, zk_, zh_);
        return n * sizeof(T);
    }

    /// What activation_bytes() is once sequences of `tokens` tokens (predictions) have run:
    /// per block 10·n·dim + 4·n·kv_dim + 4·n·hidden + 2·n + heads·n² elements of trace, plus the
    /// classifier's input and logits, the workspace, the cache and RoPE tables (seq_len
    /// positions) and the backward temporaries, times sizeof(T).
    [[nodiscard]] std::size_t sequence_bytes(std::size_t tokens) const noexcept
    {
        const std::size_t n = tokens, d = cfg_.dim, kv = cfg_.kv_dim(), hid = cfg_.hidden_dim;
        const std::size_t per_layer = 10 * n * d + 4 * n * kv + 4 * n * hid + 2 * n + cfg_.n_heads * n * n;
        std::size_t e = cfg_.n_layers * per_layer;
        e += 2 * n * d + n + n * cfg_.vocab_size;                      // final input, rms, normed; logits
        e += 4 * n * d + 2 * n * kv + n * n + 2 * n * hid + n;        // workspace x, xn, q, o; k, v; scores; gate, up; rms
        e += 2 * cfg_.seq_len * (cfg_.head_size() / 2);               // RoPE tables
        e += 2 * cfg_.n_layers * cfg_.seq_len * kv;                   // cache
        e += 4 * n * d + 2 * n * kv + 3 * n * hid + n * n;            // dx, dn, dq, do; dk, dv; dh, dg, du; dp
        e += (sites_.keys ? n * kv : 0) + (sites_.activations ? n * hid : 0);  // pre-quantizer values (zk, zh)
        return e * sizeof(T);
    }

    /// Bytes of everything held: the frozen and the rotated weights, the gradient accumulators
    /// and activation_bytes().
    [[nodiscard]] std::size_t held_bytes() const noexcept
    {
        std::size_t n = model_elements(src_) + model_elements(net_);
        n += sizes(r1_, g1_, db_, ga_, d_embedding_, d_classifier_);
        for (const layer_state& s : layers_)
            n += sizes(s.r2, s.g2, s.v_in, s.o_in, s.dq, s.dk, s.dv, s.dwo, s.dw1, s.dw2, s.dw3, s.pq, s.pk, s.pv, s.po,
                       s.p1, s.p2, s.p3);
        return n * sizeof(T) + activation_bytes();
    }

private:
    using mat = basic_rows<T>;
    using cmap = Eigen::Map<const mat>;

    struct layer_state {
        mat r2, g2;                       // R2 and its gradient
        mat v_in, o_in;                   // Wv·R1 and Wo·diag(R2): the factors the chain rule needs
        mat dq, dk, dv, dwo, dw1, dw2, dw3;  // gradients of the rotated (quantized) weights
        mat pq, pk, pv, po, p1, p2, p3;   // rotated weights before the quantizer (only when quantized)
        // The quantizer's parameters of each, found once per call (with the clip search) and
        // reused by the straight-through masks.
        std::vector<spinquant::quant_params<T>> qq, qk, qv, qo, q1, q2, q3;
    };

    static const model_config& checked_config(const model& m)
    {
        detail::check_model_shapes(m, "llama::rotation_backward");
        return m.config;
    }

    template <class... M>
    static std::size_t sizes(const M&... m) noexcept
    {
        return (static_cast<std::size_t>(m.size()) + ...);
    }

    static std::size_t model_elements(const model_of<T>& m) noexcept
    {
        std::size_t n = m.token_embedding.data.size() + m.classifier.data.size() + m.final_norm.size();
        for (const auto& w : m.layers)
            n += w.attn_norm.size() + w.ffn_norm.size() + w.wq.data.size() + w.wk.data.size() + w.wv.data.size() +
                 w.wo.data.size() + w.w1.data.size() + w.w2.data.size() + w.w3.data.size();
        return n;
    }

    void check_rotations(spinquant::matrix_view<const T> r1, std::span<const spinquant::matrix_view<const T>> r2,
                         std::string_view where) const
    {
        if (r2.size() != cfg_.n_layers)
            spinquant::detail::fail(spinquant::errc::bad_shape, where,
                                    std::to_string(r2.size()) + " R2 rotations, expected one per layer (" +
                                        std::to_string(cfg_.n_layers) + ")");
        const auto r1_name = [] { return std::string("R1"); };
        const auto r2_name = [](std::size_t l) { return [l] { return "R2 of layer " + std::to_string(l); }; };
        detail::require_matrix(r1.rows, r1.cols, cfg_.dim, cfg_.dim, where, r1_name);
        for (std::size_t l = 0; l < r2.size(); ++l)
            detail::require_matrix(r2[l].rows, r2[l].cols, cfg_.head_size(), cfg_.head_size(), where, r2_name(l));
        detail::require_finite_matrix(r1, where, r1_name);
        for (std::size_t l = 0; l < r2.size(); ++l) detail::require_finite_matrix(r2[l], where, r2_name(l));
    }

    void check_gradients(spinquant::matrix_view<T> g1, std::span<const spinquant::matrix_view<T>> g2,
                         std::string_view where) const
    {
        if (g2.size() != cfg_.n_layers)
            spinquant::detail::fail(spinquant::errc::bad_shape, where,
                                    std::to_string(g2.size()) + " R2 gradients, expected one per layer (" +
                                        std::to_string(cfg_.n_layers) + ")");
        detail::require_matrix(g1.rows, g1.cols, cfg_.dim, cfg_.dim, where, [] { return std::string("the R1 gradient"); });
        for (std::size_t l = 0; l < g2.size(); ++l)
            detail::require_matrix(g2[l].rows, g2[l].cols, cfg_.head_size(), cfg_.head_size(), where,
                                   [l] { return "the R2 gradient of layer " + std::to_string(l); });
    }

    void check_sequence(std::span<const int> s, std::string_view where) const
    {
        if (!started_) spinquant::detail::fail(spinquant::errc::bad_argument, where, "no batch was begun (call begin first)");
        if (s.size() < 2)
            spinquant::detail::fail(spinquant::errc::bad_argument, where,
                                    "a sequence has " + std::to_string(s.size()) + " tokens, expected at least 2");
        for (std::size_t i = 0; i < s.size(); ++i)
            if (s[i] < 0 || static_cast<std::size_t>(s[i]) >= cfg_.vocab_size)
                spinquant::detail::fail(spinquant::errc::bad_argument, where,
                                        "token " + std::to_string(i) + " is " + std::to_string(s[i]) + ", expected 0.." +
                                            std::to_string(cfg_.vocab_size - 1));
        if (s.size() - 1 > cfg_.seq_len)
            spinquant::detail::fail(spinquant::errc::bad_shape, where,
                                    "a sequence of " + std::to_string(s.size()) + " tokens exceeds the context of " +
                                        std::to_string(cfg_.seq_len) + " (+1 target)");
    }

    // Rotated weight `out` = `product`, quantized when the weights are; `pre` keeps the value the
    // quantizer saw and `params` its parameters, which its straight-through mask is computed from.
    template <class Product, class W>
    void store_weight(const Product& product, W& out, mat& pre, std::vector<spinquant::quant_params<T>>& params)
    {
        if (sites_.weights) {
            pre.noalias() = product;
            quantize_weight(pre, out, params);
        } else {
            detail::map_mut(out).noalias() = product;
        }
    }

    template <class W>
    void quantize_weight(const mat& pre, W& out, std::vector<spinquant::quant_params<T>>& params)
    {
        params.resize(spinquant::param_count(sites_.weight, out.rows, out.cols));
        spinquant::find_params(pre, sites_.weight, std::span<spinquant::quant_params<T>>(params));
        detail::map_mut(out) = pre;
        spinquant::fake_quantize(out.view(), std::span<const spinquant::quant_params<T>>(params), sites_.weight);
    }

    void build_network()
    {
        const std::size_t hs = cfg_.head_size();
        const auto ehs = static_cast<Eigen::Index>(hs);
        detail::map_mut(net_.token_embedding).noalias() = detail::map(src_.token_embedding) * r1_;
        detail::map_mut(net_.classifier).noalias() = detail::map(src_.classifier) * r1_;
        for (std::size_t l = 0; l < cfg_.n_layers; ++l) {
            const auto& w = src_.layers[l];
            auto& o = net_.layers[l];
            layer_state& s = layers_[l];
            store_weight(detail::map(w.wq) * r1_, o.wq, s.pq, s.qq);
            store_weight(detail::map(w.wk) * r1_, o.wk, s.pk, s.qk);
            store_weight(detail::map(w.w1) * r1_, o.w1, s.p1, s.q1);
            store_weight(detail::map(w.w3) * r1_, o.w3, s.p3, s.q3);
            store_weight(r1_.transpose() * detail::map(w.w2), o.w2, s.p2, s.q2);
            // v_proj: diag(R2)ᵀ·(Wv·R1), one R2 per kv head's block of output rows.
            s.v_in.noalias() = detail::map(w.wv) * r1_;
            mat& pv = sites_.weights ? s.pv : ga_;
            for (std::size_t h = 0; h < cfg_.n_kv_heads; ++h) {
                const auto r = static_cast<Eigen::Index>(h * hs);
                pv.middleRows(r, ehs).noalias() = s.r2.transpose() * s.v_in.middleRows(r, ehs);
            }
            if (sites_.weights)
                quantize_weight(pv, o.wv, s.qv);
            else
                detail::map_mut(o.wv) = pv;
            // o_proj: R1ᵀ·(Wo·diag(R2)), one R2 per query head's block of input columns.
            const cmap wo = detail::map(w.wo);
            for (std::size_t h = 0; h < cfg_.n_heads; ++h) {
                const auto c = static_cast<Eigen::Index>(h * hs);
                s.o_in.middleCols(c, ehs).noalias() = wo.middleCols(c, ehs) * s.r2;
            }
            store_weight(r1_.transpose() * s.o_in, o.wo, s.po, s.qo);
        }
    }

    void clear_gradients()
    {
        d_embedding_.setZero();
        d_classifier_.setZero();
        for (layer_state& s : layers_) {
            s.dq.setZero();
            s.dk.setZero();
            s.dv.setZero();
            s.dwo.setZero();
            s.dw1.setZero();
            s.dw2.setZero();
            s.dw3.setZero();
        }
    }

    // Sums the cross-entropy of the targets s[1..n] over logits_ in double (the formula of
    // eval.hpp's log_softmax, so the value equals what evaluation computes from the same logits)
    // and, when `gradient`, overwrites logits_ with scale·(softmax − one-hot).
    double cross_entropy(std::span<const int> s, double scale, bool gradient)
    {
        double nll = 0.0;
        const auto V = logits_.cols();
        for (Eigen::Index t = 0; t < logits_.rows(); ++t) {
            T* row = logits_.row(t).data();
            double mx = -std::numeric_limits<double>::infinity();
            for (Eigen::Index v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(row[v]));
            double sum = 0.0;
            for (Eigen::Index v = 0; v < V; ++v) sum += std::exp(static_cast<double>(row[v]) - mx);
            const double lse = mx + std::log(sum);
            const auto target = static_cast<Eigen::Index>(s[static_cast<std::size_t>(t) + 1]);
            nll -= static_cast<double>(row[target]) - lse;
            if (!gradient) continue;
            for (Eigen::Index v = 0; v < V; ++v)
                row[v] = static_cast<T>(scale * (std::exp(static_cast<double>(row[v]) - lse) - (v == target ? 1.0 : 0.0)));
        }
        return nll;
    }

    // Backward through the classifier, the final norm, every block and the embedding, with
    // logits_ holding ∂loss/∂logits.
    void backward(std::span<const int> tokens)
    {
        d_classifier_.noalias() += logits_.transpose() * trace_.final_normed;
        dn_.noalias() = logits_ * detail::map(net_.classifier);
        dx_.resize(dn_.rows(), dn_.cols());
        detail::rms_norm_backward<T>(trace_.final_input, trace_.final_rms, src_.final_norm, dn_, dx_, false);
        for (std::size_t l = cfg_.n_layers; l-- > 0;) layer_backward(l);
        for (std::size_t t = 0; t < tokens.size(); ++t)
            d_embedding_.row(tokens[t]) += dx_.row(static_cast<Eigen::Index>(t));
    }

    // dx_ holds ∂loss/∂(block output) on entry and ∂loss/∂(block input) on exit.
    void layer_backward(std::size_t l)
    {
        const basic_layer_trace<T>& tr = trace_.layers[l];
        const auto& w = net_.layers[l];
        const auto& frozen = src_.layers[l];
        layer_state& g = layers_[l];
        const std::size_t hs = cfg_.head_size();
        const auto ehs = static_cast<Eigen::Index>(hs);
        const auto n = dx_.rows();

        // Feed-forward: out = mid + h·W2ᵀ, h = down_input hook(silu(gate) ⊙ up).
        g.dw2.noalias() += dx_.transpose() * tr.down_in;
        dh_.noalias() = dx_ * detail::map(w.w2);
        if (sites_.activations) {
            zh_ = tr.down_in_raw;  // the quantizer's input: after R4 when it is on
            if (sites_.r4) r4_->apply_rows(spinquant::as_matrix_view(zh_));
            spinquant::fake_quantize_backward(zh_, dh_, sites_.a_token);
        }
        if (sites_.r4) r4_->apply_inverse_rows(spinquant::as_matrix_view(dh_));
        // silu(g) = g·σ(g), silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
        dg_.resize(n, dh_.cols());
        du_.resize(n, dh_.cols());
        {
            const auto ga = tr.gate.array();
            const auto sig = T(1) / ((-ga).exp() + T(1));
            du_.array() = dh_.array() * ga * sig;
            dg_.array() = dh_.array() * tr.up.array() * sig * (T(1) + ga * (T(1) - sig));
        }
        g.dw1.noalias() += dg_.transpose() * tr.ffn_in;
        g.dw3.noalias() += du_.transpose() * tr.ffn_in;
        dn_.noalias() = dg_ * detail::map(w.w1);
        dn_.noalias() += du_ * detail::map(w.w3);
        if (sites_.activations) spinquant::fake_quantize_backward(tr.ffn_in_raw, dn_, sites_.a_token);
        detail::rms_norm_backward<T>(tr.mid, tr.ffn_rms, frozen.ffn_norm, dn_, dx_, true);

        // Attention: mid = input + o·Woᵀ.
        g.dwo.noalias() += dx_.transpose() * tr.o;
        do_.noalias() = dx_ * detail::map(w.wo);
        if (sites_.activations) spinquant::fake_quantize_backward(tr.o_raw, do_, sites_.a_head);
        dq_.resize(n, do_.cols());
        dk_.setZero(n, tr.k.cols());
        dv_.setZero(n, tr.v.cols());
        const T scale = T(1) / std::sqrt(static_cast<T>(hs));
        for (std::size_t h = 0; h < cfg_.n_heads; ++h) {
            const auto qh = static_cast<Eigen::Index>(h * hs);
            const auto kh = static_cast<Eigen::Index>((h / cfg_.kv_group()) * hs);
            const mat& p = tr.probs[h];
            dp_.noalias() = do_.middleCols(qh, ehs) * tr.v.middleCols(kh, ehs).transpose();
            dv_.middleCols(kh, ehs).noalias() += p.transpose() * do_.middleCols(qh, ehs);
            // Softmax rows: dS = P ⊙ (dP − ⟨P, dP⟩); masked entries have P = 0 and get 0.
            for (Eigen::Index t = 0; t < n; ++t) {
                auto dr = dp_.row(t).array();
                const auto pr = p.row(t).array();
                const T dot = (pr * dr).sum();
                dr = pr * (dr - dot) * scale;
            }
            dq_.middleCols(qh, ehs).noalias() = dp_ * tr.k.middleCols(kh, ehs);
            dk_.middleCols(kh, ehs).noalias() += dp_.transpose() * tr.q.middleCols(qh, ehs);
        }
        // The hooks of q, k and v in reverse: quantizer masks, then R3's inverse.
        if (sites_.values) spinquant::fake_quantize_backward(tr.v_raw, dv_, sites_.v_head);
        if (sites_.keys) {
            zk_ = tr.k_raw;
            if (sites_.r3) r3_->apply_rows(detail::heads_as_rows(spinquant::as_matrix_view(zk_), hs));
            spinquant::fake_quantize_backward(zk_, dk_, sites_.k_head);
        }
        if (sites_.r3) {
            r3_->apply_inverse_rows(detail::heads_as_rows(spinquant::as_matrix_view(dk_), hs));
            r3_->apply_inverse_rows(detail::heads_as_rows(spinquant::as_matrix_view(dq_), hs));
        }
        detail::rope_backward(dq_, hs, ws_.rope);
        detail::rope_backward(dk_, hs, ws_.rope);
        g.dq.noalias() += dq_.transpose() * tr.attn_in;
        g.dk.noalias() += dk_.transpose() * tr.attn_in;
        g.dv.noalias() += dv_.transpose() * tr.attn_in;
        dn_.noalias() = dq_ * detail::map(w.wq);
        dn_.noalias() += dk_ * detail::map(w.wk);
        dn_.noalias() += dv_ * detail::map(w.wv);
        if (sites_.activations) spinquant::fake_quantize_backward(tr.attn_in_raw, dn_, sites_.a_token);
        detail::rms_norm_backward<T>(tr.input, tr.attn_rms, frozen.attn_norm, dn_, dx_, true);
    }

    // The weight quantizers' masks, then ∂/∂R1 and ∂/∂R2 from the gradients of the rotated weights.
    void chain()
    {
        const std::size_t hs = cfg_.head_size();
        const auto ehs = static_cast<Eigen::Index>(hs);
        g1_.noalias() = detail::map(src_.token_embedding).transpose() * d_embedding_;
        g1_.noalias() += detail::map(src_.classifier).transpose() * d_classifier_;
        for (std::size_t l = 0; l < cfg_.n_layers; ++l) {
            const auto& w = src_.layers[l];
            layer_state& s = layers_[l];
            if (sites_.weights) {
                const auto mask = [&](const mat& pre, mat& grad, const std::vector<spinquant::quant_params<T>>& params) {
                    spinquant::fake_quantize_backward(pre, grad, std::span<const spinquant::quant_params<T>>(params), sites_.weight);
                };
                mask(s.pq, s.dq, s.qq);
                mask(s.pk, s.dk, s.qk);
                mask(s.pv, s.dv, s.qv);
                mask(s.po, s.dwo, s.qo);
                mask(s.p1, s.dw1, s.q1);
                mask(s.p2, s.dw2, s.q2);
                mask(s.p3, s.dw3, s.q3);
            }
            // Readers W·R1: ∂/∂R1 = Wᵀ·G.
            g1_.noalias() += detail::map(w.wq).transpose() * s.dq;
            g1_.noalias() += detail::map(w.wk).transpose() * s.dk;
            g1_.noalias() += detail::map(w.w1).transpose() * s.dw1;
            g1_.noalias() += detail::map(w.w3).transpose() * s.dw3;
            // down_proj R1ᵀ·W2: ∂/∂R1 = W2·Gᵀ.
            g1_.noalias() += detail::map(w.w2) * s.dw2.transpose();
            // v_proj diag(R2)ᵀ·A, A = Wv·R1: ∂/∂A_h = R2·G_h, ∂/∂R2 = Σ_h A_h·G_hᵀ, ∂/∂R1 = Wvᵀ·∂/∂A.
            s.g2.setZero();
            for (std::size_t h = 0; h < cfg_.n_kv_heads; ++h) {
                const auto r = static_cast<Eigen::Index>(h * hs);
                ga_.middleRows(r, ehs).noalias() = s.r2 * s.dv.middleRows(r, ehs);
                s.g2.noalias() += s.v_in.middleRows(r, ehs) * s.dv.middleRows(r, ehs).transpose();
            }
            g1_.noalias() += detail::map(w.wv).transpose() * ga_;
            // o_proj R1ᵀ·B, B = Wo·diag(R2): ∂/∂R1 = B·Gᵀ, ∂/∂B = R1·G, ∂/∂R2 = Σ_h Wo_hᵀ·(∂/∂B)_h.
            g1_.noalias() += s.o_in * s.dwo.transpose();
            db_.noalias() = r1_ * s.dwo;
            const cmap wo = detail::map(w.wo);
            for (std::size_t h = 0; h < cfg_.n_heads; ++h) {
                const auto c = static_cast<Eigen::Index>(h * hs);
                s.g2.noalias() += wo.middleCols(c, ehs).transpose() * db_.middleCols(c, ehs);
            }
        }
    }

    model_config cfg_;
    quant_sites sites_;
    model_of<T> src_;  // the frozen weights, in T
    model_of<T> net_;  // rotated and quantized: what the forward pass runs
    basic_activation_hooks<T> hooks_;
    std::unique_ptr<spinquant::hadamard_plan<T>> own_r3_, own_r4_;  // the plans of instances other than float
    const spinquant::hadamard_plan<T>* r3_ = nullptr;
    const spinquant::hadamard_plan<T>* r4_ = nullptr;
    mat r1_, g1_, db_, ga_, d_embedding_, d_classifier_;
    std::vector<layer_state> layers_;
    basic_forward_trace<T> trace_;
    basic_kv_cache<T> cache_;
    basic_workspace<T> ws_;
    mat logits_, dx_, dn_, dq_, dk_, dv_, do_, dh_, dg_, du_, dp_, zk_, zh_;
    bool started_ = false;
};

}  // namespace llama
