// Allocation checks for one test executable: include this first, in exactly one translation unit.
//
// It replaces every global allocation function, plain and nothrow (sanitizers then see matching
// pairs), so that spinquant::test::allocations counts each operator new; and it turns Eigen's heap
// allocations into an abort while a test forbids them (EIGEN_RUNTIME_NO_MALLOC, with eigen_assert
// routed to an always-on check so that it also works under NDEBUG).
#pragma once

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <new>

#ifdef EIGEN_WORLD_VERSION
#error "support/allocation_counter.hpp must be included before any Eigen header"
#endif

namespace spinquant::test {
inline std::atomic<long> allocations{0};  // calls of any operator new so far

[[noreturn]] inline void eigen_check_failed(const char* what)
{
    std::fprintf(stderr, "Eigen check failed: %s\n", what);
    std::abort();
}

/// How many times operator new ran during f().
template <class F>
long allocations_during(F&& f)
{
    const long before = allocations.load();
    f();
    return allocations.load() - before;
}
}  // namespace spinquant::test

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) \
    do { \
        if (!(x)) ::spinquant::test::eigen_check_failed(#x); \
    } while (false)

void* operator new(std::size_t size)
{
    ++spinquant::test::allocations;
    if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
    throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return ::operator new(size); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept
{
    ++spinquant::test::allocations;
    return std::malloc(size == 0 ? 1 : size);
}
void* operator new[](std::size_t size, const std::nothrow_t& t) noexcept { return ::operator new(size, t); }
// GCC 12 at -O2 sees malloc'd memory reach free through operator delete and calls the pair
// "mismatched"; here malloc and free are the pair, by construction.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
