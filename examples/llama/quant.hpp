#pragma once
/// The quantized forward pass of the llama example, with the reference's placement
/// (REFERENCE.md §1a/§1c): activations fake-quantized per token at every linear input (o_proj's
/// input per head), the K cache after RoPE and the online R3, the V cache per head, weights by
/// RTN (or GPTQ, elsewhere), lm_head and the embedding in full precision, and the online
/// Hadamards R3 (queries and keys over head_dim) and R4 (down_proj input over hidden_dim)
/// through spinquant::hadamard_plan. Everything is built from the library's quantizer and
/// Hadamard plan; nothing here re-implements either.
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include <spinquant/eigen.hpp>
#include <spinquant/error.hpp>
#include <spinquant/gptq.hpp>
#include <spinquant/hadamard.hpp>
#include <spinquant/quantizer.hpp>

#include "eval.hpp"
#include "forward.hpp"
#include "model.hpp"

namespace llama {

/// What one evaluated configuration quantizes, and how. 16 bits means "not quantized", as in
/// the reference's scripts (its ActQuantizer treats 16 bits as off). Defaults follow SpinQuant's
/// scripts: asymmetric activations and KV cache, symmetric per-channel weights with the MSE clip
/// search (--w_clip), clip ratios 1.0, K and V quantized per head.
struct quant_config {
    int w_bits = 16;            ///< weights of q/k/v/o/gate/up/down_proj
    int a_bits = 16;            ///< activations at every linear input except lm_head
    int k_bits = 16;            ///< K cache (after RoPE and R3)
    int v_bits = 16;            ///< V cache
    bool w_symmetric = true;
    bool w_clip = true;         ///< MSE clip search for weights (the reference's --w_clip)
    bool a_symmetric = false;
    bool kv_symmetric = false;
    double a_clip = 1.0;        ///< activation clip ratio, (0, 1]
    double k_clip = 1.0;
    double v_clip = 1.0;
    bool online_r3 = false;     ///< Hadamard over head_dim on queries and keys after RoPE
    bool online_r4 = false;     ///< Hadamard over hidden_dim on down_proj's input (merge_r4 into w2 too)

    /// W<w>A<a>KV<k> (the K bits stand for the KV cache; the example always sets k = v).
    [[nodiscard]] std::string label() const { return bits_label(static_cast<unsigned>(w_bits), static_cast<unsigned>(a_bits), static_cast<unsigned>(k_bits)); }
    /// The reference's settings at W<w>A<a>KV<kv>.
    [[nodiscard]] static quant_config bits(int w, int a, int kv)
    {
        quant_config c;
        c.w_bits = w;
        c.a_bits = a;
        c.k_bits = kv;
        c.v_bits = kv;
        return c;
    }
};

/// The online Hadamard transforms of a model: R3 over head_dim and R4 over hidden_dim, built
/// with the reference's matrices (hadamard_source::reference: hidden 172 uses SpinQuant's had172).
struct online_rotations {
    spinquant::hadamard_plan<float> r3;
    spinquant::hadamard_plan<float> r4;

