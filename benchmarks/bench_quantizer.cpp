// Per-row asymmetric 4-bit quantization (the reference's per-token activation quantizer, A4 with
// --a_asym) of float matrices: fake quantization in place, and quantization to packed 4-bit codes.
// Baselines in the same binary: the same formulas as a plain scalar loop (vectorization disabled),
// the same loop with the compiler free to auto-vectorize it, and a streaming in-place pass that
// reads and writes the same bytes (the memory-bound ceiling).
//
// Run: bench_quantizer --benchmark_min_time=0.5
// Arguments: rows (cols = 4096). 1 and 64 rows stay in cache; 4096 rows (64 MiB) do not.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <xsimd/xsimd.hpp>

#include <spinquant/detail/random.hpp>
#include <spinquant/quantizer.hpp>

namespace {

constexpr std::size_t cols = 4096;
constexpr int bits = 4;
constexpr float qmax = 15.0f;

std::vector<float> make_input(std::size_t rows)
{
    std::mt19937_64 g(42);
    spinquant::detail::normal_sampler normal;
    std::vector<float> x(rows * cols);
    for (float& v : x) v = static_cast<float>(normal(g));
    return x;
}

const spinquant::quant_spec spec = spinquant::quant_spec::activation(bits);  // asymmetric, per token

// The baseline loops: the reference formulas written the obvious way. NOVEC keeps one copy
// scalar; the other copy is the same source with auto-vectorization allowed.
#if defined(__clang__)
#define SPINQUANT_BENCH_NOVEC _Pragma("clang loop vectorize(disable) interleave(disable)")
#define SPINQUANT_BENCH_NOVEC_FN
#elif defined(__GNUC__)
#define SPINQUANT_BENCH_NOVEC
#define SPINQUANT_BENCH_NOVEC_FN __attribute__((optimize("no-tree-vectorize")))
#else
#define SPINQUANT_BENCH_NOVEC
#define SPINQUANT_BENCH_NOVEC_FN
#endif

struct row_params {
    float scale;
    float zero;
};

#define SPINQUANT_BENCH_ROW_PARAMS(PRAGMA)                                  \
    float lo = r[0], hi = r[0];                                             \
    PRAGMA for (std::size_t j = 1; j < n; ++j)                              \
    {                                                                       \
        lo = r[j] < lo ? r[j] : lo;                                         \
        hi = r[j] > hi ? r[j] : hi;                                         \
    }                                                                       \
    lo = lo < 0.0f ? lo : 0.0f;                                             \
    hi = hi > 0.0f ? hi : 0.0f;                                             \
    if (lo == 0.0f && hi == 0.0f) {                                         \
        lo = -1.0f;                                                         \
        hi = 1.0f;                                                          \
    }                                                                       \
    const float scale = (hi - lo) / qmax;                                   \
    const row_params p{scale, std::nearbyint(-lo / scale)};

SPINQUANT_BENCH_NOVEC_FN void scalar_fake_quantize_row(float* r, std::size_t n)
{
    SPINQUANT_BENCH_ROW_PARAMS(SPINQUANT_BENCH_NOVEC)
    SPINQUANT_BENCH_NOVEC for (std::size_t j = 0; j < n; ++j)
    {
        float q = std::nearbyint(r[j] / p.scale) + p.zero;
        q = q >= 0.0f ? q : 0.0f;
        q = q <= qmax ? q : qmax;
        r[j] = p.scale * (q - p.zero);
    }
}

void autovec_fake_quantize_row(float* r, std::size_t n)
{
    SPINQUANT_BENCH_ROW_PARAMS()
    for (std::size_t j = 0; j < n; ++j) {
        float q = std::nearbyint(r[j] / p.scale) + p.zero;
        q = q >= 0.0f ? q : 0.0f;
        q = q <= qmax ? q : qmax;
        r[j] = p.scale * (q - p.zero);
    }
}

SPINQUANT_BENCH_NOVEC_FN void scalar_pack_row(const float* r, std::size_t n, std::uint8_t* out, row_params& pp)
{
    SPINQUANT_BENCH_ROW_PARAMS(SPINQUANT_BENCH_NOVEC)
    pp = p;
    SPINQUANT_BENCH_NOVEC for (std::size_t j = 0; j < n; j += 2)
    {
        float q0 = std::nearbyint(r[j] / p.scale) + p.zero;
        float q1 = std::nearbyint(r[j + 1] / p.scale) + p.zero;
        q0 = q0 >= 0.0f ? (q0 <= qmax ? q0 : qmax) : 0.0f;
        q1 = q1 >= 0.0f ? (q1 <= qmax ? q1 : qmax) : 0.0f;
        out[j / 2] = static_cast<std::uint8_t>(static_cast<unsigned>(q0) | (static_cast<unsigned>(q1) << 4));
    }
}

/// The baselines compute what the library computes; check once so a ratio never compares different work.
void check_baselines()
{
    static bool done = false;
    if (done) return;
    done = true;
    const auto x = make_input(8);
    auto a = x, b = x, c = x;
    spinquant::fake_quantize(spinquant::as_matrix_view(a.data(), 8, cols), spec);
    for (std::size_t i = 0; i < 8; ++i) {
        scalar_fake_quantize_row(b.data() + i * cols, cols);
        autovec_fake_quantize_row(c.data() + i * cols, cols);
    }
    const auto q = spinquant::quantize(spinquant::as_matrix_view(x.data(), 8, cols), spec);
    std::vector<std::uint8_t> packed(cols / 2);
    bool ok = a == b && a == c;
    for (std::size_t i = 0; i < 8; ++i) {
        row_params p{};
        scalar_pack_row(x.data() + i * cols, cols, packed.data(), p);
        for (std::size_t k = 0; k < cols / 2; ++k) ok = ok && packed[k] == q.codes[i * q.row_bytes + k];
        ok = ok && p.scale == q.scales[i] && p.zero == q.zeros[i];
    }
    if (!ok) {
        std::fprintf(stderr, "bench_quantizer: a baseline disagrees with the library\n");
        std::abort();
    }
}

void set_bytes(benchmark::State& state, std::size_t rows)
{
    // Bytes read plus bytes written by an in-place pass over the matrix.
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(2 * rows * cols * sizeof(float)));
}

