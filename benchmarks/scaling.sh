#!/usr/bin/env bash
# Multi-GPU scaling from the users' own configs, changing only trainer flags (issue 9). Needs 2 GPUs.
#   bash benchmarks/scaling.sh OUT_DIR [lm|vision|resume]...     (default: all three)
# lm:     the ~370M LM on 1 GPU, DDP and FSDP on 2 (global batch 16 to compare losses, 16 per GPU for scaling)
# vision: hgrn2_vit_tiny with repeated augmentation on 1 and 2 GPUs (generated 224 px shapes: no ImageNet here),
#         with a check of the two ranks' draws (benchmarks/shards.py)
# resume: a DDP checkpoint from 2 GPUs resumed on 1 GPU (2 accumulated batches: the same global batch) and on 2;
#         the losses after resuming must agree between the two
set -euo pipefail
out=${1:?usage: benchmarks/scaling.sh OUT_DIR [lm|vision|resume]...}
shift
parts=${*:-lm vision resume}
steps=50
# A short warmup, so the first 50 steps' losses fall and compare something.
warm="--model.init_args.optim.warmup_steps 10"
ddp="--trainer.devices 2 --trainer.strategy ddp"
fsdp="--trainer.devices 2 --trainer.strategy fsdp"

for part in $parts; do
  case $part in
  lm)
    python3 benchmarks/train.py --steps $steps --out "$out" --tag=-scaling \
      --run "1gpu=$warm --trainer.devices 1" \
      --run "ddp2-global16=$warm $ddp --data.init_args.batch_size 8" \
      --run "ddp2=$warm $ddp" \
      --run "fsdp2-global16=$warm $fsdp --data.init_args.batch_size 8" \
      --run "fsdp2=$warm $fsdp"
    ;;
  vision)
    shapes="--data.class_path datamodules.ShapesDataModule --data.init_args.root /tmp/shapes \
      --data.init_args.image_size 224 --data.init_args.train_per_class 200 --data.init_args.val_per_class 2 \
      --data.init_args.num_workers 14 --trainer.max_epochs -1"
    # The 2-GPU run also records each rank's draws: every image drawn 3 times over both ranks, never more.
    record="--trainer.callbacks+=benchmarks.shards.RecordShards --trainer.callbacks.path $out/shards-vit_tiny-ddp2.json"
    python3 benchmarks/train.py --config configs/imagenet/hgrn2_vit_tiny.yaml --steps $steps --out "$out" \
      --tag=-vision-scaling --run "vit_tiny-1gpu=$shapes --trainer.devices 1" --run "vit_tiny-ddp2=$shapes $ddp $record"
    python3 -c "import json, sys; r = json.load(open(sys.argv[1])); r.pop('draws'); print(r)" "$out/shards-vit_tiny-ddp2.json"
    ;;
  resume)
    # Resumed in place (ModelCheckpoint keeps last.ckpt only in the folder it wrote it in); the step-20
    # checkpoint is put back before the second resume.
    run="$out/resume/run"
    lm="python3 -m hgrn2_lightning fit --config configs/lm/hgrn2_370m.yaml --data.init_args.source runs/bench-tokens \
      --trainer.limit_val_batches 0 --trainer.logger false --config $out/resume/checkpoints.yaml $warm"
    mkdir -p "$out/resume"
    printf 'trainer:\n  default_root_dir: %s\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args: {dirpath: %s/checkpoints, save_last: true, every_n_train_steps: 10}\n' \
      "$run" "$run" > "$out/resume/checkpoints.yaml"
    python3 -c "import sys; sys.path[:0] = ['benchmarks']; from train import make_token_folder, Path; make_token_folder(Path('runs/bench-tokens'))"
    $lm $ddp --trainer.max_steps 20
    cp "$run/throughput.json" "$out/resume/ddp2.json"
    cp "$run/checkpoints/last.ckpt" "$out/resume/step20.ckpt"
    $lm --trainer.devices 1 --trainer.accumulate_grad_batches 2 --trainer.max_steps 30 --ckpt_path last
    cp "$run/throughput.json" "$out/resume/from-ddp2-on-1gpu.json"
    cp "$run/checkpoints/last.ckpt" "$out/resume/from-ddp2-on-1gpu.ckpt"
    cp "$out/resume/step20.ckpt" "$run/checkpoints/last.ckpt"
    $lm $ddp --trainer.max_steps 30 --ckpt_path last
    cp "$run/throughput.json" "$out/resume/from-ddp2-on-ddp2.json"
    cp "$run/checkpoints/last.ckpt" "$out/resume/from-ddp2-on-ddp2.ckpt"
    python3 - "$out/resume" <<'EOF'
import json, sys
from pathlib import Path
import torch
root = Path(sys.argv[1])
report = {}
for run, checkpoint in (("ddp2", "step20"), ("from-ddp2-on-1gpu", None), ("from-ddp2-on-ddp2", None)):
    state = torch.load(root / f"{checkpoint or run}.ckpt", weights_only=False, map_location="cpu")
    losses = json.loads((root / f"{run}.json").read_text())["losses"]
    report[run] = {"global_step": state["global_step"], "losses": losses}
    print(run, "step", state["global_step"], "losses", " ".join(f"{x:.4f}" for x in losses))
one, two = report["from-ddp2-on-1gpu"]["losses"], report["from-ddp2-on-ddp2"]["losses"]
assert len(one) == len(two), f"{len(one)} and {len(two)} step losses: the runs did not take the same steps"
report["max_relative_difference_after_resume"] = max(abs(a - b) / abs(b) for a, b in zip(one, two))
print("resumed on 1 GPU vs on 2: max relative loss difference", report["max_relative_difference_after_resume"])
(root / "resume.json").write_text(json.dumps(report, indent=2) + "\n")
EOF
    ;;
  *) echo "unknown part $part: choose lm, vision or resume" >&2; exit 2 ;;
  esac
done
