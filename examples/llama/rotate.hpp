#pragma once
/// The llama example's model through spinquant/transformer.hpp, and rotation learning with the
/// layer-wise objectives of spinquant/objective.hpp.
///
/// Rotated models: `rotated_model` copies a full-precision model and applies the library's recipe
/// (untie, fuse norms, R1, per-layer R2, the offline half of R4). Learning (`learn_rotations`)
/// follows SpinQuant's schedule (REFERENCE.md §1d–1e: random Hadamard initialisation, Cayley SGD,
/// lr 1.5, cosine decay, 100 steps, gradient-norm clip 1.0) on proxies of the quantized network's
/// error computed from full-precision calibration activations:
///   R1: Σ over layers of linear_quantization_error(attention input, {q, k, v}) and
///       linear_quantization_error(FFN input, {gate, up}) — every reader of the residual stream;
///   R2 of layer l (after R1 is merged): linear_quantization_error(o_proj input, {o_proj}) with
///       per-head activation groups, plus the V-cache error ‖Q(V·R2) − V·R2‖² (an identity
///       "layer" without a weight quantizer), both over diag(R2, …, R2).
/// Since these proxies never see R3 or R4, SpinQuant "no_had" and "had" learn the same R1/R2; the
/// two differ in the online Hadamards applied at evaluation. `learn_rotations_end_to_end` learns
/// R1 and every R2 jointly on SpinQuant's own loss instead: the cross-entropy of the whole
/// quantized network (e2e_loss.hpp, straight-through gradients through every quantizer).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <spinquant/objective.hpp>
#include <spinquant/quantizer.hpp>
#include <spinquant/rotation.hpp>
#include <spinquant/stiefel.hpp>
#include <spinquant/transformer.hpp>

#include "e2e_loss.hpp"
#include "eval.hpp"
#include "forward.hpp"
#include "model.hpp"
#include "quant.hpp"

namespace llama {

using rotation_set = spinquant::rotation_set<float>;

/// R1 (dim) and one R2 (head size) per layer, random Hadamard (QuaRot's and SpinQuant's
/// initialisation), from std::mt19937_64(seed): the same seed gives the same rotations everywhere.
[[nodiscard]] inline rotation_set random_hadamard_rotations(const model_config& c, std::uint64_t seed)
{
    std::mt19937_64 rng(seed);
    rotation_set r;
    r.r1 = spinquant::random_hadamard<float>(c.dim, rng);
    for (std::size_t l = 0; l < c.n_layers; ++l) r.r2.push_back(spinquant::random_hadamard<float>(c.head_size(), rng));
    return r;
}

/// A copy of `fp` with the recipe applied: norms fused, `rotations` merged (an empty set only
/// fuses the norms), and R4's offline half merged into every down_proj when `r4` is given (then
/// evaluate with quant_config::online_r4 and the same online_rotations). Errors: those of
/// spinquant::apply_rotations (bad shapes, non-finite values), fp untouched.
[[nodiscard]] inline model rotated_model(const model& fp, const rotation_set& rotations, const online_rotations* r4 = nullptr)
{
    model m = fp;
    spinquant::apply_rotations(m, rotations, r4 ? &r4->r4 : nullptr);
    return m;
}

/// Full-precision activations at the sites the layer-wise objectives read, one row per
/// calibration token, per layer: the inputs of q/k/v and of gate/up (after RMSNorm, whose weight
/// fuse_norms has folded away, so these are x / rms(x)), the o_proj input and the V cache.
struct calibration_activations {
    std::vector<rows> attn_in, ffn_in, o_in, v;
    std::size_t tokens = 0;
};

/// Runs the norm-fused model `fused` (no rotation, no hooks) over the calibration sequences and
/// collects calibration_activations from at most `max_tokens` tokens (whole sequences).
/// Errors: errc::bad_argument for an empty calibration set; those of forward().
[[nodiscard]] inline calibration_activations capture_calibration(const model& fused, const eval_set& calib, std::size_t max_tokens)
{
    if (calib.sequences.empty())
        spinquant::detail::fail(spinquant::errc::bad_argument, "llama::capture_calibration", "the calibration set is empty");
    const model_config& c = fused.config;
    std::vector<std::vector<rows>> parts(4 * c.n_layers);
    calibration_activations out;
    kv_cache cache(c);
    workspace ws(c);
    forward_trace trace;
    rows logits;
    for (const auto& s : calib.sequences) {
        const std::size_t n = s.size() - 1;
        if (out.tokens > 0 && out.tokens + n > max_tokens) break;
        cache.clear();
        forward(fused, std::span<const int>(s).first(n), 0, cache, {}, ws, logits, &trace);
        for (std::size_t l = 0; l < c.n_layers; ++l) {
            const layer_trace& t = trace.layers[l];
            parts[4 * l + 0].push_back(t.attn_in_raw);
            parts[4 * l + 1].push_back(t.ffn_in_raw);
            parts[4 * l + 2].push_back(t.o_raw);
            parts[4 * l + 3].push_back(t.v_raw);
        }
        out.tokens += n;
    }
    const auto stack = [&](const std::vector<rows>& p) {
        rows m(static_cast<Eigen::Index>(out.tokens), p.front().cols());
        Eigen::Index r = 0;
        for (const rows& b : p) {
            m.middleRows(r, b.rows()) = b;
            r += b.rows();
        }
        return m;
    };
    for (std::size_t l = 0; l < c.n_layers; ++l) {
        out.attn_in.push_back(stack(parts[4 * l + 0]));
        out.ffn_in.push_back(stack(parts[4 * l + 1]));
        out.o_in.push_back(stack(parts[4 * l + 2]));
        out.v.push_back(stack(parts[4 * l + 3]));
    }
    return out;
}

/// Options of learn_rotations: the reference's schedule by default.
struct learning_options {
    std::size_t steps = 100;
    double lr = 1.5;
    double max_grad_norm = 1.0;
    bool learn_r2 = true;
    std::ostream* progress = nullptr;  ///< prints step, loss and orthonormality error every `every` steps
    std::size_t every = 25;
};

namespace detail {

/// A sum of rotation objectives over the same single rotation: losses add, gradients add.
template <class Objective>
class objective_sum {
public:
    void add(Objective f) { terms_.push_back(std::move(f)); }

