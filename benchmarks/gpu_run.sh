#!/usr/bin/env bash
# Both train-step benchmarks on one GPU, for benchmarks/RESULTS.md: the JAX step of
# the default config (configs/ucf101.py: R(2+1)D-18 [2,2,2,2], 16x112x112) in bf16,
# and the PyTorch baseline at the same batch, as the authors ran it (fp32, eager)
# and tuned (AMP bf16, channels_last, torch.compile, cudnn.benchmark); then the JAX
# step at the largest batch that fits, with and without rematerialisation.
#
# The GPU machine has no internet and lacks dm-pix and ml-collections (pure-Python
# wheels). With internet, from the repository root, once:
#     bash benchmarks/gpu_run.sh --fetch     # wheels into .whl/ (git-ignored there)
# then on the GPU machine (device tool: carry [".whl"]), from the repository root:
#     OUT=$OUT bash benchmarks/gpu_run.sh                  # stages 1 3 2
#     OUT=$OUT STAGES=4 bash benchmarks/gpu_run.sh         # a call of its own
# Results: $OUT/*.json and $OUT/summary.md (the table for RESULTS.md), log in $OUT/log,
# and $OUT/1_trace.tar.gz (3 traced steps of stage 1 and their HLO; read them here with
# `python benchmarks/profile_step.py --read=DIR`; the script prints its table too).
# Stage 7 (STAGES="1 7 3 2") times one variant of the JAX step that stage 1's HLO
# points to, traced as well; stage 8 the channel padding of conv_impl=3d_pad8;
# stage 9 BatchNorm and ReLU alone; stage 10 the stem's first convolution alone in
# every form and the step with it as a 7x7 convolution (stem_impl=conv; the
# default, auto, runs it in space-to-depth form on NVIDIA cards in bf16); stage 11
# tuned PyTorch at the batch stage 4 found. Stages run in the order
# 1 7 8 9 10 3 2 4 11 5 6;
# each gets its own timeout or what is left of DEADLINE (seconds since the start,
# default 560, inside one 10-minute call), whichever is less, and is skipped with
# under 30 s left.
# Measured on an H100 SXM (session 11, 2026-11-27, jax 0.11.2, torch 2.11): one
# XLA compilation of the ucf101 step took 107 s (cuDNN autotuning); stage 1 148 s
# in all (it adds a 3-step trace), stage 3 40 s, stage 2 154 s (torch.compile
# 112 s), stage 10 83 s (its step's convolutions mostly tuned by stage 1): 471 s
# for STAGES="1 3 2" then STAGES=10 in one call. Stages 4 and 5 compile twice
# more (two probes without autotuning, then the batch found) and need a call of
# their own: stage 4 took 298 s on the H100 (batch 40, compiled in 157 s); on an
# H200 (session 8) it ran out of 272 s while autotuning the batch it found
# (80). Stage 6
# times the JAX step with the (2+1)D convolutions as 2D cuDNN ones
# (conv_impl=2d), traced, to check on the card the choice conv_impl='auto'
# makes (3d).
# A call's autotuning results come back in $OUT/jax_cache.tar.gz: unpacked into
# .jaxcache/ (git-ignored, so a fresh checkout has none), carried, and named by
# JAX_CACHE=.jaxcache, they spare the next call on the same kind of card tuning
# those convolutions again.
# Dry run on a CPU (tiny model, batch 2-4, torch.compile left out: on a CPU it
# builds C++ for minutes; stage 9 shrunk, being sized for the card); its result
# is in benchmarks/RESULTS.md:
#     CONFIG=configs/reference.py:runlocal MIN_BATCH=2 MAX_BATCH=4 MULTIPLE=2 \
#       MEMORY_LIMIT_GB=1 STEPS=2 TORCH_EXTRA=--device=cpu \
#       TORCH_TUNED="--channels_last --cudnn_benchmark" \
#       STAGES="1 7 8 9 10 3 2 4 11 5 6" NORM_EXTRA="--elements=1e6 --reps=2" \
#       DEADLINE=1500 OUT=/tmp/gpu_dry bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download --no-deps --only-binary=:all: -d .whl \
      dm-pix==0.4.5 ml-collections==1.1.0
fi

OUT=${OUT:-/tmp/cvc_bench}
CONFIG=${CONFIG:-configs/ucf101.py}
MIN_BATCH=${MIN_BATCH:-16}
MAX_BATCH=${MAX_BATCH:-1024}
MULTIPLE=${MULTIPLE:-8}
STEPS=${STEPS:-20}
REMAT=${REMAT:-dots}
TORCH_EXTRA=${TORCH_EXTRA:-}
TORCH_TUNED=${TORCH_TUNED:---amp=bf16 --channels_last --compile --cudnn_benchmark}
DEADLINE=${DEADLINE:-560}
LIMIT=${MEMORY_LIMIT_GB:+--memory_limit_gb=$MEMORY_LIMIT_GB}
FIT="--min_batch=$MIN_BATCH --max_batch=$MAX_BATCH --multiple=$MULTIPLE $LIMIT"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1

