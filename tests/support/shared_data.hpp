#pragma once
// Locates ../shared (golden files, real text) beside the checkout. Tests that need it call
// shared_path_or_skip(); without the folder (a user's fresh clone) they print a line starting
// "SKIPPED:", which ctest reports as skipped, and return. Under SPINQUANT_REQUIRE_SHARED=1 (CI) a
// missing folder is a failure instead.
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>

#include "catch.hpp"

#ifndef SPINQUANT_SHARED_DIR
#error "CMake defines SPINQUANT_SHARED_DIR for every test"
#endif

namespace spinquant::test {

/// The path of `relative` inside the shared folder, or nullopt (after reporting the skip).
inline std::optional<std::filesystem::path> shared_path_or_skip(const std::string& relative)
{
    const std::filesystem::path p = std::filesystem::path(SPINQUANT_SHARED_DIR) / relative;
    if (std::filesystem::exists(p)) return p;
    const char* required = std::getenv("SPINQUANT_REQUIRE_SHARED");
    if (required != nullptr && std::string(required) == "1")
        FAIL("SPINQUANT_REQUIRE_SHARED=1 but " << p.string() << " does not exist");
    std::cout << "SKIPPED: " << p.string() << " not found (the shared data folder beside the checkout)\n";
    return std::nullopt;
}

}  // namespace spinquant::test
