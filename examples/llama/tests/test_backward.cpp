#include "support/allocation_counter.hpp"  // first: replaces operator new for this executable

#include "support/catch.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <spinquant/quantizer.hpp>
#include <spinquant/rotation.hpp>
#include <spinquant/stiefel.hpp>

#include "backward.hpp"
#include "e2e_loss.hpp"
#include "eval.hpp"
#include "llama_test_support.hpp"
#include "quant.hpp"

using llama::test::stories260k;
using llama::test::tok512;

namespace {

template <class T>
using rmat = spinquant::rotation_matrix<T>;

// A copy of `src` cut to its first `layers` blocks (the real shapes, less work), with the norm
// weights folded into the linears when `fuse` (what the objective is meant for).
llama::model prepared(const llama::model& src, std::size_t layers, bool fuse = true)
{
    llama::model m = src;
    if (layers < m.config.n_layers) {
        m.layers.resize(layers);
        m.config.n_layers = layers;
    }
    if (fuse) {
        for (auto& lw : m.layers) {
            spinquant::fuse_rms_norm(lw.attn_norm, lw.wq.view(), lw.wk.view(), lw.wv.view());
            spinquant::fuse_rms_norm(lw.ffn_norm, lw.w1.view(), lw.w3.view());
        }
        spinquant::fuse_rms_norm(m.final_norm, m.classifier.view());
    }
    return m;
}

// R1 then one R2 per layer, Haar-random or random Hadamard, with their views in call order.
template <class T>
struct rotation_list {
    std::vector<rmat<T>> r;

    [[nodiscard]] std::vector<spinquant::matrix_view<const T>> views() const
    {
        std::vector<spinquant::matrix_view<const T>> v;
        for (const auto& m : r) v.push_back(spinquant::as_matrix_view(m));
        return v;
    }
    [[nodiscard]] std::vector<spinquant::matrix_view<T>> mutable_views()
    {
        std::vector<spinquant::matrix_view<T>> v;
        for (auto& m : r) v.push_back(spinquant::as_matrix_view(m));
        return v;
    }
};

template <class T>
rotation_list<T> random_rotations(const llama::model_config& c, std::uint64_t seed, bool hadamard = false)
{
    std::mt19937_64 rng(seed);
    rotation_list<T> out;
    const auto draw = [&](std::size_t n) {
        return hadamard ? spinquant::random_hadamard<T>(n, rng) : spinquant::random_orthogonal<T>(n, rng);
    };
    out.r.push_back(draw(c.dim));
    for (std::size_t l = 0; l < c.n_layers; ++l) out.r.push_back(draw(c.head_size()));
    return out;
}

template <class T>
rotation_list<T> zeros_like(const rotation_list<T>& r)
{
    rotation_list<T> g = r;
    for (auto& m : g.r) m.setZero();
    return g;
}

std::vector<int> some_tokens(std::size_t n)
{
    auto t = tok512().encode("Once there was a boy named Tony. He loved sailing in his boat.\nOne day he saw a fish.",
                             true, false);
    t.resize(std::min(n, t.size()));
    return t;
}

// An entry (rotation k, row i, column j) of the rotation list.
struct entry {
    std::size_t k, i, j;
};

// `count_r1` entries of R1 and `count_r2` of each R2, drawn at random.
std::vector<entry> sample_entries(const llama::model_config& c, std::size_t count_r1, std::size_t count_r2, std::uint64_t seed)
{
    std::mt19937_64 rng(seed);
    std::vector<entry> e;
    for (std::size_t a = 0; a < count_r1; ++a) e.push_back({0, rng() % c.dim, rng() % c.dim});
    for (std::size_t l = 0; l < c.n_layers; ++l)
        for (std::size_t a = 0; a < count_r2; ++a) e.push_back({l + 1, rng() % c.head_size(), rng() % c.head_size()});
    return e;
}

// ∂f/∂(entry) by central differences with one Richardson step (error O(h^4)).
template <class F>
double finite_difference(F&& f, rotation_list<double>& r, const entry& e, double h)
{
    double& x = r.r[e.k](static_cast<Eigen::Index>(e.i), static_cast<Eigen::Index>(e.j));
    const double x0 = x;
    const auto at = [&](double dx) {
        x = x0 + dx;
        const double v = f(r);
        x = x0;
        return v;
    };
    const double d1 = (at(h) - at(-h)) / (2 * h);
    const double d2 = (at(2 * h) - at(-2 * h)) / (4 * h);
    return (4 * d1 - d2) / 3;
}

}  // namespace

