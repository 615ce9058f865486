#!/usr/bin/env bash
# Cross-build the native edgemole client for 64-bit ARM Linux (boards: Raspberry Pi 4/5, Jetson, ...) on a
# Debian/Ubuntu x86-64 host, against the ExecuTorch runtime of the pinned executorch wheel for aarch64, and
# optionally prepare a sysroot to run the result under qemu-aarch64 on the host (what CI does).
#
# Idempotent: the wheel is downloaded and unpacked once into the cache folder, CMake builds incrementally, the
# sysroot is refreshed in place. Every step says what it does.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TRIPLE=aarch64-linux-gnu
EXECUTORCH_VERSION="${EXECUTORCH_VERSION:-1.5.1}"
WHEEL_PLATFORM=manylinux_2_28_aarch64
WHEEL_PYTHON=3.11  # any cp tag works: the runtime libraries in lib/ do not depend on the Python version
PYTHON="${PYTHON:-python3}"

BUILD="$REPO/build/native-aarch64"
CACHE="${EDGEMOLE_AARCH64_CACHE:-$REPO/build/cache/executorch-aarch64}"
BUILD_TYPE=RelWithDebInfo
SYSROOT=""
WANT_SYSROOT=0
OFFLINE=0
FETCH_ONLY=0
CHECK_ONLY=0
TESTS=auto
JOBS="$(nproc 2>/dev/null || echo 2)"
TARGETS=()
EXTRA=()

usage() {
  cat <<EOF
usage: $(basename "$0") [options] [-- extra cmake configure arguments]

Cross-builds devices/native for aarch64 Linux with $TRIPLE-g++ and the executorch==$EXECUTORCH_VERSION
$WHEEL_PLATFORM wheel's runtime.

  -B, --build DIR       build folder (default: build/native-aarch64 in the repository)
  --cache DIR           where the aarch64 wheel is downloaded and unpacked
                        (default: \$EDGEMOLE_AARCH64_CACHE or build/cache/executorch-aarch64 in the repository)
  --build-type TYPE     CMAKE_BUILD_TYPE (default: $BUILD_TYPE)
  --target NAME         build only this target (repeatable; default: everything)
  -j, --jobs N          parallel build jobs (default: $JOBS)
  --tests / --no-tests  build the doctest unit tests (default: when doctest/doctest.h is installed)
  --sysroot [DIR]       also prepare a sysroot for qemu-aarch64 -L (default DIR: <build>/qemu-sysroot): the
                        aarch64 loader and the libraries the binaries need, and a one-CPU sys/devices/system/cpu
  --fetch-only          download and unpack the wheel, then stop
  --offline             never download: fail (exit 4) when the wheel is not in the cache
  --check               check the cross toolchain and the :arm64 packages, then stop (exit 3 when missing)
  -h, --help            this text

Exit status: 0 done, 1 a step failed, 2 bad usage, 3 a dependency is missing (the apt-get commands are printed),
4 the wheel is not in the cache and --offline was given.
EOF
}

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$1" >&2; exit "${2:-1}"; }

while (($#)); do
  case "$1" in
    -B|--build) BUILD="$(realpath -m "${2:?--build needs a folder}")"; shift 2 ;;
    --cache) CACHE="$(realpath -m "${2:?--cache needs a folder}")"; shift 2 ;;
    --build-type) BUILD_TYPE="${2:?--build-type needs a value}"; shift 2 ;;
    --target) TARGETS+=("${2:?--target needs a name}"); shift 2 ;;
    -j|--jobs) JOBS="${2:?--jobs needs a number}"; shift 2 ;;
    -j[0-9]*) JOBS="${1#-j}"; shift ;;
    --tests) TESTS=ON; shift ;;
    --no-tests) TESTS=OFF; shift ;;
    --sysroot)
      WANT_SYSROOT=1
      if [[ $# -gt 1 && "$2" != -* ]]; then SYSROOT="$(realpath -m "$2")"; shift; fi
      shift ;;
    --fetch-only) FETCH_ONLY=1; shift ;;
    --offline) OFFLINE=1; shift ;;
    --check) CHECK_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown option: $1" 2 ;;
  esac
done
[[ -n "$SYSROOT" ]] || SYSROOT="$BUILD/qemu-sysroot"

