#include "support/catch.hpp"

#include <cmath>
#include <set>
#include <string>
#include <vector>

#include <spinquant/quantizer.hpp>

#include "llama_test_support.hpp"
#include "quant.hpp"

using llama::rows;
using llama::test::stories260k;
using llama::test::tok512;

namespace {

std::vector<int> some_tokens()
{
    return tok512().encode("Once there was a boy named Tony. He loved sailing in his boat.\nOne day he saw a fish.",
                           true, false);
}

rows run(const llama::model& m, const llama::activation_hooks& hooks, llama::forward_trace* trace = nullptr,
         llama::kv_cache* cache_out = nullptr)
{
    const auto tokens = some_tokens();
    llama::kv_cache cache(m.config);
    llama::workspace ws(m.config);
    rows logits;
    llama::forward(m, tokens, 0, cache, hooks, ws, logits, trace);
    if (cache_out) *cache_out = cache;
    return logits;
}

// Largest number of distinct values in any run of `width` consecutive elements of a row.
std::size_t max_levels(const rows& x, Eigen::Index width)
{
    std::size_t worst = 0;
    for (Eigen::Index t = 0; t < x.rows(); ++t)
        for (Eigen::Index c = 0; c < x.cols(); c += width) {
            std::set<float> levels;
            for (Eigen::Index j = c; j < c + width; ++j) levels.insert(x(t, j));
            worst = std::max(worst, levels.size());
        }
    return worst;
}

// The dense online transform of a plan, applied to rows: x -> x M^T per block of M's size.
rows dense_rows(const rows& x, const spinquant::hadamard_plan<float>& plan)
{
    const auto n = static_cast<Eigen::Index>(plan.size());
    const auto md = plan.matrix();
    Eigen::MatrixXd mt(n, n);
    for (Eigen::Index i = 0; i < n; ++i)
        for (Eigen::Index j = 0; j < n; ++j) mt(j, i) = static_cast<double>(md[static_cast<std::size_t>(i * n + j)]);
    rows out(x.rows(), x.cols());
    for (Eigen::Index c = 0; c < x.cols(); c += n)
        out.middleCols(c, n) = (x.middleCols(c, n).cast<double>() * mt).cast<float>();
    return out;
}

float max_abs_diff(const rows& a, const rows& b) { return (a - b).cwiseAbs().maxCoeff(); }

// The whole matrix's range extended to 0: at least the range of any unit, so range / 15 bounds
// every unit's 4-bit step and half of it the rounding error.
float range_of(const rows& x) { return std::max(x.maxCoeff(), 0.0f) - std::min(x.minCoeff(), 0.0f); }

}  // namespace

TEST_CASE("a configuration that quantizes nothing installs no hooks", "[llama][quant]")
{
    const auto hooks = llama::make_quant_hooks(stories260k().config, llama::quant_config{});
    CHECK_FALSE(hooks.attn_input);
    CHECK_FALSE(hooks.query);
    CHECK_FALSE(hooks.key);
    CHECK_FALSE(hooks.value);
    CHECK_FALSE(hooks.o_input);
    CHECK_FALSE(hooks.ffn_input);
    CHECK_FALSE(hooks.down_input);
    CHECK(llama::quant_config::bits(4, 4, 4).label() == "W4A4KV4");
}

TEST_CASE("online R3 and R4 with R4 merged into down_proj leave the full-precision model unchanged", "[llama][quant]")
{
    const auto& fp = stories260k();
    const llama::online_rotations rot(fp.config);
    CHECK(rot.r3.size() == 8);
    CHECK(rot.r4.size() == 172);
    CHECK(rot.r4.order() == 172);  // the reference's had172, 172 = 172 * 2^0
    llama::quant_config q;
    q.online_r3 = q.online_r4 = true;
    llama::model merged = fp;
    llama::merge_r4(merged, rot);
    const auto hooks = llama::make_quant_hooks(fp.config, q, &rot);
    CHECK(max_abs_diff(run(merged, hooks), run(fp, {})) < 1e-3f);
    // Each half alone changes the function (the test could fail).
    CHECK(max_abs_diff(run(fp, hooks), run(fp, {})) > 1e-2f);
    CHECK(max_abs_diff(run(merged, {}), run(fp, {})) > 1e-2f);
}

