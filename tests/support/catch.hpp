#pragma once
// Catch2 v2/v3 shim: CMake defines SPINQUANT_CATCH2_V3 when it found Catch2 3.
#if defined(SPINQUANT_CATCH2_V3)
#include <catch2/catch_all.hpp>
#else
#include <catch2/catch.hpp>
#endif