void BM_fake_quantize(benchmark::State& state)
{
    check_baselines();
    const auto rows = static_cast<std::size_t>(state.range(0));
    auto x = make_input(rows);
    const auto m = spinquant::as_matrix_view(x.data(), rows, cols);
    for (auto _ : state) {
        spinquant::fake_quantize(m, spec);
        benchmark::DoNotOptimize(x.data());
        benchmark::ClobberMemory();
    }
    set_bytes(state, rows);
}

void BM_fake_quantize_unchecked(benchmark::State& state)
{
    const auto rows = static_cast<std::size_t>(state.range(0));
    auto x = make_input(rows);
    spinquant::quant_spec s = spec;
    s.check_finite = false;  // no separate NaN/Inf scan
    const auto m = spinquant::as_matrix_view(x.data(), rows, cols);
    for (auto _ : state) {
        spinquant::fake_quantize(m, s);
        benchmark::DoNotOptimize(x.data());
        benchmark::ClobberMemory();
    }
    set_bytes(state, rows);
}

void BM_scalar_loop_baseline(benchmark::State& state)
{
    const auto rows = static_cast<std::size_t>(state.range(0));
    auto x = make_input(rows);
    for (auto _ : state) {
        for (std::size_t i = 0; i < rows; ++i) scalar_fake_quantize_row(x.data() + i * cols, cols);
        benchmark::DoNotOptimize(x.data());
        benchmark::ClobberMemory();
    }
    set_bytes(state, rows);
}

void BM_autovec_loop_baseline(benchmark::State& state)
{
    const auto rows = static_cast<std::size_t>(state.range(0));
    auto x = make_input(rows);
    for (auto _ : state) {
        for (std::size_t i = 0; i < rows; ++i) autovec_fake_quantize_row(x.data() + i * cols, cols);
        benchmark::DoNotOptimize(x.data());
        benchmark::ClobberMemory();
    }
    set_bytes(state, rows);
}