TEST_CASE("activations, keys and values are quantized at the reference's sites", "[llama][quant]")
{
    const auto& fp = stories260k();
    const auto& c = fp.config;
    const auto hs = static_cast<Eigen::Index>(c.head_size());
    const llama::online_rotations rot(c);
    auto q = llama::quant_config::bits(16, 4, 4);
    q.online_r3 = q.online_r4 = true;
    llama::model m = fp;
    llama::merge_r4(m, rot);
    llama::forward_trace trace;
    llama::kv_cache cache(c);
    (void)run(m, llama::make_quant_hooks(c, q, &rot), &trace, &cache);
    const auto a_token = spinquant::quant_spec::activation(4);
    const auto per_head = spinquant::quant_spec::activation(4, false, c.head_size());
    for (std::size_t l = 0; l < c.n_layers; ++l) {
        const auto& tr = trace.layers[l];
        INFO("layer " << l);
        // Linear inputs: what the library's per-token quantizer gives for the raw activations.
        rows expect = tr.attn_in_raw;
        spinquant::fake_quantize(spinquant::as_matrix_view(expect), a_token);
        CHECK(tr.attn_in == expect);
        expect = tr.ffn_in_raw;
        spinquant::fake_quantize(spinquant::as_matrix_view(expect), a_token);
        CHECK(tr.ffn_in == expect);
        CHECK(max_levels(tr.attn_in, tr.attn_in.cols()) <= 16);
        // o_proj input: per head (16 levels per head, more across the token).
        expect = tr.o_raw;
        spinquant::fake_quantize(spinquant::as_matrix_view(expect), per_head);
        CHECK(tr.o == expect);
        CHECK(max_levels(tr.o, hs) <= 16);
        CHECK(max_levels(tr.o, tr.o.cols()) > 16);
        // Queries: R3 only (dense reference transform, never quantized).
        CHECK(max_abs_diff(tr.q, dense_rows(tr.q_raw, rot.r3)) < 1e-5f);
        // Keys: R3, then 4 bits per head; the cache holds exactly what attention used.
        const rows k_rotated = dense_rows(tr.k_raw, rot.r3);
        CHECK(max_levels(tr.k, hs) <= 16);
        const float k_step = range_of(k_rotated) / 15.0f;
        CHECK(max_abs_diff(tr.k, k_rotated) <= 0.5f * k_step + 1e-5f);
        CHECK(cache.keys[l].topRows(tr.k.rows()) == tr.k);
        // Values: 4 bits per head, no rotation.
        expect = tr.v_raw;
        spinquant::fake_quantize(spinquant::as_matrix_view(expect), per_head);
        CHECK(tr.v == expect);
        CHECK(cache.values[l].topRows(tr.v.rows()) == tr.v);
        // down_proj input: R4 (dense reference), then per token.
        expect = dense_rows(tr.down_in_raw, rot.r4);
        const float d_step = range_of(expect) / 15.0f;
        CHECK(max_levels(tr.down_in, tr.down_in.cols()) <= 16);
        CHECK(max_abs_diff(tr.down_in, expect) <= 0.5f * d_step + 1e-4f);
    }
}

TEST_CASE("RTN quantizes every linear weight per output channel and leaves embedding and classifier", "[llama][quant]")
{
    const auto& fp = stories260k();
    llama::model m = fp;
    llama::quantize_weights_rtn(m, llama::quant_config::bits(4, 16, 16));
    CHECK(m.token_embedding.data == fp.token_embedding.data);
    CHECK(m.classifier.data == fp.classifier.data);
    CHECK(m.final_norm == fp.final_norm);
    const auto spec = spinquant::quant_spec::weight(4, true, 0, true);
    for (std::size_t l = 0; l < m.layers.size(); ++l) {
        const auto& got = m.layers[l];
        const auto& orig = fp.layers[l];
        CHECK(got.attn_norm == orig.attn_norm);
        const llama::matrix* pairs[7][2] = {{&got.wq, &orig.wq}, {&got.wk, &orig.wk}, {&got.wv, &orig.wv},
                                            {&got.wo, &orig.wo}, {&got.w1, &orig.w1}, {&got.w2, &orig.w2},
                                            {&got.w3, &orig.w3}};
        for (const auto& p : pairs) {
            llama::matrix expect = *p[1];
            spinquant::fake_quantize(expect.view(), spec);
            CHECK(p[0]->data == expect.data);
            CHECK(p[0]->data != p[1]->data);
            for (std::size_t r = 0; r < p[0]->rows; ++r) {
                const auto row = p[0]->view().row(r);
                REQUIRE(std::set<float>(row.begin(), row.end()).size() <= 16);
            }
        }
    }
    llama::model same = fp;
    llama::quantize_weights_rtn(same, llama::quant_config{});  // 16 bits: nothing to do
    CHECK(same.layers[0].wq.data == fp.layers[0].wq.data);
}

