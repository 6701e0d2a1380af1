"""The HGRN2 patch classifier and its LightningModule: geometry, non-causal mixing, Mixup, the recipe, the CLI."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from datamodules.images import ImageNetDataModule, ShapesDataModule
from hgrn2_lightning.cli import main
from hgrn2_lightning.model import HGRN2Config
from hgrn2_lightning.optim import OptimConfig
from hgrn2_lightning.vision import ImageClassifier, MixupConfig, PatchClassifier, soft_target_cross_entropy

ROOT = Path(__file__).resolve().parents[2]
NO_MIXUP = MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0)


def backbone(direction: str = "bidirectional", **kwargs) -> HGRN2Config:
    grid = (4, 4) if direction == "2d" else None
    return HGRN2Config(**{"d_model": 32, "n_layers": 2, "expand_ratio": 8, "direction": direction, "grid": grid,
                          **kwargs})


def test_patchify_cuts_row_major_patches_flattened_row_column_channel():
    model = PatchClassifier(backbone(), num_classes=3, image_size=8, patch_size=4)
    images = torch.randn(2, 3, 8, 8)
    patches = model.patchify(images)
    assert patches.shape == (2, 4, 4 * 4 * 3)
    for index, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        block = images[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]  # [B, C, p, p]
        torch.testing.assert_close(patches[:, index], block.permute(0, 2, 3, 1).reshape(2, -1))


@pytest.mark.parametrize("direction", ["bidirectional", "2d"])
def test_classifier_mean_pools_the_patch_features(direction):
    torch.manual_seed(0)
    model = PatchClassifier(backbone(direction), num_classes=5, image_size=16, patch_size=4).eval()
    images = torch.randn(3, 3, 16, 16)
    logits = model(images)
    assert logits.shape == (3, 5)
    features = model.features(images)
    assert features.shape == (3, 16, 32)
    torch.testing.assert_close(logits, model.head(model.head_norm(features.mean(dim=1))))
    assert not torch.allclose(logits, model.head(model.head_norm(features[:, -1])))


@pytest.mark.parametrize("direction", ["bidirectional", "2d"])
def test_every_patch_sees_the_whole_image(direction):
    """Non-causal: the last patch changes the first patch's features, and the first the last's."""
    torch.manual_seed(0)
    model = PatchClassifier(backbone(direction), num_classes=3, image_size=16, patch_size=4).eval()
    images = torch.randn(1, 3, 16, 16)
    last, first = images.clone(), images.clone()
    last[..., 12:, 12:] += 1.0
    first[..., :4, :4] += 1.0
    base, with_last, with_first = (model.features(x)[0] for x in (images, last, first))
    assert (with_last[0] - base[0]).abs().max() > 1e-3
    assert (with_first[-1] - base[-1]).abs().max() > 1e-3


def test_bad_geometry_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        PatchClassifier(backbone(), 3, image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="non-causal backbone"):
        PatchClassifier(backbone("causal"), 3, image_size=16, patch_size=4)
    with pytest.raises(ValueError, match=r"set backbone.grid \[2, 2\]"):
        PatchClassifier(backbone("2d"), 3, image_size=16, patch_size=8)
    model = PatchClassifier(backbone(), 3, image_size=16, patch_size=4)
    with pytest.raises(ValueError, match="make data.image_size and model.init_args.image_size agree"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="num_classes is None"):
        ImageClassifier(backbone(), num_classes=None)


def test_mixup_makes_convex_images_and_targets_that_sum_to_one():
    module = ImageClassifier(backbone(), num_classes=4, image_size=16, patch_size=4, label_smoothing=0.0,
                             mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0))
    np.random.seed(3)
    images, labels = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 1, 2])
    mixed, targets = module.mixup(images.clone(), labels)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    lam = targets[0, 0].item()  # sample 0 (class 0) is mixed with the reversed batch's sample 0 (class 2)
    assert 0 < lam < 1 and targets[0, 2].item() == pytest.approx(1 - lam)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))


def test_cutmix_pastes_a_box_and_smooths_the_targets():
    module = ImageClassifier(backbone(), num_classes=4, image_size=16, patch_size=4, label_smoothing=0.1,
                             mixup=MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0))
    np.random.seed(0)
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    mixed, targets = module.mixup(images.clone(), labels)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
    assert targets.min() >= 0.1 / 4 - 1e-6
    pasted = (mixed != images).any(dim=1)[0]  # pixels of image 0 taken from image 3
    assert torch.equal(mixed[0][:, pasted], images[3][:, pasted])
    pasted_fraction = pasted.float().mean().item()
    assert 0 < pasted_fraction < 1
    # The targets weigh the two classes by the pasted area (then smoothing shares 0.1 over 4 classes).
    assert targets[0, 3].item() == pytest.approx(pasted_fraction * 0.9 + 0.025, abs=1e-5)


def test_soft_target_loss_is_cross_entropy_for_smoothed_one_hot_targets():
    logits, labels = torch.randn(5, 7), torch.randint(0, 7, (5,))
    targets = F.one_hot(labels, 7) * 0.9 + 0.1 / 7
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, targets), F.cross_entropy(logits, labels, label_smoothing=0.1)
    )


def test_mixup_refuses_an_odd_batch():
    module = ImageClassifier(backbone(), num_classes=4, image_size=16, patch_size=4)
    with pytest.raises(ValueError, match="even batch size, got 3"):
        module.training_step((torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 2])), 0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The generated task at its smallest: 16 px, 8 training and 2 validation images per shape."""
    return tmp_path_factory.mktemp("shapes")


