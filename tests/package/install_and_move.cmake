# Installs the build tree into PREFIX, then moves it to MOVED: the find_package and pkg-config
# tests use the moved copy, which proves the installed package is relocatable.
file(REMOVE_RECURSE "${PREFIX}" "${MOVED}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed: ${rc}")
endif()
file(RENAME "${PREFIX}" "${MOVED}")
foreach(f include/spinquant/spinquant.hpp share/cmake/spinquant/spinquantConfig.cmake
          share/cmake/spinquant/spinquantConfigVersion.cmake share/cmake/spinquant/spinquantTargets.cmake
          share/cmake/spinquant/spinquantDependencies.cmake share/pkgconfig/spinquant.pc)
  if(NOT EXISTS "${MOVED}/${f}")
    message(FATAL_ERROR "installed package lacks ${f}")
  endif()
endforeach()
