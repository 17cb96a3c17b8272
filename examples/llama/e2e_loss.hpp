#pragma once
/// SpinQuant's training objective (REFERENCE.md §1e) as a spinquant::rotation_objective: the
/// mean next-token cross-entropy of the rotated, quantized network on a stream of calibration
/// sequences, with its straight-through gradient with respect to R1 and every layer's R2 (every
/// model weight frozen). Drive it with spinquant::minimize and spinquant::cayley_sgd:
///
///     llama::end_to_end_loss loss(fused, q, &rot, calib, 8);
///     spinquant::cayley_sgd<float> opt(loss.shapes(), {.lr = 1.5, .max_grad_norm = 1.0,
///                                                      .schedule = {.total_steps = 100}});
///     const auto history = spinquant::minimize<float>(opt, loss, views_of_r1_and_r2s, 100);
///
/// The data stream is the reference's: the calibration sequences in order, not shuffled, `batch`
/// of them per call, wrapping around at the end.
#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <spinquant/concepts.hpp>
#include <spinquant/error.hpp>
#include <spinquant/objective.hpp>
#include <spinquant/stiefel.hpp>

#include "backward.hpp"
#include "eval.hpp"
#include "model.hpp"
#include "quant.hpp"

namespace llama {

/// The end-to-end objective in T: float for training (end_to_end_loss), double for
/// finite-difference checks of the gradient.
///
/// Each call f(rotations, gradients) takes the next `batch` calibration sequences, rotates and
/// quantizes the weights at `rotations` = {R1, R2 of layer 0, ..., R2 of layer L-1}, runs each
/// sequence forward and backward (one at a time, so memory stays at one sequence's activations,
/// sequence_bytes()), returns the mean cross-entropy over all their predictions and writes its
/// gradient in the same order. Steady state: no allocation per call once every sequence length
/// has been seen (beyond Eigen's GEMM blocks above its stack limit). Not thread-safe.
template <spinquant::real_scalar T>
class basic_end_to_end_loss {
public:
    /// The objective for the norm-fused model `fused` (norm weights folded into the linears; the
    /// classifier its own matrix, as llama::model always has it; R4's offline half merged into
    /// w2 when q.online_r4), quantized as `q`, with the online rotations `rot` (required when
    /// q.online_r3 or q.online_r4, else may be null; must outlive the objective), on `calib`
    /// (copied), `batch` sequences per call. Errors: errc::bad_argument for batch 0, an empty
    /// calibration set, a sequence of fewer than 2 tokens or a token out of range,
    /// errc::bad_shape for a sequence longer than the context plus one, and those of
    /// rotation_backward (bad bits, missing or mismatched rotations, inconsistent weights).
    basic_end_to_end_loss(const model& fused, const quant_config& q, const online_rotations* rot, const eval_set& calib,
                          std::size_t batch)
        : net_(fused, q, rot), calib_(checked(fused.config, calib, "llama::end_to_end_loss")), batch_(batch)
    {
        if (batch == 0) spinquant::detail::fail(spinquant::errc::bad_argument, "llama::end_to_end_loss", "batch is 0, expected >= 1");
    }

    /// The mean cross-entropy (natural log) over the predictions of the next `batch` sequences at
    /// `rotations` (1 + n_layers matrices: R1 dim x dim, then each layer's R2 head_size x
    /// head_size; any strides, need not be orthogonal), with its gradient written into
    /// `gradients` (same count and shapes). Advances the stream by `batch`. Errors (gradients
    /// untouched, stream not advanced): errc::bad_shape for a wrong count or shape of either,
    /// errc::non_finite for NaN/Inf in a rotation. Cost: `batch` forward+backward passes plus
    /// one rotation and quantization of the weights.
    double operator()(std::span<const spinquant::matrix_view<const T>> rotations,
                      std::span<const spinquant::matrix_view<T>> gradients)
    {
        constexpr std::string_view where = "llama::end_to_end_loss";
        check_counts(rotations.size(), "rotations", where);
        check_counts(gradients.size(), "gradients", where);
        const std::size_t L = net_.config().n_layers;
        const std::size_t d = net_.config().dim, hs = net_.config().head_size();
        for (std::size_t i = 0; i <= L; ++i) {
            const std::size_t n = i == 0 ? d : hs;
            // Names are built only when a check fails: a passing call allocates nothing here.
            const auto name = [i](const char* what) {
                return [i, what] {
                    return std::string(what) + " " + std::to_string(i) + " (" +
                           (i == 0 ? std::string("R1") : "R2 of layer " + std::to_string(i - 1)) + ")";
                };
            };
            detail::require_matrix(rotations[i].rows, rotations[i].cols, n, n, where, name("rotation"));
            detail::require_matrix(gradients[i].rows, gradients[i].cols, n, n, where, name("gradient"));
        }
        net_.begin(rotations[0], rotations.subspan(1));  // also rejects NaN/Inf before anything is written
        std::size_t predictions = 0;
        for (std::size_t k = 0; k < batch_; ++k) predictions += calib_.sequences[(next_ + k) % calib_.sequences.size()].size() - 1;
        const double scale = 1.0 / static_cast<double>(predictions);
        double nll = 0.0;
        for (std::size_t k = 0; k < batch_; ++k) nll += net_.accumulate(calib_.sequences[(next_ + k) % calib_.sequences.size()], scale);
        net_.finish(gradients[0], gradients.subspan(1));
        next_ = (next_ + batch_) % calib_.sequences.size();
        ++calls_;
        return nll * scale;
    }

