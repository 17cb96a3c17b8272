# Flags for the project's own tests, benchmarks and examples. Never exported: consumers of
# spinquant::spinquant get no warnings, -march or sanitizer flags from us.
add_library(spinquant_dev_flags INTERFACE)
target_compile_options(spinquant_dev_flags INTERFACE
  -Wall -Wextra -Wpedantic -Wconversion -Wsign-conversion -Wshadow -Wnon-virtual-dtor -Wold-style-cast
  -Wcast-align -Woverloaded-virtual -Wnull-dereference -Wdouble-promotion -Wimplicit-fallthrough)
target_link_libraries(spinquant_dev_flags INTERFACE spinquant::spinquant)

# -march=native for code whose speed matters (benchmarks, the demo). It is opt-in per target,
# like xtensor::optimize, so the library itself never assumes the build machine's ISA.
add_library(spinquant_native INTERFACE)
add_library(spinquant::native ALIAS spinquant_native)
include(CheckCXXCompilerFlag)
check_cxx_compiler_flag(-march=native SPINQUANT_HAS_MARCH_NATIVE)
if(SPINQUANT_HAS_MARCH_NATIVE)
  target_compile_options(spinquant_native INTERFACE -march=native)
endif()