TEST_CASE("the gradient with respect to R1 and R2 matches finite differences of the double loss", "[llama][backward]")
{
    struct setting {
        const char* name;
        bool fuse, online;
    };
    const setting s = GENERATE(setting{"fused norms, no online rotation", true, false},
                               setting{"fused norms, online R3 and R4", true, true},
                               setting{"unfused norm weights, online R3 and R4", false, true});
    INFO(s.name);
    llama::model m = prepared(stories260k(), 2, s.fuse);
    const llama::online_rotations rot(m.config);
    llama::quant_config q;  // 16 bits everywhere: the quantizers are the identity
    q.online_r3 = q.online_r4 = s.online;
    if (s.online) llama::merge_r4(m, rot);
    const llama::eval_set set{{some_tokens(9)}};
    llama::basic_end_to_end_loss<double> f(m, q, &rot, set, 1);
    auto r = random_rotations<double>(m.config, 7);
    auto g = zeros_like(r);
    const double loss = f(r.views(), g.mutable_views());
    CHECK(loss > 1.0);
    const auto value = [&](const rotation_list<double>& at) { return f.evaluate(at.views(), set); };
    CHECK(value(r) == loss);
    double worst = 0.0;
    for (const entry& e : sample_entries(m.config, 16, 6, 11)) {
        const double fd = finite_difference(value, r, e, 1e-3);
        const double got = g.r[e.k](static_cast<Eigen::Index>(e.i), static_cast<Eigen::Index>(e.j));
        const double rel = std::abs(got - fd) / std::abs(fd);
        worst = std::max(worst, rel);
        INFO("rotation " << e.k << " (" << e.i << ", " << e.j << "): gradient " << got << ", finite difference " << fd);
        CHECK(rel <= 1e-6);
    }
    WARN("worst relative error " << worst);
}

namespace {

// The rotated network in double, built with the library's fusion helpers (rotation.hpp), not
// with backward.hpp: E·R1, Wc·R1, W·R1 for q/k/gate/up, diag(R2)ᵀ·Wv·R1, R1ᵀ·Wo·diag(R2), R1ᵀ·W2.
llama::basic_model<double> rotated_double(const llama::model& m, const rotation_list<double>& r)
{
    auto d = llama::model_cast<double>(m);
    const rmat<double>& r1 = r.r[0];
    spinquant::rotate_embedding(d.token_embedding.view(), r1);
    spinquant::rotate_input_side(d.classifier.view(), r1);
    for (std::size_t l = 0; l < d.layers.size(); ++l) {
        auto& w = d.layers[l];
        const rmat<double>& r2 = r.r[l + 1];
        for (auto* x : {&w.wq, &w.wk, &w.wv, &w.w1, &w.w3}) spinquant::rotate_input_side(x->view(), r1);
        spinquant::rotate_output_side_per_head(w.wv.view(), r2);
        spinquant::rotate_input_side_per_head(w.wo.view(), r2);
        spinquant::rotate_output_side(w.wo.view(), r1);
        spinquant::rotate_output_side(w.w2.view(), r1);
    }
    return d;
}

// Mean cross-entropy of tokens[1..] from logits of tokens[..n-1], in double.
template <class T>
double mean_cross_entropy(const llama::basic_rows<T>& logits, const std::vector<int>& tokens)
{
    double nll = 0.0;
    for (Eigen::Index t = 0; t < logits.rows(); ++t) {
        double mx = -1e300, sum = 0.0;
        for (Eigen::Index v = 0; v < logits.cols(); ++v) mx = std::max(mx, static_cast<double>(logits(t, v)));
        for (Eigen::Index v = 0; v < logits.cols(); ++v) sum += std::exp(static_cast<double>(logits(t, v)) - mx);
        nll += mx + std::log(sum) - static_cast<double>(logits(t, tokens[static_cast<std::size_t>(t) + 1]));
    }
    return nll / static_cast<double>(logits.rows());
}

// A quantizer replaced by its straight-through linearisation at a base point x0:
// x -> Q(x0) + M ⊙ (x - x0) with M = fake_quantize_backward(x0, ones). It equals Q at x0 and is
// smooth, and by definition its derivative is the straight-through estimator's: finite
// differences of a network built from these check the masked backward pass.
struct linearised {
    spinquant::quant_spec spec;
    bool masked = true;  // false: the unmasked estimator (a control the test must tell apart)
    llama::basic_rows<double> x0, q0, mask;
    bool recorded = false;