    explicit online_rotations(const model_config& c)
        : r3(c.head_size(), reference_options()), r4(c.hidden_dim, reference_options())
    {
    }

private:
    [[nodiscard]] static spinquant::hadamard_options reference_options()
    {
        spinquant::hadamard_options o;
        o.source = spinquant::hadamard_source::reference;
        return o;
    }
};

namespace detail {

/// A [T, n_heads * head_size] row-major activation seen as [T * n_heads, head_size]: one row per
/// head of each token, so a head_size plan's apply_rows transforms every head.
[[nodiscard]] inline spinquant::matrix_view<float> per_head_rows(spinquant::matrix_view<float> x, std::size_t head_size)
{
    SPINQUANT_ASSERT(x.is_contiguous() && x.cols % head_size == 0);
    return {x.data, x.rows * (x.cols / head_size), head_size, head_size, 1};
}

[[nodiscard]] inline activation_hook quantize_hook(const spinquant::quant_spec& spec)
{
    return [spec](std::size_t, spinquant::matrix_view<float> x) { spinquant::fake_quantize(x, spec); };
}

inline void check_bits(int bits, const char* what, const char* where)
{
    if (bits < 2 || bits > 16)
        spinquant::detail::fail(spinquant::errc::bits_out_of_range, where,
                                std::string(what) + " = " + std::to_string(bits) + ", expected 2..16 (16 = off)");
}

}  // namespace detail

/// The activation hooks of `q` for a model of shape `c`: the reference's ActQuantizer at each
/// linear input (per token; o_proj's input per head), R3 then the K quantizer (per head) on
/// keys, R3 on queries, the V quantizer (per head) on values, R4 then the quantizer on
/// down_proj's input. `rot` is required when q.online_r3 or q.online_r4 and must outlive the
/// hooks. Errors (errc::bits_out_of_range, errc::bad_argument from the quantizer's spec check,
/// errc::bad_argument when a rotation is asked for without `rot`) are reported here, not when
/// the hooks run.
[[nodiscard]] inline activation_hooks make_quant_hooks(const model_config& c, const quant_config& q,
                                                       const online_rotations* rot = nullptr)
{
    using spinquant::quant_spec;
    detail::check_bits(q.a_bits, "a_bits", "llama::make_quant_hooks");
    detail::check_bits(q.k_bits, "k_bits", "llama::make_quant_hooks");
    detail::check_bits(q.v_bits, "v_bits", "llama::make_quant_hooks");
    if ((q.online_r3 || q.online_r4) && rot == nullptr)
        spinquant::detail::fail(spinquant::errc::bad_argument, "llama::make_quant_hooks",
                                "online_r3/online_r4 are set but no online_rotations were given");
    const std::size_t hs = c.head_size();
    const quant_spec a_token = quant_spec::activation(q.a_bits, q.a_symmetric, 0, q.a_clip);
    const quant_spec a_head = quant_spec::activation(q.a_bits, q.a_symmetric, hs, q.a_clip);
    const quant_spec k_head = quant_spec::activation(q.k_bits, q.kv_symmetric, hs, q.k_clip);
    const quant_spec v_head = quant_spec::activation(q.v_bits, q.kv_symmetric, hs, q.v_clip);
    for (const auto* s : {&a_token, &a_head, &k_head, &v_head}) s->validate();

    activation_hooks h;
    const bool qa = q.a_bits < 16, qk = q.k_bits < 16, qv = q.v_bits < 16;
    if (qa) {
        h.attn_input = detail::quantize_hook(a_token);
        h.o_input = detail::quantize_hook(a_head);
        h.ffn_input = detail::quantize_hook(a_token);
    }
    if (q.online_r3) {
        const auto* r3 = &rot->r3;
        h.query = [r3, hs](std::size_t, spinquant::matrix_view<float> x) { r3->apply_rows(detail::per_head_rows(x, hs)); };
    }
    if (q.online_r3 || qk)
        h.key = [r3 = q.online_r3 ? &rot->r3 : nullptr, hs, qk, k_head](std::size_t, spinquant::matrix_view<float> x) {
            if (r3) r3->apply_rows(detail::per_head_rows(x, hs));
            if (qk) spinquant::fake_quantize(x, k_head);
        };
    if (qv) h.value = detail::quantize_hook(v_head);
    if (q.online_r4 || qa)
        h.down_input = [r4 = q.online_r4 ? &rot->r4 : nullptr, qa, a_token](std::size_t, spinquant::matrix_view<float> x) {
            if (r4) r4->apply_rows(x);
            if (qa) spinquant::fake_quantize(x, a_token);
        };
    return h;
}

/// Merges R4's offline half into every down_proj (w2 <- w2 M^T, M the online transform), so that
/// w2' (M x) = w2 x: the model stays the same function when make_quant_hooks applies M online.
/// Must run before the weights are quantized.
inline void merge_r4(model& m, const online_rotations& rot)
{
    spinquant::merge_online_r4(m, rot.r4);
}

/// RTN: fake-quantizes the weights of every linear layer except lm_head (and the embedding) with
/// the reference's WeightQuantizer (per output channel, q.w_symmetric, MSE clip search when
/// q.w_clip). No-op at 16 bits. Errors: errc::bits_out_of_range for w_bits outside 2..16.
inline void quantize_weights_rtn(model& m, const quant_config& q)
{
    detail::check_bits(q.w_bits, "w_bits", "llama::quantize_weights_rtn");
    if (q.w_bits >= 16) return;
    spinquant::quantize_weights(m, spinquant::quant_spec::weight(q.w_bits, q.w_symmetric, 0, q.w_clip));
}

/// GPTQ as SpinQuant's gptq_fwrd runs it (REFERENCE.md §1f): blocks one after another, each
/// fed the calibration activations that the already-quantized blocks before it produce; inside a
/// block the linears in four groups, {q, k, v}, {o}, {gate, up}, {down}, each group's Hessian
/// taken from a forward pass in which the earlier groups are already quantized. Activations stay
/// in full precision (the reference enables its activation quantizers only afterwards), but
/// down_proj sees its input after the online R4 when q.online_r4 (call merge_r4 first), as the
/// reference's hooks on the inner linear do. Each calibration sequence counts as one Hessian
/// sample, as the reference's add_batch counts batch entries.
/// Errors (m untouched, whichever layer fails): errc::bits_out_of_range for w_bits outside
/// 2..16; errc::bad_argument for an empty calibration set, a sequence shorter than 2 tokens or
/// online_r4 without `rot`; those of forward() for bad tokens or sequences longer than the
/// context; those of spinquant::gptq (errc::not_positive_definite when a Hessian is singular
/// even after damping). No-op at 16 bits. Complexity: 5 block passes per block over the calibration set
/// plus one GPTQ per linear.
inline void quantize_weights_gptq(model& m, const quant_config& q, const eval_set& calib,
                                  const online_rotations* rot = nullptr, const spinquant::gptq_options& options = {})
{
    constexpr const char* where = "llama::quantize_weights_gptq";
    detail::check_bits(q.w_bits, "w_bits", where);
    if (q.w_bits >= 16) return;
    if (calib.sequences.empty())
        spinquant::detail::fail(spinquant::errc::bad_argument, where, "the calibration set is empty");
    if (q.online_r4 && rot == nullptr)
        spinquant::detail::fail(spinquant::errc::bad_argument, where, "online_r4 is set but no online_rotations were given");
    const model_config& c = m.config;
    {
        kv_cache probe(c);
        for (const auto& s : calib.sequences) {
            if (s.size() < 2)
                spinquant::detail::fail(spinquant::errc::bad_argument, where, "a calibration sequence has fewer than 2 tokens");
            check_forward_input(m, std::span<const int>(s).first(s.size() - 1), 0, probe, where);
        }
    }
    const auto spec = spinquant::quant_spec::weight(q.w_bits, q.w_symmetric, 0, q.w_clip);
    model out = m;  // m changes only when every layer succeeded
    quant_config fp_acts;  // full-precision activations, with the online R4 where the model has it
    fp_acts.online_r4 = q.online_r4;
    const activation_hooks hooks = make_quant_hooks(c, fp_acts, rot);

    // The residual stream entering the current block, one matrix per calibration sequence.
    std::vector<rows> inputs(calib.sequences.size());
    for (std::size_t i = 0; i < inputs.size(); ++i) {
        const auto& s = calib.sequences[i];
        embed(out, std::span<const int>(s).first(s.size() - 1), inputs[i]);
    }
    kv_cache cache(c);
    workspace ws(c);
    layer_trace trace;
    rows x;
    // Runs block l over every sequence and adds the input of one group's linears to `acc`.
    const auto hessian = [&](std::size_t l, rows layer_trace::*site, std::size_t columns) {
        spinquant::hessian_accumulator acc(columns);
        for (const rows& in : inputs) {
            x = in;
            forward_layer(out, l, x, 0, cache, hooks, ws, &trace);
            acc.add_batch(trace.*site, 1);
        }
        return acc.hessian();
    };
    const auto quantize = [&](matrix& w, const Eigen::MatrixXd& h) {
        const auto r = spinquant::gptq(w.view(), h, spec, options);
        spinquant::as_eigen(w.view()) = r.weight;
    };
    for (std::size_t l = 0; l < c.n_layers; ++l) {
        layer_weights& lw = out.layers[l];
        const Eigen::MatrixXd h_attn = hessian(l, &layer_trace::attn_in, c.dim);
        for (matrix* w : {&lw.wk, &lw.wv, &lw.wq}) quantize(*w, h_attn);
        quantize(lw.wo, hessian(l, &layer_trace::o, c.dim));
        const Eigen::MatrixXd h_ffn = hessian(l, &layer_trace::ffn_in, c.dim);
        quantize(lw.w3, h_ffn);
        quantize(lw.w1, h_ffn);
        quantize(lw.w2, hessian(l, &layer_trace::down_in, c.hidden_dim));
        for (rows& in : inputs) forward_layer(out, l, in, 0, cache, hooks, ws);  // the next block's inputs
    }
    m = std::move(out);
}

}  // namespace llama
