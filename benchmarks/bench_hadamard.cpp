// The Walsh-Hadamard transform on float rows, one thread. Every case transforms a batch of rows in
// place: a 2^15-float batch (128 KiB, in L2) and a 2^25-float batch (128 MiB, from memory); rows
// longer than the batch make a batch of one row. Baselines in the same binary, same flags:
//   textbook   the in-place radix-2 triple loop (for h, for i, for j), left to the compiler
//   stream     a pass that reads and writes the same bytes (x = -x): the memory-bound ceiling
//   eigen      the dense product X H^T / sqrt(n) with Eigen (n <= 4096, cached batch only)
//   two_stage  for K 2^k: the library's power-of-two transform on each of the K rows, then the
//              mix as an Eigen GEMM with H_K (the plain two-stage method, its first stage as fast
//              as ours, so the ratio measures the mix)
//   plan       hadamard_plan<float>::apply_rows (ours)
//   leaf       the kernel's first pass alone (spinquant::detail; memory batch, BM_leaf_vs_stream):
//              where the from-memory time goes
// Counters: bytes_per_second counts the batch once (n floats per row), as for every case.
//
// Token blocks of short rows (n = K 2^k with a small 2^k, e.g. the R4 rotation n = 172 of the
// shipped example model): a block of `rows` rows (256, a typical token block; 1 for a single
// vector), cached. Baseline in the same binary:
//   block_dense  the dense GEMM X M^T with Eigen, M = the plan's own matrix() (scale and signs in it)
//   block_plan   hadamard_plan<float>::apply_rows (ours) on the same block
//
// Run: bench_hadamard --benchmark_min_time=0.5 --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
// GCC 12 reports _mm512_undefined_ps() inside AVX-512 shuffles (Eigen's GEMM packing, xsimd's
// swizzle) as maybe uninitialized; the value is never read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <new>
#include <random>
#include <span>
#include <vector>

#include <Eigen/Core>

#include <spinquant/hadamard.hpp>

namespace {

constexpr std::int64_t cached = std::int64_t{1} << 15;
constexpr std::int64_t memory = std::int64_t{1} << 25;

/// 64-byte aligned storage, as engines allocate tensors. A plain std::vector of this size comes from
/// glibc's mmap path and starts 16 bytes past a page boundary, so every 64-byte register would
/// straddle two cache lines (BM_plan_misaligned measures that case).
template <class T>
struct cache_aligned {
    using value_type = T;
    cache_aligned() = default;
    template <class U>
    constexpr cache_aligned(const cache_aligned<U>&) noexcept
    {
    }
    T* allocate(std::size_t count) { return static_cast<T*>(::operator new(count * sizeof(T), std::align_val_t{64})); }
    void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{64}); }
    friend bool operator==(const cache_aligned&, const cache_aligned&) noexcept { return true; }
};
using aligned_floats = std::vector<float, cache_aligned<float>>;

struct batch {
    std::size_t n = 0, rows = 0;
    aligned_floats storage;
    std::span<float> data;  // the rows: storage from `shift` floats on
};

/// Args: n, batch floats. `shift`: floats between the 64-byte aligned storage and the first row.
batch make_batch(const benchmark::State& state, std::size_t shift = 0)
{
    batch b;
    b.n = static_cast<std::size_t>(state.range(0));
    const auto total = static_cast<std::size_t>(state.range(1));
    b.rows = b.n >= total ? 1 : total / b.n;
    b.storage.resize(b.rows * b.n + shift);
    b.data = std::span<float>(b.storage).subspan(shift);
    std::mt19937 g(1);
    for (float& v : b.data) v = static_cast<float>(g() % 2001) / 1000.0f - 1.0f;
    return b;
}

void finish(benchmark::State& state, const batch& b)
{
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(b.rows * b.n * sizeof(float)));
    state.counters["rows"] = static_cast<double>(b.rows);
}