    void operator()(spinquant::matrix_view<double> x)
    {
        auto e = spinquant::as_eigen(x);
        if (!recorded) {
            x0 = e;
            q0 = x0;
            spinquant::fake_quantize(q0, spec);
            mask = llama::basic_rows<double>::Ones(x0.rows(), x0.cols());
            if (masked) spinquant::fake_quantize_backward(x0, mask, spec);
            recorded = true;
        }
        e = q0.array() + mask.array() * (e.array() - x0.array());
    }
    [[nodiscard]] long cut() const { return static_cast<long>((mask.array() == 0.0).count()); }
};

// The W/A/K/V-quantized network with every quantizer linearised at the first call's rotations,
// online R3/R4 through double plans of the reference's matrices.
struct linearised_network {
    const llama::model& m;
    std::vector<int> tokens;
    std::size_t hs;
    spinquant::hadamard_plan<double> r3, r4;
    std::vector<linearised> attn, key, value, o, ffn, down, weights;

    linearised_network(const llama::model& model, const llama::quant_config& q, std::vector<int> t, bool masked)
        : m(model), tokens(std::move(t)), hs(model.config.head_size()), r3(hs, options()),
          r4(model.config.hidden_dim, options())
    {
        const auto L = model.config.n_layers;
        using spinquant::quant_spec;
        const auto make = [&](std::vector<linearised>& v, const quant_spec& s, std::size_t n) {
            v.assign(n, linearised{s, masked, {}, {}, {}, false});
        };
        make(attn, quant_spec::activation(q.a_bits, q.a_symmetric, 0, q.a_clip), L);
        make(ffn, quant_spec::activation(q.a_bits, q.a_symmetric, 0, q.a_clip), L);
        make(down, quant_spec::activation(q.a_bits, q.a_symmetric, 0, q.a_clip), L);
        make(o, quant_spec::activation(q.a_bits, q.a_symmetric, hs, q.a_clip), L);
        make(key, quant_spec::activation(q.k_bits, q.kv_symmetric, hs, q.k_clip), L);
        make(value, quant_spec::activation(q.v_bits, q.kv_symmetric, hs, q.v_clip), L);
        make(weights, quant_spec::weight(q.w_bits, q.w_symmetric, 0, q.w_clip), 7 * L);
    }
    static spinquant::hadamard_options options()
    {
        spinquant::hadamard_options o;
        o.source = spinquant::hadamard_source::reference;
        return o;
    }
    [[nodiscard]] spinquant::matrix_view<double> heads(spinquant::matrix_view<double> x) const
    {
        return {x.data, x.rows * (x.cols / hs), hs, hs, 1};
    }

