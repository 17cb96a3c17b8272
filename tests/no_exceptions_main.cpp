// Built with -fno-exceptions: bad input must print the library's message and abort.
// tests/CMakeLists.txt runs it and checks the message and the non-zero exit.
#include <vector>

#include <spinquant/concepts.hpp>

int main()
{
    static_assert(!SPINQUANT_HAS_EXCEPTIONS, "this program must be compiled with -fno-exceptions");
    std::vector<float> v(12);
    (void)spinquant::as_matrix_view(v, 5, 3);  // wrong element count: aborts with a message
    return 0;                                  // not reached
}
