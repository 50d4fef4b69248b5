#!/usr/bin/env bash
# The accelerator checks of the speed notes, as one run on a machine with a GPU (or TPU):
# the four MCTF configs' forward in bfloat16 at batch 256 with the fusion steps' share, the
# batch-size sweep up to 1024, the two merge implementations, and the train step.
#
#   bash benchmarks/device_checks.sh --prepare        # here: the wheels the device lacks
#   bash benchmarks/device_checks.sh OUTDIR           # there: the checks, figures in OUTDIR
#   bash benchmarks/device_checks.sh OUTDIR --quick   # the same commands at toy sizes (CPU)
#
# The device image has JAX, flax, optax and orbax but not ml_collections: --prepare puts its
# wheel in .device/ (git-ignored), which the run must carry. The fusion steps' share comes
# from --steps_free (no profiler trace, which would need TensorFlow there). Every command
# prints its figures and writes JSON; a failing command is reported and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p .device
  grep -qx "/.device/" .git/info/exclude 2>/dev/null || echo "/.device/" >> .git/info/exclude
  python3 -m pip download --quiet --no-deps --dest .device "ml-collections>=1.1.0"
  ls .device
  exit 0
fi

out=${1:?usage: device_checks.sh --prepare | OUTDIR [--quick]}
mkdir -p "$out"
if ! python3 -c "import ml_collections" 2>/dev/null; then
  python3 -m pip install --quiet --no-index --no-deps --target /tmp/device_pydeps .device/*.whl
  export PYTHONPATH=/tmp/device_pydeps${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

batch=256 sizes=1,8,32,256,1024 repeats=20 configs=deit_s,deit_s_fast,deit_t,deit_t_fast
sweep=deit_s,deit_t steps=2
if [[ "${2:-}" == "--quick" ]]; then
  batch=4 sizes=1,4 repeats=2 configs=deit_t sweep=deit_t steps=1
fi
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

failed=()
step() {   # step NAME COMMAND...: runs it, its output in OUTDIR/NAME.txt
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.txt" || failed+=("$name")
}
step forward python3 benchmarks/forward.py --configs=$configs --batch_size=$batch \
    --dtype=bfloat16 --repeats=$repeats --steps_free --profile=false --json="$out/forward.json"
step sweep python3 benchmarks/forward.py --configs=$sweep --batch_sizes=$sizes \
    --dtype=bfloat16 --repeats=$repeats --json="$out/sweep.json"
for impl in scatter matmul; do
  step "merge_$impl" python3 -m mctf_jax.tools.benchmark --config=configs/deit_s.py \
      --config.fusion.merge_impl=$impl --batch_size=$batch --dtype=bfloat16 --repeats=$repeats
done
step train_step python3 benchmarks/train_step.py --config=configs/deit_s.py \
    --batch_size=$batch --dtype=bfloat16 --repeats=$steps --json="$out/train_step.json"
# The same train step compiled ahead of time for this GPU's model (mctf_jax.tools.compile):
# its compiled HBM need beside the running peak train_step.py reports.
gpu=$(python3 -c "import jax; k = jax.devices()[0].device_kind
print(next((m for m in ('h100', 'h200') if m in k.lower()), ''))" 2>/dev/null)
if [[ -n "$gpu" ]]; then
  step compiled python3 -m mctf_jax.tools.compile --config=configs/deit_s.py \
      --topology=$gpu:1 --programs=train --config.batch_size=$batch \
      --config.model.dtype=bfloat16 --json="$out/compiled.json"
fi

if (( ${#failed[@]} )); then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all checks ran; figures in $out"
