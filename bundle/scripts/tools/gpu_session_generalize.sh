#!/usr/bin/env bash
# One lease of a lent GPU for issue 20's recipe, `lite` only: static stage, then video stage, weights back first.
# (`base` is left out: a second recipe does not fit in one 600 s call.)
# Nothing depends on a lease: CPU training is the plan, and a refused or cut lease loses nothing but the lease.
#   1. static stage (train.json + pretrain_static.json) from the shipped weights: stills of kvasir_seg and hc18 plus the
#      training frames of the DAVIS roots, synthetic motion, STATIC seconds (--time_budget);
#   2. video stage (train.json) from stage 1's raw weights: cvc_clinicdb, vocalfolds and davis2016 train, VIDEO seconds;
#   both: --init_weights, --pretrained false, batch 32, --ema_momentum / --compress_prob / --grey_prob / --noise_prob;
#   3. evaluation LAST, of the shipped and of the returned fp16 weights, on the packed val splits only (evaluate.json
#      over inference.json; the suite's held-out and stored sets would have to be generated there too, which does not
#      fit): a first look only. The judgement is the suite on the CPU machine, on the returned weights:
#      python -m scripts.tools.suite --ckpt_path lite_video_ema_fp16.pt --compare bundle/models/model.pt --output_dir ..
#      and, as 0.6.0 was made, the half-and-half mix of the returned weights with the shipped ones (WiSE-FT):
#      python -m scripts.tools.average_weights bundle/models/model.pt lite_video_ema_fp16.pt --output wise.pt
# Files in $OUT (at most 8 come back, 16 MiB each, 64 MiB together; this writes 6, each file appears by a rename, so a
# run cut at any moment leaves only whole files, plus at most one partial *.part):
#   lite_static_ema_fp16.pt, lite_static_raw_fp16.pt   written the moment stage 1 ends (fp16 state dicts, ~3 MB each)
#   lite_video_ema_fp16.pt,  lite_video_raw_fp16.pt    written the moment stage 2 ends, before any evaluation
#   logs.tar.gz     every log so far (device, install, trainings, evaluations, metrics.json), rewritten after each step
#   results.json    J&F / Lost per val set and model, written at the end
# Time: one command of at most 600 s in all, install included; the script stops itself by DEADLINE (default 540 s,
# issue 20's 9 minutes): each stage's budget is cut to what is left, evaluation gets the rest (call's timeout_s=600).
# What travels (64 MiB a call, the tracked tree ~9.5 MB included): the wheels (.whl/, 41.3 MB: av 35.8, nibabel 3.3,
# monai 1.7, pytorch-ignite 0.4, fire, termcolor; the image has torch, numpy, Pillow, OpenCV, tqdm, matplotlib) and
# the packed data (.devdata/, `cd bundle && python -m scripts.tools.pack_data ../../shared/data/NAME ../.devdata/NAME
# --short-side S --quality Q` for cvc_clinicdb, vocalfolds, davis2016, kvasir_seg, hc18; measure with `du -sb` before
# the lease: davis2016 (109 MB as shipped) packs to about 62 % at S=240 Q=70 and 37 % at S=192 Q=60, estimated from 3
# sequences). Both do not fit in one call (PyAV alone is 36 MB, and train.json's storage augmentation imports it), so
# a lease is two calls back to back (or three: `install` again with more carried data only checks), the machine kept
# warm between them (it goes back after 30 s idle; the next call then fails at once, naming what is missing, and the
# lease is to be dropped rather than retried):
#   run(carry=[".whl", ".devdata/cvc_clinicdb", ".devdata/vocalfolds"], timeout_s=120,
#       command="bash bundle/scripts/tools/gpu_session_generalize.sh install")     # wheels into /tmp/site, checked
#   run(carry=[".devdata/davis2016", ".devdata/kvasir_seg", ".devdata/hc18"], timeout_s=600,
#       command="bash bundle/scripts/tools/gpu_session_generalize.sh")             # paths carried before stay there
# Dry run on a CPU (no .whl/: the current environment; tiny budgets, e.g. with small copies packed into /tmp):
#   OUT=/tmp/gpu_out STATIC=20 VIDEO=20 BATCH=2 WORKERS=0 DATA_DIR=/tmp/packed \
#       bash bundle/scripts/tools/gpu_session_generalize.sh
set -u
MODE=${1:-run}
STATIC=${STATIC:-150} VIDEO=${VIDEO:-200} DEADLINE=${DEADLINE:-540} DATA_DIR=${DATA_DIR:-.devdata}
WORKERS=${WORKERS:-12} BATCH=${BATCH:-32} SITE=${SITE:-/tmp/site}
fail() { echo "gpu_session_generalize.sh: error: $*" >&2; exit 2; }
[ "$MODE" = run ] || [ "$MODE" = install ] || fail "unknown mode '$MODE' (run or install)"
[ -n "${OUT:-}" ] && OUT=$(realpath -m "$OUT") || fail "OUT must name a folder for the results"
[ ! -e "$OUT" ] || { [ -d "$OUT" ] && [ -z "$(ls -A "$OUT")" ]; } || fail "OUT ($OUT) is not an empty folder"
for n in STATIC VIDEO DEADLINE WORKERS BATCH; do [[ ${!n} =~ ^[0-9]+$ ]] || fail "$n must be a whole number"; done
[ -d "$DATA_DIR" ] && DATA_DIR=$(cd "$DATA_DIR" && pwd)  # relative to where it was called from, else to the root
cd "$(dirname "$0")/../../.." || fail "cannot enter the repository root"
if [ "$MODE" = run ]; then
    for d in cvc_clinicdb vocalfolds davis2016; do
        [ -d "$DATA_DIR/$d/JPEGImages" ] || fail "$DATA_DIR/$d/JPEGImages missing (pack it: scripts.tools.pack_data)"
    done
    for d in kvasir_seg hc18; do [ -d "$DATA_DIR/$d/images" ] || fail "$DATA_DIR/$d/images missing (pack it too)"; done
