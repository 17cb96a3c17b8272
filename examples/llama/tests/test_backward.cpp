#include "support/allocation_counter.hpp"  // first: replaces operator new for this executable

#include "support/catch.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <spinquant/quantizer.hpp>
#include <spinquant/rotation.hpp>
#include <spinquant/stiefel.hpp>

#include "backward.hpp"
#include "e2e_loss.hpp"
#include "eval.hpp"
#include "llama_test_support.hpp"
#include "quant.hpp"

using llama::test::stories260k;
using llama::test::tok512;

namespace {

template <class T>
using rmat = spinquant::rotation_matrix<T>;

// A copy of `src` cut to its first `layers` blocks (the real shapes, less work), with the norm
// weights folded into the linears when `fuse` (what the objective is meant for).
llama::model prepared(const llama::model& src, std::size_t layers, bool fuse = true)
{
    llama::model m = src;
    if (layers < m.config.n_layers) {
        m.layers.resize(layers);
        m.config.n_layers = layers;
    }
    if (fuse) {
        for (auto& lw : m.layers) {
            spinquant::fuse_rms_norm(lw.attn_norm, lw.wq.view(), lw.wk.view(), lw.wv.view());
            spinquant::fuse_rms_norm(lw.ffn_norm, lw.w1.view(), lw.w3.view());
        }
        spinquant::fuse_rms_norm(m.final_norm, m.classifier.view());
    }
    return m;
}

// R1 then one R2 per layer, Haar-random or random Hadamard, with their views in call order.
template <class T>
struct rotation_list {
    std::vector<rmat<T>> r;

    [[nodiscard]] std::vector<spinquant::matrix_view<const T>> views() const
    {
        std::vector<spinquant::matrix_view<const T>> v;
        for (const auto& m : r) v.push_back(spinquant::as_matrix_view(m));
        return v;
    }
    [[nodiscard]] std::vector<spinquant::matrix_view<T>> mutable_views()
    {
        std::vector<spinquant::matrix_view<T>> v;
        for (auto& m : r) v.push_back(spinquant::as_matrix_view(m));
        return v;
    }
};

template <class T>
rotation_list<T> random_rotations(const llama::model_config& c, std::uint64_t seed, bool hadamard = false)
{
    std::mt19937_64 rng(seed);
    rotation_list<T> out;
    const auto draw = [&](std::size_t n) {
        return hadamard ? spinquant::random_hadamard<T>(n, rng) : spinquant::random_orthogonal<T>(n, rng);
    };
    out.r.push_back(draw(c.dim));
    for (std::size_t l = 0; l < c.n_layers; ++l) out.r.push_back(draw(c.head_size()));
    return out;
}

template <class T>
rotation_list<T> zeros_like(const rotation_list<T>& r)
{
    rotation_list<T> g = r;
    for (auto& m : g.r) m.setZero();
    return g;
}

std::vector<int> some_tokens(std::size_t n)
{
    auto t = tok512().encode("Once there was a boy named Tony. He loved sailing in his boat.\nOne day he saw a fish.",
                             true, false);
    t.resize(std::min(n, t.size()));
    return t;
}

// An entry (rotation k, row i, column j) of the rotation list.
struct entry {
    std::size_t k, i, j;
};

// `count_r1` entries of R1 and `count_r2` of each R2, drawn at random.
std::vector<entry> sample_entries(const llama::model_config& c, std::size_t count_r1, std::size_t count_r2, std::uint64_t seed)
{
    std::mt19937_64 rng(seed);
    std::vector<entry> e;
    for (std::size_t a = 0; a < count_r1; ++a) e.push_back({0, rng() % c.dim, rng() % c.dim});
    for (std::size_t l = 0; l < c.n_layers; ++l)
        for (std::size_t a = 0; a < count_r2; ++a) e.push_back({l + 1, rng() % c.head_size(), rng() % c.head_size()});
    return e;
}

// ∂f/∂(entry) by central differences with one Richardson step (error O(h^4)).
template <class F>
double finite_difference(F&& f, rotation_list<double>& r, const entry& e, double h)
{
    double& x = r.r[e.k](static_cast<Eigen::Index>(e.i), static_cast<Eigen::Index>(e.j));
    const double x0 = x;
    const auto at = [&](double dx) {
        x = x0 + dx;
        const double v = f(r);
        x = x0;
        return v;
    };
    const double d1 = (at(h) - at(-h)) / (2 * h);
    const double d2 = (at(2 * h) - at(-2 * h)) / (4 * h);
    return (4 * d1 - d2) / 3;
}

}  // namespace

TEST_CASE("the gradient with respect to R1 and R2 matches finite differences of the double loss", "[llama][backward]")
{
    struct setting {
        const char* name;
        bool fuse, online;
    };
    const setting s = GENERATE(setting{"fused norms, no online rotation", true, false},
                               setting{"fused norms, online R3 and R4", true, true},
                               setting{"unfused norm weights, online R3 and R4", false, true});
    INFO(s.name);
    llama::model m = prepared(stories260k(), 2, s.fuse);
    const llama::online_rotations rot(m.config);
    llama::quant_config q;  // 16 bits everywhere: the quantizers are the identity
    q.online_r3 = q.online_r4 = s.online;
    if (s.online) llama::merge_r4(m, rot);
    const llama::eval_set set{{some_tokens(9)}};
    llama::basic_end_to_end_loss<double> f(m, q, &rot, set, 1);
    auto r = random_rotations<double>(m.config, 7);
    auto g = zeros_like(r);
    const double loss = f(r.views(), g.mutable_views());
    CHECK(loss > 1.0);
    const auto value = [&](const rotation_list<double>& at) { return f.evaluate(at.views(), set); };
    CHECK(value(r) == loss);
    double worst = 0.0;
    for (const entry& e : sample_entries(m.config, 24, 8, 11)) {
        const double fd = finite_difference(value, r, e, 1e-3);
        const double got = g.r[e.k](static_cast<Eigen::Index>(e.i), static_cast<Eigen::Index>(e.j));
        const double rel = std::abs(got - fd) / std::abs(fd);
        worst = std::max(worst, rel);
        INFO("rotation " << e.k << " (" << e.i << ", " << e.j << "): gradient " << got << ", finite difference " << fd);
        CHECK(rel <= 1e-6);
    }
    WARN("worst relative error " << worst);
}
