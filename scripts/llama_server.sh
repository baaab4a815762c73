#!/usr/bin/env bash
# Build llama.cpp's native `llama-server` and a GGUF conversion of the shipped tiny policy, for the LLM-as-judge
# tests and benchmark (treeward.rewards.judge). Everything goes to a cache OUTSIDE the repository and is reused:
#
#   ${TREEWARD_CACHE:-$HOME/.cache/treeward}/llama-server/
#     src/llama_cpp_python-<v>/             the llama-cpp-python sdist, which vendors the whole llama.cpp tree
#     bin-<commit12>-<flags12>/llama-server the server, keyed by the llama.cpp commit and the cmake flags + arch
#     gguf/tiny-policy-<model16>-<commit12>-f32.gguf   keyed by the model's file hash and the converter's commit
#     manifest-<model16>.json               {"binary", "gguf", "commit", "model_hash", ...}; read by the tests
#
# Idempotent: a second run with everything cached takes about a second. Recipe and pitfalls:
# ../shared/reference/openai-server.md (native llama-server from the llama.cpp vendored in the
# llama-cpp-python==0.3.36 sdist; the converter needs its unknown BPE pre-tokenizer forced to `smollm`, which splits
# digits and then applies the GPT-2 regex exactly like the checkpoint's tokenizer; `add_bos_token: true` so string
# prompts get <bos> as in training).
#
# Environment: PYTHON (default .venv/bin/python; needs torch + transformers + numpy for the conversion),
# TREEWARD_CACHE, LLAMA_BUILD_JOBS (default 2). Prints `LLAMA_SERVER_BIN=<path>` and `LLAMA_SERVER_GGUF=<path>`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
CACHE=${TREEWARD_CACHE:-$HOME/.cache/treeward}/llama-server
SDIST_VERSION=0.3.36
MODEL=$ROOT/src/treeward/assets/tiny-policy
MODEL_FILES=(config.json model.safetensors tokenizer.json tokenizer_config.json)   # what the converter reads
JOBS=${LLAMA_BUILD_JOBS:-2}
# GGML_NATIVE=OFF: the cached binary may be reused on another CPU of the same arch (no -march=native).
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF)

