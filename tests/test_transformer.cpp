// Tests of transformer.hpp: the SpinQuant recipe over a user model adapted through
// transformer_traits. The model here is laid out unlike llama2.c's: q/k/v fused in one
// column-major matrix, gate/up fused in one row-major matrix, column-major o/down, an embedding
// with padded rows and a tied lm_head, both norms of a layer in one vector. Its function is
// computed by the independent double forward pass of support/stiefel_llama.hpp.
#include "support/catch.hpp"

#include <chrono>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <spinquant/transformer.hpp>

#include "support/stiefel_llama.hpp"

using spinquant::matrix_view;

namespace toy {

struct layer {
    Eigen::MatrixXd qkv;        // [(heads + 2 kv_heads) * d, hidden], column-major
    Eigen::MatrixXd o, down;    // column-major
    std::vector<double> gate_up;  // [2 ffn, hidden], row-major
    std::vector<double> norms;    // attention norm, then ffn norm
};

struct model {
    spinquant::test::llama_config cfg;
    std::size_t pad = 3;            // embedding row stride = hidden + pad
    std::vector<double> embedding;  // [vocab, hidden + pad]
    std::vector<double> lm_head;    // own storage once untied
    bool tied = true;
    std::vector<double> final_norm;
    std::vector<layer> layers;

    [[nodiscard]] std::size_t hidden() const { return static_cast<std::size_t>(cfg.dim); }
};

/// The same weights as a random spinquant::test::llama_model, laid out as above (biases 0).
inline model from(const spinquant::test::llama_model<double>& src)
{
    model m;
    m.cfg = src.cfg;
    const auto h = static_cast<std::size_t>(m.cfg.dim);
    m.embedding.assign(static_cast<std::size_t>(m.cfg.vocab) * (h + m.pad), -99.0);  // padding must stay put
    for (Eigen::Index i = 0; i < m.cfg.vocab; ++i)
        for (Eigen::Index j = 0; j < m.cfg.dim; ++j)
            m.embedding[static_cast<std::size_t>(i) * (h + m.pad) + static_cast<std::size_t>(j)] = src.embedding(i, j);
    m.final_norm.assign(src.final_norm.data(), src.final_norm.data() + src.final_norm.size());
    for (const auto& l : src.layers) {
        layer t;
        t.qkv.resize(l.wq.rows() + l.wk.rows() + l.wv.rows(), m.cfg.dim);
        t.qkv << l.wq, l.wk, l.wv;
        t.o = l.wo;
        t.down = l.w_down;
        t.gate_up.resize(static_cast<std::size_t>(2 * m.cfg.hidden * m.cfg.dim));
        Eigen::Map<Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(t.gate_up.data(), 2 * m.cfg.hidden, m.cfg.dim)
            << l.w_gate, l.w_up;
        t.norms.assign(l.attn_norm.data(), l.attn_norm.data() + l.attn_norm.size());
        t.norms.insert(t.norms.end(), l.ffn_norm.data(), l.ffn_norm.data() + l.ffn_norm.size());
        m.layers.push_back(std::move(t));
    }
    return m;
}

inline matrix_view<double> rows_of(Eigen::MatrixXd& m, Eigen::Index r0, Eigen::Index n)
{
    return {m.data() + r0, static_cast<std::size_t>(n), static_cast<std::size_t>(m.cols()), 1, static_cast<std::size_t>(m.rows())};
}

}  // namespace toy

