#pragma once
// An independent, deliberately naive forward pass in double precision, written from the model's
// equations (data/README.md "Model math") rather than from forward.hpp: one token at a time,
// plain loops, no cache object, no Eigen, RoPE angles computed in double. Tests compare the float
// batched forward pass against it.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "model.hpp"

namespace llama::test {

using dvec = std::vector<double>;

/// y = W x for a row-major [rows, cols] matrix.
inline dvec matvec(const matrix& w, const dvec& x)
{
    dvec y(w.rows, 0.0);
    for (std::size_t i = 0; i < w.rows; ++i)
        for (std::size_t j = 0; j < w.cols; ++j) y[i] += static_cast<double>(w(i, j)) * x[j];
    return y;
}

inline dvec rmsnorm(const dvec& x, const std::vector<float>& g)
{
    double ms = 0.0;
    for (const double v : x) ms += v * v;
    ms /= static_cast<double>(x.size());
    const double s = 1.0 / std::sqrt(ms + 1e-5);
    dvec y(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) y[i] = static_cast<double>(g[i]) * x[i] * s;
    return y;
}

/// Rotates pairs (2j, 2j+1) of each head by pos * 10000^(-2j / head_size).
inline void rope(dvec& x, std::size_t head_size, std::size_t pos)
{
    for (std::size_t h = 0; h < x.size(); h += head_size)
        for (std::size_t j = 0; 2 * j < head_size; ++j) {
            const double angle =
                static_cast<double>(pos) * std::pow(10000.0, -static_cast<double>(2 * j) / static_cast<double>(head_size));
            const double a = x[h + 2 * j], b = x[h + 2 * j + 1];
            x[h + 2 * j] = a * std::cos(angle) - b * std::sin(angle);
            x[h + 2 * j + 1] = a * std::sin(angle) + b * std::cos(angle);
        }
}

/// Logits [T][vocab] of every position of `tokens`, processed from position 0.
inline std::vector<dvec> reference_logits(const model& m, const std::vector<int>& tokens)
{
    const auto& c = m.config;
    const std::size_t hs = c.head_size(), T = tokens.size();
    // keys[l][t], values[l][t]: per layer, the rotated keys and the values of every position so far.
    std::vector<std::vector<dvec>> keys(c.n_layers), values(c.n_layers);
    std::vector<dvec> out;
    for (std::size_t t = 0; t < T; ++t) {
        dvec x(c.dim);
        for (std::size_t i = 0; i < c.dim; ++i)
            x[i] = static_cast<double>(m.token_embedding(static_cast<std::size_t>(tokens[t]), i));
        for (std::size_t l = 0; l < c.n_layers; ++l) {
            const auto& w = m.layers[l];
            const dvec xn = rmsnorm(x, w.attn_norm);
            dvec q = matvec(w.wq, xn), k = matvec(w.wk, xn);
            rope(q, hs, t);
            rope(k, hs, t);
            keys[l].push_back(k);
            values[l].push_back(matvec(w.wv, xn));
            dvec att(c.dim, 0.0);
            for (std::size_t h = 0; h < c.n_heads; ++h) {
                const std::size_t kvh = h / (c.n_heads / c.n_kv_heads);
                dvec score(t + 1);
                double mx = -1e300;
                for (std::size_t s = 0; s <= t; ++s) {
                    double dot = 0.0;
                    for (std::size_t i = 0; i < hs; ++i) dot += q[h * hs + i] * keys[l][s][kvh * hs + i];
                    score[s] = dot / std::sqrt(static_cast<double>(hs));
                    mx = std::max(mx, score[s]);
                }
                double sum = 0.0;
                for (double& v : score) sum += (v = std::exp(v - mx));
                for (std::size_t s = 0; s <= t; ++s)
                    for (std::size_t i = 0; i < hs; ++i) att[h * hs + i] += score[s] / sum * values[l][s][kvh * hs + i];
            }
            const dvec o = matvec(w.wo, att);
            for (std::size_t i = 0; i < c.dim; ++i) x[i] += o[i];
            const dvec xf = rmsnorm(x, w.ffn_norm);
            const dvec g = matvec(w.w1, xf), u = matvec(w.w3, xf);
            dvec hdn(c.hidden_dim);
            for (std::size_t i = 0; i < c.hidden_dim; ++i) hdn[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
            const dvec down = matvec(w.w2, hdn);
            for (std::size_t i = 0; i < c.dim; ++i) x[i] += down[i];
        }
        out.push_back(matvec(m.classifier, rmsnorm(x, m.final_norm)));
    }
    return out;
}

/// Mean negative log-likelihood of tokens[1..] given the logits of tokens[..T-1].
inline double reference_nll(const std::vector<dvec>& logits, const std::vector<int>& tokens)
{
    double nll = 0.0;
    for (std::size_t t = 0; t + 1 < tokens.size(); ++t) {
        double mx = -1e300, sum = 0.0;
        for (const double v : logits[t]) mx = std::max(mx, v);
        for (const double v : logits[t]) sum += std::exp(v - mx);
        nll -= logits[t][static_cast<std::size_t>(tokens[t + 1])] - mx - std::log(sum);
    }
    return nll / static_cast<double>(tokens.size() - 1);
}

}  // namespace llama::test