def tiny_shapes(root, **kwargs) -> ShapesDataModule:
    return ShapesDataModule(root=str(root), image_size=16, train_per_class=8, val_per_class=2, batch_size=12, **kwargs)


def test_data_that_does_not_fit_the_head_is_refused(shapes, tmp_path):
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, use_distributed_sampler=False)
    module = ImageClassifier(backbone(), num_classes=4, image_size=16, patch_size=4)
    with pytest.raises(ValueError, match=r"the data has 6 classes but the classifier head has 4"):
        trainer.fit(module, tiny_shapes(shapes))
    module = ImageClassifier(backbone(), num_classes=6, image_size=32, patch_size=4)
    with pytest.raises(ValueError, match=r"data.image_size is 16 but the model takes 32 px"):
        trainer.fit(module, tiny_shapes(shapes))


def test_a_checkpoint_of_another_class_count_is_refused_with_both_counts():
    """The CLI sizes the head by the data's classes: a checkpoint trained on another class set would otherwise stop
    on a state_dict size mismatch from inside torch."""
    trained = ImageClassifier(backbone(), num_classes=3, image_size=16, patch_size=4)
    checkpoint = {"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}
    module = ImageClassifier(backbone(), num_classes=4, image_size=16, patch_size=4)
    with pytest.raises(ValueError, match=r"checkpoint's classifier has 3 classes but the data has 4"):
        module.on_load_checkpoint(checkpoint)
    trained.on_load_checkpoint(checkpoint)  # the same class count loads as before


def test_a_checkpoint_of_other_class_names_is_refused_by_the_data(shapes, tmp_path):
    """The same class count with other names (label n would be another class) passes the model's check; the
    DataModule's state in the checkpoint catches it when Lightning restores it for evaluation (the same DataModule
    class on another root: Lightning files the state under the class name)."""
    folders = lambda root: ImageNetDataModule(str(root), image_size=16, batch_size=4, repeated_augmentation=1,
                                              num_workers=0)
    data = folders(tiny_shapes(shapes).root)  # the generated class-folder layout
    model = ImageClassifier(backbone(), num_classes=data.num_classes, image_size=16, patch_size=4)
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, enable_checkpointing=False, **quiet)
    trainer.fit(model, data)
    checkpoint = tmp_path / "shapes.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert torch.load(checkpoint, weights_only=False)["ImageNetDataModule"] == {"classes": data.classes}
    renamed = tmp_path / "renamed"
    shutil.copytree(data.root, renamed)
    for split in ("train", "val"):  # one class renamed: its label moves to the end of the sorted names
        (renamed / split / data.classes[0]).rename(renamed / split / "zigzag")
    other = folders(renamed)
    assert other.num_classes == data.num_classes
    with pytest.raises(ValueError, match=f"label 0 is {data.classes[0]!r} there and {data.classes[1]!r} here"):
        L.Trainer(**quiet).validate(model, datamodule=other, ckpt_path=checkpoint, weights_only=False)
    L.Trainer(limit_val_batches=1, **quiet).validate(model, datamodule=data, ckpt_path=checkpoint, weights_only=False)


