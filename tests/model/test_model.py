"""The backbone and the language model: causality, recurrent decoding, lower bounds, optimiser groups."""

import math

import lightning as L

import pytest
import torch
from torch import nn

from hgrn2_lightning import model as model_module
from hgrn2_lightning.generate import generate, sample_next
from hgrn2_lightning.lm import CausalLM, LanguageModel
from hgrn2_lightning.model import HGRN2, HGRN2Config
from kernels import hgrn2_scan
from hgrn2_lightning.optim import OptimConfig, configure_adamw, learning_rate_schedule
from tests.helpers import relative_error

TINY = dict(d_model=32, n_layers=3, expand_ratio=8)


def tiny_lm(vocab_size=50, seed=0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(HGRN2Config(**{**TINY, **overrides}), vocab_size)
    with torch.no_grad():  # spread the lower bounds, so every layer has a different one
        model.backbone.lower_bound_logits.normal_(0, 1.0)
    return model.eval()


def test_language_model_is_causal():
    model = tiny_lm()
    tokens = torch.randint(0, 50, (2, 40))
    logits = model(tokens)
    for t in (0, 17, 38):
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(0, 50, changed[:, t + 1 :].shape)
        assert torch.equal(model(changed)[:, : t + 1], logits[:, : t + 1])
        assert not torch.allclose(model(changed)[:, t + 1 :], logits[:, t + 1 :])


def test_bidirectional_layers_see_the_future():
    torch.manual_seed(0)
    backbone = HGRN2(HGRN2Config(**TINY, direction="bidirectional")).eval()
    x = torch.randn(1, 20, 32)
    changed = x.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(backbone(x)[:, 0], backbone(changed)[:, 0])


def test_2d_scan_sums_four_directional_scans_over_the_grid():
    """On a 3 x 4 grid, each direction equals a 1-D scan of the rows or the columns taken one by one."""
    from hgrn2_lightning.model import _grid_scan
    from kernels import hgrn2_scan

    q, f, i = (torch.randn(2, 12, 2, 4, dtype=torch.float64) for _ in range(3))
    out = _grid_scan(q, f, i, (3, 4), {"lower_bound": None, "scale": 1.0})
    grid = lambda x: x.view(2, 3, 4, 2, 4)
    expected = torch.zeros_like(grid(q))
    both = lambda a, b, c: hgrn2_scan(a, b, c, scale=1.0)[0] + hgrn2_scan(a, b, c, scale=1.0, reverse=True)[0]
    for r in range(3):
        expected[:, r] += both(grid(q)[:, r], grid(f)[:, r], grid(i)[:, r])
    for c in range(4):
        expected[:, :, c] += both(grid(q)[:, :, c], grid(f)[:, :, c], grid(i)[:, :, c])
    assert relative_error(out, expected.view(2, 12, 2, 4)) < 1e-12
    with pytest.raises(ValueError, match="needs grid"):
        HGRN2Config(**TINY, direction="2d")


@pytest.mark.parametrize("prompt_length", [1, 5, 33])
def test_recurrent_decoding_equals_the_full_forward(prompt_length):
    model = tiny_lm().double()
    tokens = torch.randint(0, 50, (3, 45))
    full = model(tokens)
    states = [s.double() for s in model.new_states(3)]
    pieces = [model(tokens[:, :prompt_length], states)]
    pieces += [model(tokens[:, t : t + 1], states) for t in range(prompt_length, 45)]
    assert relative_error(torch.cat(pieces, 1), full) < 1e-12


def test_recurrent_decoding_in_float32():
    model = tiny_lm()
    tokens = torch.randint(0, 50, (2, 30))
    states = model.new_states(2)
    stepped = torch.cat([model(tokens[:, t : t + 1], states) for t in range(30)], 1)
    assert relative_error(stepped, model(tokens)) < 1e-5


def test_lower_bounds_start_unbounded_and_rise_with_depth():
    backbone = HGRN2(HGRN2Config(d_model=16, n_layers=5, expand_ratio=4))
    bounds = backbone.lower_bounds()
    assert bounds[0] is None
    # Fresh (uniform softmax): layer l starts at l / L.
    for layer, bound in enumerate(bounds[1:], start=1):
        assert torch.allclose(bound, torch.full((16,), layer / 5))
    with torch.no_grad():
        backbone.lower_bound_logits.normal_(0, 3.0)
    bounds = torch.stack(backbone.lower_bounds()[1:])
    assert (bounds.diff(dim=0) >= 0).all() and (bounds > 0).all() and (bounds < 1).all()
    # The scans skip their bound check on the strength of this: [0, 1) even where the softmax saturates.
    with torch.no_grad():
        backbone.lower_bound_logits.copy_(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)) * 200)
    bounds = torch.stack(backbone.lower_bounds()[1:])
    assert (bounds >= 0).all() and (bounds < 1).all() and (bounds == 0).any() and (bounds > 0.999).any()
    unbounded = HGRN2(HGRN2Config(d_model=16, n_layers=3, expand_ratio=4, use_lower_bound=False))
    assert unbounded.lower_bounds() == [None] * 3


