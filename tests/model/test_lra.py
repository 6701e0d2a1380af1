"""The LRA models: padding never reaches the result, retrieval features, pixel inputs, and a ListOps run
through the CLI end to end."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hgrn2_lightning.cli import main
from hgrn2_lightning.lra import LRAModel, SequenceClassifier, masked_mean, pair_features, sinusoidal_positions
from hgrn2_lightning.model import HGRN2Config

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 20


def token_model(norm: str = "batchnorm", paired: bool = False, seed: int = 0, **overrides) -> LRAModel:
    torch.manual_seed(seed)
    config = HGRN2Config(d_model=16, n_layers=3, expand_ratio=4, mlp_hidden=16, norm=norm, direction="bidirectional",
                         **overrides)
    model = LRAModel(config, num_classes=10, vocab_size=VOCAB, paired=paired, positions=True)
    with torch.no_grad():  # spread the lower bounds and the batch norm statistics away from their defaults
        model.encoder.backbone.lower_bound_logits.normal_(0, 1.0)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def padded(tokens: torch.Tensor, length: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """tokens [n] padded to `length` with zeros, or with the given junk."""
    out = torch.zeros(length, dtype=torch.int64) if fill is None else fill[:length].clone()
    out[: len(tokens)] = tokens
    return out


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "rmsnorm"])
def test_padding_never_changes_the_logits(norm):
    """The same sequence, alone, in a batch with others, padded to other lengths with other junk: same logits."""
    model = token_model(norm)
    torch.manual_seed(1)
    sequence = torch.randint(1, VOCAB, (13,))
    alone = model(padded(sequence, 13)[None], torch.tensor([13]))
    junk = torch.randint(0, VOCAB, (64,))
    for length in (16, 40, 64):
        batch = torch.stack([padded(sequence, length, junk), torch.randint(0, VOCAB, (length,))])
        logits = model(batch, torch.tensor([13, length]))
        torch.testing.assert_close(logits[0], alone[0], rtol=1e-5, atol=1e-5)
    # The test can fail: the same padded batch without the mask lets the reverse scans read the padding.
    x = model.encoder.embed(batch) + sinusoidal_positions(64, 16)
    unmasked = masked_mean(model.encoder.backbone(x), torch.tensor([13, 64]))
    assert not torch.allclose(model.head(unmasked)[0], alone[0], rtol=1e-3, atol=1e-3)


def test_padding_never_changes_the_logits_in_training_without_batch_statistics():
    model = token_model("layernorm").train()
    sequence = torch.randint(1, VOCAB, (9,))
    lengths = torch.tensor([9])
    with torch.no_grad():
        clean = model(padded(sequence, 32)[None], lengths)
        dirty = model(padded(sequence, 32, torch.randint(1, VOCAB, (32,)))[None], lengths)
    torch.testing.assert_close(dirty, clean, rtol=1e-5, atol=1e-5)


def test_mean_pooling_covers_exactly_the_real_positions():
    x = torch.randn(3, 7, 4)
    lengths = torch.tensor([7, 1, 4])
    pooled = masked_mean(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(pooled[b], x[b, :n].mean(0))


def test_sinusoidal_positions():
    pe = sinusoidal_positions(50, 8)
    assert pe.shape == (50, 8)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0] * 4))
    angle = 7 / 10000 ** (2 / 8)
    torch.testing.assert_close(pe[7, 2:4], torch.tensor([math.sin(angle), math.cos(angle)]))


def test_retrieval_encodes_each_document_on_its_own():
    model = token_model(paired=True)
    torch.manual_seed(2)
    a, b, c = (torch.randint(1, VOCAB, (n,)) for n in (11, 17, 5))
    pair = lambda x, y: torch.stack([padded(x, 24), padded(y, 24)])[None]
    lengths = lambda x, y: torch.tensor([[len(x), len(y)]])
    encode = lambda x: model.encoder(padded(x, 24)[None], torch.tensor([len(x)]))[0]
    u, v = encode(a), encode(b)
    torch.testing.assert_close(model(pair(a, b), lengths(a, b))[0], model.head(u[None], v[None])[0])
    # a's features do not depend on its partner, and swapping the documents swaps u and v, negates u - v
    with torch.no_grad():
        features = model.encoder(torch.stack([padded(a, 24), padded(c, 24)]), torch.tensor([11, 5]))
    torch.testing.assert_close(features[0], u, rtol=1e-5, atol=1e-5)
    swapped, straight = pair_features(v[None], u[None])[0], pair_features(u[None], v[None])[0]
    d = u.shape[0]
    torch.testing.assert_close(swapped[: 2 * d], torch.cat([v, u]))
    torch.testing.assert_close(swapped[2 * d : 3 * d], -straight[2 * d : 3 * d])
    torch.testing.assert_close(swapped[3 * d :], straight[3 * d :])
    assert model.head.mlp[0].in_features == 4 * d and model.head.mlp[-1].out_features == 10


def test_retrieval_refuses_single_documents():
    model = token_model(paired=True)
    with pytest.raises(ValueError, match=r"pairs of documents \[B, 2, T\]"):
        model(torch.ones(2, 10, dtype=torch.int64), torch.tensor([10, 10]))


def test_pixel_model_with_2d_scans_sees_the_whole_image():
    torch.manual_seed(0)
    config = HGRN2Config(
        d_model=8, n_layers=2, expand_ratio=2, mlp_hidden=8, norm="batchnorm", direction="2d", grid=(4, 4)
    )
    model = LRAModel(config, num_classes=2, input_channels=1).eval()
    pixels = torch.randn(2, 16, 1)
    logits = model(pixels, torch.tensor([16, 16]))
    assert logits.shape == (2, 2)
    changed = pixels.clone()
    changed[:, 15] += 1.0  # the last pixel reaches the pooled features through the reverse scans
    assert not torch.allclose(model(changed, torch.tensor([16, 16])), logits)


def test_sync_batchnorm_conversion_keeps_the_model_working():
    """`--trainer.sync_batchnorm true` swaps every BatchNorm for a SyncBatchNorm; the outputs stay the same."""
    model = token_model("batchnorm")
    tokens, lengths = torch.randint(1, VOCAB, (2, 12)), torch.tensor([12, 7])
    before = model(tokens, lengths)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    torch.testing.assert_close(converted(tokens, lengths), before)


def test_bad_model_settings_are_named():
    config = HGRN2Config(d_model=8, n_layers=1, expand_ratio=2, direction="bidirectional")
    with pytest.raises(ValueError, match="num_classes is not set"):
        SequenceClassifier(config, vocab_size=10)
    with pytest.raises(ValueError, match="either vocab_size .* or input_channels"):
        SequenceClassifier(config, num_classes=2, vocab_size=10, input_channels=1)
    with pytest.raises(ValueError, match="either vocab_size .* or input_channels"):
        SequenceClassifier(config, num_classes=2)


def test_listops_fit_and_test_through_the_cli(tmp_path, capsys):
    """The demo config, shrunk to seconds: it generates its set, trains, resumes its checkpoint for test,
    and prints accuracy beside the majority-class rate."""
    config = yaml.safe_load((ROOT / "configs/lra/listops_demo.yaml").read_text())
    run = tmp_path / "run"
    config["trainer"].update(
        max_steps=6, val_check_interval=3, limit_val_batches=2, num_sanity_val_steps=0, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run),
    )
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    config["trainer"]["callbacks"][0]["init_args"].update(dirpath=str(run / "checkpoints"), every_n_train_steps=3)
    config["model"]["init_args"]["backbone"].update(d_model=16, n_layers=2)
    config["model"]["init_args"]["optim"]["warmup_steps"] = 2
    data = config["data"]["init_args"]
    data.update(root=str(tmp_path / "listops"), max_length=48, batch_size=8)
    data["generate"].update(num_train=48, num_val=16, num_test=16, min_length=5, max_length=40)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    assert "val accuracy: " in capsys.readouterr().out
    assert (tmp_path / "listops" / "basic_train.tsv").exists()
    main(["test", "--config", str(path), "--ckpt_path", "last"])
    printed = capsys.readouterr().out
    assert "test accuracy: " in printed and "majority class" in printed
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 6 and "rng_states" in state


def test_readme_listops_commands_read_the_folder_make_listops_writes():
    """The README's ListOps steps run in order as written: fit and test read (through --data.init_args.root or the
    config's default) the folder that make-listops writes."""
    readme = (ROOT / "README.md").read_text()
    written = re.search(r"hgrn2 lra make-listops --out (\S+)", readme).group(1)
    default = yaml.safe_load((ROOT / "configs/lra/listops.yaml").read_text())["data"]["init_args"]["root"]
    commands = re.findall(r"hgrn2 \w+ --config configs/lra/listops\.yaml[^\n#]*", readme)
    assert len(commands) >= 2
    for command in commands:
        given = re.search(r"--data\.init_args\.root (\S+)", command)
        assert (given.group(1) if given else default) == written, command