/// The textbook in-place transform (unnormalised; the 1/sqrt(n) pass is left out in its favour).
void textbook_fwht(float* x, std::size_t n)
{
    for (std::size_t h = 1; h < n; h *= 2)
        for (std::size_t i = 0; i < n; i += 2 * h)
            for (std::size_t j = i; j < i + h; ++j) {
                const float a = x[j];
                const float b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
}

void BM_textbook(benchmark::State& state)
{
    batch b = make_batch(state);
    for (auto _ : state) {
        for (std::size_t r = 0; r < b.rows; ++r) textbook_fwht(b.data.data() + r * b.n, b.n);
        benchmark::DoNotOptimize(b.data.data());
        benchmark::ClobberMemory();
    }
    finish(state, b);
}

/// The stream baseline: one in-place read+write pass over the batch.
void stream_pass(batch& b)
{
    for (float& v : b.data) v = -v;
    benchmark::DoNotOptimize(b.data.data());
    benchmark::ClobberMemory();
}

void BM_stream(benchmark::State& state)
{
    batch b = make_batch(state);
    for (auto _ : state) stream_pass(b);
    finish(state, b);
}

void BM_eigen(benchmark::State& state)
{
    batch b = make_batch(state);
    using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const std::vector<float> h = spinquant::hadamard_matrix<float>(b.n);
    const Eigen::Map<const row_major> hm(h.data(), static_cast<Eigen::Index>(b.n), static_cast<Eigen::Index>(b.n));
    row_major out(static_cast<Eigen::Index>(b.rows), static_cast<Eigen::Index>(b.n));
    Eigen::Map<row_major> x(b.data.data(), static_cast<Eigen::Index>(b.rows), static_cast<Eigen::Index>(b.n));
    for (auto _ : state) {
        out.noalias() = x * hm.transpose();
        x = out;  // in place, like the others
        benchmark::DoNotOptimize(b.data.data());
        benchmark::ClobberMemory();
    }
    finish(state, b);
}

void BM_two_stage(benchmark::State& state)
{
    batch b = make_batch(state);
    const spinquant::hadamard_plan<float> plan(b.n);
    const std::size_t k = plan.order(), m = plan.pow2_length();
    using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    row_major hk(static_cast<Eigen::Index>(k), static_cast<Eigen::Index>(k));
    for (std::size_t i = 0; i < k; ++i)
        for (std::size_t j = 0; j < k; ++j)
            hk(static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(j)) = plan.order_matrix()[i * k + j];
    row_major mixed(static_cast<Eigen::Index>(k), static_cast<Eigen::Index>(m));
    const float scale = plan.scale();
    for (auto _ : state) {
        for (std::size_t r = 0; r < b.rows; ++r) {
            float* row = b.data.data() + r * b.n;
            for (std::size_t i = 0; i < k; ++i) spinquant::detail::fwht_pow2<float>(std::span<float>(row + i * m, m));
            Eigen::Map<row_major> x(row, static_cast<Eigen::Index>(k), static_cast<Eigen::Index>(m));
            mixed.noalias() = hk * x;
            x = mixed * scale;
        }
        benchmark::DoNotOptimize(b.data.data());
        benchmark::ClobberMemory();
    }
    finish(state, b);
}

/// apply_rows over the batch; `shift` as for make_batch.
void run_plan(benchmark::State& state, std::size_t shift)
{
    batch b = make_batch(state, shift);
    const spinquant::hadamard_plan<float> plan(b.n);
    const auto view = spinquant::as_matrix_view(b.data.data(), b.rows, b.n);
    for (auto _ : state) {
        plan.apply_rows(view);
        benchmark::DoNotOptimize(b.data.data());
        benchmark::ClobberMemory();
    }
    finish(state, b);
    state.counters["K"] = static_cast<double>(plan.order());
}

void BM_plan(benchmark::State& state) { run_plan(state, 0); }

/// Rows 16 bytes past a 64-byte boundary (where a large malloc'd buffer starts): every register
/// load and store of the kernels straddles two cache lines.
void BM_plan_misaligned(benchmark::State& state) { run_plan(state, 4); }

/// The kernel's leaf pass alone (its first pass, which reads every row from memory and finishes
/// the stages inside 16 registers; spinquant::detail) over every row of b.
void leaf_pass(batch& b)
{
    namespace detail = spinquant::detail;
    using arch = xsimd::default_arch;
    constexpr std::size_t leaf = detail::fwht_leaf_size<float, arch>;
    // The leaf's own orthonormal scale, so that repeated passes keep the values' size.
    const detail::fwht_multiplier<float> scale{detail::fwht_scale::scalar, 1.0f / std::sqrt(float(leaf)), nullptr};
    const auto region = detail::fwht_rows_window<float>(b.n, {b.data.data(), b.data.size()});  // as apply_rows
    for (std::size_t r = 0; r < b.rows; ++r)
        detail::fwht_leaf_pass<float, arch, detail::fwht_leaf_registers<arch>, detail::fwht_scale::scalar,
                               detail::fwht_scale::none>(
            b.data.data() + r * b.n, b.n, scale, {}, detail::fwht_leaf_ahead(region.advanced(r * b.n)));
    benchmark::DoNotOptimize(b.data.data());
    benchmark::ClobberMemory();
}

/// The stream, then (with_leaf) the leaf pass alone, then the plan, in turn on the same batch: the
/// shares of the stream rate they reach, free of what moves separate cases apart (the physical
/// pages each batch gets, the machine's load drifting between cases). The reported time is the
/// plan's, or the leaf pass's with_leaf.
void run_vs_stream(benchmark::State& state, bool with_leaf)
{
    batch b = make_batch(state);
    const spinquant::hadamard_plan<float> plan(b.n);
    const auto view = spinquant::as_matrix_view(b.data.data(), b.rows, b.n);
    using clock = std::chrono::steady_clock;
    const auto seconds = [](clock::time_point from, clock::time_point to) {
        return std::chrono::duration<double>(to - from).count();
    };
    double stream_seconds = 0, leaf_seconds = 0, plan_seconds = 0;
    for (auto _ : state) {
        const auto t0 = clock::now();
        stream_pass(b);
        const auto t1 = clock::now();
        if (with_leaf) leaf_pass(b);
        const auto t2 = clock::now();
        plan.apply_rows(view);
        benchmark::DoNotOptimize(b.data.data());
        benchmark::ClobberMemory();
        const auto t3 = clock::now();
        stream_seconds += seconds(t0, t1);
        leaf_seconds += seconds(t1, t2);
        plan_seconds += seconds(t2, t3);
        state.SetIterationTime(with_leaf ? seconds(t1, t2) : seconds(t2, t3));
    }
    finish(state, b);
    const double bytes = static_cast<double>(state.iterations()) * static_cast<double>(b.rows * b.n * sizeof(float));
    state.counters["stream_GBps"] = bytes / stream_seconds / 1e9;
    state.counters["plan_per_stream"] = stream_seconds / plan_seconds;
    if (with_leaf) state.counters["leaf_per_stream"] = stream_seconds / leaf_seconds;
}

/// The plan against the stream.
void BM_plan_vs_stream(benchmark::State& state) { run_vs_stream(state, false); }

/// Where the from-memory time goes: the plan costs the leaf pass's time plus that of the strided
/// passes which follow it in L1/L2, where no memory traffic is left to hide them, so
/// plan_per_stream falls below leaf_per_stream by their share.
void BM_leaf_vs_stream(benchmark::State& state) { run_vs_stream(state, true); }

spinquant::hadamard_options with_signs()
{
    spinquant::hadamard_options o;
    o.random_signs = true;
    o.seed = 1;
    return o;
}

/// A rows x n block of short rows (Args: n, rows), with random signs so that both paths do all of it.
struct block {
    std::size_t n = 0, rows = 0;
    aligned_floats data;
    spinquant::hadamard_plan<float> plan;
    explicit block(const benchmark::State& state)
        : n(static_cast<std::size_t>(state.range(0))), rows(static_cast<std::size_t>(state.range(1))),
          data(n * rows), plan(n, with_signs())
    {
        std::mt19937 g(1);
        for (float& v : data) v = static_cast<float>(g() % 2001) / 1000.0f - 1.0f;
    }
};

void finish_block(benchmark::State& state, const block& b)
{
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(b.rows * b.n * sizeof(float)));
    state.counters["K"] = static_cast<double>(b.plan.order());
}

