#!/usr/bin/env bash
# The GPU check, in one run on a bare GPU machine: the CUDA tests, the training-throughput and
# inference-latency benchmarks, then a GPU preset end to end (download from the carried
# archive, preprocess, train UNet, train UNet++, prune, report), with a summary table last.
#
#   bash bench/gpu_check.sh drive             # DRIVE: tests, benchmarks, drive-gpu
#   bash bench/gpu_check.sh camvid            # CamVid: tests, camvid-gpu
#   bash bench/gpu_check.sh drive --dry-run   # here, on the CPU, tiny sizes: catches typos
#
# What it expects next to the repo (git-ignored, carried by the device tool):
#   .whl/      wheels of what the GPU machine lacks (smp, albumentations, albucore, simsimd,
#              stringzilla, pydantic, pydantic-core, annotated-types, typing-inspection,
#              typing-extensions, openpyxl, et-xmlfile): bench/gpu_wheels.sh fetches them
#   .gpudata/  DRIVE.zip or CamVid.zip (cp ../shared/datasets/<X>.zip .gpudata/)
# DVC and MLflow do not travel (they would not fit in 64 MiB with the data): the stages run
# one after another as `python -m pipeline.stages.<stage>`, with mlflow.enabled: false (the
# metrics are the same). GPU_CHECK_SET="key=value ..." overrides preset values (dotted keys).
#
# Everything lands in $OUT (default ./gpu_out): log.txt (all output), summary.md (the table
# printed last), results.tar.gz (reports/, the benchmark tables, the params that ran). Each
# step has its own time limit, and all of them fit GPU_CHECK_BUDGET seconds (default 560, under
# the device's 600 s per command): an overrunning step cannot take the summary with it.
set -uo pipefail

dataset=${1:?usage: bash bench/gpu_check.sh drive|camvid [--dry-run]}
dry=${2:-}
case $dataset in
  drive) archive=DRIVE.zip ;;
  camvid) archive=CamVid.zip ;;
  *) echo "gpu_check: dataset must be drive or camvid, not '$dataset'" >&2; exit 2 ;;
esac
if [[ -n $dry && $dry != --dry-run ]]; then
  echo "gpu_check: the second argument may only be --dry-run, not '$dry'" >&2; exit 2
fi

root=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z $dry ]]; then src=$root/.gpudata/$archive; else src=${GPU_CHECK_SOURCE:-$root/.gpudata/$archive}; fi
[[ -f $src ]] || { echo "gpu_check: $src not found (copy $archive into .gpudata/)" >&2; exit 1; }
if [[ -z $dry ]] && ! compgen -G "$root/.whl/*.whl" >/dev/null; then
  echo "gpu_check: no wheels in $root/.whl (run bash bench/gpu_wheels.sh, carry .whl)" >&2; exit 1
fi
out=${OUT:-$root/gpu_out}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
exec > >(tee -a "$out/log.txt") 2>&1
started=$(date +%s)
status=()  # "step: ok|FAILED (rc)|TIMEOUT  seconds"

budget=${GPU_CHECK_BUDGET:-560}  # s for the whole run: the device stops a command at 600

step() {  # step NAME LIMIT_S COMMAND...: run it with a time limit, record how it ended
  local name=$1 limit=$2 t0 rc
  shift 2
  # within the run's budget, 20 s kept for the summary: a late step is cut short, not the summary
  local left=$((budget - ($(date +%s) - started) - 20))
  if ((left < 10)); then
    status+=("$name: SKIPPED (out of the ${budget}s budget), 0s")
    echo "=== $name: SKIPPED, out of the ${budget}s budget"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local took=$(($(date +%s) - t0)) verdict=ok
  if ((rc == 124 || rc == 137)); then verdict=TIMEOUT; elif ((rc)); then verdict="FAILED ($rc)"; fi
  status+=("$name: $verdict, ${took}s")
  echo "=== $name: $verdict in ${took}s"
  return 0
}

# --- Python with the project's packages ------------------------------------------------------
if [[ -z $dry ]]; then
  py=python3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$work/site" "$root"/.whl/*.whl || { echo "gpu_check: wheel install failed"; exit 1; }
  site=$work/site
else
  py=$root/.venv/bin/python
  # what the GPU machine lacks is made unimportable here too, so the dry run catches a stray
  # `import mlflow` or `import dvc` on the path the GPU run takes
  site=$work/block
  mkdir -p "$site"
  cat >"$site/sitecustomize.py" <<'EOF'
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "dvc"):
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)")
        return None
sys.meta_path.insert(0, _Absent())
EOF
fi

# the run happens in a copy: the stages write data/, models/, reports/ under the repo root
repo=$work/repo
mkdir -p "$repo"
# (the device's copy may have no .git: tar, leaving out what is not the project's)
tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./.whl --exclude=./.gpudata \
  --exclude=./gpu_out --exclude=./data --exclude=./models --exclude=./mlflow.db \
  --exclude=./mlartifacts --exclude=./mlruns -cf - . | tar -C "$repo" -xf -
mkdir -p "$repo/data" "$repo/models"
cp "$root"/data/README.md "$repo/data/" 2>/dev/null; cp "$root"/models/README.md "$repo/models/" 2>/dev/null
export PYTHONPATH=$site:$repo PYTHONUNBUFFERED=1 MPLBACKEND=Agg
cd "$repo" || exit 1
mkdir -p "$work/bench"

echo "=== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$py -c 'import platform, torch; print("python", platform.python_version(), "torch",
  torch.__version__, "cuda", torch.version.cuda, "device",
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'
echo "commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '(no .git here)')"

