#!/usr/bin/env bash
# A real LRA ListOps run on one GPU (issue 6): the full-size set drawn with LRA's generator (96k / 2k / 2k,
# about 1.5 minutes), the paper's model and optimizer from configs/lra/listops.yaml, with the schedule
# compressed to STEPS optimizer steps (warmup a tenth of them) so that one device command holds a whole
# cosine; then the test set on the best checkpoint. The training and validation curve lands in OUT/curve.csv,
# the test accuracy in OUT/test.csv.
#   bash benchmarks/listops_run.sh OUT_DIR [STEPS [more hgrn2 flags...]]
set -euo pipefail
out=${1:?usage: benchmarks/listops_run.sh OUT_DIR [STEPS [more hgrn2 flags...]]}
steps=${2:-3000}
data=${LISTOPS_DATA:-/tmp/listops-1000}
[ -f "$data/basic_test.tsv" ] || python3 -m hgrn2_lightning lra make-listops --out "$data" --seed 0
mkdir -p "$out"
printf 'trainer:
  default_root_dir: %s
  logger: {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: %s, name: listops, version: 0}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: %s/checkpoints, monitor: val/acc, mode: max, filename: best, save_last: true}
' "$out" "$out" "$out" > "$out/run.yaml"
run=(--config configs/lra/listops.yaml --config "$out/run.yaml" --data.init_args.root "$data")
python3 -m hgrn2_lightning fit "${run[@]}" --trainer.max_steps "$steps" --trainer.max_epochs -1 \
  --trainer.val_check_interval 250 --trainer.check_val_every_n_epoch null \
  --model.init_args.schedule_steps "$steps" --model.init_args.optim.warmup_steps $((steps / 10)) "${@:3}"
cp "$out/listops/version_0/metrics.csv" "$out/curve.csv"  # the test run below writes its own there
python3 -m hgrn2_lightning test "${run[@]}" --ckpt_path "$out/checkpoints/best.ckpt" "${@:3}"
cp "$out/listops/version_0/metrics.csv" "$out/test.csv"
