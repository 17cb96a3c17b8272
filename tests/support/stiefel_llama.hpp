#pragma once
// A small random LLaMA-like model for the rotation tests: token embedding, RMSNorm with weights,
// grouped-query attention with RoPE and a causal softmax, a SwiGLU MLP, a final norm and an
// untied lm_head, weights [out, in] of type T. The forward pass is written out directly in double
// (no library code), so that fusing norms and rotations into the weights can be checked to compute
// the same logits. v_proj and o_proj carry biases to exercise the bias paths.
#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

#include <Eigen/Core>

#include <spinquant/detail/random.hpp>

namespace spinquant::test {

struct llama_config {
    Eigen::Index vocab = 13, dim = 16, n_heads = 4, n_kv_heads = 2, head_dim = 4, hidden = 24, layers = 2;
};

template <class T>
struct llama_layer {
    Eigen::Matrix<T, Eigen::Dynamic, 1> attn_norm, ffn_norm, bv, bo;
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> wq, wk, wv, wo, w_gate, w_up, w_down;
};

template <class T>
struct llama_model {
    llama_config cfg;
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> embedding, lm_head;
    std::vector<llama_layer<T>> layers;
    Eigen::Matrix<T, Eigen::Dynamic, 1> final_norm;
};

/// Weights N(0, 1/fan_in), norm weights 1 + 0.3·N(0, 1) (far from 1, so fusing them matters).
template <class T>
llama_model<T> random_llama(const llama_config& cfg, std::uint64_t seed)
{
    std::mt19937_64 rng(seed);
    detail::normal_sampler normal;
    const auto mat = [&](Eigen::Index rows, Eigen::Index cols) {
        Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> m(rows, cols);
        const double s = 1.0 / std::sqrt(static_cast<double>(cols));
        for (Eigen::Index i = 0; i < rows; ++i)
            for (Eigen::Index j = 0; j < cols; ++j) m(i, j) = static_cast<T>(s * normal(rng));
        return m;
    };
    const auto norm = [&](Eigen::Index n) {
        Eigen::Matrix<T, Eigen::Dynamic, 1> v(n);
        for (Eigen::Index i = 0; i < n; ++i) v(i) = static_cast<T>(1.0 + 0.3 * normal(rng));
        return v;
    };
    const auto bias = [&](Eigen::Index n) {
        Eigen::Matrix<T, Eigen::Dynamic, 1> v(n);
        for (Eigen::Index i = 0; i < n; ++i) v(i) = static_cast<T>(0.1 * normal(rng));
        return v;
    };
    llama_model<T> m;
    m.cfg = cfg;
    m.embedding = mat(cfg.vocab, cfg.dim);
    for (Eigen::Index l = 0; l < cfg.layers; ++l) {
        llama_layer<T> layer;
        layer.attn_norm = norm(cfg.dim);
        layer.ffn_norm = norm(cfg.dim);
        layer.wq = mat(cfg.n_heads * cfg.head_dim, cfg.dim);
        layer.wk = mat(cfg.n_kv_heads * cfg.head_dim, cfg.dim);
        layer.wv = mat(cfg.n_kv_heads * cfg.head_dim, cfg.dim);
        layer.bv = bias(cfg.n_kv_heads * cfg.head_dim);
        layer.wo = mat(cfg.dim, cfg.n_heads * cfg.head_dim);
        layer.bo = bias(cfg.dim);
        layer.w_gate = mat(cfg.hidden, cfg.dim);
        layer.w_up = mat(cfg.hidden, cfg.dim);
        layer.w_down = mat(cfg.dim, cfg.hidden);
        m.layers.push_back(layer);
    }
    m.final_norm = norm(cfg.dim);
    m.lm_head = mat(cfg.vocab, cfg.dim);
    return m;
}

/// Logits (tokens x vocab) of the model on `tokens`, computed in double.
template <class T>
Eigen::MatrixXd llama_logits(const llama_model<T>& m, const std::vector<Eigen::Index>& tokens)
{
    const llama_config& c = m.cfg;
    const auto t = static_cast<Eigen::Index>(tokens.size());
    const auto rms_norm = [](const Eigen::MatrixXd& x, const Eigen::VectorXd& w) {
        Eigen::MatrixXd y(x.rows(), x.cols());
        for (Eigen::Index i = 0; i < x.rows(); ++i) {
            const double r = 1.0 / std::sqrt(x.row(i).squaredNorm() / static_cast<double>(x.cols()) + 1e-5);
            y.row(i) = (x.row(i) * r).cwiseProduct(w.transpose());
        }
        return y;
    };
    const auto rope = [&](Eigen::MatrixXd& x, Eigen::Index heads) {
        for (Eigen::Index pos = 0; pos < x.rows(); ++pos)
            for (Eigen::Index h = 0; h < heads; ++h)
                for (Eigen::Index i = 0; i < c.head_dim / 2; ++i) {
                    const double theta = static_cast<double>(pos) *
                                         std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(c.head_dim));
                    const Eigen::Index a = h * c.head_dim + 2 * i;
                    const double x0 = x(pos, a), x1 = x(pos, a + 1);
                    x(pos, a) = x0 * std::cos(theta) - x1 * std::sin(theta);
                    x(pos, a + 1) = x0 * std::sin(theta) + x1 * std::cos(theta);
                }
    };
    Eigen::MatrixXd h(t, c.dim);
    for (Eigen::Index i = 0; i < t; ++i) h.row(i) = m.embedding.row(tokens[static_cast<std::size_t>(i)]).template cast<double>();
    for (const auto& layer : m.layers) {
        const Eigen::MatrixXd x = rms_norm(h, layer.attn_norm.template cast<double>());
        Eigen::MatrixXd q = x * layer.wq.template cast<double>().transpose();
        Eigen::MatrixXd k = x * layer.wk.template cast<double>().transpose();
        Eigen::MatrixXd v = x * layer.wv.template cast<double>().transpose();
        v.rowwise() += layer.bv.template cast<double>().transpose();
        rope(q, c.n_heads);
        rope(k, c.n_kv_heads);
        Eigen::MatrixXd att(t, c.n_heads * c.head_dim);
        for (Eigen::Index hd = 0; hd < c.n_heads; ++hd) {
            const Eigen::Index kv = hd / (c.n_heads / c.n_kv_heads);
            for (Eigen::Index i = 0; i < t; ++i) {
                Eigen::VectorXd score(i + 1);
                for (Eigen::Index j = 0; j <= i; ++j)
                    score(j) = q.row(i).segment(hd * c.head_dim, c.head_dim).dot(k.row(j).segment(kv * c.head_dim, c.head_dim)) /
                               std::sqrt(static_cast<double>(c.head_dim));
                score = (score.array() - score.maxCoeff()).exp();
                score /= score.sum();
                Eigen::VectorXd out = Eigen::VectorXd::Zero(c.head_dim);
                for (Eigen::Index j = 0; j <= i; ++j) out += score(j) * v.row(j).segment(kv * c.head_dim, c.head_dim).transpose();
                att.row(i).segment(hd * c.head_dim, c.head_dim) = out.transpose();
            }
        }
        Eigen::MatrixXd o = att * layer.wo.template cast<double>().transpose();
        o.rowwise() += layer.bo.template cast<double>().transpose();
        h += o;
        const Eigen::MatrixXd y = rms_norm(h, layer.ffn_norm.template cast<double>());
        const Eigen::MatrixXd gate = y * layer.w_gate.template cast<double>().transpose();
        const Eigen::MatrixXd up = y * layer.w_up.template cast<double>().transpose();
        const Eigen::MatrixXd act = (gate.array() / (1.0 + (-gate.array()).exp())).matrix().cwiseProduct(up);
        h += act * layer.w_down.template cast<double>().transpose();
    }
    return rms_norm(h, m.final_norm.template cast<double>()) * m.lm_head.template cast<double>().transpose();
}

}  // namespace spinquant::test