# The two pure-Python packages the benchmarks need and the machine lacks, from the
# carried wheels (only these two: .whl/ may hold others, TensorFlow among them,
# that no stage imports).
if ! python3 -c "import dm_pix, ml_collections" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/cvc_site \
      .whl/dm_pix-*.whl .whl/ml_collections-*.whl \
      || { echo "No wheels: run 'bash benchmarks/gpu_run.sh --fetch' first."; exit 1; }
  export PYTHONPATH=/tmp/cvc_site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# JAX may take 95% of the GPU (its default is 75%); each stage is its own process,
# so JAX and PyTorch never hold the GPU at the same time.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
# JAX's persistent compilation cache (with XLA's per-fusion autotuning results in
# it): JAX_CACHE names a folder carried from an earlier call to skip the cuDNN
# autotuning of convolutions already tuned there; the cache goes back as
# $OUT/jax_cache.tar.gz. A step loaded from it reports its load time as compile s.
export JAX_COMPILATION_CACHE_DIR=$(realpath -m "${JAX_CACHE:-/tmp/cvc_jax_cache}")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()[0].device_kind, \
'| torch', torch.__version__)"
date -u

STAGES=${STAGES:-1 3 2}
# The card's rated memory bandwidth, for the traces' floor (`profile_step.py
# --floor_gbs`: the step with every XLA kernel at that rate, no channel padding).
case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)" in
  *H200*) FLOOR_GBS=${FLOOR_GBS:-4800} ;;
  *"H100 80GB HBM3"*) FLOOR_GBS=${FLOOR_GBS:-3350} ;;  # SXM
esac
# A trace folder under /tmp as $2 (tar.gz), its per-op table printed first. The
# xplane protobuf can outgrow what comes back, so it stays behind when the trace
# events were also written as JSON.
pack_trace() {
  [[ -f /tmp/$1/step.hlo ]] || return 0
  python3 benchmarks/profile_step.py --read="/tmp/$1" --top=40 \
      ${FLOOR_GBS:+--floor_gbs=$FLOOR_GBS} 2>&1 | tail -n 48
  local exclude=()
  find "/tmp/$1" -name "*.trace.json.gz" | grep -q . && exclude=(--exclude="*.xplane.pb")
  tar czf "$2" -C /tmp "${exclude[@]}" "$1"
}
stage() {  # stage NAME TIMEOUT_S COMMAND...: run, report, never stop the script
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  (( left < limit )) && limit=$left
  if (( limit < 30 )); then
    echo "=== $name: skipped, ${left} s left of DEADLINE=${DEADLINE}"
    : > /tmp/cvc_stage.log  # no out-of-memory to retry on
    return 1
  fi
  echo "=== $name (timeout ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee /tmp/cvc_stage.log
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  return "$rc"
}

# 1) JAX, bf16, at MIN_BATCH (one compilation), timed, then 3 steps traced.
if [[ " $STAGES " == *" 1 "* ]]; then
  stage jax_bf16 200 python3 benchmarks/fit_batch.py --config="$CONFIG" \
      --config.dtype=bfloat16 --min_batch="$MIN_BATCH" --max_batch="$MIN_BATCH" \
      $LIMIT --steps="$STEPS" --json="$OUT/1_jax_bf16.json" --trace_dir=/tmp/cvc_trace
  pack_trace cvc_trace "$OUT/1_trace.tar.gz"
fi
BATCH=${BATCH:-$MIN_BATCH}

# 7) JAX, bf16, at BATCH, with other XLA flags (FLAGS7), traced. FLAGS7=auto reads
#    stage 1's optimised HLO: where cuDNN runs the 3D convolutions channels-first
#    (dim_labels bf012..., XLA's layout heuristic keeps NCHW for all but bf16 2D
#    convolutions) it forces channels-last (xla_gpu_force_conv_nhwc), PyTorch's
#    tuned row running channels_last_3d; otherwise it times the 2D form (2d).
#    FLAGS7=--xla_gpu_experimental_enable_conv_fusion=true times XLA's cuDNN
#    convolution fusions (the ReLU's mask and the joins' add in the input
#    gradients' epilogues; compiled without a card they cannot be built, their
#    plans being autotuned: benchmarks/RESULTS.md).
if [[ " $STAGES " == *" 7 "* ]]; then
  FLAGS7=${FLAGS7:-auto}
  IMPL7=3d
  if [[ "$FLAGS7" == auto ]]; then
    FLAGS7=""
    if grep -q 'dim_labels=bf012' /tmp/cvc_trace/step.hlo 2>/dev/null; then
      FLAGS7=--xla_gpu_force_conv_nhwc=true
    else
      IMPL7=2d
    fi
  fi
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$FLAGS7" \
    stage "jax_bf16 conv_impl=$IMPL7 XLA_FLAGS+=$FLAGS7" 200 python3 benchmarks/fit_batch.py \
      --config="$CONFIG" --config.dtype=bfloat16 \
      --config.model.encoder.conv_impl="$IMPL7" --min_batch="$BATCH" \
      --max_batch="$BATCH" $LIMIT --steps="$STEPS" --json="$OUT/7_jax_bf16_variant.json" \
      --trace_dir=/tmp/cvc_trace7
  pack_trace cvc_trace7 "$OUT/7_trace.tar.gz"
