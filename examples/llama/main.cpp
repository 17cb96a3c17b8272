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
#include "rotate.hpp"
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
  --eval-tokens N       evaluation tokens (default: 8192: 32 windows, 8160 predictions)
  --window N            tokens per window (default: 256); windows do not overlap, and each
                        predicts its tokens after the first (N - 1 predictions)
  --calib-tokens N      calibration tokens (default: 8192), from the calibration part
  --dummy-prefix WHERE  every (default: run.c's encoder on each block of the text) or first
                        (the dummy-prefix space on the text's first block only)
  --eval-seed S         seed of the sampled evaluation text (default: 1)
  --calib-seed S        seed of the sampled calibration text (default: 2)
  --seeds N             rotation seeds of the random and learned rows (default: 3)
  --steps N             Cayley SGD steps per learned rotation (default: 100, as the reference)
  --lr X                Cayley SGD learning rate (default: 1.5, as the reference)
  --no-w-clip           weights without the MSE clip search (the reference's scripts use it)
  --methods LIST        comma-separated subset of rtn,hadamard,no_had,had,e2e (default: all);
                        e2e = SpinQuant had with R1/R2 learned on the quantized network's
                        cross-entropy (straight-through gradients), the others use the
                        layer-wise objectives
  --batch N             calibration sequences per step of the end-to-end learning (default: 8)
  --save-rotations DIR  write each seed's learned rotations to DIR/rotations_<layerwise|e2e>_seed<S>.bin
  --load-rotations DIR  read learned rotations from those files instead of learning
  --csv PATH            write the rows as CSV (method,bits,weights,seed,ppl,kl,top1)
  --json PATH           write the protocol, rows and summary as JSON
  --greedy N            print the greedy continuation of BOS (N tokens, as run.c -t 0) and exit
  --sites               where the W4A4KV4 loss comes from: perplexity with 4-bit weights plus
                        one 4-bit activation or cache site at a time, without rotations and
                        with random Hadamard R1-R4 (the rotation seeds), and exit
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
    llama::dummy_prefix prefix = llama::dummy_prefix::every_block;
    bool w_clip = true;
    std::uint64_t eval_seed = 1;
    std::uint64_t calib_seed = 2;
    std::size_t seeds = 3;
    std::size_t steps = 100;
    double lr = 1.5;
    std::vector<std::string> methods = {"rtn", "hadamard", "no_had", "had", "e2e"};
    std::size_t batch = 8;
    std::optional<std::filesystem::path> save_rotations, load_rotations;
    std::optional<std::filesystem::path> csv, json;
    std::optional<std::size_t> greedy;
    bool bench = false;
    bool sites = false;
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
        } else if (a == "--dummy-prefix") {
            const std::string& v = value();
            if (v == "every")
                o.prefix = llama::dummy_prefix::every_block;
            else if (v == "first")
                o.prefix = llama::dummy_prefix::first_block;
            else
                bad_usage("--dummy-prefix expects 'every' or 'first', got '" + v + "'");
        } else if (a == "--no-w-clip") {
            o.w_clip = false;
        } else if (a == "--eval-seed") {
            o.eval_seed = parse_number(a, value());
        } else if (a == "--calib-seed") {
            o.calib_seed = parse_number(a, value());
        } else if (a == "--seeds") {
            o.seeds = parse_number(a, value());
        } else if (a == "--steps") {
            o.steps = parse_number(a, value());
        } else if (a == "--lr") {
            const std::string& v = value();
            std::size_t used = 0;
            try {
                o.lr = std::stod(v, &used);
            } catch (const std::exception&) {
                used = 0;
            }
            if (used != v.size() || !(o.lr > 0)) bad_usage("--lr expects a positive number, got '" + v + "'");
        } else if (a == "--methods") {
            o.methods.clear();
            std::stringstream list(value());
            for (std::string m; std::getline(list, m, ',');) {
                if (m != "rtn" && m != "hadamard" && m != "no_had" && m != "had" && m != "e2e")
                    bad_usage("--methods: unknown method '" + m + "' (expected rtn, hadamard, no_had, had, e2e)");
                o.methods.push_back(m);
            }
        } else if (a == "--batch") {
            o.batch = parse_number(a, value());
            if (o.batch == 0) bad_usage("--batch must be at least 1");
        } else if (a == "--save-rotations") {
            o.save_rotations = value();
        } else if (a == "--load-rotations") {
            o.load_rotations = value();
        } else if (a == "--csv") {
            o.csv = value();
        } else if (a == "--json") {
            o.json = value();
        } else if (a == "--sites") {
            o.sites = true;
        } else if (a == "--bench") {
            o.bench = true;
        } else if (a == "--greedy") {
            o.greedy = parse_number(a, value());
        } else {
            bad_usage("unknown option '" + a + "'");
        }
    }
    if (o.window < 2 || o.eval_tokens < o.window || o.calib_tokens < o.window)
        bad_usage("--eval-tokens and --calib-tokens must be at least --window, which must be at least 2");
    if (o.seeds == 0) bad_usage("--seeds must be at least 1");
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

/// --sites: the perplexity of W4 weights (RTN) plus one 4-bit site at a time, with no rotation and
/// with random Hadamard R1-R4 for each seed: which quantizer costs what, and which rotation can
/// reach it (a site's error changes only with the rotations that act on its values).
void sites(const llama::model& fp, const llama::eval_set& eval, const llama::reference& ref, std::size_t seeds, bool w_clip)
{
    const llama::online_rotations online(fp.config);
    struct site {
        const char* name;
        const char* rotations;
        llama::activation_hook llama::activation_hooks::*hook;
    };
    using H = llama::activation_hooks;
    const site list[] = {{"A4 q/k/v_proj input", "R1", &H::attn_input}, {"A4 o_proj input", "R2", &H::o_input},
                         {"A4 gate/up_proj input", "R1", &H::ffn_input}, {"A4 down_proj input", "R4", &H::down_input},
                         {"K4 cache", "R3", &H::key},                    {"V4 cache", "R2", &H::value}};
    std::vector<std::string> columns{"no rotation"};
    std::vector<std::vector<double>> ppl(std::size(list) + 2);  // W4 only, each site, W4A4KV4
    for (std::size_t r = 0; r <= seeds; ++r) {
        const bool had = r > 0;
        if (had) columns.push_back("random Hadamard, seed " + std::to_string(r - 1));
        llama::model m = had ? llama::rotated_model(fp, llama::random_hadamard_rotations(fp.config, r - 1), &online) : fp;
        auto w4 = llama::quant_config::bits(4, 16, 16), all = llama::quant_config::bits(4, 4, 4);
        for (auto* q : {&w4, &all}) {
            q->w_clip = w_clip;
            q->online_r3 = q->online_r4 = had;
        }
        llama::quantize_weights_rtn(m, w4);
        const auto base = llama::make_quant_hooks(fp.config, w4, &online);
        const auto full = llama::make_quant_hooks(fp.config, all, &online);
        ppl[0].push_back(llama::evaluate(m, base, eval, ref).ppl);
        for (std::size_t i = 0; i < std::size(list); ++i) {
            auto h = base;
            h.*list[i].hook = full.*list[i].hook;  // the site's quantizer, with its online rotation if any
            ppl[i + 1].push_back(llama::evaluate(m, h, eval, ref).ppl);
        }
        ppl.back().push_back(llama::evaluate(m, full, eval, ref).ppl);
    }
    std::printf("perplexity with W4 (RTN) weights plus one 4-bit site (full precision: %.3f)\n", ref.fp.ppl);
    std::printf("%-26s %-10s", "site", "rotated by");
    for (const auto& c : columns) std::printf("  %*s", static_cast<int>(std::max<std::size_t>(c.size(), 8)), c.c_str());
    std::printf("\n");
    const auto row = [&](const char* name, const char* by, const std::vector<double>& v) {
        std::printf("%-26s %-10s", name, by);
        for (std::size_t i = 0; i < v.size(); ++i)
            std::printf("  %*.3f", static_cast<int>(std::max<std::size_t>(columns[i].size(), 8)), v[i]);
        std::printf("\n");
    };
    row("W4 weights only", "R1 R2 R4", ppl[0]);
    for (std::size_t i = 0; i < std::size(list); ++i)
        row((std::string("+ ") + list[i].name).c_str(), list[i].rotations, ppl[i + 1]);
    row("W4A4KV4 (all sites)", "", ppl.back());
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
        const auto stream = llama::tokenize_blocks(tok, text, o.prefix);
        const auto split = llama::split_at_byte(stream, o.split);
        std::cout << "text: " << text_path->filename().string() << ": " << stream.tokens.size() << " tokens in "
                  << stream.block_byte.size() << " blocks; evaluation part " << split.evaluation.size()
                  << " tokens (blocks 0.." << split.first_calibration_block - 1 << "), calibration part "
                  << split.calibration.size() << " tokens\n";
        eval = llama::make_windows(split.evaluation, o.window, o.eval_tokens);
        calib = llama::make_windows(split.calibration, o.window, o.calib_tokens);
        protocol.text = text_path->filename().string() + ", evaluation part (bytes 0.." + std::to_string(o.split) +
                        "), first " + std::to_string(eval.sequences.size() * o.window) + " tokens, dummy prefix on " +
                        (o.prefix == llama::dummy_prefix::every_block ? "every block" : "the first block");
    } else {
        const std::size_t count = o.eval_tokens / o.window;
        eval = llama::sample_sequences(fp, count, o.window - 1, o.eval_seed);
        calib = llama::sample_sequences(fp, o.calib_tokens / o.window, o.window - 1, o.calib_seed);
        std::cout << "text: no text file; evaluating on " << count << " sequences of BOS + " << o.window - 1
                  << " tokens sampled from the full-precision model (seed " << o.eval_seed
                  << "), calibration text sampled with seed " << o.calib_seed << "\n";
        protocol.text = "sampled from the full-precision model at temperature 1, seed " + std::to_string(o.eval_seed);
    }
    protocol.sequences = eval.sequences.size();
    protocol.predictions = eval.predictions();
    std::cout << "evaluation: " << protocol.sequences << " windows of " << o.window << " tokens ("
              << protocol.predictions << " predictions); calibration: " << calib.sequences.size() << " windows ("
              << calib.predictions() << " predictions, never from the evaluation part)\n\n";

    if (o.bench) {
        bench(fp, eval);
        return 0;
    }

    const auto t_ref = std::chrono::steady_clock::now();
    const llama::reference ref = llama::make_reference(fp, eval);
    const double fp_seconds = seconds_since(t_ref);
    if (o.sites) {
        sites(fp, eval, ref, o.seeds, o.w_clip);
        return 0;
    }
    std::vector<llama::result_row> rows;
    rows.push_back({"FP", "FP", "FP", std::nullopt, ref.fp});

    // Each method is a rotated (or plain) model, its W4 weights by RTN or by GPTQ on the
    // calibration set (computed once per method and seed, shared by the three bit settings).
    const auto wanted = [&](const char* m) { return std::find(o.methods.begin(), o.methods.end(), m) != o.methods.end(); };
    const llama::online_rotations online(c);
    const auto with_clip = [&](llama::quant_config q) {
        q.w_clip = o.w_clip;
        return q;
    };
    const auto w4 = with_clip(llama::quant_config::bits(4, 16, 16));
    const auto settings = {w4, with_clip(llama::quant_config::bits(4, 8, 8)), with_clip(llama::quant_config::bits(4, 4, 4))};
    const auto evaluate_method = [&](const std::string& method, const llama::rotation_set* rotations, bool had,
                                     std::optional<std::uint64_t> seed) {
        const llama::model base = rotations ? llama::rotated_model(fp, *rotations, had ? &online : nullptr) : fp;
        for (const char* weights : {"RTN", "GPTQ"}) {
            llama::model m = base;
            auto wq = w4;
            wq.online_r4 = had;
            const auto t = std::chrono::steady_clock::now();
            if (std::string_view(weights) == "RTN")
                llama::quantize_weights_rtn(m, wq);
            else
                llama::quantize_weights_gptq(m, wq, calib, &online);
            const double t_weights = seconds_since(t);
            for (auto q : settings) {
                q.online_r3 = q.online_r4 = had;
                const auto te = std::chrono::steady_clock::now();
                rows.push_back({method, q.label(), weights, seed, llama::evaluate(m, llama::make_quant_hooks(c, q, &online), eval, ref)});
                std::printf("  %-16s %-9s %-4s weights%s: ppl %7.3f  (weights %.2f s, evaluation %.2f s)\n", method.c_str(),
                            q.label().c_str(), weights, seed ? (" seed " + std::to_string(*seed)).c_str() : "",
                            rows.back().m.ppl, t_weights, seconds_since(te));
                std::fflush(stdout);
            }
        }
    };

    // No rotation ("RTN" in the paper's tables).
    if (wanted("rtn")) evaluate_method("RTN", nullptr, false, std::nullopt);
    // Random Hadamard R1/R2 with online R3/R4 (QuaRot-style), and learned R1/R2 without
    // (SpinQuant no_had) and with (SpinQuant had) the online Hadamards, per seed.
    llama::learning_options learn;
    learn.steps = o.steps;
    learn.lr = o.lr;
    learn.progress = &std::cout;
    for (std::uint64_t seed = 0; seed < o.seeds; ++seed) {
        if (wanted("hadamard")) {
            const auto r = llama::random_hadamard_rotations(c, seed);
            evaluate_method("random Hadamard", &r, true, seed);
        }
        // Learned rotations, read from --load-rotations or learned and optionally saved.
        const auto learned_rotations = [&](const std::string& kind, auto&& learn_them) {
            const std::string file = "rotations_" + kind + "_seed" + std::to_string(seed) + ".bin";
            llama::rotation_set r;
            if (o.load_rotations) {
                r = spinquant::load_rotations<float>(*o.load_rotations / file);
                std::cout << "  rotations read from " << (*o.load_rotations / file).string() << "\n";
            } else {
                const auto t = std::chrono::steady_clock::now();
                llama::learning_report rep;
                r = learn_them(rep);
                std::printf("  learned in %.2f s: loss %.5g -> %.5g\n", seconds_since(t), rep.first, rep.last);
            }
            if (o.save_rotations) {
                std::filesystem::create_directories(*o.save_rotations);
                spinquant::save_rotations(*o.save_rotations / file, r);
            }
            return r;
        };
        if (wanted("no_had") || wanted("had")) {
            const auto learned = learned_rotations("layerwise", [&](llama::learning_report& rep) {
                std::cout << "  learning R1, then each R2 (seed " << seed << ", " << learn.steps << " Cayley SGD steps each, lr "
                          << learn.lr << ") on the layer-wise W4A4KV4 objectives, " << calib.predictions() << " calibration tokens\n";
                return llama::learn_rotations(fp, calib, with_clip(llama::quant_config::bits(4, 4, 4)), seed, learn, calib.predictions(), &rep);
            });
            if (wanted("no_had")) evaluate_method("SpinQuant no_had", &learned, false, seed);
            if (wanted("had")) evaluate_method("SpinQuant had", &learned, true, seed);
        }
        if (wanted("e2e")) {
            auto q = with_clip(llama::quant_config::bits(4, 4, 4));
            q.online_r3 = q.online_r4 = true;
            const auto learned = learned_rotations("e2e", [&](llama::learning_report& rep) {
                std::cout << "  learning R1 and every R2 jointly (seed " << seed << ", " << learn.steps << " Cayley SGD steps, lr "
                          << learn.lr << ") on the cross-entropy of the W4A4KV4 network with R3/R4, " << o.batch
                          << " calibration sequences per step\n";
                return llama::learn_rotations_end_to_end(fp, calib, q, &online, seed, learn, o.batch, &rep);
            });
            evaluate_method("SpinQuant had (end-to-end loss)", &learned, true, seed);
        }
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
