// llama_spinquant: loads the shipped stories260K checkpoint (or another llama2.c checkpoint),
// evaluates it on real text (or on text sampled from it), and prints the table of perplexity,
// KL divergence to full precision and top-1 agreement; optionally writes CSV and JSON.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "eval.hpp"
#include "generate.hpp"
#include "model.hpp"
#include "quant.hpp"
#include "tokenizer.hpp"

namespace {

constexpr const char* usage = R"(usage: llama_spinquant [options]

Evaluates a llama2.c checkpoint in full precision and quantized, and prints one table:
perplexity, KL divergence to the full-precision model and top-1 agreement.

Options:
  --model PATH          llama2.c checkpoint            (default: the shipped stories260K.bin)
  --tokenizer PATH      llama2.c tokenizer             (default: the shipped tok512.bin)
  --text PATH           evaluation text, split into evaluation and calibration parts
                        (default: tinystories_valid_head.txt in the shared data folder, if present)
  --no-text             ignore any text file: evaluate on text sampled from the model
  --split BYTES         byte offset where the calibration part starts (default: 537401)
  --eval-tokens N       predictions to evaluate (default: 8192)
  --window N            predictions per window; windows do not overlap (default: 256)
  --calib-tokens N      calibration predictions (default: 8192), from the calibration part
  --eval-seed S         seed of the sampled evaluation text (default: 1)
  --calib-seed S        seed of the sampled calibration text (default: 2)
  --csv PATH            write the rows as CSV (method,bits,weights,seed,ppl,kl,top1)
  --json PATH           write the protocol, rows and summary as JSON
  --greedy N            print the greedy continuation of BOS (N tokens, as run.c -t 0) and exit
  --bench               time the forward pass over the evaluation windows (batched per window,
                        token by token with the cache, and quantized W4A4KV4 with R3/R4) and exit
  --help                print this text
)";

struct options {
    std::filesystem::path model = std::filesystem::path(LLAMA_DATA_DIR) / "stories260K.bin";
    std::filesystem::path tokenizer = std::filesystem::path(LLAMA_DATA_DIR) / "tok512.bin";
    std::optional<std::filesystem::path> text;
    bool no_text = false;
    std::size_t split = 537401;
    std::size_t eval_tokens = 8192;
    std::size_t window = 256;
    std::size_t calib_tokens = 8192;
    std::uint64_t eval_seed = 1;
    std::uint64_t calib_seed = 2;
    std::optional<std::filesystem::path> csv, json;
    std::optional<std::size_t> greedy;
    bool bench = false;
};

[[noreturn]] void bad_usage(const std::string& why)
{
    std::cerr << "llama_spinquant: " << why << "\n(run with --help for the options)\n";
    std::exit(2);
}

