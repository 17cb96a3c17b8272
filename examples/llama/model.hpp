#pragma once
/// A LLaMA-architecture model in llama2.c's checkpoint format: the configuration, the weights as
/// owned row-major matrices that the library sees through matrix_view, and a loader that rejects
/// truncated or inconsistent files before it builds anything.
///
/// File layout (llama2.c legacy format, little-endian): 7 x int32 header {dim, hidden_dim,
/// n_layers, n_heads, n_kv_heads, vocab_size, seq_len}, then float32 tensors, matrices stored
/// [out_features, in_features]: token_embedding [vocab, dim], rms_att [L, dim], wq [L, dim, dim],
/// wk [L, kv_dim, dim], wv [L, kv_dim, dim], wo [L, dim, dim], rms_ffn [L, dim], w1 [L, hidden, dim],
/// w2 [L, dim, hidden], w3 [L, hidden, dim], rms_final [dim], seq_len * head_size unused floats
/// (legacy RoPE tables), then wcls [vocab, dim] only when the header's vocab_size is negative.
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <spinquant/concepts.hpp>
#include <spinquant/detail/checks.hpp>
#include <spinquant/error.hpp>
#include <spinquant/transformer.hpp>

namespace llama {

/// The shape of a model, as the checkpoint header gives it.
struct model_config {
    std::size_t dim = 0;         ///< width of the residual stream
    std::size_t hidden_dim = 0;  ///< width of the SwiGLU feed-forward layer
    std::size_t n_layers = 0;
    std::size_t n_heads = 0;     ///< query heads
    std::size_t n_kv_heads = 0;  ///< key/value heads (grouped-query attention when fewer than n_heads)
    std::size_t vocab_size = 0;
    std::size_t seq_len = 0;     ///< longest context the model was trained for
    bool shared_classifier = true;  ///< the file ties the classifier to the token embedding

    [[nodiscard]] std::size_t head_size() const noexcept { return dim / n_heads; }
    [[nodiscard]] std::size_t kv_dim() const noexcept { return head_size() * n_kv_heads; }
    /// Query heads per key/value head.
    [[nodiscard]] std::size_t kv_group() const noexcept { return n_heads / n_kv_heads; }
    /// Parameters that the forward pass uses (the classifier counted once when shared).
    [[nodiscard]] std::size_t parameter_count() const noexcept
    {
        const std::size_t per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim() * dim + 3 * hidden_dim * dim;
        return vocab_size * dim * (shared_classifier ? 1 : 2) + n_layers * per_layer + dim;
    }
};

/// An owned row-major matrix [rows, cols] (rows are output channels for weights).
struct matrix {
    std::vector<float> data;
    std::size_t rows = 0;
    std::size_t cols = 0;

    matrix() = default;
    matrix(std::size_t r, std::size_t c) : data(r * c, 0.0f), rows(r), cols(c) {}

