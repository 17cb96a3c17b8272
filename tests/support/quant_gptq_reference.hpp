#pragma once
// GPTQ the slow, obvious way (Frantar et al., Algorithm 1 without lazy batches): explicit
// inverse of the dampened Hessian, its upper Cholesky factor, one column at a time with the
// error pushed into every later column at once, group parameters from the current weights.
// Element quantization through the plain quantizer reference (quant_reference.hpp).
#include <algorithm>
#include <cstddef>
#include <numeric>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/LU>

#include "quant_reference.hpp"

namespace spinquant::test {

struct naive_gptq_result {
    Eigen::MatrixXd q;                  // fake-quantized, original column order
    Eigen::MatrixXd codes;              // integer codes, original column order
    std::vector<std::size_t> perm;      // processing order
};

/// spec: granularity row or group (group_size columns). W rows x cols (float values), H cols x cols.
inline naive_gptq_result naive_gptq(const Eigen::MatrixXf& w_in, const Eigen::MatrixXd& h_in, const quant_spec& spec,
                                    bool act_order, double damp_ratio = 0.01)
{
    const Eigen::Index rows = w_in.rows(), cols = w_in.cols();
    Eigen::MatrixXd w = w_in.cast<double>();
    Eigen::MatrixXd h = h_in;
    quant_spec row_spec = spec;
    row_spec.granularity = granularity::row;
    row_spec.group_size = 0;
    const bool groups = spec.granularity == granularity::group;
    const Eigen::Index gs = groups ? static_cast<Eigen::Index>(spec.group_size) : cols;
    for (Eigen::Index j = 0; j < cols; ++j)
        if (h(j, j) == 0) {
            h(j, j) = 1;
            w.col(j).setZero();
        }
    naive_gptq_result out;
    out.perm.resize(static_cast<std::size_t>(cols));
    std::iota(out.perm.begin(), out.perm.end(), std::size_t{0});
    if (act_order)
        std::stable_sort(out.perm.begin(), out.perm.end(), [&](std::size_t a, std::size_t b) {
            return h(Eigen::Index(a), Eigen::Index(a)) > h(Eigen::Index(b), Eigen::Index(b));
        });
    Eigen::MatrixXd wp(rows, cols), hp(cols, cols);
    for (Eigen::Index k = 0; k < cols; ++k) {
        wp.col(k) = w.col(Eigen::Index(out.perm[std::size_t(k)]));
        for (Eigen::Index l = 0; l < cols; ++l)
            hp(k, l) = h(Eigen::Index(out.perm[std::size_t(k)]), Eigen::Index(out.perm[std::size_t(l)]));
    }
    hp.diagonal().array() += damp_ratio * hp.diagonal().mean();
    const Eigen::MatrixXd hinv = hp.inverse();
    const Eigen::MatrixXd u = Eigen::LLT<Eigen::MatrixXd>(hinv).matrixU();

    std::vector<ref_params<float>> p(static_cast<std::size_t>(rows));
    const auto params_of = [&](Eigen::Index c0, Eigen::Index k) {
        for (Eigen::Index r = 0; r < rows; ++r) {
            std::vector<float> v;
            for (Eigen::Index j = c0; j < c0 + k; ++j) v.push_back(static_cast<float>(wp(r, j)));
            p[std::size_t(r)] = ref_unit_params(v, row_spec);
        }
    };
    if (!groups) params_of(0, cols);
    Eigen::MatrixXd q(rows, cols), codes(rows, cols);
    for (Eigen::Index c = 0; c < cols; ++c) {
        if (groups && c % gs == 0) params_of(c, gs);
        for (Eigen::Index r = 0; r < rows; ++r) {
            const float x = static_cast<float>(wp(r, c));
            const ref_params<float> pr = p[std::size_t(r)];
            const float qv = ref_fake(x, pr, spec);
            codes(r, c) = static_cast<double>(ref_code(x, pr, spec, !spec.symmetric));
            q(r, c) = static_cast<double>(qv);
            const double e = (wp(r, c) - double(qv)) / u(c, c);
            for (Eigen::Index j = c + 1; j < cols; ++j) wp(r, j) -= e * u(c, j);
        }
    }
    out.q.resize(rows, cols);
    out.codes.resize(rows, cols);
    for (Eigen::Index k = 0; k < cols; ++k) {
        out.q.col(Eigen::Index(out.perm[std::size_t(k)])) = q.col(k);
        out.codes.col(Eigen::Index(out.perm[std::size_t(k)])) = codes.col(k);
    }
    return out;
}

}  // namespace spinquant::test
