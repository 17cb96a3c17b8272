#include "support/catch.hpp"

#include <cmath>
#include <limits>
#include <string>

#include "llama_test_support.hpp"
#include "model.hpp"

using llama::test::header;
using llama::test::index_value;
using llama::test::make_checkpoint;

namespace {

// Expects parse_checkpoint to fail with `code` and a message containing `needle`.
void require_rejected(const std::vector<std::byte>& bytes, spinquant::errc code, const std::string& needle)
{
    try {
        (void)llama::parse_checkpoint(bytes, "test.bin");
        FAIL("expected the checkpoint to be rejected (" << needle << ")");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == code);
        const std::string what = e.what();
        INFO(what);
        CHECK(what.find("llama::parse_checkpoint") != std::string::npos);
        CHECK(what.find("test.bin") != std::string::npos);
        CHECK(what.find(needle) != std::string::npos);
    }
}

}  // namespace

TEST_CASE("the shipped stories260K checkpoint has the documented shape", "[llama][model]")
{
    const auto& m = llama::test::stories260k();
    const auto& c = m.config;
    CHECK(c.dim == 64);
    CHECK(c.hidden_dim == 172);
    CHECK(c.n_layers == 5);
    CHECK(c.n_heads == 8);
    CHECK(c.n_kv_heads == 4);
    CHECK(c.vocab_size == 512);
    CHECK(c.seq_len == 512);
    CHECK(c.shared_classifier);
    CHECK(c.head_size() == 8);
    CHECK(c.kv_dim() == 32);
    CHECK(c.kv_group() == 2);
    CHECK(c.parameter_count() == 260032);  // data/README.md
    REQUIRE(m.layers.size() == 5);
    CHECK(m.layers[4].w2.rows == 64);
    CHECK(m.layers[4].w2.cols == 172);
    CHECK(m.layers[0].wk.rows == 32);
    // A tied file gets the embedding as its classifier, in a buffer of its own.
    CHECK(m.classifier.data == m.token_embedding.data);
    CHECK(m.classifier.data.data() != m.token_embedding.data.data());
}

TEST_CASE("every tensor of a synthetic checkpoint lands in its place", "[llama][model]")
{
    for (const bool tied : {true, false}) {
        header h;
        if (!tied) h.vocab_size = -h.vocab_size;
        const auto bytes = make_checkpoint(h, index_value);
        const auto m = llama::parse_checkpoint(bytes);
        const std::size_t d = 16, hid = 24, L = 2, V = 20, kv = 8;
        CHECK(m.config.shared_classifier == tied);
        CHECK(m.config.vocab_size == V);
        // Walk the file order independently of the loader and compare every float.
        std::size_t i = 0;
        const auto expect_span = [&](const std::vector<float>& got, std::size_t n) {
            REQUIRE(got.size() == n);
            for (std::size_t j = 0; j < n; ++j, ++i) REQUIRE(got[j] == index_value(i));
        };
        expect_span(m.token_embedding.data, V * d);
        for (std::size_t l = 0; l < L; ++l) expect_span(m.layers[l].attn_norm, d);
        for (std::size_t l = 0; l < L; ++l) expect_span(m.layers[l].wq.data, d * d);
        for (std::size_t l = 0; l < L; ++l) expect_span(m.layers[l].wk.data, kv * d);
        for (std::size_t l = 0; l < L; ++l) expect_span(m.layers[l].wv.data, kv * d);
        for (std::size_t l = 0; l < L; ++l) expect_span(m.layers[l].wo.data, d * d);
        for (std::size_t l = 0; l < L; ++l) expect_span(m.layers[l].ffn_norm, d);
        for (std::size_t l = 0; l < L; ++l) expect_span(m.layers[l].w1.data, hid * d);
        for (std::size_t l = 0; l < L; ++l) expect_span(m.layers[l].w2.data, d * hid);
        for (std::size_t l = 0; l < L; ++l) expect_span(m.layers[l].w3.data, hid * d);
        expect_span(m.final_norm, d);
        i += 12 * 4;  // legacy RoPE tables: seq_len * head_size floats
        if (tied) {
            CHECK(m.classifier.data == m.token_embedding.data);
        } else {
            expect_span(m.classifier.data, V * d);
        }
        CHECK(m.layers[1].w2.view()(3, 5) == m.layers[1].w2.data[3 * hid + 5]);
    }
}

