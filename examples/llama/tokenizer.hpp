#pragma once
/// The llama2.c tokenizer: a SentencePiece-style BPE vocabulary with byte fallback, read from
/// llama2.c's tokenizer.bin format, with the encoder and decoder of llama2.c's run.c.
///
/// File layout (little-endian): int32 max_token_length, then for each id: float32 score, int32
/// byte length, the bytes (no terminator). The vocabulary size is not stored; it comes from the
/// checkpoint header. Ids 0/1/2 are <unk>, BOS and EOS; "<0xHH>" pieces stand for single bytes.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <spinquant/error.hpp>

#include "model.hpp"

namespace llama {

/// Token ids with a fixed meaning in llama2.c vocabularies.
inline constexpr int bos_id = 1;
inline constexpr int eos_id = 2;

/// A loaded vocabulary: pieces, merge scores, and the encoder/decoder.
class tokenizer {
public:
    /// Parses a tokenizer held in memory, with `vocab_size` entries (from the checkpoint header).
    /// Fails with errc::bad_file when the data is truncated, has trailing bytes, a piece is longer
    /// than max_token_length or empty, a score is not finite, or two ids share a piece (the
    /// encoder would be ambiguous); errc::bad_argument when vocab_size < 3.
    tokenizer(std::span<const std::byte> bytes, std::size_t vocab_size, std::string_view name = "tokenizer")
    {
        constexpr std::string_view where = "llama::tokenizer";
        if (vocab_size < 3)
            spinquant::detail::fail(spinquant::errc::bad_argument, where,
                                    "vocab_size is " + std::to_string(vocab_size) + ", expected at least 3 (<unk>, BOS, EOS)");
        detail::byte_reader in(bytes, where, name);
        const std::int32_t max_len = in.i32("max_token_length");
        if (max_len <= 0 || max_len > 256)
            in.fail("max_token_length = " + std::to_string(max_len) + ", expected 1..256");
        max_token_length_ = static_cast<std::size_t>(max_len);
        pieces_.reserve(vocab_size);
        scores_.reserve(vocab_size);
        for (std::size_t id = 0; id < vocab_size; ++id) {
            const std::string what = "token " + std::to_string(id);
            const float score = in.f32(what + " score");
            if (!(score - score == 0.0f)) in.fail(what + " has a non-finite score");
            const std::int32_t len = in.i32(what + " length");
            if (len <= 0 || static_cast<std::size_t>(len) > max_token_length_)
                in.fail(what + " has length " + std::to_string(len) + ", expected 1.." + std::to_string(max_token_length_));
            pieces_.push_back(in.string(static_cast<std::size_t>(len), what + " bytes"));
            scores_.push_back(score);
        }
        if (in.remaining() != 0)
            in.fail("inconsistent: " + std::to_string(in.remaining()) + " bytes after the last of " +
                    std::to_string(vocab_size) + " tokens (wrong vocab_size?)");
        lookup_.reserve(vocab_size);
        for (std::size_t id = 0; id < vocab_size; ++id)
            if (!lookup_.emplace(pieces_[id], static_cast<int>(id)).second)
                in.fail("tokens " + std::to_string(lookup_.at(pieces_[id])) + " and " + std::to_string(id) +
                        " have the same piece");
        for (unsigned b = 0; b < 256; ++b) byte_ids_[b] = find(byte_piece(b));
        space_id_ = find(" ");
        // Every way to write a piece as the concatenation of two pieces, keyed by the pair of ids:
        // the merge loop then looks pairs up by integer instead of building strings.
        for (std::size_t id = 0; id < vocab_size; ++id) {
            const std::string& p = pieces_[id];
            for (std::size_t k = 1; k < p.size(); ++k) {
                const int a = find(std::string_view(p).substr(0, k)), b = find(std::string_view(p).substr(k));
                if (a >= 0 && b >= 0) merges_.emplace(pair_key(a, b), static_cast<int>(id));
            }
        }
    }

    /// Loads a tokenizer file; errors as the constructor, plus errc::bad_file when unreadable.
    [[nodiscard]] static tokenizer load(const std::filesystem::path& path, std::size_t vocab_size)
    {
        const auto bytes = detail::read_file(path, "llama::tokenizer::load");
        return tokenizer(bytes, vocab_size, path.string());
    }

    [[nodiscard]] std::size_t vocab_size() const noexcept { return pieces_.size(); }
    [[nodiscard]] std::size_t max_token_length() const noexcept { return max_token_length_; }
    /// The piece of `id` as stored ("<0x0A>" for byte pieces, " " for SentencePiece's word marker).
    [[nodiscard]] const std::string& piece(int id) const { return pieces_.at(static_cast<std::size_t>(id)); }
    [[nodiscard]] float score(int id) const { return scores_.at(static_cast<std::size_t>(id)); }
    /// The id of an exact piece, or -1.
    [[nodiscard]] int find(std::string_view piece) const
    {
        const auto it = lookup_.find(std::string(piece));
        return it == lookup_.end() ? -1 : it->second;
    }