void BM_stream_baseline(benchmark::State& state)
{
    // Reads and writes every float once, in place, at full SIMD width: the memory-bound ceiling.
    using B = xsimd::batch<float>;
    const auto rows = static_cast<std::size_t>(state.range(0));
    auto x = make_input(rows);
    for (auto _ : state) {
        float* p = x.data();
        for (std::size_t i = 0; i + B::size <= x.size(); i += B::size) (-B::load_unaligned(p + i)).store_unaligned(p + i);
        benchmark::DoNotOptimize(x.data());
        benchmark::ClobberMemory();
    }
    set_bytes(state, rows);
}

void set_pack_bytes(benchmark::State& state, std::size_t rows)
{
    // Floats read plus packed codes written.
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(rows * cols * sizeof(float) + rows * cols / 2));
}

void BM_quantize_pack(benchmark::State& state)
{
    const auto rows = static_cast<std::size_t>(state.range(0));
    const auto x = make_input(rows);
    spinquant::quantized_matrix<float> q;
    const auto m = spinquant::as_matrix_view(x.data(), rows, cols);
    spinquant::quantize(m, spec, q);  // storage allocated once
    for (auto _ : state) {
        spinquant::quantize(m, spec, q);
        benchmark::DoNotOptimize(q.codes.data());
        benchmark::ClobberMemory();
    }
    set_pack_bytes(state, rows);
}

void BM_quantize_pack_unchecked(benchmark::State& state)
{
    const auto rows = static_cast<std::size_t>(state.range(0));
    const auto x = make_input(rows);
    spinquant::quantized_matrix<float> q;
    spinquant::quant_spec s = spec;
    s.check_finite = false;
    const auto m = spinquant::as_matrix_view(x.data(), rows, cols);
    spinquant::quantize(m, s, q);
    for (auto _ : state) {
        spinquant::quantize(m, s, q);
        benchmark::DoNotOptimize(q.codes.data());
        benchmark::ClobberMemory();
    }
    set_pack_bytes(state, rows);
}

void BM_scalar_pack_baseline(benchmark::State& state)
{
    const auto rows = static_cast<std::size_t>(state.range(0));
    const auto x = make_input(rows);
    std::vector<std::uint8_t> codes(rows * cols / 2);
    std::vector<row_params> params(rows);
    for (auto _ : state) {
        for (std::size_t i = 0; i < rows; ++i)
            scalar_pack_row(x.data() + i * cols, cols, codes.data() + i * cols / 2, params[i]);
        benchmark::DoNotOptimize(codes.data());
        benchmark::ClobberMemory();
    }
    set_pack_bytes(state, rows);
}

void BM_stream_read_baseline(benchmark::State& state)
{
    // Reads every float once and writes an eighth of the bytes: the ceiling for packing.
    using B = xsimd::batch<float>;
    const auto rows = static_cast<std::size_t>(state.range(0));
    const auto x = make_input(rows);
    std::vector<float> out(rows * cols / 8);
    for (auto _ : state) {
        const float* p = x.data();
        for (std::size_t i = 0, o = 0; i + 8 * B::size <= x.size(); i += 8 * B::size, o += B::size) {
            const auto ld = [&](std::size_t k) { return B::load_unaligned(p + i + k * B::size); };
            (((ld(0) + ld(1)) + (ld(2) + ld(3))) + ((ld(4) + ld(5)) + (ld(6) + ld(7)))).store_unaligned(out.data() + o);
        }
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    set_pack_bytes(state, rows);
}

}  // namespace

BENCHMARK(BM_fake_quantize)->Arg(1)->Arg(64)->Arg(4096);
BENCHMARK(BM_fake_quantize_unchecked)->Arg(1)->Arg(64)->Arg(4096);
BENCHMARK(BM_scalar_loop_baseline)->Arg(1)->Arg(64)->Arg(4096);
BENCHMARK(BM_autovec_loop_baseline)->Arg(1)->Arg(64)->Arg(4096);
BENCHMARK(BM_stream_baseline)->Arg(1)->Arg(64)->Arg(4096);
BENCHMARK(BM_quantize_pack)->Arg(1)->Arg(64)->Arg(4096);
BENCHMARK(BM_quantize_pack_unchecked)->Arg(1)->Arg(64)->Arg(4096);
BENCHMARK(BM_scalar_pack_baseline)->Arg(1)->Arg(64)->Arg(4096);
BENCHMARK(BM_stream_read_baseline)->Arg(1)->Arg(64)->Arg(4096);

BENCHMARK_MAIN();
