"""The `hgrn2` command end to end on CPU: configs, fit, resume, generate, DDP, and the errors users meet."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from hgrn2_lightning.checkpoint import AtomicCheckpointIO
from hgrn2_lightning.cli import main
from hgrn2_lightning.throughput import process_start_time

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


class StopAtStep(L.Callback):
    """Ends fit after `step` optimizer steps, as an interrupted run would (its last checkpoint stays)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def tiny_lm_config(tmp_path: Path, corpus: str, max_steps: int = 8, dropout: float = 0.1, stop_at: int | None = None):
    """The demo config, shrunk to seconds: same classes, same keys."""
    config = yaml.safe_load((ROOT / "configs/lm/demo.yaml").read_text())
    run = tmp_path / "run"
    trainer = config["trainer"]
    trainer.update(
        max_steps=max_steps, val_check_interval=4, limit_val_batches=2, num_sanity_val_steps=0,
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run),
    )
    trainer["logger"]["init_args"]["save_dir"] = str(run)
    trainer["callbacks"][0]["init_args"].update(dirpath=str(run / "checkpoints"), every_n_train_steps=4)
    if stop_at:
        trainer["callbacks"].append({"class_path": "tests.test_cli.StopAtStep", "init_args": {"step": stop_at}})
    model = config["model"]["init_args"]
    model["backbone"] = dict(d_model=32, n_layers=2, expand_ratio=8, dropout=dropout)
    model["optim"]["warmup_steps"] = 2
    config["data"]["init_args"].update(source=corpus, seq_len=32, batch_size=4)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"config-{stop_at or max_steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, run


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"def function_{n}(x):\n    return x * {n} + {n % 7}\n\n" for n in range(400)))
    return str(path)


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_every_config_parses_and_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


def test_printed_config_runs_as_written(tmp_path, corpus, capsys):
    config, run = tiny_lm_config(tmp_path, corpus, max_steps=2)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    main(["fit", "--config", str(printed)])
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_fit_validate_test_predict_and_generate(tmp_path, corpus, capsys):
    config, run = tiny_lm_config(tmp_path, corpus)
    with pytest.raises(SystemExit, match=r"^error: test --ckpt_path last: no last checkpoint in \[.*checkpoints'\]"):
        main(["test", "--config", str(config), "--ckpt_path", "last"])  # before any fit: not the untrained weights
    with pytest.warns(UserWarning, match="test without --ckpt_path runs the model's freshly initialised weights"):
        main(["test", "--config", str(config)])
    main(["fit", "--config", str(config)])
    checkpoint = run / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == 8 and "rng_states" in state
    assert list(run.glob("tensorboard/events.out.tfevents.*"))
    for command in ("validate", "test", "predict"):
        main([command, "--config", str(config), "--ckpt_path", str(checkpoint)])
    written = capsys.readouterr().out.rsplit(" written to ", 1)[-1].strip()
    predictions = torch.load(written)
    # the per-token loss (nats) of every test sequence of 32 tokens: finite, and below a uniform guess over bytes
    assert predictions["split"] == "test" and predictions["predictions"].shape[1] == 32
    assert torch.isfinite(predictions["predictions"]).all()
    assert 0 < predictions["predictions"].mean() < math.log(256)
    main(["generate", "--ckpt_path", str(checkpoint), "--prompt", "def ", "--max_new_tokens", "20", "--seed", "1"])
    first = capsys.readouterr().out
    main(["generate", "--ckpt_path", str(checkpoint), "--prompt", "def ", "--max_new_tokens", "20", "--seed", "1"])
    assert first.startswith("def ") and capsys.readouterr().out == first


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, corpus):
    """Same data order, optimizer and scheduler state, step count and dropout stream after --ckpt_path last."""
    straight, straight_run = tiny_lm_config(tmp_path / "a", corpus)
    main(["fit", "--config", str(straight)])
    interrupted, run = tiny_lm_config(tmp_path / "b", corpus, stop_at=4)
    main(["fit", "--config", str(interrupted)])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    resumed, _ = tiny_lm_config(tmp_path / "b", corpus)
    main(["fit", "--config", str(resumed), "--ckpt_path", "last"])
    a = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert b["global_step"] == a["global_step"] == 8
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    assert b["lr_schedulers"][0]["last_epoch"] == a["lr_schedulers"][0]["last_epoch"]