    double operator()(const rotation_list<double>& r)
    {
        auto d = rotated_double(m, r);
        for (std::size_t l = 0; l < d.layers.size(); ++l) {
            auto& w = d.layers[l];
            llama::basic_matrix<double>* ws[7] = {&w.wq, &w.wk, &w.wv, &w.wo, &w.w1, &w.w2, &w.w3};
            for (std::size_t k = 0; k < 7; ++k) weights[7 * l + k](ws[k]->view());
        }
        using view = spinquant::matrix_view<double>;
        llama::basic_activation_hooks<double> h;
        h.attn_input = [&](std::size_t l, view x) { attn[l](x); };
        h.query = [&](std::size_t, view x) { r3.apply_rows(heads(x)); };
        h.key = [&](std::size_t l, view x) {
            r3.apply_rows(heads(x));
            key[l](x);
        };
        h.value = [&](std::size_t l, view x) { value[l](x); };
        h.o_input = [&](std::size_t l, view x) { o[l](x); };
        h.ffn_input = [&](std::size_t l, view x) { ffn[l](x); };
        h.down_input = [&](std::size_t l, view x) {
            r4.apply_rows(x);
            down[l](x);
        };
        llama::basic_kv_cache<double> cache(m.config);
        llama::basic_workspace<double> ws(m.config);
        llama::basic_rows<double> logits;
        llama::forward(d, std::span<const int>(tokens).first(tokens.size() - 1), 0, cache, h, ws, logits);
        return mean_cross_entropy(logits, tokens);
    }
};

}  // namespace

TEST_CASE("with quantizers on, the gradient is the straight-through estimator with fake_quantize_backward's masks",
          "[llama][backward]")
{
    llama::model m = prepared(stories260k(), 2);
    const llama::online_rotations rot(m.config);
    llama::merge_r4(m, rot);
    auto q = llama::quant_config::bits(4, 4, 4);
    q.online_r3 = q.online_r4 = true;
    q.a_clip = 0.9;  // clip ratios below 1 (and the weights' MSE clip search) make the clamp cut elements
    q.k_clip = q.v_clip = 0.95;
    const auto tokens = some_tokens(9);
    llama::basic_end_to_end_loss<double> f(m, q, &rot, llama::eval_set{{tokens}}, 1);
    auto r = random_rotations<double>(m.config, 5);
    auto g = zeros_like(r);
    const double loss = f(r.views(), g.mutable_views());

    linearised_network ste(m, q, tokens, true);
    CHECK_THAT(ste(r), Catch::Matchers::WithinRel(loss, 1e-12));  // the same network at the base point
    long cut_activations = 0, cut_weights = 0;
    for (const auto* v : {&ste.attn, &ste.key, &ste.value, &ste.o, &ste.ffn, &ste.down})
        for (const auto& s : *v) cut_activations += s.cut();
    for (const auto& s : ste.weights) cut_weights += s.cut();
    INFO("elements cut off by the clamp: " << cut_activations << " activations, " << cut_weights << " weights");
    CHECK(cut_activations > 0);
    CHECK(cut_weights > 0);

    linearised_network unmasked(m, q, tokens, false);
    (void)unmasked(r);
    double worst = 0.0, control = 0.0;
    for (const entry& e : sample_entries(m.config, 16, 4, 3)) {
        const double fd = finite_difference(ste, r, e, 1e-3);
        const double got = g.r[e.k](static_cast<Eigen::Index>(e.i), static_cast<Eigen::Index>(e.j));
        const double rel = std::abs(got - fd) / std::abs(fd);
        worst = std::max(worst, rel);
        INFO("rotation " << e.k << " (" << e.i << ", " << e.j << "): gradient " << got << ", finite difference " << fd);
        CHECK(rel <= 1e-6);
        if (e.k == 0 && control == 0.0) {
            const double fd_unmasked = finite_difference(unmasked, r, e, 1e-3);
            control = std::abs(got - fd_unmasked) / std::abs(fd_unmasked);
        }
    }
    WARN("worst relative error " << worst << "; an unmasked estimator differs by " << control);
    CHECK(control > 1e-4);  // the masks matter: the check could fail
}

