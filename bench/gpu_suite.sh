#!/usr/bin/env bash
# The GPU suite: what to measure when a GPU is lent, in at most ~8 minutes on one device.
#
#   bench/gpu_suite.sh [--dry-run] [OUT_DIR]        (OUT_DIR default: $OUT, else gpu_suite_out)
#
# Steps (each under its own time limit; a step that would overrun the suite's budget is skipped and said so):
#   decode   batch-1 decode and prefill of a Qwen-1.8B-shaped QWen in bf16 (random weights) vs transformers'
#            Qwen2ForCausalLM on the same weights, and vs the HBM bandwidth bound (bench/decode_bench.py)
#   engine8  the engine at 1 and 8 concurrent streams (bench/engine_bench.py, same shape, bf16)
#   engine32 the engine at 1 and 32 streams
#   gptq     GPTQ Int4 decode vs bf16 on the demo model (bench/quant_bench.py; needs GPT-QModel's CUDA kernels)
#   zero2    one DeepSpeed ZeRO-2 LoRA step on the demo model (finetune/finetune_lora_ds.sh)
#   vllm     vLLM's CUDA build on the to-qwen2 export vs our server (bench/serve_bench.py --peer-vllm), when
#            $VLLM_PYTHON names a python that imports vllm (nothing is installed here: the device has no network)
# Writes OUT_DIR/gpu_suite.json (per step: status, seconds, the result lines) and OUT_DIR/gpu_suite.md (a table),
# and each step's whole output in OUT_DIR/<step>.log.
#
# --dry-run: the same steps on the CPU with tiny shapes (checks the suite itself, in a few minutes; numbers mean
# nothing). SUITE_STEPS="decode engine8" runs only those; SUITE_BUDGET_S (default 480) bounds the whole suite.
set -u -o pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR=$(mkdir -p "${1:-${OUT:-gpu_suite_out}}" && cd "${1:-${OUT:-gpu_suite_out}}" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON=${PYTHON:-python}
BUDGET=${SUITE_BUDGET_S:-480}
STEPS=${SUITE_STEPS:-decode engine8 engine32 gptq zero2 vllm}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
: > "$OUT_DIR/steps.tsv"

if [ $DRY = 1 ]; then
  DEVICE=(--device cpu --dtype float32)
  DECODE=(--layers 1 --hidden-size 64 --heads 4 --mlp-width 128 --vocab-size 1000 --new-tokens 4 --prefill-tokens 16
          --runs 1)
  ENGINE=(--arch qwen --device cpu --dtype float32 --new-tokens 4 --repeats 1)
  ENGINE8=(--streams 2) ENGINE32=(--streams 3)
else
  DEVICE=(--device cuda --dtype bfloat16)
  DECODE=(--layers 24 --hidden-size 2048 --heads 16 --mlp-width 5504 --vocab-size 151936 --new-tokens 128
          --prefill-tokens 2048 --runs 3)
  ENGINE=(--arch qwen-1.8b --device cuda --dtype bfloat16 --new-tokens 128 --repeats 2)
  ENGINE8=(--streams 8) ENGINE32=(--streams 32)
fi

# step NAME LIMIT_S COMMAND...: run it under `timeout`, its output to NAME.log, one line to steps.tsv
step() {
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped\t0\tthe suite budget (%s s) is spent\n' "$name" "$BUDGET" >> "$OUT_DIR/steps.tsv"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s)" >&2
  local began=$(date +%s) rc=0
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1 || rc=$?
  local status=ok
  [ $rc = 124 ] && status="timed out"
  [ $rc != 0 ] && [ $rc != 124 ] && status="failed ($rc)"
  printf '%s\t%s\t%s\t\n' "$name" "$status" "$(($(date +%s) - began))" >> "$OUT_DIR/steps.tsv"
}

skip() {
  case " $STEPS " in *" $1 "*) printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$OUT_DIR/steps.tsv" ;; esac
}

[ $DRY = 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/device.txt" 2>&1

step decode 150 "$PYTHON" -m bench.decode_bench "${DEVICE[@]}" "${DECODE[@]}"
step engine8 120 "$PYTHON" -m bench.engine_bench "${ENGINE[@]}" "${ENGINE8[@]}"
step engine32 120 "$PYTHON" -m bench.engine_bench "${ENGINE[@]}" "${ENGINE32[@]}"

if [ $DRY = 1 ]; then
  skip gptq "dry run: quantizing takes minutes on a CPU"
elif "$PYTHON" -c "import gptqmodel" > /dev/null 2>&1; then
  step gptq 150 "$PYTHON" -m bench.quant_bench --device cuda --variants fp32 gptq-int4 --work-dir "$OUT_DIR/quant" \
    --plot "$OUT_DIR/quant_bench.png"
else
  skip gptq "GPT-QModel is not installed (requirements-gptq.txt)"
fi

step zero2 150 env GPUS_PER_NODE=1 MASTER_PORT=29431 bash finetune/finetune_lora_ds.sh \
  -m "${QWEN_DEMO_DIR:-$HOME/.cache/qwen/demo}" -d examples/finetune_data.json -- --output_dir "$OUT_DIR/zero2" \
  --max_steps 1 --gradient_accumulation_steps 1 --per_device_train_batch_size 2 --save_strategy no --lora_r 4 \
  --model_max_length 128

if [ $DRY = 1 ]; then
  skip vllm "dry run: vLLM's CUDA build is measured on a GPU only"
elif [ -n "${VLLM_PYTHON:-}" ] && "$VLLM_PYTHON" -c "import vllm" > /dev/null 2>&1; then
  step vllm 180 "$PYTHON" -m bench.serve_bench --peer-vllm "$VLLM_PYTHON" --clients 8 --max-tokens 128 --rounds 2
else
  skip vllm "vLLM is not importable (set VLLM_PYTHON to the python of an environment that has it)"
fi

# One JSON and one table: each step's status and the lines that carry its results.
"$PYTHON" - "$OUT_DIR" "$DRY" <<'EOF'
import json, re, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
RESULT = re.compile(r"ratio|bandwidth bound|tokens/s|x \(wall\)|params|processes|loss|ours|vLLM|client|Error"
                    r"|^(generate|engine x)")
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, why = (line.split("\t") + [""])[:4]
    log = out / f"{name}.log"
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if RESULT.search(l)] if log.exists() else []
    steps[name] = {"status": status, "seconds": int(seconds), "why": why or None, "results": lines[-12:]}
device = (out / "device.txt").read_text().strip() if (out / "device.txt").exists() else "cpu"
(out / "gpu_suite.json").write_text(json.dumps({"dry_run": dry, "device": device, "steps": steps}, indent=1))
rows = ["| step | status | s | results |", "|---|---|---|---|"]
for name, step in steps.items():
    text = "<br>".join(step["results"]) or (step["why"] or "")
    rows.append(f"| {name} | {step['status']} | {step['seconds']} | {text.replace('|', '/')} |")
(out / "gpu_suite.md").write_text(f"GPU suite on {device}{' (dry run)' if dry else ''}\n\n" + "\n".join(rows) + "\n")
print((out / "gpu_suite.md").read_text())
EOF