    /// The library's view of this matrix (packed row-major).
    [[nodiscard]] spinquant::matrix_view<float> view() noexcept { return {data.data(), rows, cols, cols, 1}; }
    [[nodiscard]] spinquant::matrix_view<const float> view() const noexcept { return {data.data(), rows, cols, cols, 1}; }
    [[nodiscard]] float& operator()(std::size_t i, std::size_t j) noexcept { return data[i * cols + j]; }
    [[nodiscard]] float operator()(std::size_t i, std::size_t j) const noexcept { return data[i * cols + j]; }
};

/// The weights of one transformer block. Norm weights are vectors of length dim.
struct layer_weights {
    std::vector<float> attn_norm;  ///< RMSNorm before attention (rms_att)
    matrix wq;                     ///< [dim, dim]
    matrix wk;                     ///< [kv_dim, dim]
    matrix wv;                     ///< [kv_dim, dim]
    matrix wo;                     ///< [dim, dim]
    std::vector<float> ffn_norm;   ///< RMSNorm before the feed-forward layer (rms_ffn)
    matrix w1;                     ///< gate_proj [hidden, dim]
    matrix w2;                     ///< down_proj [dim, hidden]
    matrix w3;                     ///< up_proj [hidden, dim]
};

/// A whole model. The classifier is always its own matrix: a file that ties it to the embedding
/// gets a copy (config.shared_classifier records that), so rotating one never changes the other.
struct model {
    model_config config;
    matrix token_embedding;  ///< [vocab, dim]
    std::vector<layer_weights> layers;
    std::vector<float> final_norm;  ///< [dim]
    matrix classifier;              ///< [vocab, dim] (lm_head)
};

namespace detail {

/// Reads little-endian 32-bit words from a byte buffer, failing with errc::bad_file (naming the
/// file and what was being read) instead of reading past the end.
class byte_reader {
public:
    byte_reader(std::span<const std::byte> bytes, std::string_view where, std::string_view file)
        : bytes_(bytes), where_(where), file_(file)
    {
    }
    [[nodiscard]] std::size_t offset() const noexcept { return pos_; }
    [[nodiscard]] std::size_t remaining() const noexcept { return bytes_.size() - pos_; }

    [[nodiscard]] std::uint32_t u32(std::string_view what)
    {
        need(4, what);
        std::uint32_t v = 0;
        for (std::size_t i = 0; i < 4; ++i)
            v |= static_cast<std::uint32_t>(std::to_integer<unsigned>(bytes_[pos_ + i])) << (8 * i);
        pos_ += 4;
        return v;
    }
    [[nodiscard]] std::int32_t i32(std::string_view what) { return std::bit_cast<std::int32_t>(u32(what)); }
    [[nodiscard]] float f32(std::string_view what) { return std::bit_cast<float>(u32(what)); }
    void floats(std::span<float> out, std::string_view what)
    {
        need(4 * out.size(), what);
        for (float& f : out) f = f32(what);
    }
    [[nodiscard]] std::string string(std::size_t n, std::string_view what)
    {
        need(n, what);
        std::string s(n, '\0');
        std::memcpy(s.data(), bytes_.data() + pos_, n);
        pos_ += n;
        return s;
    }
    void skip(std::size_t n, std::string_view what)
    {
        need(n, what);
        pos_ += n;
    }
    [[noreturn]] void fail(std::string_view why) const
    {
        spinquant::detail::fail(spinquant::errc::bad_file, where_, std::string(file_) + ": " + std::string(why));
    }

private:
    void need(std::size_t n, std::string_view what) const
    {
        if (n > remaining())
            fail("truncated: " + std::string(what) + " needs " + std::to_string(n) + " bytes at offset " +
                 std::to_string(pos_) + ", only " + std::to_string(remaining()) + " remain");
    }
    std::span<const std::byte> bytes_;
    std::string_view where_;
    std::string_view file_;
    std::size_t pos_ = 0;
};

/// The whole file as bytes; errc::bad_file when it cannot be opened or read.
[[nodiscard]] inline std::vector<std::byte> read_file(const std::filesystem::path& path, std::string_view where)
{
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) spinquant::detail::fail(spinquant::errc::bad_file, where, "cannot open '" + path.string() + "'");
    const std::streamoff size = in.tellg();
    if (size < 0) spinquant::detail::fail(spinquant::errc::bad_file, where, "cannot read '" + path.string() + "'");
    std::vector<std::byte> bytes(static_cast<std::size_t>(size));
    in.seekg(0);
    if (!in.read(reinterpret_cast<char*>(bytes.data()), size))
        spinquant::detail::fail(spinquant::errc::bad_file, where, "cannot read '" + path.string() + "'");
    return bytes;
}

}  // namespace detail