    /// Encodes UTF-8 text as run.c does: optional BOS, a dummy-prefix " " piece when `text` is
    /// non-empty and `dummy_prefix` is set, one piece per UTF-8 code point (its bytes as byte
    /// pieces when the code point has none), then repeated merges of the adjacent pair whose
    /// concatenation is the highest-scoring piece (leftmost on ties), then optional EOS.
    /// Fails with errc::bad_argument when a needed piece (" " or a byte piece) is missing.
    /// Complexity O(n^2) in the number of code points (one scan per merge), as run.c, but the
    /// scan compares precomputed merge scores instead of looking up concatenated strings.
    [[nodiscard]] std::vector<int> encode(std::string_view text, bool bos, bool eos, bool dummy_prefix = true) const
    {
        std::vector<int> ids;
        ids.reserve(text.size() + 3);
        if (bos) ids.push_back(bos_id);
        if (dummy_prefix && !text.empty()) {
            if (space_id_ < 0) fail_missing("\" \" (the dummy prefix)");
            ids.push_back(space_id_);
        }
        for (std::size_t i = 0; i < text.size();) {
            // A code point is a lead byte plus its continuation bytes (at most 4 bytes in all).
            std::size_t j = i + 1;
            while (j < text.size() && (static_cast<unsigned char>(text[j]) & 0xC0u) == 0x80u && j - i < 4) ++j;
            const int id = find(text.substr(i, j - i));
            if (id >= 0) {
                ids.push_back(id);
            } else {
                for (std::size_t k = i; k < j; ++k) {
                    const int b = byte_ids_[static_cast<unsigned char>(text[k])];
                    if (b < 0) fail_missing(byte_piece(static_cast<unsigned char>(text[k])));
                    ids.push_back(b);
                }
            }
            i = j;
        }
        // merge[k]: the piece that (ids[k], ids[k+1]) merge into, or -1. A merge only changes the
        // pairs on either side of it, so each round is one scan over floats, no hashing.
        std::vector<int> merge(ids.empty() ? 0 : ids.size() - 1);
        const auto pair_at = [&](std::size_t k) {
            const auto it = merges_.find(pair_key(ids[k], ids[k + 1]));
            return it == merges_.end() ? -1 : it->second;
        };
        for (std::size_t k = 0; k < merge.size(); ++k) merge[k] = pair_at(k);
        for (;;) {
            int best_id = -1;
            std::size_t best_at = 0;
            for (std::size_t k = 0; k < merge.size(); ++k)  // strictly greater: leftmost on ties
                if (merge[k] >= 0 && (best_id < 0 || score(merge[k]) > score(best_id))) {
                    best_id = merge[k];
                    best_at = k;
                }
            if (best_id < 0) break;
            ids[best_at] = best_id;
            ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
            merge.erase(merge.begin() + static_cast<std::ptrdiff_t>(best_at));
            if (best_at > 0) merge[best_at - 1] = pair_at(best_at - 1);
            if (best_at < merge.size()) merge[best_at] = pair_at(best_at);
        }
        if (eos) ids.push_back(eos_id);
        return ids;
    }

    /// The bytes `id` stands for when it follows `previous`, as run.c prints them: byte pieces
    /// become their byte, and the leading space of the first piece after BOS is dropped.
    [[nodiscard]] std::string decode(int previous, int id) const
    {
        std::string_view p = piece(id);
        if (previous == bos_id && !p.empty() && p.front() == ' ') p.remove_prefix(1);
        if (const int b = byte_value(p); b >= 0) return std::string(1, static_cast<char>(b));
        return std::string(p);
    }
    /// decode() over a sequence, each token given the one before it (the first: `previous`).
    [[nodiscard]] std::string decode(std::span<const int> ids, int previous = -1) const
    {
        std::string out;
        for (const int id : ids) {
            out += decode(previous, id);
            previous = id;
        }
        return out;
    }

private:
    [[nodiscard]] static std::string byte_piece(unsigned b)
    {
        constexpr char hex[] = "0123456789ABCDEF";
        return std::string("<0x") + hex[(b >> 4) & 15u] + hex[b & 15u] + ">";
    }
    /// The byte a "<0xHH>" piece stands for, or -1 for any other piece.
    [[nodiscard]] static int byte_value(std::string_view p) noexcept
    {
        if (p.size() != 6 || p.substr(0, 3) != "<0x" || p[5] != '>') return -1;
        const auto nibble = [](char c) {
            if (c >= '0' && c <= '9') return c - '0';
            if (c >= 'A' && c <= 'F') return c - 'A' + 10;
            if (c >= 'a' && c <= 'f') return c - 'a' + 10;
            return -1;
        };
        const int hi = nibble(p[3]), lo = nibble(p[4]);
        return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
    }
    [[nodiscard]] static std::uint64_t pair_key(int a, int b) noexcept
    {
        return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
    }
    [[noreturn]] static void fail_missing(const std::string& what)
    {
        spinquant::detail::fail(spinquant::errc::bad_argument, "llama::tokenizer::encode",
                                "the vocabulary has no piece " + what + " needed for this text");
    }

    std::vector<std::string> pieces_;
    std::vector<float> scores_;
    std::unordered_map<std::string, int> lookup_;
    std::unordered_map<std::uint64_t, int> merges_;  ///< (left id, right id) -> merged id
    int byte_ids_[256] = {};
    int space_id_ = -1;
    std::size_t max_token_length_ = 0;
};

}  // namespace llama