template <>
struct spinquant::transformer_traits<toy::model> {
    static std::size_t layer_count(const toy::model& m) { return m.layers.size(); }
    static std::size_t head_dim(const toy::model& m) { return static_cast<std::size_t>(m.cfg.head_dim); }
    static matrix_view<double> embedding(toy::model& m)
    {
        return {m.embedding.data(), static_cast<std::size_t>(m.cfg.vocab), m.hidden(), m.hidden() + m.pad, 1};
    }
    static matrix_view<double> lm_head(toy::model& m)
    {
        if (m.tied) return embedding(m);
        return {m.lm_head.data(), static_cast<std::size_t>(m.cfg.vocab), m.hidden(), m.hidden(), 1};
    }
    static std::span<double> final_norm(toy::model& m) { return m.final_norm; }
    static transformer_layer<double> layer(toy::model& m, std::size_t l)
    {
        toy::layer& t = m.layers[l];
        const auto& c = m.cfg;
        const std::size_t h = m.hidden(), ffn = static_cast<std::size_t>(c.hidden);
        const auto col_major = [](Eigen::MatrixXd& w) {
            return matrix_view<double>{w.data(), static_cast<std::size_t>(w.rows()), static_cast<std::size_t>(w.cols()), 1,
                                       static_cast<std::size_t>(w.rows())};
        };
        const Eigen::Index q = c.n_heads * c.head_dim, kv = c.n_kv_heads * c.head_dim;
        return {std::span<double>(t.norms).first(h),
                std::span<double>(t.norms).subspan(h),
                toy::rows_of(t.qkv, 0, q),
                toy::rows_of(t.qkv, q, kv),
                toy::rows_of(t.qkv, q + kv, kv),
                col_major(t.o),
                {t.gate_up.data(), ffn, h, h, 1},
                {t.gate_up.data() + ffn * h, ffn, h, h, 1},
                col_major(t.down)};
    }
    static void untie(toy::model& m)
    {
        const auto e = embedding(m);
        m.lm_head.resize(e.rows * e.cols);
        for (std::size_t i = 0; i < e.rows; ++i)
            for (std::size_t j = 0; j < e.cols; ++j) m.lm_head[i * e.cols + j] = e(i, j);
        m.tied = false;
    }
};

namespace toy {

/// The same model without traits::untie: the recipe must refuse it while tied.
struct untieable : model {};

/// Back to the reference model's layout (read through the traits, so this also checks the views).
inline spinquant::test::llama_model<double> to_reference(model& m)
{
    using tr = spinquant::transformer_traits<model>;
    const auto dense = [](matrix_view<double> v) {
        Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> out(static_cast<Eigen::Index>(v.rows), static_cast<Eigen::Index>(v.cols));
        for (std::size_t i = 0; i < v.rows; ++i)
            for (std::size_t j = 0; j < v.cols; ++j) out(static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(j)) = v(i, j);
        return out;
    };
    const auto vec = [](std::span<double> s) { return Eigen::VectorXd(Eigen::Map<const Eigen::VectorXd>(s.data(), static_cast<Eigen::Index>(s.size()))); };
    spinquant::test::llama_model<double> r;
    r.cfg = m.cfg;
    r.embedding = dense(tr::embedding(m));
    r.lm_head = dense(tr::lm_head(m));
    r.final_norm = vec(tr::final_norm(m));
    for (std::size_t l = 0; l < m.layers.size(); ++l) {
        const auto v = tr::layer(m, l);
        spinquant::test::llama_layer<double> x;
        x.attn_norm = vec(v.attention_norm);
        x.ffn_norm = vec(v.ffn_norm);
        x.wq = dense(v.q_proj);
        x.wk = dense(v.k_proj);
        x.wv = dense(v.v_proj);
        x.wo = dense(v.o_proj);
        x.w_gate = dense(v.gate_proj);
        x.w_up = dense(v.up_proj);
        x.w_down = dense(v.down_proj);
        x.bv = Eigen::VectorXd::Zero(x.wv.rows());
        x.bo = Eigen::VectorXd::Zero(x.wo.rows());
        r.layers.push_back(x);
    }
    return r;
}

inline model random_model(std::uint64_t seed)
{
    auto ref = spinquant::test::random_llama<double>({}, seed);
    return from(ref);
}

inline const std::vector<Eigen::Index> tokens = {1, 5, 12, 0, 7, 7, 3, 11};

inline spinquant::rotation_set<double> random_rotations(const model& m, std::uint64_t seed)
{
    std::mt19937_64 rng(seed);
    spinquant::rotation_set<double> r;
    r.r1 = spinquant::random_orthogonal<double>(m.hidden(), rng);
    for (std::size_t l = 0; l < m.layers.size(); ++l)
        r.r2.push_back(spinquant::random_orthogonal<double>(static_cast<std::size_t>(m.cfg.head_dim), rng));
    return r;
}

}  // namespace toy

template <>
struct spinquant::transformer_traits<toy::untieable> : spinquant::transformer_traits<toy::model> {
    static void untie(toy::untieable&) = delete;
};

