#pragma once
// Shared helpers of the llama example's tests: the shipped model and tokenizer (loaded once per
// executable), synthetic checkpoints and tokenizers in memory, and the real text when the shared
// folder is present.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <spinquant/detail/random.hpp>

#include "model.hpp"
#include "support/shared_data.hpp"
#include "tokenizer.hpp"

namespace llama::test {

inline const model& stories260k()
{
    static const model m = load_checkpoint(std::filesystem::path(LLAMA_DATA_DIR) / "stories260K.bin");
    return m;
}

inline const tokenizer& tok512()
{
    static const tokenizer t = tokenizer::load(std::filesystem::path(LLAMA_DATA_DIR) / "tok512.bin", 512);
    return t;
}

/// The real text (tinystories_valid_head.txt) or nullopt after printing the SKIPPED line.
inline std::optional<std::string> real_text()
{
    const auto p = spinquant::test::shared_path_or_skip("data/tinystories_valid_head.txt");
    if (!p) return std::nullopt;
    std::ifstream in(*p, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

/// Little-endian serialisation, the layout of llama2.c's files.
inline void put_u32(std::vector<std::byte>& out, std::uint32_t v)
{
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xFFu));
}
inline void put_i32(std::vector<std::byte>& out, std::int32_t v) { put_u32(out, static_cast<std::uint32_t>(v)); }
inline void put_f32(std::vector<std::byte>& out, float v)
{
    std::uint32_t u = 0;
    std::memcpy(&u, &v, 4);
    put_u32(out, u);
}

/// The header fields of a synthetic checkpoint.
struct header {
    std::int32_t dim = 16, hidden_dim = 24, n_layers = 2, n_heads = 4, n_kv_heads = 2, vocab_size = 20, seq_len = 12;
};

/// A checkpoint whose float number i (counted from the first tensor) is value(i); untied when
/// h.vocab_size < 0. `floats_override` replaces the computed float count (to build bad files).
inline std::vector<std::byte> make_checkpoint(const header& h, float (*value)(std::size_t),
                                              std::optional<std::size_t> floats_override = std::nullopt)
{
    std::vector<std::byte> out;
    for (const std::int32_t f : {h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len})
        put_i32(out, f);
    const auto u = [](std::int32_t v) { return static_cast<std::size_t>(v < 0 ? -v : v); };
    const std::size_t d = u(h.dim), hid = u(h.hidden_dim), L = u(h.n_layers), V = u(h.vocab_size);
    const std::size_t hs = d / std::max<std::size_t>(u(h.n_heads), 1), kv = hs * u(h.n_kv_heads);
    std::size_t n = V * d + L * (2 * d + 2 * d * d + 2 * kv * d + 3 * hid * d) + d + u(h.seq_len) * hs;
    if (h.vocab_size < 0) n += V * d;
    if (floats_override) n = *floats_override;
    for (std::size_t i = 0; i < n; ++i) put_f32(out, value(i));
    return out;
}

/// A small deterministic value for float i: distinct per position, in [-1, 1).
inline float index_value(std::size_t i)
{
    return static_cast<float>(static_cast<double>((i * 2654435761u) % 2000u) / 1000.0 - 1.0);
}

/// A tokenizer file with the given pieces and scores.
inline std::vector<std::byte> make_tokenizer(std::int32_t max_len, const std::vector<std::string>& pieces,
                                             const std::vector<float>& scores)
{
    std::vector<std::byte> out;
    put_i32(out, max_len);
    for (std::size_t i = 0; i < pieces.size(); ++i) {
        put_f32(out, scores[i]);
        put_i32(out, static_cast<std::int32_t>(pieces[i].size()));
        for (const char c : pieces[i]) out.push_back(static_cast<std::byte>(c));
    }
    return out;
}

}  // namespace llama::test
