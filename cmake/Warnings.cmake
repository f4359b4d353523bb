# One place for compiler flags shared by every target.
add_library(regdisk_flags INTERFACE)
target_compile_options(regdisk_flags INTERFACE
  -Wall -Wextra -Wpedantic -Wshadow=local -Wnon-virtual-dtor -Wimplicit-fallthrough
  $<$<BOOL:${REGDISK_WERROR}>:-Werror>)
target_compile_definitions(regdisk_flags INTERFACE _FILE_OFFSET_BITS=64 _GNU_SOURCE)
if(REGDISK_SANITIZE)
  target_compile_options(regdisk_flags INTERFACE -fsanitize=address,undefined -fno-omit-frame-pointer
                         -fno-sanitize-recover=undefined)
  target_link_options(regdisk_flags INTERFACE -fsanitize=address,undefined)
endif()