def test_lower_bound_logits_receive_gradients_from_every_layer_but_the_first():
    model = tiny_lm().train()
    model(torch.randint(0, 50, (2, 16))).sum().backward()
    grad = model.backbone.lower_bound_logits.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_config_rejects_heads_that_do_not_divide_and_sizes_below_1():
    with pytest.raises(ValueError, match="multiple of expand_ratio"):
        HGRN2Config(d_model=100, expand_ratio=64)
    for size in ("d_model", "n_layers", "expand_ratio", "mlp_hidden"):
        for value in (0, -16):
            with pytest.raises(ValueError, match=f"backbone sizes must be positive, got .*'{size}': {value}"):
                HGRN2Config(**{size: value})


def test_weight_decay_only_on_matrices_and_tied_weights_counted_once():
    model = CausalLM(HGRN2Config(**TINY), 50, tie_embeddings=True)
    optimizer = configure_adamw(model, OptimConfig(weight_decay=0.1), total_steps=10)["optimizer"]
    decay, no_decay = optimizer.param_groups
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert {id(p) for p in decay["params"]} == matrices
    assert id(model.backbone.lower_bound_logits) in {id(p) for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_schedules():
    cosine = learning_rate_schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr=0.1), total_steps=110)
    assert [cosine(s) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1) and cosine(500) == pytest.approx(0.1)
    inverse_sqrt = learning_rate_schedule(
        OptimConfig(lr=1.0, warmup_steps=4, warmup_init_lr=1e-7, schedule="inverse_sqrt"), total_steps=100
    )
    assert inverse_sqrt(0) == pytest.approx(1e-7) and inverse_sqrt(4) == 1.0
    assert inverse_sqrt(16) == pytest.approx(0.5) and inverse_sqrt(64) == pytest.approx(0.25)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    assert sample_next(logits, top_k=1).tolist() == [1, 0]
    assert sample_next(logits, top_p=0.01).tolist() == [1, 0]
    # top_k = 2 never yields a token outside the two best.
    draws = torch.stack([sample_next(logits, top_k=2) for _ in range(200)])
    assert set(draws[:, 0].tolist()) <= {1, 3} and set(draws[:, 1].tolist()) == {0, 3}
    # top_p keeps the smallest head of the distribution that holds p: here the first two of row 1.
    probs = logits[1].softmax(-1)
    p = (probs[0] + probs[3]).item() - 1e-3
    draws = torch.stack([sample_next(logits, top_p=p) for _ in range(200)])
    assert set(draws[:, 1].tolist()) == {0, 3}


def test_generation_is_reproducible_with_a_seed_and_greedy_is_deterministic():
    model = tiny_lm()
    prompt = torch.randint(0, 50, (2, 7))
    runs = [
        torch.stack(list(generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))), 1)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    greedy = torch.stack(list(generate(model, prompt, 12, temperature=0)), 1)
    # Greedy decoding picks the argmax of the full forward's logits at every position.
    sequence = torch.cat([prompt, greedy], 1)
    assert torch.equal(model(sequence)[:, 6:-1].argmax(-1), greedy)