void BM_block_dense(benchmark::State& state)
{
    block b(state);
    using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const auto n = static_cast<Eigen::Index>(b.n), rows = static_cast<Eigen::Index>(b.rows);
    const std::vector<float> m = b.plan.matrix();  // apply(x) == M x, so the block becomes X M^T
    const Eigen::Map<const row_major> mm(m.data(), n, n);
    row_major out(rows, n);
    Eigen::Map<row_major> x(b.data.data(), rows, n);
    for (auto _ : state) {
        out.noalias() = x * mm.transpose();
        x = out;  // in place, like the plan
        benchmark::DoNotOptimize(b.data.data());
        benchmark::ClobberMemory();
    }
    finish_block(state, b);
}

void BM_block_plan(benchmark::State& state)
{
    block b(state);
    const auto view = spinquant::as_matrix_view(b.data.data(), b.rows, b.n);
    for (auto _ : state) {
        b.plan.apply_rows(view);
        benchmark::DoNotOptimize(b.data.data());
        benchmark::ClobberMemory();
    }
    finish_block(state, b);
}

void pow2_sizes(benchmark::internal::Benchmark* b)
{
    for (const std::int64_t total : {cached, memory})
        for (std::int64_t n = 1 << 7; n <= 1 << 16; n *= 2) b->Args({n, total});
}
void memory_sizes(benchmark::internal::Benchmark* b)
{
    for (std::int64_t n = 1 << 7; n <= 1 << 16; n *= 2) b->Args({n, memory});
    for (const std::int64_t n : {11008, 14336, 18944}) b->Args({n, memory});
}
void misaligned_sizes(benchmark::internal::Benchmark* b)
{
    for (const std::int64_t total : {cached, memory})
        for (const std::int64_t n : {1024, 8192}) b->Args({n, total});
}
void dense_sizes(benchmark::internal::Benchmark* b)
{
    for (std::int64_t n = 1 << 7; n <= 1 << 12; n *= 2) b->Args({n, cached});
}
void composite_sizes(benchmark::internal::Benchmark* b)
{
    for (const std::int64_t total : {cached, memory})
        for (const std::int64_t n : {11008, 14336, 18944}) b->Args({n, total});
}

