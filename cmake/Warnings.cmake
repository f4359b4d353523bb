# One place for compiler flags shared by every target.
add_library(regdisk_flags INTERFACE)
target_compile_options(regdisk_flags INTERFACE
  -Wall -Wextra -Wpedantic -Wnon-virtual-dtor -Wimplicit-fallthrough
  $<$<CXX_COMPILER_ID:GNU>:-Wshadow=local>
  $<$<BOOL:${REGDISK_WERROR}>:-Werror>)
target_compile_definitions(regdisk_flags INTERFACE _FILE_OFFSET_BITS=64 _GNU_SOURCE)
if(REGDISK_SANITIZE)
  target_compile_options(regdisk_flags INTERFACE -fsanitize=address,undefined -fno-omit-frame-pointer
                         -fno-sanitize-recover=undefined)
  target_link_options(regdisk_flags INTERFACE -fsanitize=address,undefined)
endif()
if(REGDISK_TSAN)
  target_compile_options(regdisk_flags INTERFACE -fsanitize=thread -fno-omit-frame-pointer)
  target_link_options(regdisk_flags INTERFACE -fsanitize=thread)
endif()
if(REGDISK_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "REGDISK_FUZZ needs clang: configure with CXX=clang++")
  endif()
  target_compile_options(regdisk_flags INTERFACE -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer)
  target_link_options(regdisk_flags INTERFACE -fsanitize=address,undefined)
endif()