TEST_CASE("the training loss is the cross-entropy of the evaluated network: llama::forward with make_quant_hooks",
          "[llama][backward]")
{
    const auto& fp = stories260k();
    llama::model m = prepared(fp, fp.config.n_layers);
    const llama::online_rotations rot(m.config);
    llama::merge_r4(m, rot);
    auto q = llama::quant_config::bits(4, 4, 4);
    q.online_r3 = q.online_r4 = true;
    const llama::eval_set set{{some_tokens(14), some_tokens(20)}};
    llama::end_to_end_loss f(m, q, &rot, set, 2);
    auto r = random_rotations<float>(m.config, 9, true);
    auto g = zeros_like(r);
    const double loss = f(r.views(), g.mutable_views());

    // The network f ran on, evaluated by the evaluator's forward pass and hooks.
    const llama::model& net = f.network().network();
    const auto hooks = llama::make_quant_hooks(m.config, q, &rot);
    double nll = 0.0;
    std::size_t n = 0;
    for (const auto& s : set.sequences) {
        llama::kv_cache cache(m.config);
        llama::workspace ws(m.config);
        llama::rows logits;
        llama::forward(net, std::span<const int>(s).first(s.size() - 1), 0, cache, hooks, ws, logits);
        nll += mean_cross_entropy(logits, s) * static_cast<double>(s.size() - 1);
        n += s.size() - 1;
    }
    CHECK_THAT(loss, Catch::Matchers::WithinRel(nll / static_cast<double>(n), 1e-12));

    // Those weights are the rotated and RTN-quantized ones: the library's fusion helpers (in
    // double, rounded once) then quantize_weights_rtn give the same network up to rounding.
    llama::model indep = m;
    const rmat<float>& r1 = r.r[0];
    spinquant::rotate_embedding(indep.token_embedding.view(), r1);
    spinquant::rotate_input_side(indep.classifier.view(), r1);
    for (std::size_t l = 0; l < indep.layers.size(); ++l) {
        auto& w = indep.layers[l];
        for (auto* x : {&w.wq, &w.wk, &w.wv, &w.w1, &w.w3}) spinquant::rotate_input_side(x->view(), r1);
        spinquant::rotate_output_side_per_head(w.wv.view(), r.r[l + 1]);
        spinquant::rotate_input_side_per_head(w.wo.view(), r.r[l + 1]);
        spinquant::rotate_output_side(w.wo.view(), r1);
        spinquant::rotate_output_side(w.w2.view(), r1);
    }
    const auto close = [](const llama::matrix& a, const llama::matrix& b, float tol) {
        return (spinquant::as_eigen(a.view()) - spinquant::as_eigen(b.view())).cwiseAbs().maxCoeff() <= tol;
    };
    CHECK(close(net.token_embedding, indep.token_embedding, 1e-5f));
    CHECK(close(net.classifier, indep.classifier, 1e-5f));
    llama::quantize_weights_rtn(indep, q);
    // Rotating in float or in double moves a row's extreme by an ulp, hence its scale and every
    // level of the row by an ulp; an element whose rounding flips differs by a whole level.
    std::size_t flipped = 0, total = 0;
    for (std::size_t l = 0; l < indep.layers.size(); ++l) {
        const auto& a = net.layers[l];
        const auto& b = indep.layers[l];
        const llama::matrix* pairs[7][2] = {{&a.wq, &b.wq}, {&a.wk, &b.wk}, {&a.wv, &b.wv}, {&a.wo, &b.wo},
                                            {&a.w1, &b.w1}, {&a.w2, &b.w2}, {&a.w3, &b.w3}};
        for (const auto& p : pairs)
            for (std::size_t row = 0; row < p[0]->rows; ++row) {
                const auto x = p[0]->view().row(row), y = p[1]->view().row(row);
                REQUIRE(std::set<float>(x.begin(), x.end()).size() <= 16);
                float scale = 0.0f;
                for (const float v : y) scale = std::max(scale, std::abs(v));
                for (std::size_t i = 0; i < x.size(); ++i) flipped += std::abs(x[i] - y[i]) > 1e-5f * scale ? 1u : 0u;
                total += x.size();
            }
    }
    INFO(flipped << " of " << total << " quantized weights sit on another level (rotation rounded in float vs in double)");
    CHECK(flipped * 100 < total);
    const llama::reference ref = llama::make_reference(prepared(fp, fp.config.n_layers), set);
    const double indep_nll = std::log(llama::evaluate(indep, hooks, set, ref).ppl);
    CHECK_THAT(loss, Catch::Matchers::WithinRel(indep_nll, 2e-3));
}

