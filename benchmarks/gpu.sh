#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md, in the stages they were run (one call of a
# lent H100 each). Run from the repository root on a CUDA machine whose Python has torch:
#
#   OUT=/tmp/gpu bash benchmarks/gpu.sh tests|compare|compile|breakdown|cli [more stages...]
#
# tests    the CUDA tests (tests/test_accelerated.py and the training and sampling tests)
# compare  bench.py at the cifar10 preset, bf16, batch 128: ddpm (with and without cuDNN's
#          kernel timing, with and without CUDA graphs) against diffusers and
#          denoising-diffusion-pytorch; BASE=dir also runs an older checkout's bench.py
# compile  training with --compile, per torch.compile mode (COMPILE_MODES, default
#          reduce-overhead; compilation time reported as warmup_s)
# variants benchmarks/variants.py: ways of running the sampling network (eager, bf16 weights,
#          CUDA graphs) at batch 256 and 32; VARIANTS= adds compiled ones
# breakdown  benchmarks/breakdown.py at the cifar10 preset, bf16, batch 128: the training step
#          by phase, and GroupNorm and SiLU knocked out or (GroupNorm) run in bf16
# samples  whole 256-image samples: 1000 DDPM steps and 20 DPM-Solver++ steps, ddpm and diffusers
# cli      `ddpm train` and `ddpm sample` as a user runs them, timed; a one-process torchrun
#          job on NCCL
#
# Peers come from the `bench` extra; where pip cannot reach an index, WHEELS=dir installs the
# wheels in dir first.
set -u
OUT=${OUT:-/tmp/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
if [ -n "${WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
BENCH=(--preset cifar10 --precision bf16 --batch-size 128 --steps 40 --warmup 5 --json)

stage() { echo "=== $1 $(date +%T)"; }
timed() {  # timed LABEL COMMAND...: the command's wall time, after its last lines of output
    local label=$1 start=$EPOCHREALTIME
    shift
    "$@" 2>&1 | tail -4
    $PY -c "print(f'$label: wall {$EPOCHREALTIME - $start:.1f} s')"
}

for what in "$@"; do
    case $what in
    tests)
        stage tests
        timeout 90 $PY -m pytest -q -x tests/test_accelerated.py 2>&1 | tail -15
        ;;
    compare)
        stage compare
        if [ -n "${BASE:-}" ]; then  # an older checkout, as it was (its own bench.py options)
            PYTHONPATH=$BASE/src:${PYTHONPATH#*:} timeout 240 $PY "$BASE"/benchmarks/bench.py \
                "${BENCH[@]}" --sample-evals 20 --samplers dpm++:20,ddpm:1000 \
                | sed 's/"impl": "ddpm"/"impl": "ddpm-before"/' | tee -a "$OUT/compare.jsonl"
        fi
        for flags in ${COMPARE_FLAGS-"" "--cudnn-benchmark"}; do
            timeout 300 $PY benchmarks/bench.py "${BENCH[@]}" $flags --peers --sample-evals 20 \
                --samplers dpm++:20,ddpm:1000 | sed "s/}$/, \"flags\": \"$flags\"}/" \
                | tee -a "$OUT/compare.jsonl"
        done
        DDPM_CUDA_GRAPHS=0 timeout 120 $PY benchmarks/bench.py "${BENCH[@]}" --cudnn-benchmark \
            --sample-evals 20 --samplers dpm++:20 \
            | sed 's/}$/, "flags": "--cudnn-benchmark, no graphs"}/' | tee -a "$OUT/compare.jsonl"
        for b in ${SMALL_BATCHES-1 8 32}; do  # small batches: where CUDA graphs should matter
            for graphs in 1 0; do
                DDPM_CUDA_GRAPHS=$graphs timeout 60 $PY benchmarks/bench.py --preset cifar10 \
                    --precision bf16 --batch-size $b --steps 3 --warmup 1 --sample-evals 50 \
                    --samplers dpm++:20 --cudnn-benchmark --json \
                    | sed "s/}$/, \"flags\": \"graphs=$graphs\"}/" | tee -a "$OUT/compare.jsonl"
            done
        done
        ;;
    compile)
        stage compile
        for mode in ${COMPILE_MODES:-reduce-overhead}; do  # max-autotune: over 200 s each
            timeout 400 $PY benchmarks/bench.py "${BENCH[@]}" --compile --compile-mode $mode \
                --sample-evals 20 --samplers dpm++:20 \
                | sed "s/}$/, \"flags\": \"--compile-mode $mode\"}/" | tee -a "$OUT/compile.jsonl"
        done
        ;;
    variants)
        stage variants
        for b in 256 32; do
            timeout 300 $PY benchmarks/variants.py --batch $b \
                --variants "${VARIANTS:-eager,pure,graphs,pure-graphs}" | tee -a "$OUT/variants.jsonl"
        done
        ;;
    breakdown)
        stage breakdown
        timeout 300 $PY benchmarks/breakdown.py --device cuda --preset cifar10 --precision bf16 \
            --batch-size 128 --rounds 20 | tee -a "$OUT/breakdown.jsonl"
        ;;
    samples)
        stage samples
        timeout 150 $PY benchmarks/bench.py "${BENCH[@]}" --cudnn-benchmark --peers \
            --sample-batch 256 --full-samples --samplers dpm++:20,ddpm:1000 --steps 5 \
            | tee -a "$OUT/samples.jsonl"
        ;;
    cli)
        stage cli
        rm -rf /tmp/cli && mkdir -p /tmp/cli/pics
        $PY - <<'EOF'
import torch
from PIL import Image
g = torch.Generator().manual_seed(0)
for i in range(2048):
    a = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(a).save(f"/tmp/cli/pics/{i:04d}.png")
EOF
        ddpm=($PY -m ddpm_cli)
        timed "train" "${ddpm[@]}" train /tmp/cli/pics --preset cifar10 \
            --steps 400 --log-every 100 --checkpoint-every 200 --sample-every 400 \
            --out /tmp/cli/run
        cp /tmp/cli/run/metrics.jsonl "$OUT/cli_metrics.jsonl"
        cp /tmp/cli/run/samples/step-0000400.png "$OUT/cli_grid.png" 2>/dev/null
        timed "resume" "${ddpm[@]}" train --resume /tmp/cli/run \
            --steps 450 --quiet
        for spec in "ddpm 1000" "dpm++ 20"; do
            set -- $spec
            timed "sample $1 $2 x256" "${ddpm[@]}" sample /tmp/cli/run -n 256 \
                --sampler "$1" --steps "$2" --precision bf16 --batch-size 256 \
                -o /tmp/cli/out-$1 --quiet
        done
        timeout 120 torchrun --nproc-per-node=1 -m ddpm_cli train /tmp/cli/pics --preset small \
            --steps 60 --log-every 20 --out /tmp/cli/nccl --quiet 2>&1 | tail -3
        wc -l /tmp/cli/nccl/metrics.jsonl
        timed "train --compile" "${ddpm[@]}" train /tmp/cli/pics \
            --preset cifar10 --steps 1000 --log-every 250 --sample-every 0 --compile \
            --out /tmp/cli/compiled
        cp /tmp/cli/compiled/metrics.jsonl "$OUT/cli_compiled_metrics.jsonl"
        timed "sample ddpm 1000 x256 --compile" "${ddpm[@]}" sample /tmp/cli/run -n 256 \
            --sampler ddpm --steps 1000 --precision bf16 --batch-size 256 --compile \
            -o /tmp/cli/out-compiled --quiet
        ;;
    esac
done
stage done