    /// The mean cross-entropy over every prediction of `set` at `rotations` (as operator()),
    /// forward only: for held-out evaluation. The stream does not advance. Errors: those of
    /// operator() for the rotations, and errc::bad_argument / errc::bad_shape as the constructor
    /// for the sequences of `set`.
    [[nodiscard]] double evaluate(std::span<const spinquant::matrix_view<const T>> rotations, const eval_set& set)
    {
        constexpr std::string_view where = "llama::end_to_end_loss::evaluate";
        check_counts(rotations.size(), "rotations", where);
        (void)checked(net_.config(), set, where);
        net_.begin(rotations[0], rotations.subspan(1));
        double nll = 0.0;
        for (const auto& s : set.sequences) nll += net_.loss(s);
        return nll / static_cast<double>(set.predictions());
    }

    /// The shapes of the rotations in call order ({dim, dim}, then {head_size, head_size} per
    /// layer), e.g. to build a cayley_sgd.
    [[nodiscard]] std::vector<spinquant::stiefel_shape> shapes() const
    {
        const model_config& c = net_.config();
        std::vector<spinquant::stiefel_shape> s{{c.dim, c.dim}};
        for (std::size_t l = 0; l < c.n_layers; ++l) s.push_back({c.head_size(), c.head_size()});
        return s;
    }
    /// 1 + n_layers.
    [[nodiscard]] std::size_t rotation_count() const noexcept { return 1 + net_.config().n_layers; }
    /// Sequences per call.
    [[nodiscard]] std::size_t batch() const noexcept { return batch_; }
    /// Index of the calibration sequence the next call starts with.
    [[nodiscard]] std::size_t position() const noexcept { return next_; }
    /// Calls that returned a loss so far.
    [[nodiscard]] std::size_t calls() const noexcept { return calls_; }
    /// The calibration set (a copy of the constructor's).
    [[nodiscard]] const eval_set& calibration() const noexcept { return calib_; }
    /// The forward/backward machinery, for its network() (the weights at the last rotations),
    /// hooks() and byte counts.
    [[nodiscard]] const rotation_backward<T>& network() const noexcept { return net_; }
    /// Bytes of one sequence's activations and the backward temporaries for sequences of
    /// `tokens` predictions (rotation_backward::sequence_bytes): about 21 MiB in float for 256
    /// tokens of stories260K. The whole objective holds held_bytes().
    [[nodiscard]] std::size_t sequence_bytes(std::size_t tokens) const noexcept { return net_.sequence_bytes(tokens); }
    /// Bytes held now: weights (frozen and rotated), gradient accumulators, the activations of
    /// the longest sequence seen, and the calibration tokens.
    [[nodiscard]] std::size_t held_bytes() const noexcept
    {
        std::size_t tokens = 0;
        for (const auto& s : calib_.sequences) tokens += s.size();
        return net_.held_bytes() + tokens * sizeof(int);
    }

private:
    static const eval_set& checked(const model_config& c, const eval_set& set, std::string_view where)
    {
        if (set.sequences.empty()) spinquant::detail::fail(spinquant::errc::bad_argument, where, "the sequence set is empty");
        for (std::size_t i = 0; i < set.sequences.size(); ++i) {
            const auto& s = set.sequences[i];
            const std::string name = "sequence " + std::to_string(i);
            if (s.size() < 2)
                spinquant::detail::fail(spinquant::errc::bad_argument, where,
                                        name + " has " + std::to_string(s.size()) + " tokens, expected at least 2");
            if (s.size() - 1 > c.seq_len)
                spinquant::detail::fail(spinquant::errc::bad_shape, where,
                                        name + " has " + std::to_string(s.size()) + " tokens, more than the context " +
                                            std::to_string(c.seq_len) + " + 1");
            for (std::size_t t = 0; t < s.size(); ++t)
                if (s[t] < 0 || static_cast<std::size_t>(s[t]) >= c.vocab_size)
                    spinquant::detail::fail(spinquant::errc::bad_argument, where,
                                            name + " token " + std::to_string(t) + " is " + std::to_string(s[t]) +
                                                ", expected 0.." + std::to_string(c.vocab_size - 1));
        }
        return set;
    }

    void check_counts(std::size_t n, const char* what, std::string_view where) const
    {
        if (n != rotation_count())
            spinquant::detail::fail(spinquant::errc::bad_shape, where,
                                    std::to_string(n) + " " + what + ", expected " + std::to_string(rotation_count()) +
                                        " (R1, then one R2 per layer)");
    }

    rotation_backward<T> net_;
    eval_set calib_;
    std::size_t batch_ = 1;
    std::size_t next_ = 0;
    std::size_t calls_ = 0;
};

/// The float objective SpinQuant trains with.
using end_to_end_loss = basic_end_to_end_loss<float>;

static_assert(spinquant::rotation_objective<end_to_end_loss, float>);
static_assert(spinquant::rotation_objective<basic_end_to_end_loss<double>, double>);

}  // namespace llama