TEST_CASE("the objective rejects bad shapes, counts and values before writing a gradient", "[llama][backward][errors]")
{
    llama::model m = prepared(stories260k(), 2);
    const llama::online_rotations rot(m.config);
    const llama::eval_set set{{some_tokens(6)}};
    llama::end_to_end_loss f(m, llama::quant_config::bits(16, 4, 4), &rot, set, 1);
    const auto r = random_rotations<float>(m.config, 1);
    auto g = zeros_like(r);
    for (auto& x : g.r) x.setConstant(42.0f);
    const auto untouched = [&] {
        for (const auto& x : g.r)
            if ((x.array() != 42.0f).any()) return false;
        return f.calls() == 0 && f.position() == 0;
    };
    const auto rejects = [&](std::vector<spinquant::matrix_view<const float>> rv,
                             std::vector<spinquant::matrix_view<float>> gv, spinquant::errc code, const char* words) {
        try {
            (void)f(rv, gv);
            FAIL("expected an error");
        } catch (const spinquant::error& e) {
            INFO(e.what());
            CHECK(e.code() == code);
            CHECK(std::string(e.what()).find(words) != std::string::npos);
        }
        CHECK(untouched());
    };
    auto rv = r.views();
    auto gv = g.mutable_views();
    rejects({rv.begin(), rv.end() - 1}, gv, spinquant::errc::bad_shape, "rotations, expected 3");
    rejects(rv, {gv.begin(), gv.end() - 1}, spinquant::errc::bad_shape, "gradients, expected 3");
    const rmat<float> wrong = rmat<float>::Identity(63, 64);
    auto bad = rv;
    bad[0] = spinquant::as_matrix_view(wrong);
    rejects(bad, gv, spinquant::errc::bad_shape, "R1");
    const rmat<float> wrong_r2 = rmat<float>::Identity(4, 4);
    bad = rv;
    bad[2] = spinquant::as_matrix_view(wrong_r2);
    rejects(bad, gv, spinquant::errc::bad_shape, "R2 of layer 1");
    rmat<float> wrong_g = rmat<float>::Constant(8, 9, 42.0f);
    auto bad_g = gv;
    bad_g[1] = spinquant::as_matrix_view(wrong_g);
    rejects(rv, bad_g, spinquant::errc::bad_shape, "gradient 1");
    rmat<float> nan = r.r[1];
    nan(2, 3) = std::nanf("");
    bad = rv;
    bad[1] = spinquant::as_matrix_view(nan);
    rejects(bad, gv, spinquant::errc::non_finite, "R2 of layer 0");
    (void)f(rv, gv);  // and then it works
    CHECK(f.calls() == 1);

    // Construction.
    const auto code_of = [&](auto&& make) {
        try {
            make();
        } catch (const spinquant::error& e) {
            return e.code();
        }
        FAIL("expected an error");
        return spinquant::errc::bad_file;
    };
    using spinquant::errc;
    const llama::quant_config fp16;
    CHECK(code_of([&] { llama::end_to_end_loss(m, fp16, nullptr, set, 0); }) == errc::bad_argument);
    CHECK(code_of([&] { llama::end_to_end_loss(m, fp16, nullptr, llama::eval_set{}, 1); }) == errc::bad_argument);
    CHECK(code_of([&] { llama::end_to_end_loss(m, fp16, nullptr, llama::eval_set{{{1}}}, 1); }) == errc::bad_argument);
    CHECK(code_of([&] { llama::end_to_end_loss(m, fp16, nullptr, llama::eval_set{{{1, 512}}}, 1); }) == errc::bad_argument);
    CHECK(code_of([&] {
              llama::end_to_end_loss(m, fp16, nullptr, llama::eval_set{{std::vector<int>(m.config.seq_len + 2, 1)}}, 1);
          }) == errc::bad_shape);
    CHECK(code_of([&] { llama::end_to_end_loss(m, llama::quant_config::bits(1, 16, 16), nullptr, set, 1); }) ==
          errc::bits_out_of_range);
    llama::quant_config r3;
    r3.online_r3 = true;
    CHECK(code_of([&] { llama::end_to_end_loss(m, r3, nullptr, set, 1); }) == errc::bad_argument);
    llama::model broken = m;
    broken.layers.pop_back();
    CHECK(code_of([&] { llama::end_to_end_loss(broken, fp16, nullptr, set, 1); }) == errc::bad_shape);
    broken = m;
    broken.layers[1].w2 = llama::matrix(64, 171);
    CHECK(code_of([&] { llama::end_to_end_loss(broken, fp16, nullptr, set, 1); }) == errc::bad_shape);
}