/// Short rows: K 2^k with 2^k below a register, 256-row token blocks, and single vectors of the
/// R4 sizes. 12 = 12 * 1, 20 = 20 * 1, 48 = 12 * 4, 56 = 28 * 2, 156 = 156 * 1, 160 = 20 * 8,
/// 172 = 172 * 1, 344 = 172 * 2, 688 = 172 * 4.
void block_sizes(benchmark::internal::Benchmark* b)
{
    for (const std::int64_t n : {12, 20, 48, 56, 156, 160, 172, 344, 688}) b->Args({n, 256});
    for (const std::int64_t n : {172, 688}) b->Args({n, 1});
}

}  // namespace

BENCHMARK(BM_textbook)->Apply(pow2_sizes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_stream)->Apply(pow2_sizes)->Apply(composite_sizes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_eigen)->Apply(dense_sizes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_two_stage)->Apply(composite_sizes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_plan)->Apply(pow2_sizes)->Apply(composite_sizes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_plan_misaligned)->Apply(misaligned_sizes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_plan_vs_stream)->Apply(memory_sizes)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_leaf_vs_stream)->Args({4096, memory})->Args({8192, memory})->Args({65536, memory})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_block_dense)->Apply(block_sizes)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_block_plan)->Apply(block_sizes)->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