TEST_CASE("online R3 and R4 lower the W4A4KV4 error on text sampled from the model", "[llama][quant]")
{
    const auto& fp = stories260k();
    const llama::online_rotations rot(fp.config);
    const auto set = llama::sample_sequences(fp, 4, 64, 3);
    const auto ref = llama::make_reference(fp, set);
    double kl[2] = {};
    for (const bool rotate : {false, true}) {
        auto q = llama::quant_config::bits(4, 4, 4);
        q.online_r3 = q.online_r4 = rotate;
        llama::model m = fp;
        if (rotate) llama::merge_r4(m, rot);
        llama::quantize_weights_rtn(m, q);
        const auto r = llama::evaluate(m, llama::make_quant_hooks(m.config, q, &rot), set, ref);
        CHECK(r.ppl > ref.fp.ppl);
        kl[rotate ? 1 : 0] = r.kl;
    }
    INFO("KL to FP without rotation " << kl[0] << ", with R3 + R4 " << kl[1]);
    CHECK(kl[1] < 0.9 * kl[0]);
}

TEST_CASE("a bad quantization setting is rejected when the hooks are made", "[llama][quant][errors]")
{
    const auto& c = stories260k().config;
    for (const int bits : {0, 1, 17}) {
        INFO(bits);
        CHECK_THROWS_AS(llama::make_quant_hooks(c, llama::quant_config::bits(16, bits, 16)), spinquant::error);
        CHECK_THROWS_AS(llama::make_quant_hooks(c, llama::quant_config::bits(16, 16, bits)), spinquant::error);
        llama::model m = stories260k();
        CHECK_THROWS_AS(llama::quantize_weights_rtn(m, llama::quant_config::bits(bits, 16, 16)), spinquant::error);
        CHECK(m.layers[0].wq.data == stories260k().layers[0].wq.data);
    }
    auto q = llama::quant_config::bits(16, 4, 16);
    q.a_clip = 1.5;
    CHECK_THROWS_AS(llama::make_quant_hooks(c, q), spinquant::error);
    llama::quant_config r3;
    r3.online_r3 = true;
    try {
        (void)llama::make_quant_hooks(c, r3);
        FAIL("expected an error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == spinquant::errc::bad_argument);
        CHECK(std::string(e.what()).find("online_rotations") != std::string::npos);
    }
}

TEST_CASE("GPTQ quantizes block by block with the Hessians of the reference's sequential procedure", "[llama][quant][gptq]")
{
    const auto& fp = stories260k();
    const auto& c = fp.config;
    const auto calib = llama::sample_sequences(fp, 3, 24, 21);
    const auto q = llama::quant_config::bits(4, 16, 16);
    llama::model got = fp;
    llama::quantize_weights_gptq(got, q, calib);
    const auto spec = spinquant::quant_spec::weight(4, true, 0, true);

    // Independently: the inputs of block 0's linears over the calibration set, given a model.
    const auto inputs = [&](const llama::model& m, llama::rows llama::layer_trace::*site, std::size_t cols) {
        spinquant::hessian_accumulator acc(cols);
        for (const auto& s : calib.sequences) {
            llama::kv_cache cache(c);
            llama::workspace ws(c);
            llama::rows x;
            llama::layer_trace tr;
            llama::embed(m, std::span<const int>(s).first(s.size() - 1), x);
            llama::forward_layer(m, 0, x, 0, cache, {}, ws, &tr);
            acc.add_batch(tr.*site, 1);
        }
        return acc.hessian();
    };
    const auto gptq = [&](const llama::matrix& w, const Eigen::MatrixXd& h) {
        return spinquant::gptq(w.view(), h, spec).weight;
    };
    const auto same = [](const llama::matrix& w, const llama::rows& expect) {
        return spinquant::as_eigen(w.view()) == expect;
    };
    // q, k, v from the full-precision inputs (nothing is quantized before them).
    const Eigen::MatrixXd h_attn = inputs(fp, &llama::layer_trace::attn_in, c.dim);
    CHECK(same(got.layers[0].wq, gptq(fp.layers[0].wq, h_attn)));
    CHECK(same(got.layers[0].wk, gptq(fp.layers[0].wk, h_attn)));
    CHECK(same(got.layers[0].wv, gptq(fp.layers[0].wv, h_attn)));
    // o_proj from the attention output of quantized q, k, v.
    llama::model step = fp;
    step.layers[0].wq = got.layers[0].wq;
    step.layers[0].wk = got.layers[0].wk;
    step.layers[0].wv = got.layers[0].wv;
    CHECK(same(got.layers[0].wo, gptq(fp.layers[0].wo, inputs(step, &llama::layer_trace::o, c.dim))));
    CHECK_FALSE(same(got.layers[0].wo, gptq(fp.layers[0].wo, inputs(fp, &llama::layer_trace::o, c.dim))));
    // The classifier, embedding and norms are left alone; every weight row has at most 16 levels.
    CHECK(got.classifier.data == fp.classifier.data);
    CHECK(got.token_embedding.data == fp.token_embedding.data);
    for (const auto& lw : got.layers)
        for (const llama::matrix* w : {&lw.wq, &lw.wk, &lw.wv, &lw.wo, &lw.w1, &lw.w2, &lw.w3})
            for (std::size_t r = 0; r < w->rows; ++r) {
                const auto row = w->view().row(r);
                REQUIRE(std::set<float>(row.begin(), row.end()).size() <= 16);
            }
}

TEST_CASE("GPTQ weights are closer to full precision than RTN weights on held-out sampled text", "[llama][quant][gptq]")
{
    const auto& fp = stories260k();
    const auto calib = llama::sample_sequences(fp, 8, 128, 31);  // calibration and evaluation seeds differ
    const auto set = llama::sample_sequences(fp, 4, 64, 32);
    const auto ref = llama::make_reference(fp, set);
    const auto q = llama::quant_config::bits(4, 16, 16);
    llama::model rtn = fp, gptq = fp;
    llama::quantize_weights_rtn(rtn, q);
    llama::quantize_weights_gptq(gptq, q, calib);
    const double kl_rtn = llama::evaluate(rtn, {}, set, ref).kl;
    const double kl_gptq = llama::evaluate(gptq, {}, set, ref).kl;
    INFO("KL to FP: RTN " << kl_rtn << ", GPTQ " << kl_gptq);
    CHECK(kl_gptq < kl_rtn);
}

TEST_CASE("GPTQ with the online R4 sees down_proj's rotated input and keeps the model's function", "[llama][quant][gptq]")
{
    const auto& fp = stories260k();
    const llama::online_rotations rot(fp.config);
    const auto calib = llama::sample_sequences(fp, 2, 24, 41);
    auto q = llama::quant_config::bits(8, 16, 16);
    q.online_r4 = true;
    llama::model m = fp;
    llama::merge_r4(m, rot);
    llama::quantize_weights_gptq(m, q, calib, &rot);
    // At 8 bits the quantized model must stay close to FP, which it only does when down_proj was
    // quantized for the rotated inputs it will see.
    const auto set = llama::sample_sequences(fp, 2, 32, 42);
    const auto ref = llama::make_reference(fp, set);
    const auto with_r4 = llama::evaluate(m, llama::make_quant_hooks(m.config, q, &rot), set, ref);
    CHECK(with_r4.kl < 0.01);
    CHECK(llama::evaluate(m, {}, set, ref).kl > 0.1);  // without the online half: broken
}

TEST_CASE("GPTQ rejects a bad setting or calibration set and leaves the model alone", "[llama][quant][gptq][errors]")
{
    const auto& fp = stories260k();
    const auto calib = llama::sample_sequences(fp, 1, 8, 1);
    llama::model m = fp;
    CHECK_THROWS_AS(llama::quantize_weights_gptq(m, llama::quant_config::bits(1, 16, 16), calib), spinquant::error);
    CHECK_THROWS_AS(llama::quantize_weights_gptq(m, llama::quant_config::bits(4, 16, 16), llama::eval_set{}),
                    spinquant::error);
    auto r4 = llama::quant_config::bits(4, 16, 16);
    r4.online_r4 = true;
    CHECK_THROWS_AS(llama::quantize_weights_gptq(m, r4, calib), spinquant::error);
    const llama::eval_set bad{{{1, 600, 3}}};
    CHECK_THROWS_AS(llama::quantize_weights_gptq(m, llama::quant_config::bits(4, 16, 16), bad), spinquant::error);
    CHECK(m.layers[0].wq.data == fp.layers[0].wq.data);
    CHECK(m.layers[4].w2.data == fp.layers[4].w2.data);
    llama::quantize_weights_gptq(m, llama::quant_config{}, calib);  // 16 bits: nothing to do
    CHECK(m.layers[2].w1.data == fp.layers[2].w1.data);
}