TEST_CASE("the objective streams the calibration set in order, one sequence's activations at a time",
          "[llama][backward]")
{
    llama::model m = prepared(stories260k(), 2);
    const llama::online_rotations rot(m.config);
    llama::merge_r4(m, rot);
    auto q = llama::quant_config::bits(16, 4, 4);
    q.online_r3 = q.online_r4 = true;
    const auto a = some_tokens(10), b = some_tokens(12), c = some_tokens(17);
    const llama::eval_set set{{a, b, c}};
    llama::end_to_end_loss f(m, q, &rot, set, 2);
    const auto r = random_rotations<float>(m.config, 2, true);
    auto g = zeros_like(r), g_ab = zeros_like(r), g_c = zeros_like(r);
    // Batches {a, b}, {c, a}, {b, c}, then {a, b} again.
    const double l_ab = f(r.views(), g_ab.mutable_views());
    CHECK(f.position() == 2);
    llama::end_to_end_loss single(m, q, &rot, llama::eval_set{{c}}, 1);
    (void)single(r.views(), g_c.mutable_views());
    const double l_ca = f(r.views(), g.mutable_views());
    CHECK(f.position() == 1);
    (void)f(r.views(), g.mutable_views());
    CHECK(f.position() == 0);
    CHECK(f(r.views(), g.mutable_views()) == l_ab);  // the same batch at the same point: the same loss
    CHECK((g.r[0] - g_ab.r[0]).cwiseAbs().maxCoeff() == 0.0f);
    // The batch loss is the mean over its predictions (c has 16, a has 9).
    const double l_a = f.evaluate(r.views(), llama::eval_set{{a}});
    const double l_c = f.evaluate(r.views(), llama::eval_set{{c}});
    CHECK_THAT(l_ca, Catch::Matchers::WithinRel((16 * l_c + 9 * l_a) / 25, 1e-12));
    CHECK(f.position() == 2);  // evaluate() does not advance the stream

    // Memory: what one sequence holds, as documented, and nothing allocated per call in the steady state.
    llama::end_to_end_loss fixed(m, q, &rot, llama::eval_set{{b, b}}, 1);
    (void)fixed(r.views(), g.mutable_views());
    const auto& net = fixed.network();
    CHECK(net.activation_bytes() == net.sequence_bytes(b.size() - 1));
    CHECK(net.held_bytes() > net.activation_bytes());
    const auto rv = r.views();
    const auto gv = g.mutable_views();
    const long allocations = spinquant::test::allocations_during([&] { (void)fixed(rv, gv); });
    CHECK(allocations == 0);
    // 256 tokens of the real model: about 21 MiB of activations, mostly attention probabilities.
    llama::end_to_end_loss real(stories260k(), llama::quant_config{}, nullptr, set, 1);
    const double mib = static_cast<double>(real.sequence_bytes(256)) / (1 << 20);
    WARN("activations held for a 256-token sequence: " << mib << " MiB");
    CHECK(mib < 24.0);
}

