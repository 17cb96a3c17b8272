#include "support/catch.hpp"

#include <cmath>
#include <cstddef>
#include <random>
#include <string>
#include <vector>

#include <Eigen/QR>

#include "forward.hpp"
#include "generate.hpp"
#include "llama_test_support.hpp"
#include "reference_forward.hpp"

using llama::rows;
using llama::test::stories260k;
using llama::test::tok512;

namespace {

// The greedy sample printed in llama2.c's doc/stories260K.md (`run stories260K.bin -z tok512.bin
// -t 0.0`, 256 steps from BOS).
constexpr const char* documented_sample =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to "
    "play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she said, \"I'm sorry, mom. I didn't know what to do.\" Her mom said, "
    "\"Don't worry, Lily. We can help you.";

std::vector<int> some_tokens()
{
    return tok512().encode("Once there was a boy named Tony. He loved sailing in his boat.\nOne day he saw a fish.",
                           true, false);
}

rows run(const llama::model& m, const std::vector<int>& tokens, const llama::activation_hooks& hooks = {},
         llama::forward_trace* trace = nullptr)
{
    llama::kv_cache cache(m.config);
    llama::workspace ws(m.config);
    rows logits;
    llama::forward(m, tokens, 0, cache, hooks, ws, logits, trace);
    return logits;
}

float max_abs_diff(const rows& a, const rows& b)
{
    REQUIRE(a.rows() == b.rows());
    REQUIRE(a.cols() == b.cols());
    return (a - b).cwiseAbs().maxCoeff();
}

// A Haar-random orthogonal matrix (QR of a Gaussian), for invariance tests.
Eigen::MatrixXf random_orthogonal(Eigen::Index n, std::uint64_t seed)
{
    std::mt19937_64 rng(seed);
    spinquant::detail::normal_sampler normal;
    Eigen::MatrixXd g(n, n);
    for (Eigen::Index i = 0; i < n; ++i)
        for (Eigen::Index j = 0; j < n; ++j) g(i, j) = normal(rng);
    const Eigen::MatrixXd q = Eigen::HouseholderQR<Eigen::MatrixXd>(g).householderQ();
    return q.cast<float>();
}

// x <- x * blockdiag(R, R, ...) on each head-sized block of columns.
void rotate_heads(spinquant::matrix_view<float> x, const Eigen::MatrixXf& r)
{
    auto e = spinquant::as_eigen(x);
    const auto hs = r.rows();
    for (Eigen::Index h = 0; h < e.cols(); h += hs) e.middleCols(h, hs) = (e.middleCols(h, hs) * r).eval();
}

}  // namespace

TEST_CASE("greedy decoding from BOS reproduces the documented stories260K sample token for token", "[llama][forward]")
{
    const int bos[1] = {llama::bos_id};
    const auto ids = llama::generate_greedy(stories260k(), {}, bos, 256);
    REQUIRE(ids.size() == 256);
    CHECK(tok512().decode(ids, llama::bos_id) == documented_sample);
    // The sample's canonical tokenization is exactly the generated sequence.
    auto expected = tok512().encode(documented_sample, true, false);
    expected.erase(expected.begin());
    CHECK(ids == expected);
}

TEST_CASE("the float forward pass matches a naive double-precision forward pass", "[llama][forward]")
{
    const auto& m = stories260k();
    const auto tokens = some_tokens();
    const rows logits = run(m, tokens);
    const auto ref = llama::test::reference_logits(m, tokens);
    double worst = 0.0, scale = 0.0;
    for (std::size_t t = 0; t < tokens.size(); ++t)
        for (std::size_t v = 0; v < m.config.vocab_size; ++v) {
            const auto ti = static_cast<Eigen::Index>(t), vi = static_cast<Eigen::Index>(v);
            worst = std::max(worst, std::abs(static_cast<double>(logits(ti, vi)) - ref[t][v]));
            scale = std::max(scale, std::abs(ref[t][v]));
        }
    INFO("max |float - double| = " << worst << " for logits up to " << scale);
    // Float rounding through 5 blocks of sums of <= 172 terms: 64 ulps of the largest
    // logit bounds it comfortably; a wrong index or a missing term is off by O(1).
    CHECK(worst < 64 * static_cast<double>(std::numeric_limits<float>::epsilon()) * scale);
}

TEST_CASE("a window processed at once, in chunks, or token by token gives the same logits", "[llama][forward]")
{
    const auto& m = stories260k();
    const auto tokens = some_tokens();
    const rows whole = run(m, tokens);
    for (const std::size_t chunk : {std::size_t{1}, std::size_t{7}}) {
        llama::kv_cache cache(m.config);
        llama::workspace ws(m.config);
        rows part, all(whole.rows(), whole.cols());
        for (std::size_t p = 0; p < tokens.size(); p += chunk) {
            const std::size_t n = std::min(chunk, tokens.size() - p);
            llama::forward(m, std::span<const int>(tokens).subspan(p, n), p, cache, {}, ws, part);
            all.middleRows(static_cast<Eigen::Index>(p), static_cast<Eigen::Index>(n)) = part;
        }
        CHECK(cache.length == tokens.size());
        CHECK(max_abs_diff(all, whole) < 1e-4f);
    }
}

