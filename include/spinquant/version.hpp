#pragma once
/// The library version: the one source, CMake parses these three lines.
#define SPINQUANT_VERSION_MAJOR 0
#define SPINQUANT_VERSION_MINOR 1
#define SPINQUANT_VERSION_PATCH 0

/// SPINQUANT_VERSION as one integer, major * 10000 + minor * 100 + patch.
#define SPINQUANT_VERSION (SPINQUANT_VERSION_MAJOR * 10000 + SPINQUANT_VERSION_MINOR * 100 + SPINQUANT_VERSION_PATCH)
