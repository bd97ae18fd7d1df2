#!/usr/bin/env bash
# Build the C++ floor (bench/cppfloor/floor_server.cc) into bench/cppfloor/build/floor-server.
#
#     bash bench/cppfloor/build.sh            # builds if the source is newer than the binary
#     bash bench/cppfloor/build.sh --force    # builds anyway
#
# Needs g++, pkg-config and gRPC C++ (Debian 12: libgrpc++-dev, 1.51); not protoc, as the server
# compiles no protos. When one is missing it says which, prints the apt-get command that
# installs them, and exits 1; it installs nothing itself.
# bench/floor.py runs it before starting the C++ floor.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source="$here/floor_server.cc"
out="$here/build/floor-server"
install="apt-get install -y --no-install-recommends g++ pkg-config libgrpc++-dev"

missing=()
command -v g++ >/dev/null 2>&1 || missing+=("g++")
command -v pkg-config >/dev/null 2>&1 || missing+=("pkg-config")
if command -v pkg-config >/dev/null 2>&1 && ! pkg-config --exists grpc++; then
    missing+=("gRPC C++ (pkg-config grpc++)")
fi
if ((${#missing[@]})); then
    list="$(printf ', %s' "${missing[@]}")"
    echo "the C++ floor cannot be built: missing ${list:2}; install with:" >&2
    echo "    $install" >&2
    exit 1
fi

if [[ "${1:-}" != "--force" && -x "$out" && "$out" -nt "$source" && "$out" -nt "${BASH_SOURCE[0]}" ]]; then
    exit 0
fi
mkdir -p "$here/build"
# shellcheck disable=SC2046  # pkg-config's flags are meant to split
g++ -std=c++17 -O2 -Wall -Wextra -pthread -o "$out.$$.tmp" "$source" $(pkg-config --cflags --libs grpc++)
mv "$out.$$.tmp" "$out"
echo "built $out (gRPC C++ $(pkg-config --modversion grpc++))" >&2