fi

# 8) JAX, bf16, at BATCH, every convolution's channels zero-padded to a multiple of
#    8 in XLA (conv_impl=3d_pad8), traced: stage 7's profile had cuDNN padding
#    R(2+1)D's widths 3, 45, 230, 460 and 921 itself for 10.8% of the step.
if [[ " $STAGES " == *" 8 "* ]]; then
  stage "jax_bf16 conv_impl=3d_pad8" 200 python3 benchmarks/fit_batch.py \
      --config="$CONFIG" --config.dtype=bfloat16 --config.model.encoder.conv_impl=3d_pad8 \
      --min_batch="$BATCH" --max_batch="$BATCH" $LIMIT --steps="$STEPS" \
      --json="$OUT/8_jax_bf16_pad8.json" --trace_dir=/tmp/cvc_trace8
  pack_trace cvc_trace8 "$OUT/8_trace.tar.gz"
fi

# 9) BatchNorm + ReLU alone against a copy (benchmarks/norm_fusions.py; NORM_EXTRA
#    adds flags): whether XLA's fusions or the memory set the 31.9 % of the step
#    they took in session 8's profile.
if [[ " $STAGES " == *" 9 "* ]]; then
  stage norm_fusions 120 python3 benchmarks/norm_fusions.py ${NORM_EXTRA:-}
fi

# 10) The stem's first convolution alone, forward and kernel gradient, in each
#     stem_impl with the 3D forms a card runs (conv_forms.py --stem; on an H100
#     in bf16 the space-to-depth form took 2.47 + 2.67 ms against the 7x7 form's
#     4.40 + 4.14); then the JAX step at BATCH with the 7x7 form (stage 1 runs
#     what stem_impl='auto' picks, space-to-depth on NVIDIA cards in bf16), traced.
if [[ " $STAGES " == *" 10 "* ]]; then
  stage stem_forms 150 python3 benchmarks/conv_forms.py --config="$CONFIG" \
      --config.dtype=bfloat16 --config.batch_size="$BATCH" --stem --reps=20 \
      --stem_conv_impls=3d,3d_pad8
  stage "jax_bf16 stem_impl=conv" 200 python3 benchmarks/fit_batch.py \
      --config="$CONFIG" --config.dtype=bfloat16 \
      --config.model.encoder.stem_impl=conv --min_batch="$BATCH" \
      --max_batch="$BATCH" $LIMIT --steps="$STEPS" \
      --json="$OUT/10_jax_bf16_stem_conv.json" --trace_dir=/tmp/cvc_trace10
  pack_trace cvc_trace10 "$OUT/10_trace.tar.gz"
fi

# 3) and 2) PyTorch at the same batch, halved while it runs out of memory: as the
#    authors ran it first (it costs no compilation), then tuned.
torch_run() {  # torch_run NAME TIMEOUT_S FLAGS...; from batch TORCH_BATCH or BATCH
  local name=$1 limit=$2; shift 2
  local b=${TORCH_BATCH:-$BATCH}
  while (( b >= 1 )); do
    stage "$name (batch $b)" "$limit" python3 benchmarks/torch_baseline.py \
        --config="$CONFIG" --batch_size="$b" --steps="$STEPS" "$@" $TORCH_EXTRA \
        --json="$OUT/$name.json" && return 0
    grep -q "OutOfMemoryError" /tmp/cvc_stage.log || return 1
    b=$((b / 2))
  done
}
ENCODER=--encoder=torchvision
python3 -c "import torchvision" 2>/dev/null || ENCODER=--encoder=ours
[[ " $STAGES " == *" 3 "* ]] && torch_run 3_torch_fp32_authors 90 $ENCODER --amp=none
[[ " $STAGES " == *" 2 "* ]] && torch_run 2_torch_bf16_tuned 180 $ENCODER $TORCH_TUNED