std::uint64_t parse_number(std::string_view name, const std::string& value)
{
    std::size_t used = 0;
    unsigned long long v = 0;
    try {
        v = std::stoull(value, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (used != value.size() || value.empty() || value.front() == '-')
        bad_usage(std::string(name) + " expects a non-negative integer, got '" + value + "'");
    return v;
}

options parse(int argc, char** argv)
{
    options o;
    const std::vector<std::string> args(argv + 1, argv + argc);
    for (std::size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        const auto value = [&]() -> const std::string& {
            if (i + 1 >= args.size()) bad_usage(a + " needs a value");
            return args[++i];
        };
        if (a == "--help" || a == "-h") {
            std::cout << usage;
            std::exit(0);
        } else if (a == "--model") {
            o.model = value();
        } else if (a == "--tokenizer") {
            o.tokenizer = value();
        } else if (a == "--text") {
            o.text = value();
        } else if (a == "--no-text") {
            o.no_text = true;
        } else if (a == "--split") {
            o.split = parse_number(a, value());
        } else if (a == "--eval-tokens") {
            o.eval_tokens = parse_number(a, value());
        } else if (a == "--window") {
            o.window = parse_number(a, value());
        } else if (a == "--calib-tokens") {
            o.calib_tokens = parse_number(a, value());
        } else if (a == "--eval-seed") {
            o.eval_seed = parse_number(a, value());
        } else if (a == "--calib-seed") {
            o.calib_seed = parse_number(a, value());
        } else if (a == "--csv") {
            o.csv = value();
        } else if (a == "--json") {
            o.json = value();
        } else if (a == "--bench") {
            o.bench = true;
        } else if (a == "--greedy") {
            o.greedy = parse_number(a, value());
        } else {
            bad_usage("unknown option '" + a + "'");
        }
    }
    if (o.window == 0 || o.eval_tokens < o.window || o.calib_tokens < o.window)
        bad_usage("--eval-tokens and --calib-tokens must be at least --window, which must be > 0");
    return o;
}

std::string read_text(const std::filesystem::path& p)
{
    std::ifstream in(p, std::ios::binary);
    if (!in) bad_usage("cannot read '" + p.string() + "'");
    std::ostringstream s;
    s << in.rdbuf();
    return s.str();
}

double seconds_since(std::chrono::steady_clock::time_point t0)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Seconds of the fastest of `repeats` calls of f.
template <class F>
double best_of(int repeats, F&& f)
{
    double best = 1e300;
    for (int r = 0; r < repeats; ++r) {
        const auto t = std::chrono::steady_clock::now();
        f();
        best = std::min(best, seconds_since(t));
    }
    return best;
}

/// --bench: the forward pass over `eval`, three ways, in this one binary.
void bench(const llama::model& fp, const llama::eval_set& eval)
{
    llama::kv_cache cache(fp.config);
    llama::workspace ws(fp.config);
    llama::rows logits;
    float sink = 0.0f;
    const auto batched = [&](const llama::model& m, const llama::activation_hooks& hooks) {
        for (const auto& s : eval.sequences) {
            cache.clear();
            llama::forward(m, std::span<const int>(s).first(s.size() - 1), 0, cache, hooks, ws, logits);
            sink += logits(0, 0);
        }
    };
    const auto stepwise = [&] {
        for (const auto& s : eval.sequences) {
            cache.clear();
            for (std::size_t t = 0; t + 1 < s.size(); ++t) {
                llama::forward(fp, std::span<const int>(s).subspan(t, 1), t, cache, {}, ws, logits);
                sink += logits(0, 0);
            }
        }
    };
    const llama::online_rotations rot(fp.config);
    auto q = llama::quant_config::bits(4, 4, 4);
    q.online_r3 = q.online_r4 = true;
    llama::model qm = fp;
    llama::merge_r4(qm, rot);
    llama::quantize_weights_rtn(qm, q);
    const auto hooks = llama::make_quant_hooks(fp.config, q, &rot);
    const double n = static_cast<double>(eval.predictions());
    const double t_batched = best_of(5, [&] { batched(fp, {}); });
    const double t_step = best_of(3, stepwise);
    const double t_quant = best_of(5, [&] { batched(qm, hooks); });
    std::printf("forward pass over %zu windows (%.0f tokens), best of 5 (3 for token by token):\n", eval.sequences.size(), n);
    std::printf("  full precision, batched per window   %8.4f s  %9.0f tokens/s  1.00x (baseline)\n", t_batched, n / t_batched);
    std::printf("  full precision, token by token        %8.4f s  %9.0f tokens/s  %.2fx the time\n", t_step, n / t_step,
                t_step / t_batched);
    std::printf("  W4A4KV4 + online R3/R4, batched       %8.4f s  %9.0f tokens/s  %.2fx the time\n", t_quant,
                n / t_quant, t_quant / t_batched);
    if (sink == 12345.0f) std::printf("%g\n", static_cast<double>(sink));  // keeps the work observable
}

int run(const options& o)
{
    const auto t0 = std::chrono::steady_clock::now();
    const llama::model fp = llama::load_checkpoint(o.model);
    const llama::tokenizer tok = llama::tokenizer::load(o.tokenizer, fp.config.vocab_size);
    const auto& c = fp.config;
    std::cout << "model: " << o.model.filename().string() << ": dim " << c.dim << ", hidden " << c.hidden_dim << ", "
              << c.n_layers << " layers, " << c.n_heads << " heads (" << c.n_kv_heads << " kv), head size "
              << c.head_size() << ", vocab " << c.vocab_size << ", context " << c.seq_len << ", "
              << c.parameter_count() << " parameters" << (c.shared_classifier ? " (tied classifier)" : "") << "\n";

    if (o.greedy) {
        const int bos[1] = {llama::bos_id};
        const auto ids = llama::generate_greedy(fp, {}, bos, *o.greedy);
        std::cout << tok.decode(ids, llama::bos_id) << "\n";
        return 0;
    }

    // Evaluation text: the real text's evaluation part, or text sampled from the FP model.
    std::optional<std::filesystem::path> text_path = o.text;
    if (!text_path && !o.no_text) {
        const auto shared = std::filesystem::path(LLAMA_SHARED_DIR) / "data" / "tinystories_valid_head.txt";
        if (std::filesystem::exists(shared)) text_path = shared;
    }
    llama::eval_set eval, calib;
    llama::eval_protocol protocol;
    protocol.window = o.window;
    if (text_path && !o.no_text) {
        const std::string text = read_text(*text_path);
        const auto stream = llama::tokenize_blocks(tok, text);
        const auto split = llama::split_at_byte(stream, o.split);
        std::cout << "text: " << text_path->filename().string() << ": " << stream.tokens.size() << " tokens in "
                  << stream.block_byte.size() << " blocks; evaluation part " << split.evaluation.size()
                  << " tokens (blocks 0.." << split.first_calibration_block - 1 << "), calibration part "
                  << split.calibration.size() << " tokens\n";
        eval = llama::make_windows(split.evaluation, o.window, o.eval_tokens);
        calib = llama::make_windows(split.calibration, o.window, o.calib_tokens);
        protocol.text = text_path->filename().string() + ", evaluation part (bytes 0.." + std::to_string(o.split) +
                        "), first " + std::to_string(eval.predictions()) + " predictions";
    } else {
        const std::size_t count = o.eval_tokens / o.window;
        eval = llama::sample_sequences(fp, count, o.window, o.eval_seed);
        calib = llama::sample_sequences(fp, o.calib_tokens / o.window, o.window, o.calib_seed);
        std::cout << "text: no text file; evaluating on " << count << " sequences of BOS + " << o.window
                  << " tokens sampled from the full-precision model (seed " << o.eval_seed
                  << "), calibration text sampled with seed " << o.calib_seed << "\n";
        protocol.text = "sampled from the full-precision model at temperature 1, seed " + std::to_string(o.eval_seed);
    }
    protocol.sequences = eval.sequences.size();
    protocol.predictions = eval.predictions();
    std::cout << "evaluation: " << protocol.sequences << " windows of " << o.window << " predictions ("
              << protocol.predictions << " in all); calibration: " << calib.sequences.size() << " windows ("
              << calib.predictions() << " predictions, never from the evaluation part)\n\n";

    if (o.bench) {
        bench(fp, eval);
        return 0;
    }

    const auto t_ref = std::chrono::steady_clock::now();
    const llama::reference ref = llama::make_reference(fp, eval);
    const double fp_seconds = seconds_since(t_ref);
    std::vector<llama::result_row> rows;
    rows.push_back({"FP", "FP", "FP", std::nullopt, ref.fp});

    // No rotation ("RTN" in the paper's tables), with W4 weights rounded to nearest or by GPTQ on
    // the calibration set; each weight variant is computed once and shared by the three rows.
    const auto w4 = llama::quant_config::bits(4, 16, 16);
    std::vector<std::pair<std::string, llama::model>> weights;
    weights.emplace_back("RTN", fp);
    llama::quantize_weights_rtn(weights.back().second, w4);
    const auto t_gptq = std::chrono::steady_clock::now();
    weights.emplace_back("GPTQ", fp);
    llama::quantize_weights_gptq(weights.back().second, w4, calib);
    std::cout << "  GPTQ on " << calib.predictions() << " calibration tokens: " << seconds_since(t_gptq) << " s"
              << std::endl;
    for (const auto& [name, m] : weights)
        for (const auto& q : {llama::quant_config::bits(4, 16, 16), llama::quant_config::bits(4, 8, 8),
                              llama::quant_config::bits(4, 4, 4)}) {
            const auto t = std::chrono::steady_clock::now();
            rows.push_back({"RTN", q.label(), name, std::nullopt, llama::evaluate(m, llama::make_quant_hooks(c, q), eval, ref)});
            std::cout << "  RTN " << q.label() << " " << name << " weights: evaluated in " << seconds_since(t) << " s ("
                      << seconds_since(t) / fp_seconds << "x the full-precision pass)" << std::endl;
        }

    llama::write_table(std::cout, llama::summarize(rows));
    std::cout << "\nfull-precision pass: " << fp_seconds << " s (" << static_cast<double>(protocol.predictions) / fp_seconds
              << " tokens/s); total " << seconds_since(t0) << " s\n";
    if (o.csv) {
        std::ofstream f(*o.csv);
        llama::write_csv(f, rows);
        if (!f) bad_usage("cannot write '" + o.csv->string() + "'");
    }
    if (o.json) {
        std::ofstream f(*o.json);
        llama::write_json(f, protocol, rows);
        if (!f) bad_usage("cannot write '" + o.json->string() + "'");
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv)
{
    const options o = parse(argc, argv);
    try {
        return run(o);
    } catch (const std::exception& e) {
        std::cerr << "llama_spinquant: " << e.what() << "\n";
        return 1;
    }
}
