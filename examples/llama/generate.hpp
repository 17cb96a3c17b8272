#pragma once
/// Text generation with the (optionally quantized) forward pass: greedy decoding, as run.c at
/// temperature 0, and seeded sampling at a temperature, reproducible on every platform (the
/// draw goes through spinquant::detail::uniform01, never a std:: distribution).
#include <cmath>
#include <cstddef>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <spinquant/detail/random.hpp>
#include <spinquant/error.hpp>

#include "forward.hpp"
#include "tokenizer.hpp"

namespace llama {

/// Index of the largest value (the first one on ties, as run.c's argmax). Precondition: non-empty.
[[nodiscard]] inline int argmax(std::span<const float> x) noexcept
{
    std::size_t best = 0;
    for (std::size_t i = 1; i < x.size(); ++i)
        if (x[i] > x[best]) best = i;
    return static_cast<int>(best);
}

/// Draws an index from softmax(logits / temperature) by inverting the cumulative distribution
/// (accumulated in double) at one uniform draw. Precondition: non-empty, temperature > 0.
template <std::uniform_random_bit_generator G>
[[nodiscard]] int sample_token(std::span<const float> logits, double temperature, G& rng)
{
    double mx = static_cast<double>(logits[0]);
    for (const float v : logits) mx = std::max(mx, static_cast<double>(v));
    double total = 0.0;
    for (const float v : logits) total += std::exp((static_cast<double>(v) - mx) / temperature);
    const double u = spinquant::detail::uniform01(rng) * total;
    double cdf = 0.0;
    for (std::size_t i = 0; i < logits.size(); ++i) {
        cdf += std::exp((static_cast<double>(logits[i]) - mx) / temperature);
        if (u < cdf) return static_cast<int>(i);
    }
    return static_cast<int>(logits.size() - 1);  // u within rounding of the total
}

/// Feeds `prompt` (non-empty) through the model, then appends up to `max_new` tokens, each
/// chosen by `pick(std::span<const float> logits) -> int` from the logits after the previous
/// one. Stops early when `stop_at_bos` and BOS is picked (run.c's end of a story; BOS is not
/// returned) or at the model's context length. Returns the new tokens only.
/// Errors: errc::bad_argument for an empty prompt or a token id out of range.
template <class Pick>
[[nodiscard]] std::vector<int> generate(const model& m, const activation_hooks& hooks, std::span<const int> prompt,
                                        std::size_t max_new, Pick&& pick, bool stop_at_bos = true)
{
    if (prompt.empty())
        spinquant::detail::fail(spinquant::errc::bad_argument, "llama::generate", "the prompt is empty, expected at least BOS");
    kv_cache cache(m.config);
    workspace ws(m.config);
    rows logits;
    std::vector<int> out;
    forward(m, prompt, 0, cache, hooks, ws, logits);
    for (std::size_t pos = prompt.size(); out.size() < max_new; ++pos) {
        const auto last = logits.row(logits.rows() - 1);
        const int next = pick(std::span<const float>(last.data(), static_cast<std::size_t>(last.size())));
        if (stop_at_bos && next == bos_id) break;
        out.push_back(next);
        if (pos >= m.config.seq_len || out.size() == max_new) break;
        const int feed[1] = {next};
        forward(m, feed, pos, cache, hooks, ws, logits);
    }
    return out;
}

/// run.c at temperature 0: greedy tokens after `prompt`, stopping at BOS.
[[nodiscard]] inline std::vector<int> generate_greedy(const model& m, const activation_hooks& hooks,
                                                      std::span<const int> prompt, std::size_t max_new)
{
    return generate(m, hooks, prompt, max_new, [](std::span<const float> l) { return argmax(l); });
}

}  // namespace llama
