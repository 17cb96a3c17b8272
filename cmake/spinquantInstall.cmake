# Install and export rules: headers, CMake package (config + version + targets), pkg-config file.
include(CMakePackageConfigHelpers)
set(SPINQUANT_CMAKE_DIR "${CMAKE_INSTALL_DATADIR}/cmake/spinquant" CACHE STRING "Where the CMake package files are installed")
set(SPINQUANT_PKGCONFIG_DIR "${CMAKE_INSTALL_DATADIR}/pkgconfig" CACHE STRING "Where spinquant.pc is installed")

install(TARGETS spinquant EXPORT spinquantTargets FILE_SET HEADERS)
install(EXPORT spinquantTargets NAMESPACE spinquant:: DESTINATION "${SPINQUANT_CMAKE_DIR}")
export(EXPORT spinquantTargets NAMESPACE spinquant:: FILE "${PROJECT_BINARY_DIR}/spinquantTargets.cmake")

configure_package_config_file(cmake/spinquantConfig.cmake.in "${PROJECT_BINARY_DIR}/spinquantConfig.cmake"
                              INSTALL_DESTINATION "${SPINQUANT_CMAKE_DIR}")
write_basic_package_version_file("${PROJECT_BINARY_DIR}/spinquantConfigVersion.cmake"
                                 COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
# The build tree is a usable package too (find_package with spinquant_DIR pointing at it).
configure_file(cmake/spinquantDependencies.cmake "${PROJECT_BINARY_DIR}/spinquantDependencies.cmake" COPYONLY)
install(FILES "${PROJECT_BINARY_DIR}/spinquantConfig.cmake" "${PROJECT_BINARY_DIR}/spinquantConfigVersion.cmake"
              cmake/spinquantDependencies.cmake
        DESTINATION "${SPINQUANT_CMAKE_DIR}")

# pkg-config: prefix is computed from the .pc file's own location, so the install is relocatable.
# The file sits two levels below the prefix (share/pkgconfig), as "${pcfiledir}/../.." assumes.
configure_file(cmake/spinquant.pc.in "${PROJECT_BINARY_DIR}/spinquant.pc" @ONLY)
install(FILES "${PROJECT_BINARY_DIR}/spinquant.pc" DESTINATION "${SPINQUANT_PKGCONFIG_DIR}")