TEST_CASE("a truncated checkpoint is rejected with the byte counts", "[llama][model][errors]")
{
    const auto full = make_checkpoint(header{}, index_value);
    for (const std::size_t keep : {std::size_t{0}, std::size_t{3}, std::size_t{27}, std::size_t{28}, full.size() / 2,
                                   full.size() - 1}) {
        INFO("kept " << keep << " of " << full.size() << " bytes");
        const std::vector<std::byte> cut(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(keep));
        require_rejected(cut, spinquant::errc::bad_file, "truncated");
    }
}

TEST_CASE("a checkpoint with trailing bytes or a wrong header is rejected as inconsistent", "[llama][model][errors]")
{
    auto extra = make_checkpoint(header{}, index_value);
    extra.push_back(std::byte{0});
    require_rejected(extra, spinquant::errc::bad_file, "inconsistent");

    // A tied header over an untied file: 20 x 16 floats too many.
    header untied;
    untied.vocab_size = -20;
    auto bytes = make_checkpoint(untied, index_value);
    bytes[20] = std::byte{20};  // vocab_size field (offset 5 * 4) becomes +20
    bytes[21] = bytes[22] = bytes[23] = std::byte{0};
    require_rejected(bytes, spinquant::errc::bad_file, "inconsistent");

    struct bad_case {
        header h;
        const char* needle;
    };
    header zero_layers, heads, kv, odd, negative_dim, huge;
    zero_layers.n_layers = 0;
    heads.n_heads = 5;           // 16 % 5 != 0
    kv.n_kv_heads = 3;           // 4 % 3 != 0
    odd.n_heads = 16;            // head size 1
    odd.n_kv_heads = 16;
    negative_dim.dim = -16;
    huge.hidden_dim = 1 << 24;
    for (const auto& [h, needle] : {bad_case{zero_layers, "n_layers = 0"}, bad_case{heads, "not divisible by n_heads"},
                                    bad_case{kv, "not divisible by n_kv_heads"}, bad_case{odd, "odd"},
                                    bad_case{negative_dim, "dim = -16"}, bad_case{huge, "hidden_dim = 16777216"}}) {
        INFO(needle);
        // The floats that follow do not matter: the header check comes first.
        require_rejected(make_checkpoint(h, index_value, std::size_t{64}), spinquant::errc::bad_file, needle);
    }
}

TEST_CASE("a checkpoint with a NaN weight is rejected naming the tensor", "[llama][model][errors]")
{
    const auto nan_at_w2 = [](std::size_t i) {
        // Float index of layer 1's w2[0]: embedding, norms, q, k, v, o, ffn norms, w1, then w2 of layer 0.
        const std::size_t d = 16, hid = 24, V = 20, kv = 8;
        const std::size_t at = V * d + 2 * d + 2 * d * d + 2 * 2 * kv * d + 2 * d * d + 2 * d + 2 * hid * d + d * hid;
        return i == at ? std::numeric_limits<float>::quiet_NaN() : index_value(i);
    };
    require_rejected(make_checkpoint(header{}, nan_at_w2), spinquant::errc::non_finite, "layer 1 w2");
}

TEST_CASE("loading a missing checkpoint file names the file", "[llama][model][errors]")
{
    try {
        (void)llama::load_checkpoint("no-such-dir/no-such.bin");
        FAIL("expected an error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == spinquant::errc::bad_file);
        CHECK(std::string(e.what()).find("no-such.bin") != std::string::npos);
    }
}