def test_learning_rate_scales_with_the_global_batch_and_warmup_counts_epochs(shapes, tmp_path):
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    module = ImageClassifier(backbone(), num_classes=6, image_size=16, patch_size=4, mixup=NO_MIXUP,
                             warmup_epochs=2, lr_reference_batch=4)
    trainer.fit(module, tiny_shapes(shapes))
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(module.optim.lr * 12 / 4)
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    steps_per_epoch = 48 // 12
    assert factor(steps_per_epoch) == pytest.approx(0.5, abs=0.01)  # halfway through 2 epochs of warmup
    assert factor(2 * steps_per_epoch) == pytest.approx(1.0)
    module = ImageClassifier(backbone(), num_classes=6, image_size=16, patch_size=4, mixup=NO_MIXUP,
                             optim=OptimConfig(lr=1e-3, min_lr=5e-4), lr_reference_batch=1024)
    with pytest.raises(ValueError, match=r"scaled to the global batch, 0.001 x 12 / 1024 = 1.17e-05, is below "
                                         r"optim.min_lr \(0.0005\)"):
        trainer.fit(module, tiny_shapes(shapes))


class RecordLosses(L.Callback):
    """Writes the training losses of a run to a JSON file."""

    def __init__(self, path: str):
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(self.losses))


def tiny_demo_config(tmp_path: Path, shapes: Path, max_steps: int, callbacks=()) -> tuple[Path, Path]:
    """configs/imagenet/demo.yaml, shrunk to seconds: same classes, same keys."""
    config = yaml.safe_load((ROOT / "configs/imagenet/demo.yaml").read_text())
    run = tmp_path / "run"
    trainer = config["trainer"]
    trainer.pop("max_epochs")
    trainer.update(max_steps=max_steps, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, default_root_dir=str(run))
    trainer["logger"]["init_args"]["save_dir"] = str(run)
    trainer["callbacks"][0]["init_args"]["dirpath"] = str(run / "checkpoints")
    trainer["callbacks"] += list(callbacks)
    model = config["model"]["init_args"]
    model.update(image_size=16, patch_size=4, warmup_epochs=0.5)
    model["backbone"].update(d_model=32, n_layers=2, expand_ratio=8, mlp_hidden=64)
    config["data"]["init_args"].update(root=str(shapes), image_size=16, train_per_class=8, val_per_class=2,
                                       batch_size=12)
    path = tmp_path / f"config-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, run


def test_demo_config_learns_through_the_cli_and_resumes(shapes, tmp_path):
    losses = tmp_path / "losses.json"
    record = {"class_path": "tests.model.test_vision.RecordLosses", "init_args": {"path": str(losses)}}
    config, run = tiny_demo_config(tmp_path, shapes, max_steps=40, callbacks=[record])
    main(["fit", "--config", str(config)])
    history = json.loads(losses.read_text())
    assert len(history) == 40
    assert np.mean(history[:4]) == pytest.approx(np.log(6), abs=0.1)  # chance among 6 shapes
    assert np.mean(history[-8:]) < np.mean(history[:4]) - 0.1
    checkpoint = run / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == 40 and "rng_states" in state
    assert list(run.glob("tensorboard/events.out.tfevents.*"))
    longer, _ = tiny_demo_config(tmp_path, shapes, max_steps=44)
    main(["fit", "--config", str(longer), "--ckpt_path", "last"])
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 44
    main(["validate", "--config", str(longer), "--ckpt_path", str(checkpoint)])