def test_two_process_ddp_on_cpu(tmp_path, corpus):
    config, run = tiny_lm_config(tmp_path, corpus, max_steps=4)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "hgrn2_lightning", "fit", "--config", str(config),
         "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr + result.stdout
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_unknown_config_key_is_named(tmp_path, corpus, capsys):
    config, _ = tiny_lm_config(tmp_path, corpus)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.init_args.backbone.d_modle", "64"])
    assert "d_modle" in capsys.readouterr().err


def test_a_mistyped_key_is_a_short_error_naming_it_not_the_usage(tmp_path, corpus, capsys):
    """jsonargparse prints a parser's whole usage (for fit every Trainer flag, some 50 lines) above a parse error;
    the CLI prints the error, naming the key (a model's on one line), and where the options are listed."""
    config, _ = tiny_lm_config(tmp_path, corpus)
    trainer_typo, model_typo = tmp_path / "trainer-typo.yaml", tmp_path / "model-typo.yaml"
    trainer_typo.write_text(config.read_text().replace("max_steps:", "max_step:"))
    model_typo.write_text(config.read_text().replace("d_model:", "d_modle:"))
    for args, error, command in (
        (["fit", "--config", str(config), "--trainer.max_epoch", "3"], "unrecognized arguments: --trainer.max_epoch 3",
         "hgrn2 fit"),
        (["fit", "--config", str(trainer_typo)], "does not accept option 'trainer.max_step'", "hgrn2 fit"),
        (["fit", "--config", str(model_typo)], "Group 'backbone' does not accept option 'd_modle'", "hgrn2 fit"),
        (["test", "--config", str(config), "--model.init_args.backbone.d_modle", "8"], "--backbone.d_modle=8",
         "hgrn2 test"),
        (["generate", "--ckpt_patth", "x"], "unrecognized arguments: --ckpt_patth x", "hgrn2 generate"),
        (["lra", "make-listops", "--outt", "x"], "unrecognized arguments: --outt x", "hgrn2 lra make-listops"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, args
        assert err.startswith("error: ") and error in err, err
        assert err.splitlines()[1:] == [f"(`{command} --help` lists the options)"], err
    with pytest.raises(SystemExit) as exit_info:  # --help is still the whole help
        main(["fit", "--help"])
    assert exit_info.value.code == 0 and "--trainer.max_epochs" in capsys.readouterr().out


def test_a_refused_config_value_is_its_own_message_not_jsonargparse_dump(tmp_path, corpus):
    """jsonargparse reports a class that refused its config with the whole config and a traceback; the CLI stops
    with the class's own message instead."""
    config, _ = tiny_lm_config(tmp_path, corpus)
    with pytest.raises(SystemExit, match=r"^error: optim.lr must be positive, got -1.0$"):
        main(["fit", "--config", str(config), "--model.init_args.optim.lr", "-1"])
    with pytest.raises(SystemExit, match=r"^error: backbone sizes must be positive, got .*'expand_ratio': 0"):
        main(["fit", "--config", str(config), "--model.init_args.backbone.expand_ratio", "0"])


def test_missing_corpus_is_named_without_a_traceback_unless_asked(tmp_path, monkeypatch):
    config, _ = tiny_lm_config(tmp_path, str(tmp_path / "missing/*.txt"))
    hint = r"\n\(HGRN2_TRACEBACK=1 shows where it was raised\)$"
    with pytest.raises(SystemExit, match=r"^error: .*matches no file.*" + hint):
        main(["fit", "--config", str(config)])
    monkeypatch.setenv("HGRN2_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        main(["fit", "--config", str(config)])


def test_nan_loss_stops_with_advice(tmp_path, corpus):
    config, _ = tiny_lm_config(tmp_path, corpus)
    with pytest.raises(SystemExit, match="^error: .*lower model.optim.lr"):
        main(["fit", "--config", str(config), "--model.init_args.optim.lr", "1e30", "--trainer.gradient_clip_val", "0"])


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def torn_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_every_fit_reports_throughput_and_the_true_loss_under_accumulation(tmp_path, corpus):
    """The CLI's ThroughputMonitor writes throughput.json. With 2 accumulated micro-batches Lightning hands
    the monitor each loss halved; the recorded loss of a step is the mean of its micro-batches' own. The first
    step's time counts from the process's start (here pytest's: so it is bounded by the run so far, not a
    constant)."""
    config, run = tiny_lm_config(tmp_path, corpus, max_steps=3, dropout=0.0)
    before_fit = time.time() - process_start_time()
    main(["fit", "--config", str(config), "--trainer.accumulate_grad_batches", "2"])
    summary = json.loads(next(run.rglob("throughput.json")).read_text())
    assert summary["unit"] == "tokens" and summary["per_s"] > 0
    assert before_fit < summary["first_step_s"] < time.time() - process_start_time()
    assert len(summary["losses"]) == 3 and summary["world_size"] == 1
    # A freshly initialised model predicts nearly uniformly over the 257 byte tokens.
    assert summary["losses"][0] == pytest.approx(math.log(257), abs=0.3)


def test_training_benchmark_runs_its_cpu_smoke_path(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/train.py", "--smoke", "--steps", "3", "--out", str(tmp_path),
         "--data", str(tmp_path / "tokens")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "train-cpu.json").read_text())
    first, again = summary["ours"]
    assert first["per_s"] > 0 and len(first["losses"]) == 3
    # The same config, data and seed train alike: the comparison the fast and plain scans are held to.
    (agreement,) = summary["loss_agreement"]
    assert agreement["steps"] == 3 and agreement["max_relative"] < 1e-6, agreement
    assert json.loads((tmp_path / "tokens" / "meta.json").read_text())["dtype"] == "uint16"


@pytest.mark.parametrize("option", ["chunked_loss", "compile_blocks", "activation_checkpointing",
                                    "recompute_scan_states"])
def test_speed_options_train_like_the_plain_model(tmp_path, corpus, option, compile_through_aot_eager):
    """model.chunked_loss, compile_blocks, activation_checkpointing and recompute_scan_states change how the
    step is computed, not what is learned (nor the checkpoint's parameter names). With dropout: a recomputed
    block draws the same dropout masks as its forward did. (On the CPU the scan is PyTorch's, for which
    recompute_scan_states changes nothing; tests/kernels covers it with the Triton kernels.) Compiled blocks
    run through aot_eager (`compile_through_aot_eager`)."""
    runs = {}
    dropout = 0.1 if option == "activation_checkpointing" else 0.0
    for enabled in (False, True):
        config, run = tiny_lm_config(tmp_path / str(enabled), corpus, max_steps=4, dropout=dropout)
        torch._dynamo.utils.counters.clear()
        main(["fit", "--config", str(config), f"--model.init_args.{option}", str(enabled).lower()])
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
        runs[enabled] = checkpoint["state_dict"]
    # How the run was computed is not part of the model a checkpoint describes (the loss is: it trains alike).
    assert (option in checkpoint["hyper_parameters"]) == (option == "chunked_loss")
    if option == "compile_blocks":  # it did compile, and whole blocks: no graph breaks
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
        assert not torch._dynamo.utils.counters["graph_break"]
    assert runs[True].keys() == runs[False].keys()
    for name, tensor in runs[False].items():
        torch.testing.assert_close(runs[True][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_an_error_in_a_dataloader_worker_is_the_workers_own_message():
    """torch re-raises a worker's error with the worker's traceback as its message; the CLI keeps the last line."""
    from torch._utils import ExceptionWrapper

    from hgrn2_lightning.cli import _own_message

    try:
        raise ValueError("cannot read image a.jpg: truncated. Replace or delete the file")
    except ValueError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ValueError) as raised:
        wrapper.reraise()
    assert "Original Traceback" in str(raised.value)
    assert _own_message(raised.value) == "cannot read image a.jpg: truncated. Replace or delete the file"


def test_trainer_flags_the_machine_cannot_meet_stop_with_lightnings_message(tmp_path, corpus):
    config, _ = tiny_lm_config(tmp_path, corpus)
    with pytest.raises(SystemExit, match=r"^error: .*(gpu|GPU|cuda|CUDA)"):
        main(["fit", "--config", str(config), "--trainer.accelerator", "gpu", "--trainer.devices", "8"])


def test_an_abbreviated_option_is_refused_not_taken_for_the_full_one(tmp_path, corpus, capsys):
    config, _ = tiny_lm_config(tmp_path, corpus)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--trainer.max_step", "1"])
    assert "unrecognized arguments: --trainer.max_step 1" in capsys.readouterr().err