# 4) JAX, bf16, the largest batch XLA's memory analysis says fits, timed. Stages 4
#    and 5 may take all that is left of DEADLINE: autotuning the batch found (80 on
#    an H200) outlasted 272 s in session 8, so each wants a call of its own. Their
#    autotuning still times every candidate algorithm but skips checking each one's
#    result against a reference (level 3 of 4; FIT_AUTOTUNE=4 restores it), the
#    part of autotuning XLA's authors found could multiply its time (XLA_FLAGS
#    shows in the JSON's notes).
#    FIT_AT=N (stage 4) and REMAT_AT=N (stage 5) compile batch N alone, without the
#    two probe compilations (not timed apart on a card: stage 4's 298 s on an H100
#    held them, the 157 s compilation of the batch found and the timing): the batch that
#    `benchmarks/compile_for.py` found by compiling for the card on a machine without
#    it (an H100 SXM: 40, and 72 with remat=dots; an H200: 80, and 128 with
#    remat=dots; benchmarks/RESULTS.md).
FIT_XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=${FIT_AUTOTUNE:-3}"
fit_flags() {  # fit_flags [N]: fit_batch.py's batch flags, batch N alone if given
  if [[ -n "${1:-}" ]]; then echo "--min_batch=$1 --max_batch=$1 $LIMIT"; else echo "$FIT"; fi
}
if [[ " $STAGES " == *" 4 "* ]]; then
  XLA_FLAGS=$FIT_XLA_FLAGS stage jax_bf16_fit 600 python3 benchmarks/fit_batch.py \
      --config="$CONFIG" --config.dtype=bfloat16 $(fit_flags "${FIT_AT:-}") \
      --steps="$STEPS" --json="$OUT/4_jax_bf16_fit.json"
fi

# 11) PyTorch tuned at the batch stage 4 found (read from its JSON, or FIT_BATCH=N
#     from an earlier call), halved while it runs out of memory: both frameworks
#     at the largest batch (stage 4 found 40 on an H100).
if [[ " $STAGES " == *" 11 "* ]]; then
  FIT_BATCH=${FIT_BATCH:-$(python3 -c "import json, sys; \
print(json.load(open(sys.argv[1]))['global_batch'])" "$OUT/4_jax_bf16_fit.json" 2>/dev/null)}
  if [[ -n "$FIT_BATCH" ]]; then
    TORCH_BATCH=$FIT_BATCH torch_run 11_torch_bf16_tuned_fit 240 $ENCODER $TORCH_TUNED
  else
    echo "=== torch_bf16_tuned_fit: skipped, no batch (run stage 4 first or set FIT_BATCH)"
  fi
fi

# 5) The same, rematerialised (config.remat; dots: each block keeps only its
#    convolution outputs): a larger batch in the same memory.
if [[ " $STAGES " == *" 5 "* ]]; then
  XLA_FLAGS=$FIT_XLA_FLAGS stage jax_bf16_remat 600 python3 benchmarks/fit_batch.py \
      --config="$CONFIG" --config.dtype=bfloat16 --remat="$REMAT" \
      $(fit_flags "${REMAT_AT:-}") --steps="$STEPS" --json="$OUT/5_jax_bf16_remat.json"
fi

# 6) JAX, bf16, at BATCH, the (2+1)D convolutions as 2D ones (conv_impl=2d: cuDNN's
#    2D kernels, XLA's own gradients), traced: its per-op table beside stage 1's
#    says convolution by convolution whether cuDNN runs 2D faster than 3D.
#    Compiled for an H100 it moves 7.8 GB more per step through XLA's kernels
#    (benchmarks/RESULTS.md), so it must gain about 3 ms in cuDNN to pay.
#    (conv_impl=2d1d, the CPU's form, would move 99 GB more: not timed.)
if [[ " $STAGES " == *" 6 "* ]]; then
  stage "jax_bf16 conv_impl=2d" 200 python3 benchmarks/fit_batch.py \
      --config="$CONFIG" --config.dtype=bfloat16 --config.model.encoder.conv_impl=2d \
      --min_batch="$BATCH" --max_batch="$BATCH" $LIMIT --steps="$STEPS" \
      --json="$OUT/6_jax_bf16_2d.json" --trace_dir=/tmp/cvc_trace6
  pack_trace cvc_trace6 "$OUT/6_trace.tar.gz"
fi

tar czf "$OUT/jax_cache.tar.gz" -C "$JAX_COMPILATION_CACHE_DIR" . 2>/dev/null
if ls "$OUT"/[0-9]*_*.json >/dev/null 2>&1; then  # stage 9 alone writes none
  # In stage order: 1, 2, ..., 10 (a plain glob puts 10 before 1).
  python3 benchmarks/summarize.py $(ls "$OUT"/[0-9]*_*.json | sort -V) | tee "$OUT/summary.md"
fi