# -- 1. the cross toolchain and the arm64 libraries ------------------------------------------------------------------
MULTIARCH_LIB="/usr/lib/$TRIPLE"
check_dependencies() {
  local missing=() packages=()
  need_file() {  # need_file FILE PACKAGE
    if [[ ! -e "$1" ]]; then missing+=("$1"); packages+=("$2"); fi
  }
  command -v "$TRIPLE-g++" >/dev/null || { missing+=("$TRIPLE-g++"); packages+=(crossbuild-essential-arm64); }
  command -v cmake >/dev/null || { missing+=(cmake); packages+=(cmake); }
  need_file "$MULTIARCH_LIB/libpaho-mqtt3cs.so" libpaho-mqtt-dev:arm64
  need_file /usr/include/MQTTClient.h libpaho-mqtt-dev:arm64
  need_file /usr/include/nlohmann/json.hpp nlohmann-json3-dev
  need_file "$MULTIARCH_LIB/libutf8proc.so" libutf8proc-dev:arm64
  need_file "$MULTIARCH_LIB/libcrypto.so" libssl-dev:arm64
  need_file "/usr/include/$TRIPLE/openssl/opensslconf.h" libssl-dev:arm64
  need_file "$MULTIARCH_LIB/libz.so" zlib1g-dev:arm64
  if ((WANT_SYSROOT)); then
    command -v qemu-aarch64 >/dev/null || { missing+=(qemu-aarch64); packages+=(qemu-user); }
  fi
  if ((${#missing[@]})); then
    local sudo="" add_arch=""
    [[ "$(id -u)" == 0 ]] || sudo="sudo "
    if command -v dpkg >/dev/null && ! dpkg --print-foreign-architectures | grep -qx arm64; then
      add_arch="${sudo}dpkg --add-architecture arm64"$'\n'
    fi
    local unique
    unique="$(printf '%s\n' "${packages[@]}" | awk '!seen[$0]++' | tr '\n' ' ')"
    printf 'error: missing for the aarch64 cross build: %s\n' "${missing[*]}" >&2
    printf 'install them with (Debian 12; on Ubuntu the arm64 packages come from ports.ubuntu.com):\n' >&2
    printf '%s%sapt-get update\n%sapt-get install -y %s\n' "$add_arch" "$sudo" "$sudo" "${unique% }" >&2
    exit 3
  fi
  say "toolchain: $("$TRIPLE-g++" --version | head -n1); arm64 libraries in $MULTIARCH_LIB"
}

# -- 2. the executorch runtime for aarch64, from the pinned wheel ----------------------------------------------------
fetch_wheel() {
  mkdir -p "$CACHE"
  local wheel
  wheel="$(find "$CACHE" -maxdepth 1 -name "executorch-$EXECUTORCH_VERSION-*-$WHEEL_PLATFORM.whl" | sort | tail -n1)"
  if [[ -z "$wheel" ]]; then
    if ((OFFLINE)); then
      die "the aarch64 executorch wheel is not in $CACHE (run $0 --fetch-only once, with network)" 4
    fi
    say "downloading executorch==$EXECUTORCH_VERSION for $WHEEL_PLATFORM into $CACHE"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --platform "$WHEEL_PLATFORM" \
      --python-version "$WHEEL_PYTHON" --dest "$CACHE" "executorch==$EXECUTORCH_VERSION" ||
      die "pip could not download executorch==$EXECUTORCH_VERSION for $WHEEL_PLATFORM"
    wheel="$(find "$CACHE" -maxdepth 1 -name "executorch-$EXECUTORCH_VERSION-*-$WHEEL_PLATFORM.whl" | sort | tail -n1)"
    [[ -n "$wheel" ]] || die "pip download gave no executorch $WHEEL_PLATFORM wheel in $CACHE"
  else
    say "wheel already downloaded: $wheel"
  fi
  UNPACKED="$CACHE/$(basename "$wheel" .whl)"
  EXECUTORCH_ROOT="$UNPACKED/executorch"
  if [[ -f "$UNPACKED/.unpacked" ]]; then
    say "wheel already unpacked: $EXECUTORCH_ROOT"
    return
  fi
  say "unpacking the runtime (include/, lib/, share/) into $UNPACKED"
  rm -rf "$UNPACKED"
  "$PYTHON" - "$wheel" "$UNPACKED" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    parts = ("executorch/include/", "executorch/lib/", "executorch/share/")
    wanted = [n for n in wheel.namelist() if n.startswith(parts)]
    wheel.extractall(sys.argv[2], wanted)
EOF
  for lib in executorch executorch_threadpool executorch_kernels_optimized executorch_backend_xnnpack; do
    [[ -f "$EXECUTORCH_ROOT/lib/lib$lib.so" ]] || die "the wheel has no lib/lib$lib.so"
  done
  touch "$UNPACKED/.unpacked"
}

# -- 3. configure and build ------------------------------------------------------------------------------------------
configure_and_build() {
  if [[ "$TESTS" == auto ]]; then
    if [[ -f /usr/include/doctest/doctest.h ]]; then TESTS=ON; else
      TESTS=OFF
      say "doctest-dev is not installed: building without the unit tests"
    fi
  fi
  local args=(-S "$HERE" -B "$BUILD" -DCMAKE_TOOLCHAIN_FILE="$HERE/cmake/aarch64-linux-gnu.cmake"
              -DCMAKE_BUILD_TYPE="$BUILD_TYPE" -DEXECUTORCH_ROOT="$EXECUTORCH_ROOT" -DEDGEMOLE_TESTS="$TESTS")
  if ((WANT_SYSROOT)); then args+=("-DCMAKE_CROSSCOMPILING_EMULATOR=qemu-aarch64;-L;$SYSROOT"); fi
  args+=("${EXTRA[@]}")
  say "configuring: cmake ${args[*]}"
  cmake "${args[@]}" || die "cmake could not configure $BUILD (see above)"
  local build=(--build "$BUILD" -j "$JOBS")
  for target in "${TARGETS[@]}"; do build+=(--target "$target"); done
  say "building: cmake ${build[*]}"
  cmake "${build[@]}" || die "the build failed (see above)"
}

# -- 4. a sysroot for qemu-aarch64 -L --------------------------------------------------------------------------------
# qemu-user resolves every absolute path the program opens under the -L folder first and falls back to the host's
# path when the file is not there. So the sysroot holds the aarch64 loader (the binaries' /lib/ld-linux-aarch64.so.1)
# and, at their canonical multiarch path, the libraries they need, from the cross libc (/usr/$TRIPLE/lib) and the
# :arm64 packages; the wheel's runtime is found through the binaries' absolute rpath on the host. Loader and libc
# must come from the same glibc build: with -L /usr/$TRIPLE alone, the cross loader loads the host's libc6:arm64
# (/lib/$TRIPLE is not in that folder) and a program that starts a thread hangs. The sysroot also holds a
# sys/devices/system/cpu that says there is one CPU (number 0), so the runtime's thread pool starts no worker threads:
# emulated runs stay single-threaded (an emulated fleet member uses one core) and deterministic.
needed_of() { LC_ALL=C readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }

prepare_sysroot() {
  local libdir="$SYSROOT/lib/$TRIPLE"
  say "preparing the qemu sysroot $SYSROOT"
  mkdir -p "$libdir" "$SYSROOT/usr/lib" "$SYSROOT/sys/devices/system/cpu"
  if [[ ! -L "$SYSROOT/usr/lib/$TRIPLE" && ! -e "$SYSROOT/usr/lib/$TRIPLE" ]]; then
    ln -s "../../lib/$TRIPLE" "$SYSROOT/usr/lib/$TRIPLE"
  fi
  install -m 0755 "/usr/$TRIPLE/lib/ld-linux-aarch64.so.1" "$SYSROOT/lib/ld-linux-aarch64.so.1"
  for f in online possible present kernel_max; do printf '0\n' >"$SYSROOT/sys/devices/system/cpu/$f"; done

  # The build's aarch64 executables, then their NEEDED libraries, transitively.
  local queue=() seen=" " copied=0
  while IFS= read -r -d '' f; do
    if LC_ALL=C readelf -h "$f" 2>/dev/null | grep -q 'Machine:.*AArch64'; then queue+=("$f"); fi
  done < <(find "$BUILD" -path "$SYSROOT" -prune -o -type f -perm -u+x -print0)
  while ((${#queue[@]})); do
    local obj="${queue[0]}"
    queue=("${queue[@]:1}")
    local lib
    for lib in $(needed_of "$obj"); do
      [[ "$seen" == *" $lib "* ]] && continue
      seen+="$lib "
      if [[ -e "$EXECUTORCH_ROOT/lib/$lib" ]]; then  # reached through the rpath; its own needs are walked
        queue+=("$EXECUTORCH_ROOT/lib/$lib")
        continue
      fi
      local src=""
      for dir in "/usr/$TRIPLE/lib" "$MULTIARCH_LIB" "/lib/$TRIPLE"; do
        if [[ -e "$dir/$lib" ]]; then src="$dir/$lib"; break; fi
      done
      [[ -n "$src" ]] || die "no aarch64 $lib (needed by $obj) in /usr/$TRIPLE/lib or $MULTIARCH_LIB"
      if [[ ! -e "$libdir/$lib" ]] || ! cmp -s "$src" "$libdir/$lib"; then
        cp -L "$src" "$libdir/$lib"
        copied=$((copied + 1))
      fi
      queue+=("$src")
    done
  done
  say "sysroot ready ($copied libraries refreshed): run a binary with  qemu-aarch64 -L $SYSROOT <binary>"
}

if ((FETCH_ONLY)); then fetch_wheel; say "EXECUTORCH_ROOT=$EXECUTORCH_ROOT"; exit 0; fi
check_dependencies
if ((CHECK_ONLY)); then say "all dependencies of the aarch64 cross build are installed"; exit 0; fi
fetch_wheel
configure_and_build
if ((WANT_SYSROOT)); then prepare_sysroot; fi
say "done: aarch64 binaries in $BUILD (the runtime's libraries are in $EXECUTORCH_ROOT/lib, the binaries' rpath)"