def test_2d_scans_must_match_the_data_grid():
    from types import SimpleNamespace

    config = HGRN2Config(d_model=8, n_layers=1, expand_ratio=2, direction="2d", grid=(4, 4))
    model = SequenceClassifier(config, num_classes=2, input_channels=1)
    model.trainer = SimpleNamespace(datamodule=SimpleNamespace(grid=(32, 32)))
    with pytest.raises(ValueError, match=r"set model.init_args.backbone.grid to \[32, 32\]"):
        model.setup("fit")
    model.trainer = SimpleNamespace(datamodule=SimpleNamespace(grid=None))
    with pytest.raises(ValueError, match='use direction "bidirectional"'):
        model.setup("fit")
    model.trainer = SimpleNamespace(datamodule=SimpleNamespace(grid=(4, 4)))
    model.setup("fit")


def test_compiled_blocks_compute_the_same_as_eager(compile_through_aot_eager):
    """compile_blocks: the same logits and gradients as eager, in training (batch statistics) on padded token
    sequences, each block one graph with no break (through aot_eager: `compile_through_aot_eager`)."""
    config = HGRN2Config(d_model=16, n_layers=2, expand_ratio=4, mlp_hidden=16, norm="batchnorm",
                         direction="bidirectional")
    torch.manual_seed(1)
    tokens, lengths = torch.randint(1, VOCAB, (3, 24)), torch.tensor([24, 10, 17])
    results = []
    for compile_blocks in (False, True):
        torch.manual_seed(0)
        module = SequenceClassifier(config, num_classes=10, vocab_size=VOCAB, compile_blocks=compile_blocks)
        torch._dynamo.utils.counters.clear()
        logits = module(tokens, lengths)
        results.append([logits, *torch.autograd.grad(logits.square().sum(), list(module.parameters()))])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert not torch._dynamo.utils.counters["graph_break"]
    assert "compile_blocks" not in module.hparams
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_lra_benchmark_runs_its_cpu_smoke_path():
    """benchmarks/lra.py --smoke: both tasks' models built from their configs, trained and evaluated at toy sizes."""
    result = subprocess.run([sys.executable, "benchmarks/lra.py", "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["task"] for row in rows] == ["listops", "pathx"]
    assert all(row["train_seqs_per_s"] > 0 and row["eval_seqs_per_s"] > 0 for row in rows)