# --- the CUDA tests (they skip on a CPU) --------------------------------------------------------
step "CUDA tests" 240 $py -m pytest -q -p no:cacheprovider -k cuda \
  tests/e2e/test_gpu.py tests/unit/inference/test_metrics.py tests/unit/engine/test_engine.py

# --- the benchmarks of the DRIVE issue -----------------------------------------------------------
if [[ $dataset == drive ]]; then
  if [[ -z $dry ]]; then
    tt=() il=(--dtype bf16)
  else
    tt=(--device cpu --size 64 --batch 2 --steps 1 --windows 1 --warmup 1 --base 8)
    il=(--devices cpu --size 64 --runs 1 --warmup 0 --base 4 --depth 2)
  fi
  step "train_throughput" 150 $py bench/train_throughput.py "${tt[@]}" --out "$work/bench/train_throughput"
  step "inference_latency" 90 $py bench/inference_latency.py "${il[@]}" --out "$work/bench/inference_latency"
fi

# --- the preset end to end -------------------------------------------------------------------------
sets=${GPU_CHECK_SET:-}
if [[ -n $dry ]]; then  # minutes on 2 CPU cores, every stage and the same code paths
  sets="epochs=1 batch_size=4 preprocess.patches_per_epoch=32 preprocess.crop_size=64 preprocess.crop_stride=32
        unet.base_channels=4 unetpp.base_channels=4
        train.device=cpu train.compile=false train.num_workers=0 train.warmup_epochs=0.5
        inference.tile_size=0 pruning.latency_runs=2 pruning.latency_warmup=1 $sets"
  [[ $dataset == camvid ]] && sets="preprocess.scale=0.25 $sets"
fi
step "params" 60 $py - "$dataset-gpu" "$src" $sets <<'EOF'
import sys
import yaml
from bench.benchlib import parse_sets
from pipeline.core import paths
from pipeline.core.config import load_params, load_yaml
from pipeline.preset import check_keys, load_overlay, merge

# pipeline.preset's checks and merge; written with PyYAML, as DVC (its -S code) does not travel
preset, source, *sets = sys.argv[1:]
base = load_yaml(paths.PARAMS.read_text())
run = {"dataset": {"source": source}, "mlflow": {"enabled": False}}
for layer in (load_overlay(preset), run, parse_sets(sets)):
    check_keys(layer, base, preset)
    base = merge(base, layer)
paths.PARAMS.write_text(yaml.safe_dump(base, sort_keys=False))
load_params()  # the stages' own check, before anything runs
print(f"params.yaml = {preset} + {run} + {sets}")
EOF
stages=(download preprocess "train unet" "train unetpp" prune report)
limits=(60 120 300 300 120 90)
if [[ ${status[-1]} == "params: ok"* ]]; then
  for i in "${!stages[@]}"; do
    s=${stages[$i]}
    step "${s/ /_}" "${limits[$i]}" $py -m pipeline.stages.$s
    [[ ${status[-1]} == *": ok,"* ]] || break  # a later stage needs this one's outputs
  done
fi

# --- summary and outputs ---------------------------------------------------------------------------
total=$(($(date +%s) - started))
{
  echo "### GPU check: $dataset${dry:+ (dry run on the CPU)}"
  echo
  echo "- $(date -u '+%Y-%m-%d %H:%M UTC'), wall ${total}s in all"
  echo "- set: $(echo ${sets:-(the preset as committed)})"  # one line, single spaces
  echo
  echo "| step | how it ended |"
  echo "|---|---|"
  for s in "${status[@]}"; do echo "| ${s%%:*} | ${s#*: } |"; done
  echo
  $py - "$work/bench" <<'EOF'
import json, sys
from pathlib import Path

def table(rows, cols):
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    print()

rep = Path("reports")
keys = ("miou", "dice", "f1", "auc_roc", "global_accuracy")
trained = {label: json.loads((rep / arch / "metrics.json").read_text())
           for arch, label in (("unet", "UNet"), ("unetpp", "UNet++ L4"))
           if (rep / arch / "metrics.json").is_file()}
rows = [{"model": label, **{k: round(m[k], 4) for k in keys if k in m},
         "latency_ms": round(m["latency_ms"], 2), "train_s": m["train_seconds"]}
        for label, m in trained.items()]
prune = rep / "pruning.csv"
if prune.is_file():  # every depth, scored like the full model (L4 = UNet++ above)
    import csv
    for m in csv.DictReader(prune.open()):
        rows.append({"model": f"pruned L{m['depth']}", **{k: round(float(m[k]), 4) for k in
                     keys if m.get(k)}, "latency_ms": round(float(m["latency_ms"]), 2)})
if rows:
    table(rows, ["model", *keys, "latency_ms", "train_s"])
# multi-class (CamVid's 11): the test IoU of every class; binary tasks have F1/AUC above
per_class = [{"model": label, **{k[4:]: round(v, 3) for k, v in m.items() if k.startswith("iou_")}}
             for label, m in trained.items()]
if per_class and len(per_class[0]) > 3:
    print("Test IoU per class:\n")
    table(per_class, list(per_class[0]))
for name in ("train_throughput", "inference_latency"):
    f = Path(sys.argv[1]) / f"{name}.md"
    if f.is_file():
        print(f.read_text())
EOF
} >"$work/summary.md"
cp "$work/summary.md" "$out/summary.md"
cp params.yaml "$work/bench/params.yaml"
tar czf "$out/results.tar.gz" -C "$repo" reports -C "$work" bench 2>/dev/null
echo
cat "$out/summary.md"
