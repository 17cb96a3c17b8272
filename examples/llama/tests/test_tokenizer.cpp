#include "support/catch.hpp"

#include <cstdio>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "llama_test_support.hpp"
#include "tokenizer.hpp"

using llama::test::make_tokenizer;
using llama::test::tok512;

namespace {

void require_rejected(const std::vector<std::byte>& bytes, std::size_t vocab, const std::string& needle)
{
    try {
        (void)llama::tokenizer(bytes, vocab, "tok.bin");
        FAIL("expected the tokenizer to be rejected (" << needle << ")");
    } catch (const spinquant::error& e) {
        const std::string what = e.what();
        INFO(what);
        CHECK(e.code() == spinquant::errc::bad_file);
        CHECK(what.find("llama::tokenizer") != std::string::npos);
        CHECK(what.find("tok.bin") != std::string::npos);
        CHECK(what.find(needle) != std::string::npos);
    }
}

}  // namespace

TEST_CASE("tok512 has the documented layout", "[llama][tokenizer]")
{
    const auto& t = tok512();
    CHECK(t.vocab_size() == 512);
    CHECK(t.max_token_length() == 7);
    CHECK(t.piece(0) == "<unk>");
    CHECK(t.piece(llama::bos_id) == "\n<s>\n");
    CHECK(t.piece(llama::eos_id) == "\n</s>\n");
    for (int b = 0; b < 256; ++b) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "<0x%02X>", static_cast<unsigned>(b));
        REQUIRE(t.piece(b + 3) == hex);
    }
    // Merged pieces are ranked by id: score = 259 - id.
    for (int id = 259; id < 512; ++id) REQUIRE(t.score(id) == static_cast<float>(259 - id));
}

TEST_CASE("encoding matches run.c on the documented example", "[llama][tokenizer]")
{
    const auto& t = tok512();
    CHECK(t.encode("Once upon a time", true, false) == std::vector<int>{1, 403, 407, 261, 378});
    CHECK(t.encode("Once upon a time", true, true) == std::vector<int>{1, 403, 407, 261, 378, 2});
    CHECK(t.encode("", true, false) == std::vector<int>{1});  // no dummy prefix for empty text
    CHECK(t.encode("\n", false, false, false) == std::vector<int>{13});  // "\n" has no piece: byte 0x0A
}

TEST_CASE("a code point without a piece falls back to its UTF-8 bytes", "[llama][tokenizer]")
{
    const auto& t = tok512();
    const std::string han = "\xE4\xB8\xAD";  // U+4E2D
    REQUIRE(t.find(han) < 0);
    CHECK(t.encode(han, false, false, false) == std::vector<int>{0xE4 + 3, 0xB8 + 3, 0xAD + 3});
    // A code point that has a piece stays one token: U+2122 is piece 507.
    CHECK(t.encode("\xE2\x84\xA2", false, false, false) == std::vector<int>{507});
}

TEST_CASE("decoding inverts encoding and merging stops only when no pair is a piece", "[llama][tokenizer]")
{
    const auto& t = tok512();
    const std::vector<std::string> texts = {
        "Once upon a time, there was a little girl named Lily.",
        "Tom said, \"I can count to 1234567890!\"\nThen he ran.",
        "Spot\xC3\xA2\xE2\x82\xAC\xE2\x84\xA2s ball",  // the dataset's own mojibake
        "tabs\tand  double  spaces, \xE4\xB8\xAD and emoji \xF0\x9F\x98\x80",
        " leading space", "x"};
    for (const auto& text : texts) {
        INFO(text);
        const auto ids = t.encode(text, true, false);
        REQUIRE(ids.front() == llama::bos_id);
        // run.c drops the dummy prefix's space after BOS when printing.
        CHECK(t.decode(std::span<const int>(ids).subspan(1), llama::bos_id) == text);
        for (std::size_t k = 1; k + 1 < ids.size(); ++k) REQUIRE(t.find(t.piece(ids[k]) + t.piece(ids[k + 1])) < 0);
    }
}

TEST_CASE("decode turns byte pieces into bytes and strips the space only after BOS", "[llama][tokenizer]")
{
    const auto& t = tok512();
    CHECK(t.decode(5, 13) == "\n");
    CHECK(t.decode(5, 0xFF + 3) == std::string(1, static_cast<char>(0xFF)));
    const int the = t.find(" the");
    REQUIRE(the >= 0);
    CHECK(t.decode(llama::bos_id, the) == "the");
    CHECK(t.decode(the, the) == " the");
}

TEST_CASE("a tokenizer file that is truncated or inconsistent is rejected", "[llama][tokenizer][errors]")
{
    const std::vector<std::string> pieces = {"<unk>", "\n<s>\n", "\n</s>\n", "a", "b", "ab"};
    const std::vector<float> scores = {0, 0, 0, -1, -2, 5};
    const auto good = make_tokenizer(6, pieces, scores);
    const llama::tokenizer ok(good, 6);
    CHECK(ok.encode("ab", false, false, false) == std::vector<int>{5});

    for (const std::size_t keep : {std::size_t{0}, std::size_t{2}, std::size_t{6}, good.size() - 1}) {
        INFO("kept " << keep);
        require_rejected(std::vector<std::byte>(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(keep)), 6,
                         "truncated");
    }
    require_rejected(good, 5, "inconsistent");  // one token left over: wrong vocab_size
    require_rejected(make_tokenizer(1, pieces, scores), 6, "length 5, expected 1..1");
    require_rejected(make_tokenizer(6, {"<unk>", "", "c"}, {0, 0, 0}), 3, "length 0");
    require_rejected(make_tokenizer(6, {"<unk>", "a", "a"}, {0, 0, 0}), 3, "same piece");
    require_rejected(make_tokenizer(6, {"<unk>", "a", "b"}, {0, std::numeric_limits<float>::infinity(), 0}), 3,
                     "non-finite");
    require_rejected(make_tokenizer(0, {}, {}), 3, "max_token_length = 0");
    CHECK_THROWS_AS(llama::tokenizer(good, 2), spinquant::error);
    CHECK_THROWS_AS(llama::tokenizer::load("no-such-tokenizer.bin", 6), spinquant::error);
}

TEST_CASE("encoding text the vocabulary cannot express fails clearly", "[llama][tokenizer][errors]")
{
    // No byte pieces and no " ": neither the dummy prefix nor an unknown character can be encoded.
    const auto bytes = make_tokenizer(6, {"<unk>", "\n<s>\n", "\n</s>\n", "a"}, {0, 0, 0, 0});
    const llama::tokenizer t(bytes, 4);
    CHECK(t.encode("aa", false, false, false) == std::vector<int>{3, 3});
    const auto message = [&](std::string_view text, bool prefix) -> std::string {
        try {
            (void)t.encode(text, false, false, prefix);
        } catch (const spinquant::error& e) {
            CHECK(e.code() == spinquant::errc::bad_argument);
            return e.what();
        }
        return "no error";
    };
    CHECK(message("a", true).find("dummy prefix") != std::string::npos);
    CHECK(message("z", false).find("<0x7A>") != std::string::npos);
}
