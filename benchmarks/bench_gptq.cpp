// GPTQ of a 4096-input linear layer (4096 and 11008 outputs: LLaMA-7B's q/k/v/o and up/gate
// shapes) with a 4096 x 4096 Hessian, 4-bit symmetric per channel, against its floor measured in
// the same binary: the Cholesky factorisation of H plus the product W * U with an upper
// triangular 4096 x 4096 U (the flops of all lazy block updates together), both with Eigen in
// double, as gptq computes. One thread: Eigen parallelises only when built with OpenMP.
//
// Run: bench_gptq   (each case runs once; the set-up builds H from 4608 calibration rows)
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <random>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include <spinquant/detail/random.hpp>
#include <spinquant/gptq.hpp>

namespace {

constexpr Eigen::Index in_features = 4096;

Eigen::MatrixXd gaussian(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed)
{
    std::mt19937_64 g(seed);
    spinquant::detail::normal_sampler normal;
    Eigen::MatrixXd m(rows, cols);
    for (Eigen::Index j = 0; j < cols; ++j)
        for (Eigen::Index i = 0; i < rows; ++i) m(i, j) = normal(g);
    return m;
}

/// H = 2/n X^T X from correlated calibration rows (built once, shared by every case).
const Eigen::MatrixXd& hessian()
{
    static const Eigen::MatrixXd h = [] {
        const Eigen::Index tokens = in_features + 512;
        const Eigen::MatrixXd x = gaussian(tokens, in_features, 1) + 0.5 * gaussian(tokens, 1, 2).replicate(1, in_features);
        spinquant::hessian_accumulator acc(static_cast<std::size_t>(in_features));
        acc.add_batch(x);
        return acc.hessian();
    }();
    return h;
}

using weight_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

weight_matrix weights(Eigen::Index rows) { return (0.02 * gaussian(rows, in_features, 3)).cast<float>(); }

void BM_gptq(benchmark::State& state)
{
    const Eigen::MatrixXd& h = hessian();
    const weight_matrix w = weights(state.range(0));
    for (auto _ : state) {
        auto r = spinquant::gptq(w, h, spinquant::quant_spec::weight(4));
        benchmark::DoNotOptimize(r.weight.data());
    }
}

void BM_cholesky_gemm_floor(benchmark::State& state)
{
    const Eigen::MatrixXd& h = hessian();
    const Eigen::MatrixXd w = weights(state.range(0)).cast<double>();
    Eigen::MatrixXd out(w.rows(), w.cols());
    for (auto _ : state) {
        const Eigen::LLT<Eigen::MatrixXd> llt(h);  // n^3 / 3 flops
        const auto& l = llt.matrixLLT();
        // rows * n^2 flops: the same as the lazy updates W[:, i2:] -= Err1 * U[i1:i2, i2:] summed over blocks.
        out.noalias() = w * l.transpose().triangularView<Eigen::Upper>();
        benchmark::DoNotOptimize(out.data());
    }
}

}  // namespace

BENCHMARK(BM_gptq)->Arg(4096)->Arg(11008)->Iterations(1)->Unit(benchmark::kSecond);
BENCHMARK(BM_cholesky_gemm_floor)->Arg(4096)->Arg(11008)->Iterations(1)->Unit(benchmark::kSecond);

BENCHMARK_MAIN();