def test_generation_rejects_bad_requests():
    model = tiny_lm()
    with pytest.raises(ValueError, match="non-empty"):
        next(generate(model, torch.zeros(1, 0, dtype=torch.long), 5))
    with pytest.raises(ValueError, match="at least 1"):
        next(generate(model, torch.zeros(1, 3, dtype=torch.long), 0))


def test_initialisation_follows_the_paper_code():
    model = CausalLM(HGRN2Config(d_model=256, n_layers=2, expand_ratio=64), 1000)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.backbone.blocks[0].mixer.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert math.isclose(model.backbone.blocks[1].mlp_norm.weight.mean().item(), 1.0)


def test_activation_checkpointing_recomputes_blocks_with_the_same_dropout_and_gradients():
    model = tiny_lm(dropout=0.2).train()
    tokens = torch.randint(0, 50, (2, 40))
    grads = []
    calls = []
    for block in model.backbone.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    for checkpointing in (False, True):
        model.backbone.checkpoint_blocks = checkpointing
        model.zero_grad()
        calls.clear()
        torch.manual_seed(3)
        model(tokens).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        # Recomputed in the backward: every block runs twice with checkpointing, once without.
        assert len(calls) == len(model.backbone.blocks) * (2 if checkpointing else 1)
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-7)


def test_scan_options_reach_every_scan(monkeypatch):
    """LanguageModel(recompute_scan_states=True, scan_backend="chunked"): each layer's scan call asks for both
    (the kernel-level effect of recomputation, no states kept and the same gradients, is tested in
    tests/kernels), and none checks its bound (which would wait on the GPU; the bounds' range is tested above)."""
    asked = []

    def recording_scan(*args, **kwargs):
        asked.append((kwargs["recompute_states"], kwargs["backend"], kwargs["check_bound"]))
        return hgrn2_scan(*args, **kwargs)

    monkeypatch.setattr(model_module, "hgrn2_scan", recording_scan)
    module = LanguageModel(HGRN2Config(**TINY), vocab_size=50, recompute_scan_states=True, scan_backend="chunked")
    module.model(torch.randint(0, 50, (2, 9)))
    assert asked == [(True, "chunked", False)] * TINY["n_layers"]
    assert "scan_backend" not in module.hparams


class RecordStepGradients(L.Callback):
    """What the optimizer used: whether it is fused, and the gradients' norm and largest entry at each of its steps
    (read after the step: Lightning's step runs the backward and the clipping inside, so before it there are none)."""

    def __init__(self):
        self.fused, self.norms, self.largest = None, [], []

    def on_train_start(self, trainer, module) -> None:
        optimizer = trainer.optimizers[0]
        self.fused = optimizer.defaults["fused"]
        optimizer.register_step_post_hook(lambda *_: self.record(module))

    def record(self, module) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(torch.nn.utils.get_total_norm(grads).item())
        self.largest.append(max(g.abs().max().item() for g in grads))


@pytest.mark.parametrize("precision, fused, algorithm", [
    ("bf16-mixed", True, "norm"), ("bf16-mixed", True, "value"), ("16-mixed", False, "norm"),
    ("32-true", True, "norm")])
def test_fused_adamw_where_allowed_and_gradients_clipped_either_way(precision, fused, algorithm):
    """The fused optimizer runs wherever no fp16 loss scaler unscales inside it; Lightning's plugin would refuse
    to clip for it, so the module clips itself, to the same norm."""
    if precision == "16-mixed" and not torch.cuda.is_available():
        pytest.skip("Lightning's fp16 loss scaling needs CUDA")
    torch.manual_seed(0)
    module = LanguageModel(HGRN2Config(**TINY), vocab_size=50)
    tokens = torch.randint(0, 50, (32, 17))
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    recorder = RecordStepGradients()
    trainer = L.Trainer(max_steps=3, precision=precision, gradient_clip_val=1e-3,
                        gradient_clip_algorithm=algorithm, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder])
    trainer.fit(module, batches)
    assert recorder.fused is fused
    clipped = recorder.norms if algorithm == "norm" else recorder.largest
    assert len(clipped) == 3 and max(clipped) <= 1e-3 * (1 + 1e-3), clipped