/// Parses a llama2.c checkpoint held in memory. `name` is used in error messages.
/// Fails with errc::bad_file when the header is inconsistent (a dimension <= 0 or above 2^20,
/// dim not divisible by n_heads, n_heads not divisible by n_kv_heads, odd head size, seq_len 0)
/// or when the byte count differs from what the header implies (truncated file or trailing bytes),
/// and with errc::non_finite when a weight is NaN or infinite. Nothing is allocated for the
/// weights before the size check passes.
[[nodiscard]] inline model parse_checkpoint(std::span<const std::byte> bytes, std::string_view name = "checkpoint")
{
    constexpr std::string_view where = "llama::parse_checkpoint";
    detail::byte_reader in(bytes, where, name);
    const char* fields[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
    std::int64_t h[7] = {};
    for (std::size_t i = 0; i < 7; ++i) h[i] = in.i32(std::string("header field ") + fields[i]);
    const bool shared = h[5] > 0;
    if (h[5] < 0) h[5] = -h[5];
    // A bound on every dimension keeps the size arithmetic below far from overflow.
    constexpr std::int64_t max_dim = std::int64_t{1} << 20;
    for (std::size_t i = 0; i < 7; ++i)
        if (h[i] <= 0 || h[i] > max_dim)
            in.fail(std::string("header field ") + fields[i] + " = " + std::to_string(h[i]) + ", expected 1.." +
                    std::to_string(max_dim));
    model_config c;
    c.dim = static_cast<std::size_t>(h[0]);
    c.hidden_dim = static_cast<std::size_t>(h[1]);
    c.n_layers = static_cast<std::size_t>(h[2]);
    c.n_heads = static_cast<std::size_t>(h[3]);
    c.n_kv_heads = static_cast<std::size_t>(h[4]);
    c.vocab_size = static_cast<std::size_t>(h[5]);
    c.seq_len = static_cast<std::size_t>(h[6]);
    c.shared_classifier = shared;
    if (c.dim % c.n_heads != 0)
        in.fail("dim " + std::to_string(c.dim) + " is not divisible by n_heads " + std::to_string(c.n_heads));
    if (c.n_heads % c.n_kv_heads != 0)
        in.fail("n_heads " + std::to_string(c.n_heads) + " is not divisible by n_kv_heads " +
                std::to_string(c.n_kv_heads));
    if (c.head_size() % 2 != 0)
        in.fail("head size " + std::to_string(c.head_size()) + " is odd; RoPE rotates pairs");

    const std::size_t L = c.n_layers, d = c.dim, kv = c.kv_dim(), hid = c.hidden_dim;
    const std::size_t floats = c.vocab_size * d + L * (2 * d + 2 * d * d + 2 * kv * d + 3 * hid * d) + d +
                               c.seq_len * c.head_size() + (shared ? 0 : c.vocab_size * d);
    const std::size_t expected = 7 * 4 + 4 * floats;
    if (bytes.size() != expected)
        in.fail(std::string(bytes.size() < expected ? "truncated" : "inconsistent") + ": the header (dim " +
                std::to_string(d) + ", hidden_dim " + std::to_string(hid) + ", n_layers " + std::to_string(L) +
                ", n_heads " + std::to_string(c.n_heads) + ", n_kv_heads " + std::to_string(c.n_kv_heads) +
                ", vocab_size " + std::to_string(c.vocab_size) + (shared ? "" : " untied") + ", seq_len " +
                std::to_string(c.seq_len) + ") implies " + std::to_string(expected) + " bytes, the file has " +
                std::to_string(bytes.size()));

    model m;
    m.config = c;
    m.layers.resize(L);
    m.token_embedding = matrix(c.vocab_size, d);
    in.floats(m.token_embedding.data, "token_embedding");
    // The file stores each tensor for all layers at once; read them in file order.
    const auto per_layer_vec = [&](std::vector<float> layer_weights::*member, const char* what) {
        for (auto& lw : m.layers) {
            (lw.*member).assign(d, 0.0f);
            in.floats(lw.*member, what);
        }
    };
    const auto per_layer_mat = [&](matrix layer_weights::*member, std::size_t rows, std::size_t cols, const char* what) {
        for (auto& lw : m.layers) {
            lw.*member = matrix(rows, cols);
            in.floats((lw.*member).data, what);
        }
    };
    per_layer_vec(&layer_weights::attn_norm, "rms_att");
    per_layer_mat(&layer_weights::wq, d, d, "wq");
    per_layer_mat(&layer_weights::wk, kv, d, "wk");
    per_layer_mat(&layer_weights::wv, kv, d, "wv");
    per_layer_mat(&layer_weights::wo, d, d, "wo");
    per_layer_vec(&layer_weights::ffn_norm, "rms_ffn");
    per_layer_mat(&layer_weights::w1, hid, d, "w1");
    per_layer_mat(&layer_weights::w2, d, hid, "w2");
    per_layer_mat(&layer_weights::w3, hid, d, "w3");
    m.final_norm.assign(d, 0.0f);
    in.floats(m.final_norm, "rms_final");
    in.skip(4 * c.seq_len * c.head_size(), "legacy RoPE tables");
    if (shared) {
        m.classifier = m.token_embedding;
    } else {
        m.classifier = matrix(c.vocab_size, d);
        in.floats(m.classifier.data, "wcls");
    }

    using spinquant::detail::require_finite;
    const std::string prefix = std::string(name) + ": ";
    require_finite<float>(m.token_embedding.data, where, prefix + "token_embedding");
    for (std::size_t l = 0; l < L; ++l) {
        const auto& lw = m.layers[l];
        const std::string p = prefix + "layer " + std::to_string(l) + " ";
        require_finite<float>(lw.attn_norm, where, p + "rms_att");
        require_finite<float>(lw.wq.data, where, p + "wq");
        require_finite<float>(lw.wk.data, where, p + "wk");
        require_finite<float>(lw.wv.data, where, p + "wv");
        require_finite<float>(lw.wo.data, where, p + "wo");
        require_finite<float>(lw.ffn_norm, where, p + "rms_ffn");
        require_finite<float>(lw.w1.data, where, p + "w1");
        require_finite<float>(lw.w2.data, where, p + "w2");
        require_finite<float>(lw.w3.data, where, p + "w3");
    }
    require_finite<float>(m.final_norm, where, prefix + "rms_final");
    require_finite<float>(m.classifier.data, where, prefix + "wcls");
    return m;
}

/// Loads a llama2.c checkpoint file. Errors as parse_checkpoint, plus errc::bad_file when the file
/// cannot be read; messages name the file.
[[nodiscard]] inline model load_checkpoint(const std::filesystem::path& path)
{
    const auto bytes = detail::read_file(path, "llama::load_checkpoint");
    return parse_checkpoint(bytes, path.string());
}

}  // namespace llama

/// llama::model as a spinquant::transformer_model: its classifier is always its own matrix (a tied
/// file gets a copy at load), so no untie is needed.
template <>
struct spinquant::transformer_traits<llama::model> {
    static std::size_t layer_count(const llama::model& m) noexcept { return m.layers.size(); }
    static std::size_t head_dim(const llama::model& m) noexcept { return m.config.head_size(); }
    static spinquant::matrix_view<float> embedding(llama::model& m) noexcept { return m.token_embedding.view(); }
    static spinquant::matrix_view<float> lm_head(llama::model& m) noexcept { return m.classifier.view(); }
    static std::span<float> final_norm(llama::model& m) noexcept { return m.final_norm; }
    static spinquant::transformer_layer<float> layer(llama::model& m, std::size_t l) noexcept
    {
        llama::layer_weights& w = m.layers[l];
        return {w.attn_norm, w.ffn_norm, w.wq.view(), w.wk.view(), w.wv.view(), w.wo.view(), w.w1.view(), w.w3.view(), w.w2.view()};
    }
};