    double operator()(std::span<const spinquant::matrix_view<const float>> r, std::span<const spinquant::matrix_view<float>> g)
    {
        const auto n = static_cast<Eigen::Index>(r[0].rows);
        scratch_.resize(n, n);
        Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> out(g[0].data, n, n);
        out.setZero();
        double loss = 0;
        const spinquant::matrix_view<float> sv = spinquant::as_matrix_view(scratch_);
        for (auto& f : terms_) {
            loss += f(r, std::span<const spinquant::matrix_view<float>>(&sv, 1));
            out += scratch_;
        }
        return loss;
    }

private:
    std::vector<Objective> terms_;
    rows scratch_;
};

/// An objective over one d x d rotation R2 that evaluates `inner` (over n x n rotations, n a
/// multiple of d) at diag(R2, ..., R2) and sums the diagonal blocks of its gradient (the chain
/// rule through the block-diagonal embedding).
template <class Inner>
class per_head_objective {
public:
    per_head_objective(Inner inner, std::size_t n, std::size_t d) : inner_(std::move(inner)), d_(d), full_(rows::Zero(eidx(n), eidx(n))), grad_(eidx(n), eidx(n)) {}

    double operator()(std::span<const spinquant::matrix_view<const float>> r, std::span<const spinquant::matrix_view<float>> g)
    {
        const auto d = eidx(d_);
        const Eigen::Map<const rows, 0, Eigen::OuterStride<>> r2(r[0].data, d, d, Eigen::OuterStride<>(static_cast<Eigen::Index>(r[0].row_stride)));
        for (Eigen::Index b = 0; b < full_.rows(); b += d) full_.block(b, b, d, d) = r2;
        const spinquant::matrix_view<const float> rv = spinquant::as_matrix_view(std::as_const(full_));
        const spinquant::matrix_view<float> gv = spinquant::as_matrix_view(grad_);
        const double loss = inner_(std::span<const spinquant::matrix_view<const float>>(&rv, 1), std::span<const spinquant::matrix_view<float>>(&gv, 1));
        Eigen::Map<rows, 0, Eigen::OuterStride<>> out(g[0].data, d, d, Eigen::OuterStride<>(static_cast<Eigen::Index>(g[0].row_stride)));
        out.setZero();
        for (Eigen::Index b = 0; b < full_.rows(); b += d) out += grad_.block(b, b, d, d);
        return loss;
    }

private:
    [[nodiscard]] static Eigen::Index eidx(std::size_t n) noexcept { return static_cast<Eigen::Index>(n); }
    Inner inner_;
    std::size_t d_;
    rows full_, grad_;
};

/// Cayley SGD with the reference schedule on `f` over the rotations `r` (updated in place, one
/// optimizer over all of them, so gradient clipping is joint as in the reference's trainer);
/// prints step, loss and the largest orthonormality error. Returns the loss before each step and
/// the final one.
template <class F>
std::vector<double> run_cayley_sgd(F& f, std::span<spinquant::rotation_matrix<float>* const> r, const learning_options& o,
                                   const std::string& name)
{
    std::vector<spinquant::stiefel_shape> shapes;
    std::vector<spinquant::rotation_matrix<float>> g;
    std::vector<spinquant::matrix_view<float>> rv, gv;
    std::vector<spinquant::matrix_view<const float>> rc, gc;
    for (auto* m : r) {
        shapes.push_back({static_cast<std::size_t>(m->rows()), static_cast<std::size_t>(m->cols())});
        g.emplace_back(m->rows(), m->cols());
    }
    for (std::size_t i = 0; i < r.size(); ++i) {
        rv.push_back(spinquant::as_matrix_view(*r[i]));
        rc.push_back(rv.back());
        gv.push_back(spinquant::as_matrix_view(g[i]));
        gc.push_back(gv.back());
    }
    spinquant::cayley_sgd<float> opt(shapes, {.lr = o.lr, .max_grad_norm = o.max_grad_norm, .schedule = {.total_steps = o.steps}});
    std::vector<double> losses;
    for (std::size_t k = 0; k <= o.steps; ++k) {
        const double loss = f(std::span<const spinquant::matrix_view<const float>>(rc), std::span<const spinquant::matrix_view<float>>(gv));
        losses.push_back(loss);
        if (o.progress && (k % o.every == 0 || k == o.steps)) {
            double orth = 0;
            for (auto* m : r) orth = std::max(orth, spinquant::max_orthonormality_error(*m));
            char line[160];
            std::snprintf(line, sizeof line, "    %-4s step %3zu  loss %.6g  |R^T R - I|max %.1e\n", name.c_str(), k, loss, orth);
            *o.progress << line << std::flush;
        }
        if (k == o.steps) break;
        opt.step(std::span<const spinquant::matrix_view<float>>(rv), std::span<const spinquant::matrix_view<const float>>(gc));
    }
    return losses;
}

/// run_cayley_sgd for one rotation.
template <class F>
std::vector<double> run_cayley_sgd(F& f, spinquant::rotation_matrix<float>& r, const learning_options& o, const std::string& name)
{
    spinquant::rotation_matrix<float>* const one[1] = {&r};
    return run_cayley_sgd(f, std::span<spinquant::rotation_matrix<float>* const>(one), o, name);
}

}  // namespace detail

/// Loss before the first step and after the last. learn_rotations: `first`/`last` are R1's
/// objective and r2_first/r2_last each R2's; learn_rotations_end_to_end: `first`/`last` are the
/// joint cross-entropy on the first and the last step's batch, and the R2 lists stay empty.
struct learning_report {
    double first = 0, last = 0;
    std::vector<double> r2_first, r2_last;
};

/// Learns R1 and every layer's R2 for the quantizers of `q` (weights, activations, V cache; see the
/// header comment) on at most `max_tokens` calibration tokens of `calib`, starting from
/// random_hadamard_rotations(fp.config, seed). R1 first, on the norm-fused model; then each R2 on
/// the model with R1 merged. Progress goes to options.progress. Errors: those of
/// capture_calibration and of the objectives (bad quantizer settings).
[[nodiscard]] inline rotation_set learn_rotations(const model& fp, const eval_set& calib, const quant_config& q, std::uint64_t seed,
                                                  const learning_options& options, std::size_t max_tokens = 8192,
                                                  learning_report* report = nullptr)
{
    using spinquant::quant_spec;
    using objective = spinquant::linear_quantization_error<float>;
    using view = spinquant::matrix_view<const float>;
    const model_config& c = fp.config;
    const std::size_t hs = c.head_size();
    const model fused = rotated_model(fp, {});
    const calibration_activations acts = capture_calibration(fused, calib, max_tokens);
    const auto maybe = [](int bits, quant_spec s) { return bits < 16 ? std::optional<quant_spec>(s) : std::nullopt; };
    const auto a_token = maybe(q.a_bits, quant_spec::activation(q.a_bits, q.a_symmetric, 0, q.a_clip));
    const auto a_head = maybe(q.a_bits, quant_spec::activation(q.a_bits, q.a_symmetric, hs, q.a_clip));
    const auto v_head = maybe(q.v_bits, quant_spec::activation(q.v_bits, q.kv_symmetric, hs, q.v_clip));
    const auto w_chan = maybe(q.w_bits, quant_spec::weight(q.w_bits, q.w_symmetric, 0, q.w_clip));
    learning_report rep;
    rotation_set r = random_hadamard_rotations(c, seed);

    detail::objective_sum<objective> r1_loss;
    for (std::size_t l = 0; l < c.n_layers; ++l) {
        const layer_weights& w = fused.layers[l];
        const view attn[3] = {w.wq.view(), w.wk.view(), w.wv.view()};
        const view ffn[2] = {w.w1.view(), w.w3.view()};
        r1_loss.add(objective(acts.attn_in[l], attn, a_token, w_chan));
        r1_loss.add(objective(acts.ffn_in[l], ffn, a_token, w_chan));
    }
    const auto h1 = detail::run_cayley_sgd(r1_loss, r.r1, options, "R1");
    rep.first = h1.front();
    rep.last = h1.back();

    if (options.learn_r2) {
        rotation_set only_r1;
        only_r1.r1 = r.r1;
        const model m1 = rotated_model(fp, only_r1);
        const rows identity = rows::Identity(static_cast<Eigen::Index>(c.kv_dim()), static_cast<Eigen::Index>(c.kv_dim()));
        const view id[1] = {spinquant::as_matrix_view(identity)};
        for (std::size_t l = 0; l < c.n_layers; ++l) {
            const view wo[1] = {m1.layers[l].wo.view()};
            // o_proj's input and weight (its quantizers: per head and per channel), and the V cache.
            struct r2_loss {
                detail::per_head_objective<objective> o, v;
                rows gv;  // the V term's gradient, added to o's: allocated once, not per step
                double operator()(std::span<const view> rr, std::span<const spinquant::matrix_view<float>> g)
                {
                    const auto d = static_cast<Eigen::Index>(rr[0].rows);
                    gv.resize(d, d);
                    const spinquant::matrix_view<float> gvv = spinquant::as_matrix_view(gv);
                    const double lo = o(rr, g);
                    const double lv = v(rr, std::span<const spinquant::matrix_view<float>>(&gvv, 1));
                    Eigen::Map<rows, 0, Eigen::OuterStride<>>(g[0].data, d, d, Eigen::OuterStride<>(static_cast<Eigen::Index>(g[0].row_stride))) += gv;
                    return lo + lv;
                }
            } f{{objective(acts.o_in[l], wo, a_head, w_chan), c.dim, hs},
                {objective(acts.v[l], id, v_head, std::nullopt), c.kv_dim(), hs},
                rows(static_cast<Eigen::Index>(hs), static_cast<Eigen::Index>(hs))};
            const auto h2 = detail::run_cayley_sgd(f, r.r2[l], options, "R2." + std::to_string(l));
            rep.r2_first.push_back(h2.front());
            rep.r2_last.push_back(h2.back());
        }
    }
    if (report) *report = rep;
    return r;
}

/// Learns R1 and every R2 jointly on SpinQuant's own objective (REFERENCE.md §1e): the mean
/// cross-entropy of the rotated network quantized as `q` (weights RTN with straight-through
/// gradients, activations, KV cache, and the online R3/R4 when q.online_r3 / q.online_r4, which
/// then need `rot`), on `batch` calibration sequences per step (llama::end_to_end_loss), starting
/// from random_hadamard_rotations(fp.config, seed), with one Cayley SGD over all rotations
/// (joint gradient clipping). `report` gets the first and the last step's loss.
/// Errors: those of end_to_end_loss.
[[nodiscard]] inline rotation_set learn_rotations_end_to_end(const model& fp, const eval_set& calib, const quant_config& q,
                                                             const online_rotations* rot, std::uint64_t seed,
                                                             const learning_options& options, std::size_t batch,
                                                             learning_report* report = nullptr)
{
    const model fused = rotated_model(fp, {}, q.online_r4 ? rot : nullptr);
    end_to_end_loss loss(fused, q, rot, calib, batch);
    rotation_set r = random_hadamard_rotations(fp.config, seed);
    std::vector<spinquant::rotation_matrix<float>*> all = {&r.r1};
    for (auto& r2 : r.r2) all.push_back(&r2);
    const auto h = detail::run_cayley_sgd(loss, std::span<spinquant::rotation_matrix<float>* const>(all), options, "CE");
    if (report) {
        report->first = h.front();
        report->last = h.back();
    }
    return r;
}

}  // namespace llama
