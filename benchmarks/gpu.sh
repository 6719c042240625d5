#!/usr/bin/env bash
# One command for a GPU machine: the exactness, batching and memory tests on the device, the benchmark suite
# (Omniglot at meta-batch 32, the 84x84 miniImageNet setting), the HVP backends, the ResNet-12 memory wall
# (K up to 100 measured, where the CPU's default run extrapolates) and the transformer memory wall at BERT-base's
# shape (12 layers, hidden 768, 128 tokens; needs transformers and peft). Results go to
# benchmarks/results/*_<device>.* (or --out), with the wall time of each part in gpu_<device>.log.
#
#   bash benchmarks/gpu.sh                       # on the GPU machine: about 6-8 minutes on an H100, a few more for the transformer wall
#   bash benchmarks/gpu.sh --device cpu --dry-run  # the same pipeline on tiny settings, on any machine
#
# It runs from source (PYTHONPATH=src) on whatever torch the machine has (>= 2.11). A machine without
# internet gets higher as a wheel in .whl/ (see benchmarks/README.md), installed here into a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
dry=0
out=benchmarks/results
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: bash benchmarks/gpu.sh [--device cuda|cpu] [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python -c "import higher" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/binom_opt_site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/binom_opt_site"
fi
log="$out/gpu_$device.log"
start=$(date +%s)
stamp() { echo "[gpu.sh +$(( $(date +%s) - start ))s] $*" | tee -a "$log"; }
: > "$log"
python -c "import torch; print('torch', torch.__version__, '| device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tee -a "$log"

if [ "$dry" = 1 ]; then
  tests=(tests/test_entry_points.py -k "every_entry_point_every_optimizer and sgd")
  omniglot=(--config tiny --ks 2 --methods higher fo-task exact-task fo-batch exact-batch)
  mini=(--config tiny --ks --methods exact-task exact-batch)
  backends=(--hidden 8 --points 2 --tasks 2 --repeats 1 --no-compile)
  wall=(--tiny --methods higher exact exact-ckpt --ks 1 2)
  transformer=(--config bert-tiny --methods higher exact --ks 1 2)
else
  tests=(tests/test_exactness.py tests/test_entry_points.py tests/test_engine.py tests/test_batching.py tests/test_memory.py
         tests/test_oracle.py tests/test_trajectory.py -x)
  omniglot=(--config omniglot --ks 5 10)
  mini=(--config miniimagenet --levels 1 2 --repeats 2 --ks 5 10 --methods higher autograd fo-task trunc1-task binom1-task
        exact-task fo-batch trunc1-batch binom1-batch binom2-batch exact-batch)
  backends=()
  # every method at K=10 (the first target) and the checkpointed Exact at K=100 (the third); a peer's point
  # predicted above 60 % of the GPU's memory is skipped
  wall=(--ks 1 2 3 10 100)
  # LoRA r=8 adapting, the rest meta-learned: higher, Exact and Exact with memory_budget="inner_step" up to K=16
  transformer=(--config bert-base --ks 1 2 4 8 16)
fi

# Each part runs whatever the one before gave: a failure is written down and the next part still runs.
part() {
  local name="$1"; shift
  stamp "$name"
  if ! "$@" > "$out/$name.txt" 2>&1; then status=1; stamp "$name FAILED (see $out/$name.txt)"; fi
  tail -4 "$out/$name.txt" | tee -a "$log"
}
status=0
part "tests_$device" python -m pytest -q -p no:cacheprovider --device "$device" "${tests[@]}"
part "run_omniglot_$device" python benchmarks/run.py --device "$device" --out "$out" "${omniglot[@]}"
part "run_miniimagenet_$device" python benchmarks/run.py --device "$device" --out "$out" "${mini[@]}"
part "hvp_backends_$device" python benchmarks/hvp_backends.py --device "$device" --out "$out" "${backends[@]}"
part "memory_wall_$device" python benchmarks/memory_wall.py --device "$device" --out "$out" "${wall[@]}"
part "transformer_wall_$device" python benchmarks/transformer_wall.py --device "$device" --out "$out" "${transformer[@]}"
stamp "done"
exit $status