TEST_CASE("at 16 bits the fused model is rotation invariant: the loss is constant and the Riemannian gradient 0",
          "[llama][backward]")
{
    // With the norms fused and nothing quantized, (x·R)(W·R)ᵀ = x·Wᵀ for every orthogonal R, so
    // the gradient must be normal to the manifold: G·Rᵀ symmetric, skew(G·Rᵀ) = 0. An error in
    // any one place R1 or R2 enters breaks this.
    llama::model m = prepared(stories260k(), 2);
    const llama::online_rotations rot(m.config);
    llama::merge_r4(m, rot);
    llama::quant_config q;
    q.online_r3 = q.online_r4 = true;
    const llama::eval_set set{{some_tokens(12)}};
    llama::basic_end_to_end_loss<double> f(m, q, &rot, set, 1);
    auto r = random_rotations<double>(m.config, 4);
    auto g = zeros_like(r);
    const double loss = f(r.views(), g.mutable_views());
    auto id = r;
    for (auto& x : id.r) x.setIdentity();
    CHECK_THAT(f.evaluate(id.views(), set), Catch::Matchers::WithinRel(loss, 1e-12));
    for (std::size_t k = 0; k < r.r.size(); ++k) {
        INFO("rotation " << k);
        const rmat<double> a = g.r[k] * r.r[k].transpose();
        CHECK(a.norm() > 1e-3);  // the Euclidean gradient itself is not 0
        CHECK((a - a.transpose()).norm() < 1e-10 * a.norm());
    }
}

TEST_CASE("ten Cayley SGD steps with SpinQuant's recipe run on the objective from random Hadamard rotations at W16A4KV4",
          "[llama][backward]")
{
    // The recipe of REFERENCE.md §1d-1e (lr 1.5, joint gradient clipping to norm 1, cosine
    // decay), through spinquant::minimize. On this 64-wide model the 4-bit keys and values of
    // the first position, which every later token attends to, dominate the loss: moving the
    // rotations by 1e-4 changes the mean cross-entropy by a few hundredths through rounding flips
    // alone, more than ten steps of learning change it, so whether the held-out loss goes down
    // in ten steps is up to chance (tried: 8 settings x 4 seeds, mean change within +-0.02).
    // What is checked here holds whatever the draw.
    const auto& fp = stories260k();
    llama::model m = prepared(fp, fp.config.n_layers);
    const llama::online_rotations rot(m.config);
    llama::merge_r4(m, rot);
    auto q = llama::quant_config::bits(16, 4, 4);
    q.online_r3 = q.online_r4 = true;
    const auto calib = llama::sample_sequences(fp, 8, 48, 51);
    const auto held_out = llama::sample_sequences(fp, 4, 48, 52);
    llama::end_to_end_loss f(m, q, &rot, calib, 2);
    auto r = random_rotations<float>(m.config, 53, true);
    const auto start = r;
    const double before = f.evaluate(r.views(), held_out);
    spinquant::cayley_sgd<float> opt(f.shapes(), {.lr = 1.5, .max_grad_norm = 1.0, .schedule = {.total_steps = 10}});
    auto params = r.mutable_views();
    const auto history = spinquant::minimize<float>(opt, f, std::span<const spinquant::matrix_view<float>>(params), 10);
    const double after = f.evaluate(r.views(), held_out);
    WARN("held-out cross-entropy " << before << " -> " << after << " (full precision: "
                                   << std::log(llama::make_reference(fp, held_out).fp.ppl) << ")");
    REQUIRE(history.size() == 11);
    CHECK(f.calls() == 11);
    CHECK(f.position() == 22 % 8);  // eleven batches of two from a stream of eight
    for (const double l : history) CHECK((std::isfinite(l) && l > 0.5 && l < 3.0));
    CHECK(opt.last_gradient_norm() > 1.0);  // clipping was active, as in the reference's runs
    CHECK(std::abs(after - before) < 0.3);
    for (std::size_t k = 0; k < r.r.size(); ++k) {
        INFO("rotation " << k);
        const auto& x = r.r[k];
        CHECK((x - start.r[k]).norm() > (k == 0 ? 1e-2f : 1e-3f));  // it moved (R2s less: R1's gradient dominates the joint norm)
        CHECK((x * x.transpose() - rmat<float>::Identity(x.rows(), x.cols())).cwiseAbs().maxCoeff() < 1e-4f);
    }
}