namespace {

double max_abs_diff(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) { return (a - b).cwiseAbs().maxCoeff(); }

std::vector<double> snapshot(toy::model& m)
{
    std::vector<double> all = m.embedding;
    all.insert(all.end(), m.lm_head.begin(), m.lm_head.end());
    all.insert(all.end(), m.final_norm.begin(), m.final_norm.end());
    for (const auto& l : m.layers) {
        all.insert(all.end(), l.qkv.data(), l.qkv.data() + l.qkv.size());
        all.insert(all.end(), l.o.data(), l.o.data() + l.o.size());
        all.insert(all.end(), l.down.data(), l.down.data() + l.down.size());
        all.insert(all.end(), l.gate_up.begin(), l.gate_up.end());
        all.insert(all.end(), l.norms.begin(), l.norms.end());
    }
    return all;
}

}  // namespace

TEST_CASE("transformer_model accepts adapted models and rejects others", "[transformer]")
{
    STATIC_REQUIRE(spinquant::transformer_model<toy::model>);
    STATIC_REQUIRE(spinquant::transformer_model<toy::model&>);
    STATIC_REQUIRE(std::same_as<spinquant::transformer_scalar_t<toy::model>, double>);
    STATIC_REQUIRE_FALSE(spinquant::transformer_model<int>);
    STATIC_REQUIRE_FALSE(spinquant::transformer_model<std::vector<float>>);
}

TEST_CASE("shape_of reads the shape off the views and checks them", "[transformer]")
{
    toy::model m = toy::random_model(1);
    const auto s = spinquant::shape_of(m);
    CHECK(s.layers == 2);
    CHECK(s.hidden == 16);
    CHECK(s.heads == 4);
    CHECK(s.kv_heads == 2);
    CHECK(s.head_dim == 4);
    CHECK(s.ffn == 24);
    CHECK(s.vocab == 13);
    m.layers[1].down.resize(16, 23);  // an inconsistent layer
    try {
        (void)spinquant::shape_of(m);
        FAIL("expected an error");
    } catch (const spinquant::error& e) {
        CHECK(e.code() == spinquant::errc::bad_shape);
        CHECK_THAT(e.what(), Catch::Matchers::Contains("layer 1 down_proj"));
    }
}

TEST_CASE("the whole recipe leaves the full-precision function unchanged", "[transformer]")
{
    toy::model m = toy::random_model(2);
    const Eigen::MatrixXd before = spinquant::test::llama_logits(toy::to_reference(m), toy::tokens);
    const auto r = toy::random_rotations(m, 3);
    REQUIRE(m.tied);
    spinquant::apply_rotations(m, r);
    CHECK_FALSE(m.tied);  // untied first, so the table was rotated once as embedding, once as lm_head
    for (const auto& l : m.layers)
        for (const double a : l.norms) CHECK(a == 1.0);
    for (const double a : m.final_norm) CHECK(a == 1.0);
    for (std::size_t i = 0; i < m.embedding.size(); ++i)
        if (i % (m.hidden() + m.pad) >= m.hidden()) REQUIRE(m.embedding[i] == -99.0);  // padding untouched
    const Eigen::MatrixXd after = spinquant::test::llama_logits(toy::to_reference(m), toy::tokens);
    CHECK(max_abs_diff(before, after) < 1e-11 * (1 + before.cwiseAbs().maxCoeff()));
    // The weights did change: the rotation is really merged.
    const toy::model plain = toy::random_model(2);
    CHECK((m.layers[0].qkv - plain.layers[0].qkv).cwiseAbs().maxCoeff() > 1e-2);
}

