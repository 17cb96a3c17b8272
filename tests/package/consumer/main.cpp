// Consumer of the installed / embedded package: includes the umbrella header and runs.
#include <cstdio>
#include <vector>

#include <spinquant/spinquant.hpp>

int main()
{
    std::vector<float> v(12, 1.0f);
    const auto m = spinquant::as_matrix_view(v, 3, 4);
    const auto e = spinquant::as_eigen(m);
    if (e.sum() != 12.0f) return 1;
    std::printf("consumer ok (spinquant %d.%d.%d)\n", SPINQUANT_VERSION_MAJOR, SPINQUANT_VERSION_MINOR,
                SPINQUANT_VERSION_PATCH);
    return 0;
}