fi
mkdir -p "$OUT" || fail "cannot create OUT ($OUT)"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYTHONWARNINGS="ignore:parsing config_file:UserWarning:monai.bundle.scripts"
LOG=$(mktemp -d /tmp/tcmn_gpu_logs.XXXXXX) WORK=$(mktemp -d /tmp/tcmn_gpu_work.XXXXXX)

archive() {  # every log so far into $OUT/logs.tar.gz, replaced by a rename so a cut run keeps the previous one
    tar -czf "$OUT/logs.tar.gz.part" -C "$LOG" . && mv -f "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}
if ls .whl/*.whl > /dev/null 2>&1 && [ ! -e "$SITE/.tcmn_installed" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        > "$LOG/install.log" 2>&1 && touch "$SITE/.tcmn_installed" || { archive; fail "wheel install failed"; }
fi
[ -e "$SITE/.tcmn_installed" ] && export PYTHONPATH=$SITE:$PWD/bundle || export PYTHONPATH=$PWD/bundle
{ command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, av, monai, ignite, nibabel, fire, scripts.training, scripts.storage_augment; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__, 'av', av.__version__)"
} > "$LOG/device.txt" 2>&1 || { archive; fail "the packages do not import (see device.txt in logs.tar.gz)"; }
if [ "$MODE" = install ]; then archive; cat "$LOG/device.txt"; rm -rf "$LOG" "$WORK"; exit 0; fi

DATA=$DATA_DIR/cvc_clinicdb,$DATA_DIR/vocalfolds,$DATA_DIR/davis2016
META=bundle/configs/metadata.json
COMMON=(--meta_file $META --dataset_dir $DATA --variant lite --pretrained false --batch_size "$BATCH"
    --learning_rate 0.0003 --warmup_iterations 50 --epoch_length 100 --max_epochs 1000 --val_interval 1000
    --checkpoint_interval 100000 --num_workers "$WORKERS" --ema_momentum 0.002 --compress_prob 0.4 --grey_prob 0.1
    --noise_prob 0.15)

save() {  # stage name: its EMA and raw weights as fp16 state dicts into $OUT, each appearing by a rename
    python3 - "$WORK/$1/checkpoints" "$OUT" "$1" <<'EOF' >> "$LOG/save.log" 2>&1
import os, sys, torch
ckpt, out, name = sys.argv[1:]
for kind, state in (("ema", lambda: torch.load(f"{ckpt}/model_ema.pt", map_location="cpu")),
                    ("raw", lambda: torch.load(f"{ckpt}/checkpoint_final.pt", map_location="cpu")["network"])):
    target = f"{out}/{name}_{kind}_fp16.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state().items()}, target + ".part")
    os.replace(target + ".part", target)
    print(target, os.path.getsize(target), "bytes")
EOF
}
train() {  # name, budget, then overrides; the budget shrinks to what DEADLINE leaves (60 s kept for the evaluation)
    local name=$1 budget=$2; shift 2
    local left=$((DEADLINE - SECONDS - 60 - 30))  # 30 s: start-up and checkpoint writing around the budget
    if [ "$left" -lt "$budget" ]; then
        [ "$left" -ge 10 ] || { echo "$name: no time left (${SECONDS} s used)" >> "$LOG/session.log"; return 1; }
        budget=$left
    fi
    echo "$name: --time_budget $budget from ${SECONDS} s" >> "$LOG/session.log"
    timeout $((budget + 60)) python3 -m monai.bundle run training "${COMMON[@]}" --output_dir "$WORK/$name" \
        --time_budget "$budget" "$@" > "$LOG/train_$name.log" 2>&1
    local rc=$?
    echo "$name: exit code $rc at ${SECONDS} s" >> "$LOG/session.log"
    [ $rc -eq 0 ] && save "$name"
    local saved=$?
    archive
    return $((rc || saved))
}

train lite_static "$STATIC" --config_file "['bundle/configs/train.json','bundle/configs/pretrain_static.json']" \
    --static_image_dirs "$DATA_DIR/kvasir_seg,$DATA_DIR/hc18" --init_weights bundle/models/model.pt \
    --num_frames 3 --num_frames_end 3 \
    && train lite_video "$VIDEO" --config_file bundle/configs/train.json \
        --init_weights "$WORK/lite_static/checkpoints/checkpoint_final.pt"
TRAINED=$?  # the exit status: non-zero when a stage failed, after whatever was done is evaluated and archived

evaluate() {  # name, weights: the packed val splits of the three roots, in one process per weights file
    local left=$((DEADLINE - SECONDS - 10))
    [ "$left" -ge 10 ] || return 1
    timeout "$left" python3 -m monai.bundle run evaluating --meta_file $META \
        --config_file "['bundle/configs/inference.json','bundle/configs/evaluate.json']" --dataset_dir "$DATA" \
        --split val --variant lite --ckpt_path "$2" --output_dir "$WORK/eval_$1" > "$LOG/eval_$1.log" 2>&1
    echo "eval $1: exit code $? at ${SECONDS} s" >> "$LOG/session.log"
    [ -f "$WORK/eval_$1/metrics.json" ] && cp "$WORK/eval_$1/metrics.json" "$LOG/metrics_$1.json"
}
evaluate shipped bundle/models/model.pt &
for f in "$OUT"/*_fp16.pt; do [ -e "$f" ] && { n=$(basename "$f" _fp16.pt); evaluate "$n" "$f" & }; done
wait
python3 - "$LOG" "$OUT/results.json" <<'EOF' > "$LOG/results.txt" 2>&1
import json, os, pathlib, sys
keys = ("J&F", "J", "F", "Lost")
results = {}
for p in sorted(pathlib.Path(sys.argv[1]).glob("metrics_*.json")):
    r = json.loads(p.read_text())
    sets = r.get("datasets", {})
    results[p.stem[len("metrics_"):]] = {"all": {k: r.get(k) for k in keys}, **{d: {k: b.get(k) for k in keys}
                                                                               for d, b in sets.items()}}
pathlib.Path(sys.argv[2] + ".part").write_text(json.dumps(results, indent=1))
os.replace(sys.argv[2] + ".part", sys.argv[2])
for name, r in results.items():
    print(name, {d: round(s["J&F"], 3) if isinstance(s["J&F"], float) else s["J&F"] for d, s in r.items()})
EOF
echo "done at ${SECONDS} s" >> "$LOG/session.log"
ls -l "$OUT" >> "$LOG/session.log"
archive
cat "$LOG/session.log" "$LOG/results.txt"
rm -rf "$LOG" "$WORK"
exit $TRAINED
