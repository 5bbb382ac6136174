#!/usr/bin/env bash
# The assignment-5 training results of docs/benchmarks.md on one H100: SmolLM2-135M-Instruct on
# GSM8K (train for training, the full test set for evaluation, r1_zero prompt, temperature 1,
# answer reward).
#
#   bash scripts/rl_recipe.sh            # all stages, in order (~30-40 min of H100 time)
#   STAGES="sft grpo" bash scripts/rl_recipe.sh
#   GRPO_ARGS="--max_minutes 5" bash scripts/rl_recipe.sh   # extra flags per stage: ZERO_SHOT_ARGS,
#                                                            # SFT_ARGS, EI_ARGS, GRPO_ARGS, DPO_ARGS
#   RUN="python3 -m cs336_alignment.cli" ...  # without uv (a machine with PYTHONPATH set instead)
#
# Stages:
#   zero_shot  the baseline, sampled at temperature 1 like every later evaluation
#   sft        SFT on GSM8K train answers rendered as r1_zero traces (teaches the format)
#   ei         expert iteration from the SFT model (sample 8 per question, keep correct, SFT)
#   grpo       GRPO-Clip from the SFT model (groups of 32; off-policy: 2 optimizer steps per rollout batch)
#   dpo        (optional) DPO on a preference JSONL given as DPO_DATA=pairs.jsonl
# Each writes $RL_OUT/<stage>/ (default runs/rl/<stage>/: {log.jsonl,curves.png,config.json,eval_samples_*.jsonl,checkpoints/}.
# Wall time of each stage goes to $RL_OUT/<stage>/wall_s.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}
RL_OUT=${RL_OUT:-runs/rl}
STAGES=${STAGES:-"zero_shot sft ei grpo"}
RUN=${RUN:-uv run cs336-alignment}
mkdir -p "$RL_OUT"

timed() {  # timed <stage> <command...>: run, record the wall time
  local stage=$1; shift
  local t0=$SECONDS
  "$@"
  mkdir -p "$RL_OUT/$stage"
  echo $((SECONDS - t0)) > "$RL_OUT/$stage/wall_s"
  echo "== $stage: $((SECONDS - t0)) s"
}

latest_policy() {  # the newest checkpoint's policy folder of a stage
  ls -d "$RL_OUT/$1"/checkpoints/step_*/policy | tail -n 1
}

for stage in $STAGES; do
  case $stage in
    zero_shot)
      timed zero_shot $RUN evaluate --model "$MODEL" --dataset gsm8k --prompt r1_zero \
        --temperature 1.0 --max-new-tokens 512 --out "$RL_OUT/zero_shot" ${ZERO_SHOT_ARGS:-} ;;
    sft)
      timed sft $RUN sft --preset smollm2-gsm8k --model "$MODEL" --out_dir "$RL_OUT/sft" ${SFT_ARGS:-} ;;
    ei)
      timed ei $RUN expert-iteration --preset smollm2-gsm8k --model "$(latest_policy sft)" --out_dir "$RL_OUT/ei" ${EI_ARGS:-} ;;
    grpo)
      timed grpo $RUN grpo --preset smollm2-gsm8k --model "$(latest_policy sft)" --out_dir "$RL_OUT/grpo" ${GRPO_ARGS:-} ;;
    dpo)
      : "${DPO_DATA:?set DPO_DATA to a JSONL of prompt/chosen/rejected}"
      timed dpo $RUN dpo --model "$MODEL" --train_data "$DPO_DATA" --out_dir "$RL_OUT/dpo" ${DPO_ARGS:-} ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done

# One line per stage: the last evaluation record (accuracy, format rate) and the wall time.
${PYTHON:-python3} - "$RL_OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for stage in ("sft", "ei", "grpo"):
    log = out / stage / "log.jsonl"
    if not log.exists():
        continue
    evals = [json.loads(l) for l in log.read_text().splitlines() if '"kind": "eval"' in l]
    wall = (out / stage / "wall_s").read_text().strip() if (out / stage / "wall_s").exists() else "?"
    if evals:
        first, last = evals[0], evals[-1]
        print(f"{stage:5s} accuracy {first['accuracy']:.4f} -> {last['accuracy']:.4f}  "
              f"format {first['format_rate']:.3f} -> {last['format_rate']:.3f}  wall {wall} s")
PY