TEST_CASE("each hook sees its site's shape once per block and per forward", "[llama][forward][hooks]")
{
    const auto& m = stories260k();
    const auto& c = m.config;
    const auto tokens = some_tokens();
    std::vector<std::string> calls;
    const auto record = [&](const char* site, std::size_t cols) {
        return [&calls, site, cols, n = tokens.size()](std::size_t layer, spinquant::matrix_view<float> x) {
            CHECK(x.rows == n);
            CHECK(x.cols == cols);
            CHECK(x.is_contiguous());
            calls.push_back(std::string(site) + std::to_string(layer));
        };
    };
    llama::activation_hooks hooks;
    hooks.attn_input = record("attn", c.dim);
    hooks.query = record("q", c.dim);
    hooks.key = record("k", c.kv_dim());
    hooks.value = record("v", c.kv_dim());
    hooks.o_input = record("o", c.dim);
    hooks.ffn_input = record("ffn", c.dim);
    hooks.down_input = record("down", c.hidden_dim);
    const rows with_hooks = run(m, tokens, hooks);
    std::vector<std::string> expected;
    for (std::size_t l = 0; l < c.n_layers; ++l)
        for (const char* s : {"attn", "q", "k", "v", "o", "ffn", "down"}) expected.push_back(s + std::to_string(l));
    CHECK(calls == expected);
    // Hooks that do not change the data leave the logits bit for bit.
    CHECK(max_abs_diff(with_hooks, run(m, tokens)) == 0.0f);
}

TEST_CASE("hooks act where the reference places quantizers: changing a site changes the output", "[llama][forward][hooks]")
{
    const auto& m = stories260k();
    const auto tokens = some_tokens();
    const rows base = run(m, tokens);
    const auto coarse = [](std::size_t, spinquant::matrix_view<float> x) {
        for (std::size_t i = 0; i < x.rows; ++i)
            for (float& v : x.row(i)) v = std::round(v * 2.0f) / 2.0f;
    };
    for (int site = 0; site < 7; ++site) {
        llama::activation_hooks hooks;
        llama::activation_hook* slots[7] = {&hooks.attn_input, &hooks.query, &hooks.key, &hooks.value,
                                            &hooks.o_input, &hooks.ffn_input, &hooks.down_input};
        *slots[site] = coarse;
        INFO("site " << site);
        CHECK(max_abs_diff(run(m, tokens, hooks), base) > 1e-3f);
    }
}

TEST_CASE("an orthogonal R3 on queries and keys of every head leaves the model unchanged", "[llama][forward][hooks]")
{
    // Scores are q·k per head, so rotating both by the same orthogonal matrix cancels (R3's site).
    const auto& m = stories260k();
    const auto tokens = some_tokens();
    const Eigen::MatrixXf r = random_orthogonal(8, 3);
    llama::activation_hooks hooks;
    hooks.query = [&](std::size_t, spinquant::matrix_view<float> x) { rotate_heads(x, r); };
    hooks.key = hooks.query;
    CHECK(max_abs_diff(run(m, tokens, hooks), run(m, tokens)) < 1e-4f);
    // Rotating only the keys breaks it (negative control).
    llama::activation_hooks keys_only;
    keys_only.key = hooks.query;
    CHECK(max_abs_diff(run(m, tokens, keys_only), run(m, tokens)) > 1e-2f);
}

TEST_CASE("an online R4 on the down_proj input with its transpose merged into w2 leaves the model unchanged",
          "[llama][forward][hooks]")
{
    const auto& fp = stories260k();
    const auto tokens = some_tokens();
    const Eigen::MatrixXf r = random_orthogonal(172, 4);
    llama::model merged = fp;
    for (auto& lw : merged.layers) {
        auto w2 = spinquant::as_eigen(lw.w2.view());
        w2 = (w2 * r).eval();  // W2 x = (W2 R)(Rᵀ x)
    }
    llama::activation_hooks hooks;
    hooks.down_input = [&](std::size_t, spinquant::matrix_view<float> x) {
        auto e = spinquant::as_eigen(x);
        e = (e * r).eval();  // rows are tokens: x -> Rᵀ x is row * R
    };
    CHECK(max_abs_diff(run(merged, tokens, hooks), run(fp, tokens)) < 1e-3f);
    CHECK(max_abs_diff(run(merged, tokens), run(fp, tokens)) > 1e-2f);  // without the online half it breaks
}