TEST_CASE("each step alone matches its dense formula", "[transformer]")
{
    using tr = spinquant::transformer_traits<toy::model>;
    toy::model m = toy::random_model(4);
    spinquant::untie_embeddings(m);
    auto ref = toy::to_reference(m);
    spinquant::fuse_norms(m);
    const auto fused = toy::to_reference(m);
    const auto& l0 = ref.layers[0];
    CHECK(max_abs_diff(fused.layers[0].wq, l0.wq * l0.attn_norm.asDiagonal()) < 1e-14);
    CHECK(max_abs_diff(fused.layers[0].w_up, l0.w_up * l0.ffn_norm.asDiagonal()) < 1e-14);
    CHECK(max_abs_diff(fused.lm_head, ref.lm_head * ref.final_norm.asDiagonal()) < 1e-14);
    CHECK(max_abs_diff(fused.embedding, ref.embedding) == 0.0);  // no mean-centring

    const auto r = toy::random_rotations(m, 5);
    spinquant::rotate_residual(m, r.r1);
    const auto rot = toy::to_reference(m);
    CHECK(max_abs_diff(rot.embedding, fused.embedding * r.r1) < 1e-13);
    CHECK(max_abs_diff(rot.lm_head, fused.lm_head * r.r1) < 1e-13);
    CHECK(max_abs_diff(rot.layers[1].wk, fused.layers[1].wk * r.r1) < 1e-13);
    CHECK(max_abs_diff(rot.layers[1].w_gate, fused.layers[1].w_gate * r.r1) < 1e-13);
    CHECK(max_abs_diff(rot.layers[1].wo, r.r1.transpose() * fused.layers[1].wo) < 1e-13);
    CHECK(max_abs_diff(rot.layers[1].w_down, r.r1.transpose() * fused.layers[1].w_down) < 1e-13);

    spinquant::rotate_heads(m, 1, r.r2[1]);
    const auto heads = toy::to_reference(m);
    const auto blocks = [&](std::size_t count) { return spinquant::block_diagonal(r.r2[1], count); };
    CHECK(max_abs_diff(heads.layers[1].wv, blocks(2).transpose() * rot.layers[1].wv) < 1e-13);
    CHECK(max_abs_diff(heads.layers[1].wo, rot.layers[1].wo * blocks(4)) < 1e-13);
    CHECK(max_abs_diff(heads.layers[0].wv, rot.layers[0].wv) == 0.0);  // other layers untouched

    // R4: down_proj' (M x) = down_proj x for the plan's online transform x -> M x.
    const spinquant::hadamard_plan<double> r4(24);
    const Eigen::MatrixXd down_before = heads.layers[0].w_down;
    spinquant::merge_online_r4(m, r4);
    const Eigen::MatrixXd down_after = toy::to_reference(m).layers[0].w_down;
    std::vector<double> x(24);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::cos(1.3 * static_cast<double>(i));
    const Eigen::VectorXd plain = down_before * Eigen::Map<const Eigen::VectorXd>(x.data(), 24);
    r4.apply(x);
    const Eigen::VectorXd online = down_after * Eigen::Map<const Eigen::VectorXd>(x.data(), 24);
    CHECK((plain - online).cwiseAbs().maxCoeff() < 1e-12);
    CHECK(tr::layer(m, 0).down_proj.rows == 16);
}

TEST_CASE("bad input is rejected with the model untouched", "[transformer][errors]")
{
    toy::model m = toy::random_model(6);
    auto r = toy::random_rotations(m, 7);
    const auto check_untouched = [&](auto&& call, spinquant::errc code, const char* words) {
        const auto before = snapshot(m);
        try {
            call();
            FAIL("expected an error");
        } catch (const spinquant::error& e) {
            CHECK(e.code() == code);
            CHECK_THAT(e.what(), Catch::Matchers::Contains(words));
        }
        const auto after = snapshot(m);  // bitwise: a NaN planted by the test must compare equal to itself
        CHECK((after.size() == before.size() && std::memcmp(after.data(), before.data(), after.size() * sizeof(double)) == 0));
    };
    SECTION("tied lm_head without untie")
    {
        check_untouched([&] { spinquant::fuse_norms(m); }, spinquant::errc::bad_argument, "tied");
        toy::untieable u{toy::random_model(6)};
        CHECK_THROWS_AS(spinquant::untie_embeddings(u), spinquant::error);
    }
    SECTION("R1 before the norms are fused")
    {
        spinquant::untie_embeddings(m);
        check_untouched([&] { spinquant::rotate_residual(m, r.r1); }, spinquant::errc::bad_argument, "fuse_norms first");
    }
    SECTION("wrong rotation sizes")
    {
        r.r1 = spinquant::rotation_matrix<double>::Identity(15, 15);
        check_untouched([&] { spinquant::apply_rotations(m, r); }, spinquant::errc::bad_shape, "r1 is 15x15");
        r = toy::random_rotations(m, 7);
        r.r2.pop_back();
        check_untouched([&] { spinquant::apply_rotations(m, r); }, spinquant::errc::bad_shape, "1 R2 rotations for 2 layers");
        r = toy::random_rotations(m, 7);
        r.r2[1] = spinquant::rotation_matrix<double>::Identity(8, 8);
        check_untouched([&] { spinquant::apply_rotations(m, r); }, spinquant::errc::bad_shape, "r2[1]");
        const spinquant::hadamard_plan<double> wrong(32);
        check_untouched([&] { spinquant::apply_rotations(m, toy::random_rotations(m, 7), &wrong); }, spinquant::errc::bad_shape, "ffn = 24");
        check_untouched([&] { spinquant::rotate_heads(m, 2, r.r2[0]); }, spinquant::errc::bad_shape, "layer 2 of 2");
    }
    SECTION("non-finite values")
    {
        m.layers[1].down(3, 4) = std::nan("");
        check_untouched([&] { spinquant::apply_rotations(m, r); }, spinquant::errc::non_finite, "non-finite");
        m = toy::random_model(6);
        r.r2[0](1, 1) = std::numeric_limits<double>::infinity();
        check_untouched([&] { spinquant::apply_rotations(m, r); }, spinquant::errc::non_finite, "r2[0]");
    }
    SECTION("a group size that does not divide an input width")
    {
        spinquant::untie_embeddings(m);
        check_untouched([&] { spinquant::quantize_weights(m, spinquant::quant_spec::weight(4, true, 16)); },
                        spinquant::errc::bad_shape, "group_size 16");
    }
}