def test_deit_recipe_with_ema_runs_through_the_cli(shapes, tmp_path):
    """Mixup + CutMix, RandAugment, random erasing, repeated augmentation and EMA weights together."""
    ema = {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}}
    config, run = tiny_demo_config(tmp_path, shapes, max_steps=3, callbacks=[ema])
    main(["fit", "--config", str(config), "--model.init_args.mixup.mixup_alpha", "0.8",
          "--model.init_args.mixup.cutmix_alpha", "1.0", "--model.init_args.label_smoothing", "0.1",
          "--data.init_args.augment.auto_augment", "rand-m9-mstd0.5-inc1", "--data.init_args.augment.random_erasing",
          "0.25", "--data.init_args.repeated_augmentation", "3", "--trainer.limit_val_batches", "1"])
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3
    averaged, current = state["state_dict"], state["current_model_state"]
    name = "model.head.weight"
    assert not torch.equal(averaged[name], current[name])  # the checkpoint holds the EMA weights


def test_two_process_ddp_with_repeated_augmentation(shapes, tmp_path):
    """Two gloo ranks, repeated augmentation x3: every image of the epoch is drawn 3 times over the two
    ranks together, never more (the ranks do not repeat each other's draws), each copy augmented anew."""
    shards = tmp_path / "shards.json"
    record = {"class_path": "benchmarks.shards.RecordShards", "init_args": {"path": str(shards)}}
    config, run = tiny_demo_config(tmp_path, shapes, max_steps=6, callbacks=[record])
    result = subprocess.run(
        [sys.executable, "-m", "hgrn2_lightning", "fit", "--config", str(config), "--trainer.strategy", "ddp",
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data.init_args.repeated_augmentation", "3",
         "--model.init_args.mixup.mixup_alpha", "0.8", "--trainer.limit_val_batches", "1"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr + result.stdout
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    report = json.loads(shards.read_text())
    assert report["ranks"] == 2 and report["repeats"] == 3 and report["steps_per_rank"] == [6]
    assert report["disjoint"], report["problems"]
    rank0, rank1 = ([i for draw in draws for i in draw["indices"]] for draws in report["draws"])
    assert rank0 != rank1 and len(rank0) == len(rank1) == 6 * 12


def test_shard_check_catches_ranks_that_draw_the_same_shard():
    from benchmarks.shards import check_shards

    stream = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # three copies of each image, dealt to two ranks in turn
    rank0, rank1 = stream[0::2], stream[1::2]
    assert check_shards([[{"epoch": 0, "indices": rank0}], [{"epoch": 0, "indices": rank1}]], 3)["disjoint"]
    assert not check_shards([[{"epoch": 0, "indices": rank0}], [{"epoch": 0, "indices": rank0}]], 3)["disjoint"]


def test_benchmark_script_runs_its_cpu_smoke_path(capsys):
    namespace = runpy.run_path(str(ROOT / "benchmarks/vision.py"))
    results = namespace["main"](["--smoke"])
    names = {row["model"] for row in results["models"]}
    assert {"hgrn2_vit_tiny", "hgrn2_vit_small", "deit_tiny_patch16_224"} <= names
    assert all(row["images_per_s"] > 0 for row in results["models"])


def test_compiled_blocks_compute_the_same_and_share_one_graph_across_drop_path_rates(compile_through_aot_eager):
    """compile_blocks: the same outputs and gradients as eager (drop path off), and with drop path on, the
    blocks of different rates share one graph (the first block, whose rate is 0, has its own), with no break
    (through aot_eager: `compile_through_aot_eager`)."""
    images = torch.randn(4, 3, 16, 16)
    results = []
    for compile_blocks in (False, True):
        torch.manual_seed(0)
        module = ImageClassifier(backbone(n_layers=2), num_classes=6, image_size=16, patch_size=4,
                                 compile_blocks=compile_blocks)
        logits = module(images)
        results.append([logits, *torch.autograd.grad(logits.square().sum(), list(module.parameters()))])
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert "compile_blocks" not in module.hparams

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    module = ImageClassifier(backbone(n_layers=4, drop_path=0.3), num_classes=6, image_size=16, patch_size=4,
                             compile_blocks=True)
    module(images).sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert not torch._dynamo.utils.counters["graph_break"]
