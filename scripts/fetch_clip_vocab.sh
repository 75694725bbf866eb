#!/usr/bin/env bash
# Build real CLIP tokenizer folders for the tests, without committing the vocab.
#
#   scripts/fetch_clip_vocab.sh [DEST]      (default DEST: .cache/clip-tokenizers)
#
# Downloads the open-clip-torch wheel from PyPI (no dependencies, nothing
# installed), takes OpenAI's CLIP BPE file out of it, checks its sha256 and
# writes two Hugging Face tokenizer folders with
# cpuflow.tokenizer.write_clip_tokenizer_files:
#   DEST/sd1/  pads with <|endoftext|>  (SD 1.x, openai/clip-vit-large-patch14)
#   DEST/sd2/  pads with "!"            (SD 2.x, stabilityai/stable-diffusion-2)
# Tests find them through CPUFLOW_CLIP_TOKENIZERS=DEST. Re-running is cheap:
# folders already built from the same source are kept.
# Python: $PYTHON, else the repo's .venv, else python3 (needs pip, numpy, tokenizers).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-.cache/clip-tokenizers}"
PKG="open-clip-torch==3.3.0"
BPE_IN_WHEEL="open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256="924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
    PY="$REPO/.venv/bin/python"
else
    PY="python3"
fi

STAMP="$PKG $BPE_SHA256 v1"
if [[ -f "$DEST/.source" && "$(cat "$DEST/.source")" == "$STAMP" \
      && -f "$DEST/sd1/vocab.json" && -f "$DEST/sd2/vocab.json" ]]; then
    echo "CLIP tokenizers already in $DEST"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "downloading $PKG (wheel only, no dependencies)"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "$PKG" -d "$TMP"

mkdir -p "$DEST"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$TMP" "$DEST" "$BPE_IN_WHEEL" "$BPE_SHA256" <<'EOF'
import glob, hashlib, os, shutil, sys, zipfile
from cpuflow.tokenizer import write_clip_tokenizer_files

tmp, dest, member, sha = sys.argv[1:5]
wheels = glob.glob(os.path.join(tmp, "open_clip_torch-*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one open_clip_torch wheel in {tmp}, found {wheels}")
gz = os.path.join(tmp, "bpe_simple_vocab_16e6.txt.gz")
with zipfile.ZipFile(wheels[0]) as zf, open(gz, "wb") as out:
    out.write(zf.read(member))
with open(gz, "rb") as f:
    got = hashlib.sha256(f.read()).hexdigest()
if got != sha:
    sys.exit(f"{member}: sha256 {got}, expected {sha}")
for name, pad in (("sd1", "<|endoftext|>"), ("sd2", "!")):
    final = os.path.join(dest, name)
    work = final + ".tmp"
    shutil.rmtree(work, ignore_errors=True)
    write_clip_tokenizer_files(gz, work, pad_token=pad)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(work, final)
    print(f"wrote {final} (pad {pad})")
EOF
echo "$STAMP" > "$DEST/.source"
