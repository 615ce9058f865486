# CMake toolchain for cross-building the native client for 64-bit ARM Linux boards (Raspberry Pi 4/5, Jetson, ...)
# on a Debian/Ubuntu x86-64 host with Debian's cross compiler and multiarch :arm64 libraries:
#
#   dpkg --add-architecture arm64 && apt-get update
#   apt-get install -y crossbuild-essential-arm64 libpaho-mqtt-dev:arm64 nlohmann-json3-dev libutf8proc-dev:arm64 \
#     libssl-dev:arm64 zlib1g-dev:arm64
#   cmake -S devices/native -B build/native-aarch64 \
#     -DCMAKE_TOOLCHAIN_FILE=devices/native/cmake/aarch64-linux-gnu.cmake \
#     -DEXECUTORCH_ROOT=<the aarch64 executorch wheel, unpacked>/executorch
#
# cross-build-aarch64.sh does all of it. Multiarch keeps arm64 libraries in /usr/lib/aarch64-linux-gnu and their
# arch-specific headers in /usr/include/aarch64-linux-gnu next to the host's, so no separate sysroot is needed: the
# compiler already searches those folders, and CMake finds the libraries through CMAKE_LIBRARY_ARCHITECTURE.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(EDGEMOLE_CROSS_TRIPLE aarch64-linux-gnu CACHE STRING "GNU triple of the cross compiler")
set(CMAKE_C_COMPILER ${EDGEMOLE_CROSS_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${EDGEMOLE_CROSS_TRIPLE}-g++)
set(CMAKE_LIBRARY_ARCHITECTURE ${EDGEMOLE_CROSS_TRIPLE})

# Libraries and headers come from the target's folders only (the multiarch ones under /usr, the cross libc under
# /usr/aarch64-linux-gnu); programs (python3 for a default EXECUTORCH_ROOT, never used by the cross script) from the
# host. The x86-64 libraries live in /usr/lib/x86_64-linux-gnu, which the aarch64 library architecture never
# searches.
set(CMAKE_FIND_ROOT_PATH /usr/${EDGEMOLE_CROSS_TRIPLE})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# FindOpenSSL asks pkg-config for hints first: make the host's pkg-config answer with the arm64 .pc files, never the
# x86-64 ones (which would hand it /usr/lib/x86_64-linux-gnu/libcrypto.so).
set(ENV{PKG_CONFIG_LIBDIR} "/usr/lib/${EDGEMOLE_CROSS_TRIPLE}/pkgconfig:/usr/share/pkgconfig")
set(ENV{PKG_CONFIG_PATH} "")

# Run a cross-built test program under qemu when ctest has to execute one. LD_LIBRARY_PATH=/lib (which -L maps to
# /usr/aarch64-linux-gnu/lib) keeps the cross libc next to the cross loader: otherwise the loader picks the host's
# libc6:arm64 from /lib/aarch64-linux-gnu, a different glibc build, and threaded programs hang. cross-build-aarch64.sh
# passes its one-CPU sysroot instead (-DCMAKE_CROSSCOMPILING_EMULATOR="qemu-aarch64;-L;<sysroot>"; see README.md).
find_program(EDGEMOLE_QEMU_AARCH64 qemu-aarch64)
if(EDGEMOLE_QEMU_AARCH64 AND NOT CMAKE_CROSSCOMPILING_EMULATOR)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${EDGEMOLE_QEMU_AARCH64} -L /usr/${EDGEMOLE_CROSS_TRIPLE} -E LD_LIBRARY_PATH=/lib)
endif()