TEST_CASE("quantize_weights fake-quantizes every layer linear and nothing else", "[transformer]")
{
    toy::model m = toy::random_model(8);
    spinquant::untie_embeddings(m);
    toy::model expected = m;
    const auto spec = spinquant::quant_spec::weight(4, true, 0, true);
    spinquant::quantize_weights(m, spec);
    using tr = spinquant::transformer_traits<toy::model>;
    for (std::size_t l = 0; l < 2; ++l) {
        const auto e = tr::layer(expected, l);
        for (const auto& w : {e.q_proj, e.k_proj, e.v_proj, e.o_proj, e.gate_proj, e.up_proj, e.down_proj})
            spinquant::fake_quantize(w, spec);
    }
    CHECK(snapshot(m) == snapshot(expected));
    CHECK(m.embedding == toy::random_model(8).embedding);
}

TEST_CASE("rotation sets round-trip through a file, and bad files are rejected", "[transformer]")
{
    const auto dir = std::filesystem::temp_directory_path() / ("spinquant_test_rotations_" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
    std::filesystem::create_directories(dir);
    const auto path = dir / "r.bin";
    spinquant::rotation_set<float> r;
    std::mt19937_64 rng(9);
    r.r1 = spinquant::random_orthogonal<float>(16, rng);
    r.r2 = {spinquant::random_orthogonal<float>(4, rng), spinquant::rotation_matrix<float>(), spinquant::random_orthogonal<float>(4, rng)};
    spinquant::save_rotations(path, r);
    const auto back = spinquant::load_rotations<float>(path);
    CHECK(back.r1 == r.r1);
    REQUIRE(back.r2.size() == 3);
    CHECK(back.r2[0] == r.r2[0]);
    CHECK(back.r2[1].size() == 0);
    CHECK(back.r2[2] == r.r2[2]);
    const auto as_double = spinquant::load_rotations<double>(path);
    CHECK(as_double.r1.cast<float>() == r.r1);

    std::ifstream in(path, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto write = [&](const std::string& s) {
        std::ofstream f(path, std::ios::binary | std::ios::trunc);
        f << s;
    };
    const auto rejects = [&](const std::string& content, const char* words) {
        write(content);
        try {
            (void)spinquant::load_rotations<float>(path);
            FAIL("expected an error");
        } catch (const spinquant::error& e) {
            CHECK(e.code() == spinquant::errc::bad_file);
            CHECK_THAT(e.what(), Catch::Matchers::Contains(words));
        }
    };
    rejects(bytes.substr(0, bytes.size() - 1), "truncated");
    rejects(bytes + "x", "1 trailing bytes");
    rejects("not a rotation file at all", "not a spinquant rotation file");
    std::string nonsquare = bytes;
    nonsquare[12] = 3;  // R1's rows: 3 x 16
    rejects(nonsquare, "expected square");
    CHECK_THROWS_AS(spinquant::load_rotations<float>(dir / "missing.bin"), spinquant::error);
    std::filesystem::remove_all(dir);
}
