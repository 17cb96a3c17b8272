// The recipe end to end on the shipped stories260K checkpoint, small enough for a unit test: the
// rotated full-precision model (R1, R2, the online R3/R4) computes the same logits as the
// original; rotation learning lowers its objective and keeps the rotations orthonormal; and on
// real text, W4A4KV4 with rotations beats plain RTN.
#include "support/catch.hpp"

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

#include <spinquant/stiefel.hpp>

#include "eval.hpp"
#include "forward.hpp"
#include "llama_test_support.hpp"
#include "quant.hpp"
#include "rotate.hpp"

namespace {

std::vector<int> some_tokens(std::size_t n)
{
    std::vector<int> t = {llama::bos_id};
    for (std::size_t i = 1; i < n; ++i) t.push_back(static_cast<int>((i * 37 + 11) % 512));
    return t;
}

llama::rows logits_of(const llama::model& m, const llama::activation_hooks& hooks, std::span<const int> tokens)
{
    llama::kv_cache cache(m.config);
    llama::workspace ws(m.config);
    llama::rows logits;
    llama::forward(m, tokens, 0, cache, hooks, ws, logits);
    return logits;
}

}  // namespace

TEST_CASE("the rotated full-precision model computes the original function", "[llama][rotate]")
{
    const llama::model& fp = llama::test::stories260k();
    const auto tokens = some_tokens(64);
    const llama::rows expected = logits_of(fp, {}, tokens);
    const llama::online_rotations online(fp.config);
    const auto rotations = llama::random_hadamard_rotations(fp.config, 7);
    const llama::model rotated = llama::rotated_model(fp, rotations, &online);
    llama::quant_config q;  // 16 bits everywhere: only the online R3/R4 act
    q.online_r3 = q.online_r4 = true;
    const llama::rows got = logits_of(rotated, llama::make_quant_hooks(fp.config, q, &online), tokens);
    const float scale = expected.cwiseAbs().maxCoeff();
    CHECK((got - expected).cwiseAbs().maxCoeff() < 2e-4f * scale);
    // ...and it is a different set of weights.
    CHECK((llama::detail::map(rotated.layers[0].wq) - llama::detail::map(fp.layers[0].wq)).cwiseAbs().maxCoeff() > 0.05f);
    // The same seed gives the same rotations.
    CHECK(llama::random_hadamard_rotations(fp.config, 7).r1 == rotations.r1);
    CHECK(llama::random_hadamard_rotations(fp.config, 8).r1 != rotations.r1);
}

TEST_CASE("learning lowers the layer-wise objective and keeps rotations orthonormal", "[llama][rotate]")
{
    const llama::model& fp = llama::test::stories260k();
    const auto calib = llama::sample_sequences(fp, 4, 128, 2);
    llama::learning_options o;
    o.steps = 12;
    llama::learning_report rep;
    const auto r = llama::learn_rotations(fp, calib, llama::quant_config::bits(4, 4, 4), 1, o, 512, &rep);
    CHECK(rep.last < rep.first);
    REQUIRE(rep.r2_last.size() == fp.config.n_layers);
    REQUIRE(rep.r2_first.size() == fp.config.n_layers);
    CHECK(spinquant::max_orthonormality_error(r.r1) < 1e-5);
    for (const auto& r2 : r.r2) CHECK(spinquant::max_orthonormality_error(r2) < 1e-5);
    CHECK(r.r1 != llama::random_hadamard_rotations(fp.config, 1).r1);  // it moved from its start
}

TEST_CASE("on real text W4A4KV4 with rotations beats plain RTN", "[llama][rotate]")
{
    const auto text = llama::test::real_text();
    if (!text) return;
    const llama::model& fp = llama::test::stories260k();
    const auto stream = llama::tokenize_blocks(llama::test::tok512(), *text);
    const auto split = llama::split_at_byte(stream, 537401);
    const auto eval = llama::make_windows(split.evaluation, 256, 2048);
    const auto calib = llama::make_windows(split.calibration, 256, 1024);
    const auto ref = llama::make_reference(fp, eval);
    const llama::online_rotations online(fp.config);
    auto q = llama::quant_config::bits(4, 4, 4);
    const auto w4 = llama::quant_config::bits(4, 16, 16);

    llama::model plain = fp;
    llama::quantize_weights_rtn(plain, w4);
    const double ppl_rtn = llama::evaluate(plain, llama::make_quant_hooks(fp.config, q, &online), eval, ref).ppl;

    llama::learning_options o;
    o.steps = 20;
    const auto learned = llama::learn_rotations(fp, calib, q, 0, o, 1024);
    llama::model had = llama::rotated_model(fp, learned, &online);
    llama::quantize_weights_rtn(had, w4);
    q.online_r3 = q.online_r4 = true;
    const double ppl_had = llama::evaluate(had, llama::make_quant_hooks(fp.config, q, &online), eval, ref).ppl;
    INFO("W4A4KV4 perplexity: plain RTN " << ppl_rtn << ", learned R1/R2 + R3/R4 " << ppl_had << ", FP " << ref.fp.ppl);
    CHECK(ref.fp.ppl < ppl_had);
    CHECK(ppl_had < 0.95 * ppl_rtn);
}
