// One Cayley SGD step against the dense kernels it needs, timed alone in the same binary and run.
//
//   exact mode (default), per n x n parameter:  S = Dᵀ·U (GEMM), LU of I − α/2·W, solve with the
//     n columns of Uᵀ, Y = X + α·W·Z (GEMM)   ->  floor BM_exact_floor: those four kernels alone;
//     every 32nd step also polishes (a rank update and a symmetric product): BM_*_polish_every_step
//     shows that cost when paid on every step.
//   reference mode (SpinQuant's SGDG):  three projection GEMMs and five fixed-point GEMMs
//     ->  floor BM_reference_floor: eight n x n GEMMs alone.
// Everything else in a step (copies, transposes, the skew part, the 1-norm, the clamp) is the
// overhead the ratio step / floor measures. Counters: GFLOP/s of one GEMM (2n³ flops) for scale.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 with AVX-512 reports -Wmaybe-uninitialized false positives inside Eigen's GEMM kernels.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <random>

#include <Eigen/Core>
#include <Eigen/LU>

#include <spinquant/rotation.hpp>
#include <spinquant/stiefel.hpp>

namespace {

template <class T>
using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;

template <class T>
matrix<T> gaussian(Eigen::Index n, std::uint64_t seed)
{
    std::mt19937_64 rng(seed);
    spinquant::detail::normal_sampler normal;
    matrix<T> m(n, n);
    for (Eigen::Index j = 0; j < n; ++j)
        for (Eigen::Index i = 0; i < n; ++i) m(i, j) = static_cast<T>(normal(rng));
    return m;
}

template <class T>
void run_step(benchmark::State& state, spinquant::cayley_sgd_options options)
{
    const auto n = static_cast<std::size_t>(state.range(0));
    std::mt19937_64 rng(1);
    matrix<T> p = spinquant::random_orthogonal<T>(n, rng);
    const matrix<T> g = gaussian<T>(static_cast<Eigen::Index>(n), 2);
    spinquant::cayley_sgd<T> opt(n, options);
    opt.step(p, g);  // step 0 checks and polishes: keep it out of the timing
    for (auto _ : state) {
        opt.step(p, g);
        benchmark::DoNotOptimize(p.data());
        benchmark::ClobberMemory();
    }
}

template <class T>
void BM_exact_step(benchmark::State& state)
{
    run_step<T>(state, {.lr = 0.01});
}

template <class T>
void BM_exact_step_momentum(benchmark::State& state)
{
    run_step<T>(state, {.lr = 0.01, .momentum = 0.9});
}

template <class T>
void BM_exact_step_polish_every_step(benchmark::State& state)
{
    run_step<T>(state, {.lr = 0.01, .orthonormalize_every = 1});
}

template <class T>
void BM_reference_step(benchmark::State& state)
{
    run_step<T>(state, {.lr = 0.01, .mode = spinquant::cayley_mode::reference, .qr_probability = 0});
}

template <class T>
void BM_gemm(benchmark::State& state)
{
    const auto n = static_cast<Eigen::Index>(state.range(0));
    const matrix<T> a = gaussian<T>(n, 3), b = gaussian<T>(n, 4);
    matrix<T> c(n, n);
    c.noalias() = a * b;  // warm-up: first touch of the output outside the timing, as for the step
    for (auto _ : state) {
        c.noalias() = a * b;
        benchmark::DoNotOptimize(c.data());
        benchmark::ClobberMemory();
    }
    state.counters["GFLOP/s"] = benchmark::Counter(2.0 * double(n) * double(n) * double(n) * double(state.iterations()),
                                                   benchmark::Counter::kIsRate);
}

template <class T>
void BM_exact_floor(benchmark::State& state)
{
    const auto n = static_cast<Eigen::Index>(state.range(0));
    const matrix<T> d = gaussian<T>(n, 5), u = gaussian<T>(n, 6), x = gaussian<T>(n, 7);
    const matrix<T> s0 = gaussian<T>(n, 8);
    const matrix<T> w = T(0.5) * (s0 - s0.transpose()) / s0.cwiseAbs().colwise().sum().maxCoeff();
    const matrix<T> l = matrix<T>::Identity(n, n) - T(0.5) * w;
    matrix<T> s(n, n), z(n, n), y(n, n);
    Eigen::PartialPivLU<matrix<T>> lu(n);
    const auto kernels = [&] {
        s.noalias() = d.transpose() * u;
        lu.compute(l);
        z.noalias() = lu.solve(x);
        y.noalias() = w * z;
    };
    kernels();  // warm-up, as the step's is
    for (auto _ : state) {
        kernels();
        benchmark::DoNotOptimize(s.data());
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
}

template <class T>
void BM_reference_floor(benchmark::State& state)
{
    const auto n = static_cast<Eigen::Index>(state.range(0));
    const matrix<T> d = gaussian<T>(n, 9), u = gaussian<T>(n, 10), h = gaussian<T>(n, 11);
    matrix<T> s(n, n), t(n, n), w(n, n), y(n, n);
    const auto kernels = [&] {
        s.noalias() = d.transpose() * u;
        t.noalias() = u * s;
        w.noalias() = u.transpose() * t;
        for (int k = 0; k < 5; ++k) y.noalias() = w * h;
    };
    kernels();  // warm-up, as the step's is
    for (auto _ : state) {
        kernels();
        benchmark::DoNotOptimize(w.data());
        benchmark::DoNotOptimize(y.data());
        benchmark::ClobberMemory();
    }
}

void sizes(benchmark::internal::Benchmark* b)
{
    b->Arg(64)->Arg(512)->Arg(2048)->Arg(4096)->Unit(benchmark::kMillisecond);
}
void small_sizes(benchmark::internal::Benchmark* b)
{
    b->Arg(64)->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_gemm, double)->Apply(sizes);
BENCHMARK_TEMPLATE(BM_exact_floor, double)->Apply(sizes);
BENCHMARK_TEMPLATE(BM_exact_step, double)->Apply(sizes);
BENCHMARK_TEMPLATE(BM_exact_step_momentum, double)->Apply(small_sizes);
BENCHMARK_TEMPLATE(BM_exact_step_polish_every_step, double)->Apply(small_sizes);
BENCHMARK_TEMPLATE(BM_reference_floor, double)->Apply(sizes);
BENCHMARK_TEMPLATE(BM_reference_step, double)->Apply(sizes);
BENCHMARK_TEMPLATE(BM_gemm, float)->Apply(sizes);
BENCHMARK_TEMPLATE(BM_exact_floor, float)->Apply(sizes);
BENCHMARK_TEMPLATE(BM_exact_step, float)->Apply(sizes);
BENCHMARK_TEMPLATE(BM_exact_step_momentum, float)->Apply(small_sizes);
BENCHMARK_TEMPLATE(BM_exact_step_polish_every_step, float)->Apply(small_sizes);
BENCHMARK_TEMPLATE(BM_reference_floor, float)->Apply(sizes);
BENCHMARK_TEMPLATE(BM_reference_step, float)->Apply(sizes);

BENCHMARK_MAIN();
