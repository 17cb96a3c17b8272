#pragma once
/// Evaluation of a (quantized) model against the full-precision one: the real-text protocol of
/// data/README.md (block-wise tokenization, evaluation/calibration split, non-overlapping
/// windows), text sampled from the full-precision model as a fallback, perplexity, KL divergence
/// to full precision and top-1 agreement, and the result table as text, CSV and JSON.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <spinquant/error.hpp>

#include "forward.hpp"
#include "generate.hpp"
#include "tokenizer.hpp"

namespace llama {

// ---------------------------------------------------------------------------------------------
// Text

/// Where tokenize_blocks puts SentencePiece's dummy-prefix space (the " " run.c's encoder
/// prepends to a non-empty text, so that its first word gets the same "▁word" piece as the
/// words after a space).
enum class dummy_prefix {
    every_block,  ///< run.c's encoder on each block as is (the default): 385,898 tokens for
                  ///< tinystories_valid_head.txt, the stream of the independent reading of this
                  ///< checkpoint (full precision 4.05 on the first 8,192 evaluation tokens)
    first_block,  ///< block 0 only: the 388,718-token stream the data's SOURCES.md counts
};

/// A text tokenized block by block. Blocks are the non-empty pieces between "\n\n" separators
/// (stories and their paragraphs). Block 0 gets BOS; every later block is preceded by the "\n"
/// token and encoded without BOS, so the stream is what run.c's encoder gives for each block,
/// joined by single newlines. The dummy prefix goes where `prefix` says.
struct token_stream {
    std::vector<int> tokens;
    std::vector<std::size_t> block_byte;   ///< byte offset of each block in the text
    std::vector<std::size_t> block_token;  ///< index in `tokens` of each block's first token (after its joiner)
};

/// Tokenizes `text` as token_stream describes. Errors: those of tokenizer::encode, and
/// errc::bad_argument when the vocabulary cannot encode "\n" as one token.
[[nodiscard]] inline token_stream tokenize_blocks(const tokenizer& tok, std::string_view text,
                                                  dummy_prefix prefix = dummy_prefix::every_block)
{
    const std::vector<int> newline = tok.encode("\n", false, false, false);
    if (newline.size() != 1)
        spinquant::detail::fail(spinquant::errc::bad_argument, "llama::tokenize_blocks",
                                "the vocabulary encodes \"\\n\" as " + std::to_string(newline.size()) +
                                    " tokens, expected 1");
    token_stream out;
    for (std::size_t pos = 0; pos <= text.size();) {
        std::size_t end = text.find("\n\n", pos);
        if (end == std::string_view::npos) end = text.size();
        if (end > pos) {
            const bool first = out.block_byte.empty();
            if (!first) out.tokens.push_back(newline.front());
            out.block_byte.push_back(pos);
            out.block_token.push_back(out.tokens.size());
            const bool space = first || prefix == dummy_prefix::every_block;
            const auto ids = tok.encode(text.substr(pos, end - pos), first, false, space);
            out.tokens.insert(out.tokens.end(), ids.begin(), ids.end());
        }
        pos = end + 2;
    }
    return out;
}

/// The two disjoint parts of a token stream: evaluation first, calibration after.
struct text_split {
    std::vector<int> evaluation;   ///< the blocks before the boundary, with the joiner after the last one
    std::vector<int> calibration;  ///< the blocks from the boundary on
    std::size_t first_calibration_block = 0;
};

/// Splits `stream` at the block that starts at byte `boundary` of the text (data/README.md:
/// 537401 for tinystories_valid_head.txt). Errors: errc::bad_argument unless some block other
/// than the first starts exactly there (the split must not cut a block, and both parts must be
/// non-empty).
[[nodiscard]] inline text_split split_at_byte(const token_stream& stream, std::size_t boundary)
{
    const auto it = std::find(stream.block_byte.begin(), stream.block_byte.end(), boundary);
    if (it == stream.block_byte.end() || it == stream.block_byte.begin())
        spinquant::detail::fail(spinquant::errc::bad_argument, "llama::split_at_byte",
                                "byte " + std::to_string(boundary) + " is not the start of a block after the first");
    const auto b = static_cast<std::size_t>(it - stream.block_byte.begin());
    const auto cut = static_cast<std::ptrdiff_t>(stream.block_token[b]);
    text_split s;
    s.evaluation.assign(stream.tokens.begin(), stream.tokens.begin() + cut);
    s.calibration.assign(stream.tokens.begin() + cut, stream.tokens.end());
    s.first_calibration_block = b;
    return s;
}

// ---------------------------------------------------------------------------------------------
// Evaluation sets

/// Sequences the model is scored on: each sequence of n tokens is one forward pass from
/// position 0 over its first n - 1 tokens, predicting its last n - 1.
struct eval_set {
    std::vector<std::vector<int>> sequences;

