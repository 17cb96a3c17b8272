# Finds what spinquant::spinquant needs. Used by the build tree and shipped inside the package.
include(CMakeFindDependencyMacro)
find_dependency(Eigen3 3.4 NO_MODULE)
find_dependency(xsimd 8.1)
# Debian 12's xsimd 8.1 target links a bare "xtl", which becomes "-lxtl" and fails to link
# (xsimd #869/#875). xsimd does not need xtl; an empty target of that name absorbs the link item.
if(TARGET xsimd AND NOT TARGET xtl)
  add_library(xtl INTERFACE IMPORTED)
endif()
