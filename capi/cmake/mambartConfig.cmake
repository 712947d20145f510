# CMake package file of the mambart C API (installed as <prefix>/lib/cmake/mambart/): defines
# the imported target mambart::mambart (libmambart and capi/mambart.h).
#   find_package(mambart REQUIRED)   # with -Dmambart_DIR=$(python -m mambart --cmake-dir)
#   target_link_libraries(app PRIVATE mambart::mambart)
get_filename_component(_mambart_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET mambart::mambart)
  add_library(mambart::mambart SHARED IMPORTED)
  set_target_properties(mambart::mambart PROPERTIES
    IMPORTED_LOCATION "${_mambart_prefix}/lib/libmambart.so"
    IMPORTED_SONAME "libmambart.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_mambart_prefix}/include")
endif()
set(mambart_INCLUDE_DIR "${_mambart_prefix}/include")
set(mambart_LIBRARY "${_mambart_prefix}/lib/libmambart.so")
set(mambart_FOUND TRUE)
unset(_mambart_prefix)
