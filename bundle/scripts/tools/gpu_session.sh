#!/usr/bin/env bash
# One lease of a lent GPU (the `device` tool: 15 minutes, one command of at most 10): GPU benchmarks, then three
# trainings side by side for BUDGET seconds each, then evaluation of every result on the val splits.
#   lite_nocon  lite from the shipped weights (bundle/models/model.pt), no contrastive loss  -> new shipped weights
#   lite_con    the same with the temporal contrastive loss (the ablation at GPU scale)
#   full        the paper-scale variant from random initialisation (no ImageNet ResNet-50 is reachable here)
# Expects, beside the working tree: .whl/ (monai, pytorch-ignite, nibabel, fire, termcolor wheels for the GPU
# host's Python) and .devdata/ (cvc_clinicdb and vocalfolds packed by `python -m scripts.tools.pack_data`).
# Everything it reports lands in $OUT. See bundle/docs/training_log.md for the numbers it produced.
set -u
BUDGET=${BUDGET:-380} DATA_DIR=${DATA_DIR:-.devdata}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/bundle
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
META=bundle/configs/metadata.json
DATA=$DATA_DIR/cvc_clinicdb,$DATA_DIR/vocalfolds

(cd bundle && timeout 60 python3 -m scripts.tools.benchmark_training --variant lite full --iterations 10 --warmup 2 \
    --device cuda --threads 2 --json "$OUT/bench_train.json") > "$OUT/bench.log" 2>&1
(cd bundle && timeout 60 python3 -m scripts.tools.benchmark --variants lite,full --sizes 384x288 --frames 300 \
    --device cuda --threads 2 --json "$OUT/bench_propagate.json") >> "$OUT/bench.log" 2>&1

train() {  # name, then overrides of train.json
    local name=$1; shift
    python3 -m monai.bundle run training --meta_file $META --config_file bundle/configs/train.json \
        --dataset_dir $DATA --output_dir /tmp/$name --val_interval 1000 --checkpoint_interval 100000 \
        --time_budget "$BUDGET" --max_epochs 1000 "$@" > "$OUT/train_$name.log" 2>&1
    echo "exit code $?" >> "$OUT/train_$name.log"
    python3 -c "import torch; torch.save(torch.load('/tmp/$name/checkpoints/checkpoint_final.pt', \
        map_location='cpu')['network'], '/tmp/$name/model.pt')"
}
lite="--pretrained false --init_weights bundle/models/model.pt --batch_size 32 --learning_rate 0.0005"
lite="$lite --warmup_iterations 50 --epoch_length 250 --num_workers 5"
train lite_nocon $lite --use_contrastive false &
train lite_con $lite --use_contrastive true &
train full --variant full --pretrained false --freeze_stride4 false --crop_size 384 --batch_size 16 \
    --learning_rate 0.0004 --warmup_iterations 100 --epoch_length 100 --num_workers 4 &
wait
for name in lite_nocon lite_con; do cp /tmp/$name/model.pt "$OUT/${name}_model.pt"; done
python3 -c "import torch; c = torch.load('/tmp/lite_nocon/checkpoints/checkpoint_final.pt', map_location='cpu'); \
    c.pop('network'); torch.save(c, '$OUT/lite_nocon_state.pt')"

evaluate() {  # name, variant, weights, dataset root
    local ds; ds=$(basename "$4")
    timeout 150 python3 -m monai.bundle run evaluating --meta_file $META --config_file "['bundle/configs/inference.json','bundle/configs/evaluate.json']" \
        --dataset_dir "$4" --split val --ckpt_path "$3" --variant "$2" --output_dir "/tmp/eval/$1_$ds" \
        > "/tmp/eval_$1_$ds.log" 2>&1
}
for root in $DATA_DIR/cvc_clinicdb $DATA_DIR/vocalfolds /tmp/lite_nocon/synthetic/echo; do
    evaluate shipped lite bundle/models/model.pt $root &
    for name in lite_nocon lite_con; do evaluate $name lite /tmp/$name/model.pt $root & done
    evaluate full full /tmp/full/model.pt $root &
done
wait
python3 - <<'EOF'
import json, os, pathlib
out = pathlib.Path(os.environ["OUT"])
report = {p.parent.name: json.loads(p.read_text()) for p in sorted(pathlib.Path("/tmp/eval").glob("*/metrics.json"))}
(out / "eval.json").write_text(json.dumps(report, indent=1))
for name, r in report.items():
    print(name, {k: v for k, v in r.items() if isinstance(v, (int, float))})
EOF
cat /tmp/eval_*.log | grep -i -B2 -A3 "error" | tail -40
ls -la "$OUT"
