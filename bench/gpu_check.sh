#!/usr/bin/env bash
# One command that checks and measures every GPU path in one short run, on a bare GPU machine (Python 3.12,
# torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0, no network) with the wheels of bench/gpu_wheels.sh
# in .whl/:
#     bench/gpu_check.sh [--out DIR]      # default DIR: $OUT if set, else runs/gpu_check
#     bench/gpu_check.sh --dry-run        # CPU: the same parts at tiny shapes, no wheels (CI runs this)
# In order, each part under its own time limit (a part that overruns is cut, the rest still runs), each
# result written into DIR as it finishes (a killed run keeps what it finished):
#     wheels      pip install --no-deps --target of .whl/*.whl (math-verify, Liger, Cut Cross-Entropy)
#     tests       every CUDA test: the Triton kernels compiled (not interpreted) against float64, each
#                 attention backend, CUDA-graph decoding, the sampler's bf16 log-probs against the training
#                 forward's, a 2-step bf16 FSDP2 train.py run of the tiny Qwen3 shape
#     kernels     bench.kernels --quick: the anchor shapes (CE over bf16 logits 16384×151936, linear CE and
#                 log-probs 16384×1536×151936) against torch eager, torch.compile, Liger, Cut Cross-Entropy,
#                 after measuring the copy and bf16 matmul ceilings on a warmed GPU
#     generate    bench.generate, batch 1 and 64, prompt 256, 256 new tokens, against transformers
#     train_step  bench.train_step, Qwen2.5-1.5B shape, 4 × 4096, bf16, against transformers + Liger
#     summary     bench/gpu_summary.py: one table, each target marked met / missed / not measured
# Every benchmark checks each implementation's output against the reference before timing it. Limits in
# seconds (7 minutes in all on an H100): wheels 15, tests 110, kernels 90, generate 140,
# train_step 60, summary 5. DIR holds: log.txt (everything, as it runs), parts.tsv (part, exit status,
# seconds, limit), tests.txt, kernels.json, generate.json, train_step.json, summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
out="${OUT:-runs/gpu_check}"
while (($#)); do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "bench/gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
: >"$out/log.txt"
printf 'part\texit\tseconds\tlimit\n' >"$out/parts.tsv"

part() {  # part NAME LIMIT COMMAND...: run under `timeout`, append its output to log.txt, record the result
  local name="$1" limit="$2" start=$SECONDS status
  shift 2
  echo "::: $name (limit ${limit} s): $*" | tee -a "$out/log.txt"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$out/log.txt" | tail -n 4
  status=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$limit" >>"$out/parts.tsv"
  echo "::: $name: exit $status after $((SECONDS - start)) s" | tee -a "$out/log.txt"
}

if ((dry)); then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
  cuda_tests=(tests/test_attention_gpu.py tests/test_gpu_paths.py)  # they skip here: the list is checked
  kernels=(-m bench.kernels --quick --dry-run)
  generate=(-m bench.generate --dry-run --batch-sizes 1 --impls "nanoreason graph" hf --warmup 0 --repeats 1)
  train_step=(-m bench.train_step --dry-run --cases fixed --precisions bf16 --hf-layouts padded)
  echo "dry run: CPU, tiny shapes, no wheels" >>"$out/log.txt"
else
  shopt -s nullglob
  wheels=(.whl/*.whl)
  ((${#wheels[@]})) && part wheels 15 "$py" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/gpu_check_site "${wheels[@]}"
  export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv >>"$out/log.txt" 2>&1
  cuda_tests=(tests/test_kernels_cross_entropy.py tests/test_kernels_linear_logprobs.py
              tests/test_kernels_traced_gemm.py tests/test_attention_gpu.py tests/test_gpu_paths.py
              "tests/test_losses.py::test_sequence_sums_bit_identical_on_cuda")
  kernels=(-m bench.kernels --quick)
  generate=(-m bench.generate --batch-sizes 1 64 --prompt-len 256 --new-tokens 256 --warmup 1 --repeats 1)
  train_step=(-m bench.train_step --cases fixed --precisions bf16 --batch 4 --seq-len 4096 --steps 5
              --warmup 2 --hf-layouts padded)
fi
"$py" -c "import sys, torch, triton, numpy; print(sys.version.split()[0], torch.__version__, triton.__version__,
numpy.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" \
  >>"$out/log.txt" 2>&1

part tests 110 env -u TRITON_INTERPRET "$py" -m pytest -q -s -p no:cacheprovider -rs "${cuda_tests[@]}"
awk '/^::: tests \(/ {on = 1} /^::: tests: exit/ {print; on = 0} on' "$out/log.txt" >"$out/tests.txt"
part kernels 90 "$py" "${kernels[@]}" --out "$out/kernels.json"
part generate 140 "$py" "${generate[@]}" --out "$out/generate.json"
part train_step 60 "$py" "${train_step[@]}" --out "$out/train_step.json"
part summary 5 "$py" bench/gpu_summary.py "$out"
cat "$out/summary.md" 2>/dev/null
awk -F'\t' 'NR > 1 && $2 != 0 {bad = 1} END {exit bad}' "$out/parts.tsv"
