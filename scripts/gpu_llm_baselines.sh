#!/usr/bin/env bash
# Compute the LLM baseline rows of an experiment config on one GPU and collect their cells.
#
#   scripts/gpu_llm_baselines.sh CONFIG [TIME_LIMIT_S]
#
# KAR (both rows), PEPLER and ReLLa (both rows) run as three processes side by side: a 135M-parameter LM
# leaves most of a data-centre GPU idle, so sharing it costs each little. Each process computes only its
# rows' cells (`userip experiment --rows`), with the LM on cuda (`--set <row>.lm_device=cuda`; devices are
# not part of a cell's key). Their cells end in runs/gpu/<group>/cells: copy them into the config's
# out_dir/cells and rerun `userip experiment --config CONFIG` (any machine) for the tables. Run from the
# repository root; PYTHON picks the interpreter (default python3), with userip importable. ROW_GROUPS picks
# the process groups (default: "kar,kar_nogen pepler rella_zeroshot,rella"); EXTRA_SETS adds overrides to
# every process (e.g. "--set seeds=[3,4] --set source_options.path=DATA", as scripts/gpu_check.py does).
set -u
config=${1:?usage: scripts/gpu_llm_baselines.sh CONFIG [TIME_LIMIT_S]}
limit=${2:-3600}
python=${PYTHON:-python3}
out=runs/gpu
mkdir -p "$out"
cuda=(--set kar.lm_device=cuda --set pepler.lm_device=cuda --set rella.lm_device=cuda)
read -r -a extra <<<"${EXTRA_SETS:-}"
groups=${ROW_GROUPS:-"kar,kar_nogen pepler rella_zeroshot,rella"}

# Convert the GGUF model (if the spec is one) once, before three processes would race to do it.
"$python" - "$config" "${extra[@]}" <<'PY' || exit 2
import sys
from userip.baselines.llm_text import load_text_lm
from userip.utils.config import apply_overrides, load_yaml
sets = [item for flag, item in zip(sys.argv[2::2], sys.argv[3::2]) if flag == "--set"]
spec = apply_overrides(load_yaml(sys.argv[1]), sets).get("llm_baseline_lm", "smollm2")
if spec not in ("offline", "random"):  # those two are built from the prepared dataset by the run itself
    print("LM ready:", load_text_lm(spec, device="cpu").describe())
PY

start=$(date +%s)
pids=()
for group in $groups; do
  name=${group%%,*}
  # Threads: KAR's CTR training runs on the CPU; the others mostly wait on the GPU.
  threads=$([ "$name" = kar ] && echo 8 || echo 3)
  OMP_NUM_THREADS=$threads timeout "$limit" "$python" -m userip.cli experiment --config "$config" \
    "${cuda[@]}" "${extra[@]}" --rows "$group" --out-dir "$out/$name" >"$out/$name.out" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "LLM baseline rows done in $(( $(date +%s) - start )) s (status $status); cells in $out/*/cells"
ls "$out"/*/cells 2>/dev/null
exit $status