TEST_CASE("a per-head rotation of the o_proj input with wo compensated leaves the model unchanged", "[llama][forward][hooks]")
{
    const auto& fp = stories260k();
    const auto tokens = some_tokens();
    const Eigen::MatrixXf r = random_orthogonal(8, 5);
    llama::model merged = fp;
    for (auto& lw : merged.layers) {
        auto wo = spinquant::as_eigen(lw.wo.view());
        for (Eigen::Index h = 0; h < wo.cols(); h += 8) wo.middleCols(h, 8) = (wo.middleCols(h, 8) * r).eval();
    }
    llama::activation_hooks hooks;
    hooks.o_input = [&](std::size_t, spinquant::matrix_view<float> x) { rotate_heads(x, r); };
    CHECK(max_abs_diff(run(merged, tokens, hooks), run(fp, tokens)) < 1e-3f);
}

TEST_CASE("the trace records what every operation consumed and produced", "[llama][forward][trace]")
{
    const auto& m = stories260k();
    const auto& c = m.config;
    const auto tokens = some_tokens();
    const auto T = static_cast<Eigen::Index>(tokens.size());
    llama::activation_hooks hooks;
    hooks.value = [](std::size_t, spinquant::matrix_view<float> x) {
        for (std::size_t i = 0; i < x.rows; ++i)
            for (float& v : x.row(i)) v *= 0.5f;
    };
    llama::forward_trace trace;
    const rows logits = run(m, tokens, hooks, &trace);
    REQUIRE(trace.layers.size() == c.n_layers);
    for (std::size_t l = 0; l < c.n_layers; ++l) {
        const auto& tr = trace.layers[l];
        const auto& w = m.layers[l];
        INFO("layer " << l);
        CHECK(tr.input.rows() == T);
        CHECK(tr.v.isApprox(0.5f * tr.v_raw));
        CHECK(tr.q == tr.q_raw);  // no query hook
        // The next block's input is this block's output: mid + w2 (down_in).
        const rows out = tr.mid + tr.down_in * llama::detail::map(w.w2).transpose();
        const rows& next = l + 1 < c.n_layers ? trace.layers[l + 1].input : trace.final_input;
        CHECK((out - next).cwiseAbs().maxCoeff() < 1e-5f);
        // RMSNorm: attn_in_raw = g * x / rms(x).
        for (Eigen::Index t = 0; t < T; ++t) {
            const float rms = std::sqrt(tr.input.row(t).squaredNorm() / static_cast<float>(c.dim) + 1e-5f);
            CHECK(std::abs(tr.attn_rms[t] * rms - 1.0f) < 1e-5f);
        }
        // Attention probabilities: causal rows that sum to one; o = P V per head.
        REQUIRE(tr.probs.size() == c.n_heads);
        for (std::size_t h = 0; h < c.n_heads; ++h) {
            const rows& p = tr.probs[h];
            REQUIRE(p.rows() == T);
            REQUIRE(p.cols() == T);
            for (Eigen::Index t = 0; t < T; ++t) {
                CHECK(std::abs(p.row(t).sum() - 1.0f) < 1e-5f);
                if (t + 1 < T) CHECK(p.row(t).tail(T - t - 1).cwiseAbs().maxCoeff() == 0.0f);
            }
            const auto hs = static_cast<Eigen::Index>(c.head_size());
            const auto kvh = static_cast<Eigen::Index>(h / c.kv_group());
            const rows o = p * tr.v.middleCols(kvh * hs, hs);
            CHECK((o - tr.o_raw.middleCols(static_cast<Eigen::Index>(h) * hs, hs)).cwiseAbs().maxCoeff() < 1e-5f);
        }
    }
    const rows expected = trace.final_normed * llama::detail::map(m.classifier).transpose();
    CHECK((expected - logits).cwiseAbs().maxCoeff() < 1e-4f);
}

TEST_CASE("forward rejects bad tokens and positions before writing anything", "[llama][forward][errors]")
{
    const auto& m = stories260k();
    llama::kv_cache cache(m.config);
    llama::workspace ws(m.config);
    rows logits = rows::Constant(2, 3, 7.0f);
    const rows before = logits;
    const std::vector<int> bad_id = {1, 512};
    CHECK_THROWS_AS(llama::forward(m, bad_id, 0, cache, {}, ws, logits), spinquant::error);
    const std::vector<int> negative = {-1};
    CHECK_THROWS_AS(llama::forward(m, negative, 0, cache, {}, ws, logits), spinquant::error);
    const std::vector<int> ok = {1, 403};
    CHECK_THROWS_AS(llama::forward(m, ok, 5, cache, {}, ws, logits), spinquant::error);  // cache holds 0
    CHECK(cache.length == 0);
    CHECK(logits == before);
    llama::kv_cache small(m.config, 4);
    const std::vector<int> five = {1, 403, 407, 261, 378};
    try {
        llama::forward(m, five, 0, small, {}, ws, logits);
        FAIL("expected an error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == spinquant::errc::bad_shape);
        CHECK(std::string(e.what()).find("exceed the context of 4") != std::string::npos);
    }
    CHECK(logits == before);
    CHECK_THROWS_AS(llama::generate_greedy(m, {}, std::span<const int>(), 4), spinquant::error);
}