    [[nodiscard]] std::size_t predictions() const noexcept
    {
        std::size_t n = 0;
        for (const auto& s : sequences) n += s.size() - 1;
        return n;
    }
};

/// Disjoint windows of `length` tokens over the first `max_tokens` of `tokens`, as the
/// reference's perplexity evaluation cuts its test set: window w holds tokens
/// [w*length, (w+1)*length) and predicts each of them after the first from the ones before it
/// in the window (length - 1 predictions; the first token of a window is context only). Takes
/// as many whole windows as fit in both `tokens` and `max_tokens`.
/// Errors: errc::bad_argument when length < 2 or no window fits.
[[nodiscard]] inline eval_set make_windows(std::span<const int> tokens, std::size_t length, std::size_t max_tokens)
{
    if (length < 2 || tokens.size() < length || max_tokens < length)
        spinquant::detail::fail(spinquant::errc::bad_argument, "llama::make_windows",
                                "no window of " + std::to_string(length) + " tokens (at least 2) fits in " +
                                    std::to_string(tokens.size()) + " tokens with a limit of " +
                                    std::to_string(max_tokens));
    const std::size_t count = std::min(tokens.size(), max_tokens) / length;
    eval_set set;
    set.sequences.reserve(count);
    for (std::size_t w = 0; w < count; ++w)
        set.sequences.emplace_back(tokens.begin() + static_cast<std::ptrdiff_t>(w * length),
                                   tokens.begin() + static_cast<std::ptrdiff_t>((w + 1) * length));
    return set;
}

/// `count` sequences of BOS followed by `length` tokens sampled from `m` (full precision, no
/// hooks) at `temperature`, from std::mt19937_64(seed); the same seed gives the same text on
/// every platform. Sampling continues through BOS (a new story), as the training stream does.
/// Errors: errc::bad_argument when length + 1 exceeds the context or temperature <= 0.
[[nodiscard]] inline eval_set sample_sequences(const model& m, std::size_t count, std::size_t length, std::uint64_t seed,
                                               double temperature = 1.0)
{
    if (length == 0 || length + 1 > m.config.seq_len || !(temperature > 0.0))
        spinquant::detail::fail(spinquant::errc::bad_argument, "llama::sample_sequences",
                                "length " + std::to_string(length) + " / temperature " + std::to_string(temperature) +
                                    ": expected 1 <= length < seq_len (" + std::to_string(m.config.seq_len) +
                                    ") and temperature > 0");
    std::mt19937_64 rng(seed);
    eval_set set;
    const int prompt[1] = {bos_id};
    for (std::size_t i = 0; i < count; ++i) {
        std::vector<int> s{bos_id};
        const auto gen = generate(
            m, activation_hooks{}, prompt, length,
            [&](std::span<const float> logits) { return sample_token(logits, temperature, rng); }, false);
        s.insert(s.end(), gen.begin(), gen.end());
        set.sequences.push_back(std::move(s));
    }
    return set;
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// Scores of one model on one eval_set.
struct metrics {
    double ppl = 0;             ///< exp(mean negative log-likelihood of the targets)
    double kl = 0;              ///< mean KL(P_fp || P_model) in nats per prediction
    double top1 = 0;            ///< fraction of predictions whose argmax equals the full-precision argmax
    std::size_t predictions = 0;
};

/// The full-precision model's predictions on an eval_set, computed once and compared against.
/// Memory: predictions x vocab floats (16 MiB for 8192 predictions of a 512-token vocabulary).
struct reference {
    std::vector<float> log_probs;  ///< [predictions, vocab] log-softmax of the FP logits
    std::vector<int> top1;         ///< [predictions] FP argmax
    std::size_t vocab = 0;
    metrics fp;                    ///< the FP model's own scores (kl 0, top1 1)
};

namespace detail {

/// Log-softmax of one row of logits, in double.
inline void log_softmax(std::span<const float> logits, std::vector<double>& out)
{
    out.resize(logits.size());
    double mx = -std::numeric_limits<double>::infinity();
    for (const float v : logits) mx = std::max(mx, static_cast<double>(v));
    double sum = 0.0;
    for (const float v : logits) sum += std::exp(static_cast<double>(v) - mx);
    const double lse = mx + std::log(sum);
    for (std::size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<double>(logits[i]) - lse;
}

/// Runs every sequence through the model and calls visit(target, logits row) per prediction.
template <class Visit>
void for_each_prediction(const model& m, const activation_hooks& hooks, const eval_set& set, Visit&& visit)
{
    kv_cache cache(m.config);
    workspace ws(m.config);
    rows logits;
    for (const auto& s : set.sequences) {
        if (s.size() < 2)
            spinquant::detail::fail(spinquant::errc::bad_argument, "llama::evaluate",
                                    "a sequence has " + std::to_string(s.size()) + " tokens, expected at least 2");
        cache.clear();
        const std::span<const int> all(s);
        forward(m, all.first(s.size() - 1), 0, cache, hooks, ws, logits);
        for (std::size_t t = 0; t + 1 < s.size(); ++t) {
            const auto r = logits.row(static_cast<Eigen::Index>(t));
            visit(s[t + 1], std::span<const float>(r.data(), static_cast<std::size_t>(r.size())));
        }
    }
}

}  // namespace detail

/// Runs the full-precision model `fp` (no hooks) over `set` and keeps what evaluate() compares to.
/// Errors: those of forward() (token ids, sequence longer than the context).
[[nodiscard]] inline reference make_reference(const model& fp, const eval_set& set)
{
    reference ref;
    ref.vocab = fp.config.vocab_size;
    ref.log_probs.reserve(set.predictions() * ref.vocab);
    ref.top1.reserve(set.predictions());
    std::vector<double> lp;
    double nll = 0.0;
    detail::for_each_prediction(fp, activation_hooks{}, set, [&](int target, std::span<const float> logits) {
        detail::log_softmax(logits, lp);
        nll -= lp[static_cast<std::size_t>(target)];
        for (const double v : lp) ref.log_probs.push_back(static_cast<float>(v));
        ref.top1.push_back(argmax(logits));
    });
    ref.fp.predictions = ref.top1.size();
    ref.fp.ppl = std::exp(nll / static_cast<double>(ref.fp.predictions));
    ref.fp.kl = 0.0;
    ref.fp.top1 = 1.0;
    return ref;
}

/// Perplexity of `m` with `hooks` on `set`, KL divergence from the reference's distribution to
/// the model's (mean over predictions, nats) and top-1 agreement with the reference.
/// Errors: errc::bad_shape when `ref` was made for another set or vocabulary; those of forward().
[[nodiscard]] inline metrics evaluate(const model& m, const activation_hooks& hooks, const eval_set& set,
                                      const reference& ref)
{
    if (ref.top1.size() != set.predictions() || ref.vocab != m.config.vocab_size)
        spinquant::detail::fail(spinquant::errc::bad_shape, "llama::evaluate",
                                "the reference holds " + std::to_string(ref.top1.size()) + " predictions over " +
                                    std::to_string(ref.vocab) + " tokens, the set has " +
                                    std::to_string(set.predictions()) + " over " + std::to_string(m.config.vocab_size));
    std::vector<double> lp;
    double nll = 0.0, kl = 0.0;
    std::size_t agree = 0, i = 0;
    detail::for_each_prediction(m, hooks, set, [&](int target, std::span<const float> logits) {
        detail::log_softmax(logits, lp);
        nll -= lp[static_cast<std::size_t>(target)];
        const float* p = &ref.log_probs[i * ref.vocab];
        double k = 0.0;
        for (std::size_t v = 0; v < ref.vocab; ++v) {
            const double lf = static_cast<double>(p[v]);
            k += std::exp(lf) * (lf - lp[v]);
        }
        kl += k;
        agree += argmax(logits) == ref.top1[i] ? 1u : 0u;
        ++i;
    });
    metrics r;
    r.predictions = i;
    r.ppl = std::exp(nll / static_cast<double>(i));
    r.kl = kl / static_cast<double>(i);
    r.top1 = static_cast<double>(agree) / static_cast<double>(i);
    return r;
}

// ---------------------------------------------------------------------------------------------
// Results

/// "W4A4KV4"-style label of a bit setting; 16 means unquantized ("W4A16KV16").
[[nodiscard]] inline std::string bits_label(unsigned w, unsigned a, unsigned kv)
{
    return "W" + std::to_string(w) + "A" + std::to_string(a) + "KV" + std::to_string(kv);
}

/// One evaluated configuration. The full-precision row has method, bits and weights "FP".
struct result_row {
    std::string method;             ///< "FP", "RTN" (no rotation), "QuaRot", "SpinQuant no_had", "SpinQuant had"
    std::string bits;               ///< bits_label(...) or "FP"
    std::string weights;            ///< "RTN", "GPTQ" or "FP"
    std::optional<std::uint64_t> seed;  ///< rotation seed for random and learned rotations
    metrics m;
};

/// The rows of one (method, bits, weights) configuration over its seeds.
struct result_summary {
    std::string method, bits, weights;
    std::size_t seeds = 0;  ///< rows aggregated (1 for deterministic configurations)
    double ppl = 0, ppl_spread = 0, kl = 0, kl_spread = 0, top1 = 0, top1_spread = 0;
};

namespace detail {
/// Mean and sample standard deviation (0 for a single value).
inline void mean_spread(const std::vector<double>& x, double& mean, double& spread)
{
    mean = 0.0;
    for (const double v : x) mean += v;
    mean /= static_cast<double>(x.size());
    double ss = 0.0;
    for (const double v : x) ss += (v - mean) * (v - mean);
    spread = x.size() > 1 ? std::sqrt(ss / static_cast<double>(x.size() - 1)) : 0.0;
}
[[nodiscard]] inline std::string format(const char* fmt, double v)
{
    char buf[64];
    std::snprintf(buf, sizeof buf, fmt, v);
    return buf;
}
[[nodiscard]] inline std::string json_string(std::string_view s)
{
    std::string out = "\"";
    for (const char c : s) {
        if (c == '"' || c == '\\') out += '\\';
        if (static_cast<unsigned char>(c) < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
            out += buf;
            continue;
        }
        out += c;
    }
    return out + "\"";
}
}  // namespace detail

/// Groups rows by (method, bits, weights) in order of first appearance: mean and sample
/// standard deviation over seeds of ppl, kl and top1.
[[nodiscard]] inline std::vector<result_summary> summarize(const std::vector<result_row>& rows_in)
{
    std::vector<result_summary> out;
    std::vector<std::vector<const result_row*>> members;
    for (const auto& r : rows_in) {
        std::size_t g = 0;
        while (g < out.size() && !(out[g].method == r.method && out[g].bits == r.bits && out[g].weights == r.weights)) ++g;
        if (g == out.size()) {
            out.push_back({r.method, r.bits, r.weights});
            members.emplace_back();
        }
        members[g].push_back(&r);
    }
    for (std::size_t g = 0; g < out.size(); ++g) {
        std::vector<double> p, k, t;
        for (const auto* r : members[g]) {
            p.push_back(r->m.ppl);
            k.push_back(r->m.kl);
            t.push_back(r->m.top1);
        }
        out[g].seeds = members[g].size();
        detail::mean_spread(p, out[g].ppl, out[g].ppl_spread);
        detail::mean_spread(k, out[g].kl, out[g].kl_spread);
        detail::mean_spread(t, out[g].top1, out[g].top1_spread);
    }
    return out;
}

/// Prints the summary as an aligned table: mean, and "± std" where several seeds were run.
inline void write_table(std::ostream& os, const std::vector<result_summary>& table)
{
    const auto pm = [](const char* fmt, double mean, double spread, std::size_t n) {
        std::string s = detail::format(fmt, mean);
        if (n > 1) s += " ± " + detail::format(fmt, spread);
        return s;
    };
    std::size_t wm = 6, wb = 4, ww = 7;
    for (const auto& r : table) {
        wm = std::max(wm, r.method.size());
        wb = std::max(wb, r.bits.size());
        ww = std::max(ww, r.weights.size());
    }
    const auto pad = [](std::string s, std::size_t w) {
        // Count code points, not bytes, so "±" does not break the alignment.
        std::size_t n = 0;
        for (const char c : s) n += (static_cast<unsigned char>(c) & 0xC0u) != 0x80u ? 1u : 0u;
        if (n < w) s.append(w - n, ' ');
        return s;
    };
    os << pad("method", wm) << "  " << pad("bits", wb) << "  " << pad("weights", ww) << "  seeds  "
       << pad("ppl", 16) << "  " << pad("KL to FP", 20) << "  top-1 agreement\n";
    for (const auto& r : table)
        os << pad(r.method, wm) << "  " << pad(r.bits, wb) << "  " << pad(r.weights, ww) << "  "
           << pad(std::to_string(r.seeds), 5) << "  " << pad(pm("%.3f", r.ppl, r.ppl_spread, r.seeds), 16) << "  "
           << pad(pm("%.5f", r.kl, r.kl_spread, r.seeds), 20) << "  " << pm("%.4f", r.top1, r.top1_spread, r.seeds)
           << "\n";
}

/// Writes one line per row: method,bits,weights,seed,ppl,kl,top1 (seed empty when not
/// applicable; numbers with 9 significant digits).
inline void write_csv(std::ostream& os, const std::vector<result_row>& rows_in)
{
    os << "method,bits,weights,seed,ppl,kl,top1\n";
    for (const auto& r : rows_in)
        os << r.method << ',' << r.bits << ',' << r.weights << ',' << (r.seed ? std::to_string(*r.seed) : "") << ','
           << detail::format("%.9g", r.m.ppl) << ',' << detail::format("%.9g", r.m.kl) << ','
           << detail::format("%.9g", r.m.top1) << '\n';
}

/// How the numbers were obtained, recorded beside them in the JSON output.
struct eval_protocol {
    std::string text;               ///< e.g. "tinystories_valid_head.txt, evaluation part" or "sampled, seed 1"
    std::size_t sequences = 0;
    std::size_t predictions = 0;
    std::size_t window = 0;         ///< tokens per window (window - 1 predictions)
};

/// Writes {"protocol": {...}, "rows": [...], "summary": [...]}.
inline void write_json(std::ostream& os, const eval_protocol& p, const std::vector<result_row>& rows_in)
{
    using detail::format;
    using detail::json_string;
    os << "{\n  \"protocol\": {\"text\": " << json_string(p.text) << ", \"sequences\": " << p.sequences
       << ", \"predictions\": " << p.predictions << ", \"window\": " << p.window << "},\n  \"rows\": [";
    for (std::size_t i = 0; i < rows_in.size(); ++i) {
        const auto& r = rows_in[i];
        os << (i ? ",\n    " : "\n    ") << "{\"method\": " << json_string(r.method)
           << ", \"bits\": " << json_string(r.bits) << ", \"weights\": " << json_string(r.weights)
           << ", \"seed\": " << (r.seed ? std::to_string(*r.seed) : "null") << ", \"ppl\": " << format("%.9g", r.m.ppl)
           << ", \"kl\": " << format("%.9g", r.m.kl) << ", \"top1\": " << format("%.9g", r.m.top1) << "}";
    }
    os << "\n  ],\n  \"summary\": [";
    const auto table = summarize(rows_in);
    for (std::size_t i = 0; i < table.size(); ++i) {
        const auto& r = table[i];
        os << (i ? ",\n    " : "\n    ") << "{\"method\": " << json_string(r.method)
           << ", \"bits\": " << json_string(r.bits) << ", \"weights\": " << json_string(r.weights)
           << ", \"seeds\": " << r.seeds << ", \"ppl\": " << format("%.9g", r.ppl)
           << ", \"ppl_spread\": " << format("%.9g", r.ppl_spread) << ", \"kl\": " << format("%.9g", r.kl)
           << ", \"kl_spread\": " << format("%.9g", r.kl_spread) << ", \"top1\": " << format("%.9g", r.top1)
           << ", \"top1_spread\": " << format("%.9g", r.top1_spread) << "}";
    }
    os << "\n  ]\n}\n";
}

}  // namespace llama