log() { echo "[llama_server.sh] $*" >&2; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9   # concurrent CI jobs sharing the cache wait for each other instead of racing
rm -rf "$CACHE"/tmp.* "$CACHE"/bin-*.tmp   # leftovers of an interrupted run (none can be running: we hold the lock)

# --- 1. the sdist (vendors llama.cpp) --------------------------------------------------------------------------
SRC=$CACHE/src/llama_cpp_python-$SDIST_VERSION
if [ ! -f "$SRC/.complete" ]; then
  log "downloading llama-cpp-python==$SDIST_VERSION sdist"
  tmp=$(mktemp -d "$CACHE/tmp.sdist.XXXXXX")
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$SDIST_VERSION" -d "$tmp"
  tar xzf "$tmp/llama_cpp_python-$SDIST_VERSION.tar.gz" -C "$tmp"
  mkdir -p "$CACHE/src"
  rm -rf "$SRC"
  mv "$tmp/llama_cpp_python-$SDIST_VERSION" "$SRC"
  rm -rf "$tmp"
  touch "$SRC/.complete"
fi
LC=$SRC/vendor/llama.cpp
COMMIT=$(tr -d '[:space:]' <"$SRC/.git/modules/vendor/llama.cpp/HEAD")
if ! [[ $COMMIT =~ ^[0-9a-f]{40}$ ]]; then
  log "error: cannot read the vendored llama.cpp commit from $SRC/.git/modules/vendor/llama.cpp/HEAD"
  exit 1
fi

# --- 2. the native llama-server binary -------------------------------------------------------------------------
FLAGS_HASH=$(printf '%s\n' "${CMAKE_FLAGS[@]}" "$(uname -m)" "$(g++ -dumpfullversion 2>/dev/null || echo cxx)" |
  sha256sum | cut -c1-12)
BIN_DIR=$CACHE/bin-${COMMIT:0:12}-$FLAGS_HASH
BIN=$BIN_DIR/llama-server
if [ ! -x "$BIN" ]; then
  BUILD=$CACHE/build-${COMMIT:0:12}-$FLAGS_HASH
  log "building llama-server (llama.cpp ${COMMIT:0:12}, -j$JOBS; about 8 min on 2 idle cores) in $BUILD"
  cmake -S "$LC" -B "$BUILD" "${CMAKE_FLAGS[@]}" >"$CACHE/cmake-configure.log" 2>&1 ||
    { tail -40 "$CACHE/cmake-configure.log" >&2; exit 1; }
  cmake --build "$BUILD" --target llama-server -j"$JOBS" >"$CACHE/cmake-build.log" 2>&1 ||
    { tail -40 "$CACHE/cmake-build.log" >&2; exit 1; }
  rm -rf "$BIN_DIR.tmp"
  mkdir -p "$BIN_DIR.tmp"
  cp "$BUILD/bin/llama-server" "$BIN_DIR.tmp/llama-server"
  "$BIN_DIR.tmp/llama-server" --version >/dev/null 2>&1 || { log "error: the built llama-server does not run"; exit 1; }
  rm -rf "$BIN_DIR"
  mv "$BIN_DIR.tmp" "$BIN_DIR"
  rm -rf "$BUILD"   # 90 MB of objects; the 15 MB binary is what is cached
fi

# --- 3. the GGUF of the shipped policy -------------------------------------------------------------------------
# model hash: sha256 of the `sha256sum` lines of the files the converter reads, in MODEL_FILES order
# (treeward.rewards.judge.tiny_policy_model_hash computes the same value).
MODEL_HASH=$(cd "$MODEL" && sha256sum "${MODEL_FILES[@]}" | sha256sum | cut -c1-64)
GGUF=$CACHE/gguf/tiny-policy-${MODEL_HASH:0:16}-${COMMIT:0:12}-f32.gguf
if [ ! -f "$GGUF" ]; then
  log "converting $MODEL to GGUF f32 (forced pre-tokenizer smollm, add_bos_token=true)"
  tmp=$(mktemp -d "$CACHE/tmp.gguf.XXXXXX")
  mkdir -p "$tmp/model" "$CACHE/gguf"
  for f in "${MODEL_FILES[@]}"; do cp "$MODEL/$f" "$tmp/model/$f"; done
  "$PY" - "$tmp/model/tokenizer_config.json" <<'EOF'
import json, sys
path = sys.argv[1]
with open(path) as f:
    cfg = json.load(f)
cfg["add_bos_token"] = True   # training prepends <bos>; without this the GGUF says add_bos=false
cfg["add_eos_token"] = False
with open(path, "w") as f:
    json.dump(cfg, f, indent=2)
EOF
  cat >"$tmp/convert_forced_pre.py" <<'EOF'
# Run llama.cpp's stock convert_hf_to_gguf.py, changing only the "unknown BPE pre-tokenizer" branch.
import os, runpy, sys
llama_cpp_dir, pre, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, llama_cpp_dir)
sys.path.insert(1, os.path.join(llama_cpp_dir, "gguf-py"))
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def _patched(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        base.logger.warning(f"forcing tokenizer.ggml.pre = {pre!r}")
        return pre
base.TextModel.get_vocab_base_pre = _patched
# The stock code imports sentencepiece before it checks that tokenizer.model exists; with no tokenizer.model (a
# tokenizer.json-only BPE checkpoint) the converter then falls back to the HF/GPT-2 vocab paths. Check first, so
# sentencepiece is not needed for such a checkpoint.
_orig_sp = base.TextModel._create_vocab_sentencepiece
def _sp_checked(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
    return _orig_sp(self)
base.TextModel._create_vocab_sentencepiece = _sp_checked
sys.argv = [os.path.join(llama_cpp_dir, "convert_hf_to_gguf.py")] + rest
runpy.run_path(sys.argv[0], run_name="__main__")
EOF
  OMP_NUM_THREADS=1 "$PY" "$tmp/convert_forced_pre.py" "$LC" smollm "$tmp/model" --outtype f32 \
    --outfile "$tmp/out.gguf" >"$CACHE/convert.log" 2>&1 || { tail -40 "$CACHE/convert.log" >&2; exit 1; }
  mv "$tmp/out.gguf" "$GGUF"
  rm -rf "$tmp"
fi

# --- 4. the manifest the tests read ----------------------------------------------------------------------------
MANIFEST=$CACHE/manifest-${MODEL_HASH:0:16}.json
"$PY" - "$MANIFEST" "$BIN" "$GGUF" "$COMMIT" "$MODEL_HASH" "$SDIST_VERSION" <<'EOF'
import json, os, sys
path, binary, gguf, commit, model_hash, sdist = sys.argv[1:]
data = {"binary": binary, "gguf": gguf, "commit": commit, "model_hash": model_hash,
        "sdist": f"llama-cpp-python=={sdist}"}
with open(path + ".tmp", "w") as f:
    json.dump(data, f, indent=2)
os.replace(path + ".tmp", path)
EOF
echo "LLAMA_SERVER_BIN=$BIN"
echo "LLAMA_SERVER_GGUF=$GGUF"
