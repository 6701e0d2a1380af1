"""Interop with flash-linear-attention's HGRN2 checkpoints, and the lm-evaluation-harness adapter.

fla's model classes are the reference: same weights and tokens must give the same logits, with random
weights, non-uniform lower bounds and norm weights that are not ones (so every mapping twist shows).
fla's Triton ops do not run on a CPU; here its scan, fused output norm, swish and SwiGLU are swapped
for plain PyTorch statements of the same math (`cpu_fla`); everything else (projections, gate, lower
bounds, blocks, head) is fla's own code. The GPU test runs fla as it is.
"""

import copy
import inspect
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml

with warnings.catch_warnings():  # fla warns that Triton has no CPU backend; the tests below do without it
    warnings.simplefilter("ignore")
    fla_models = pytest.importorskip("fla.models", reason="fla is in the test extra: make install")
    import fla.layers.hgrn2 as fla_hgrn2
    import fla.modules.mlp as fla_mlp
    from fla.modules.norm import layernorm as fla_layernorm

from hgrn2_lightning.cli import main
from hgrn2_lightning.interop import (
    InitFromPretrained,
    byte_level_tokenizer,
    config_from_fla,
    config_to_fla,
    export_fla,
    language_model_from_fla,
    read_fla_weights,
    save_checkpoint,
)
from hgrn2_lightning.lm import LanguageModel
from hgrn2_lightning.model import HGRN2Config
from tests.helpers import fla_kernels_untuned, relative_error

GPU = torch.cuda.is_available()
VOCAB = 257  # the byte tokenizer's, so the folders work with tokenizer "bytes"


def gla_recurrence(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **_):
    """fla's GLA semantics, one step at a time: S_t = Diag(exp g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t."""
    assert initial_state is None and not output_final_state and cu_seqlens is None, "the tests use no cache, no mask"
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    state = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
    outputs = []
    for t in range(T):
        state = g[:, t].float().exp()[..., None] * state + k[:, t].float()[..., None] * v[:, t].float()[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float() * scale, state))
    return torch.stack(outputs, 1).to(q.dtype), None


# fla's fused output norm takes its eps from its own default: read it, so a change in fla shows up here.
FLA_RMS_NORM_LINEAR_EPS = inspect.signature(fla_layernorm.rms_norm_linear).parameters["eps"].default


def rms_norm_linear(x, norm_weight, norm_bias, linear_weight, linear_bias, eps=FLA_RMS_NORM_LINEAR_EPS, **_):
    return F.linear(F.rms_norm(x, (x.shape[-1],), norm_weight, eps), linear_weight, linear_bias)


@pytest.fixture
def cpu_fla(monkeypatch):
    """fla's Triton-only ops replaced by PyTorch; the models below also ask for its unfused norms and MLP."""
    monkeypatch.setattr(fla_hgrn2, "fused_recurrent_gla", lambda q, k, v, gk, **kw: gla_recurrence(q, k, v, gk, **kw))
    monkeypatch.setattr(fla_hgrn2, "chunk_gla", lambda q, k, v, g, **kw: gla_recurrence(q, k, v, g, **kw))
    monkeypatch.setattr(fla_hgrn2, "rms_norm_linear", rms_norm_linear)
    monkeypatch.setattr(fla_hgrn2, "swish", F.silu)
    monkeypatch.setattr(fla_mlp, "swiglu", lambda x, y: F.silu(x) * y)


def fla_model(seed=0, on_cpu=True, **options):
    """A randomly initialised fla HGRN2ForCausalLM, lower bounds spread and norm weights away from one."""
    torch.manual_seed(seed)
    config = {"hidden_size": 64, "num_hidden_layers": 3, "expand_ratio": 16, "vocab_size": VOCAB, **options}
    if on_cpu:  # the same parameters and math, without fla's fused Triton norms
        config.update(fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fla_models.HGRN2ForCausalLM(fla_models.HGRN2Config(**config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lower_bounds"):
                param.normal_(0, 1.5)
            elif "norm" in name:
                param.mul_(1 + 0.3 * torch.randn_like(param))
    return model


def fla_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def save_fla(model, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    return folder


SHAPES = {
    "d64-e16-chunk": {"options": {}, "T": 70},  # T > 64: fla's layer takes its chunk mode
    "d96-e32-tied": {
        "options": {"hidden_size": 96, "expand_ratio": 32, "num_hidden_layers": 2, "tie_word_embeddings": True},
        "T": 30,
    },
    "d48-e8-no-affine": {
        "options": {"hidden_size": 48, "expand_ratio": 8, "num_hidden_layers": 4, "elementwise_affine": False,
                    "intermediate_size": 96, "norm_eps": 1e-5},
        "T": 40,
    },
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_imported_model_computes_fla_logits(cpu_fla, tmp_path, shape):
    model = fla_model(**SHAPES[shape]["options"])
    ours = language_model_from_fla(save_fla(model, tmp_path / "fla"), tokenizer="bytes").model.eval()
    tokens = torch.randint(0, VOCAB, (2, SHAPES[shape]["T"]))
    expected = fla_logits(model, tokens)
    with torch.no_grad():
        assert relative_error(ours(tokens), expected) < 1e-4


def test_the_mapping_twists_are_needed(cpu_fla, tmp_path):
    """Each twist of the mapping moves the logits far beyond the tolerance: the test above can fail."""
    model = fla_model()
    module = language_model_from_fla(save_fla(model, tmp_path / "fla"), tokenizer="bytes")
    tokens = torch.randint(0, VOCAB, (2, 40))
    expected = fla_logits(model, tokens)
    backbone = module.model.backbone
    with torch.no_grad():
        backbone.lower_bound_logits.copy_(model.model.lower_bounds)  # fla's Gamma as is, not rolled
        assert relative_error(module.model(tokens), expected) > 0.1
        backbone.lower_bound_logits.copy_(model.model.lower_bounds.roll(-1, 0))
        assert relative_error(module.model(tokens), expected) < 1e-4
    module.model.backbone.config.scale = None  # fla's nominal e^-0.5, without the output-norm eps correction
    with torch.no_grad():
        assert relative_error(module.model(tokens), expected) > 1e-2


def test_import_export_import_is_exact(cpu_fla, tmp_path):
    fla_folder = save_fla(fla_model(), tmp_path / "fla")
    main(["import-fla", "--folder", str(fla_folder), "--out", str(tmp_path / "a.ckpt"), "--tokenizer", "bytes"])
    main(["export-fla", "--ckpt_path", str(tmp_path / "a.ckpt"), "--out", str(tmp_path / "exported")])
    main(["import-fla", "--folder", str(tmp_path / "exported"), "--out", str(tmp_path / "b.ckpt")])
    # weights_only: LightningCLI loads --ckpt_path so (validate, test), and so our checkpoints must load.
    first, second = (torch.load(tmp_path / f"{x}.ckpt", weights_only=True) for x in "ab")
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name, tensor in first["state_dict"].items():
        assert torch.equal(tensor, second["state_dict"][name]), name
    assert first["hyper_parameters"]["backbone"] == second["hyper_parameters"]["backbone"]
    # fla's own tensors come back bit for bit, and the config keeps what fla's model is built from.
    original, exported = read_fla_weights(fla_folder), read_fla_weights(tmp_path / "exported")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[name], exported[name]) for name in original)
    fla_config = json.loads((fla_folder / "config.json").read_text())
    exported_config = json.loads((tmp_path / "exported" / "config.json").read_text())
    for field in ("hidden_size", "num_hidden_layers", "expand_ratio", "norm_eps", "use_lower_bound", "vocab_size",
                  "tie_word_embeddings", "hidden_act", "use_short_conv"):
        assert exported_config[field] == fla_config[field], field
    assert exported_config["intermediate_size"] == original["model.layers.0.mlp.gate_proj.weight"].shape[0]


def test_exported_model_loads_in_transformers_with_the_same_logits(cpu_fla, tmp_path):
    """A model trained here (fla's q scale, its own output-norm eps) exported, then loaded by fla through
    AutoModelForCausalLM: the q-scale difference is folded into i_proj."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    module = LanguageModel(HGRN2Config(d_model=32, n_layers=3, expand_ratio=8, mlp_hidden=64), vocab_size=VOCAB,
                           tokenizer="bytes")
    with torch.no_grad():
        module.model.backbone.lower_bound_logits.normal_(0, 1.5)
    checkpoint = tmp_path / "ours.ckpt"
    save_checkpoint(module, checkpoint)
    export_fla(str(checkpoint), str(tmp_path / "exported"))
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    config.update(fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False)  # for the CPU, as in fla_model
    (tmp_path / "exported" / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    tokens = torch.randint(0, VOCAB, (2, 50))
    with torch.no_grad():
        assert relative_error(module.model.eval()(tokens), fla_logits(theirs, tokens)) < 1e-4
    text = "naïve\tcafé <|endoftext|>"
    hf_ids = AutoTokenizer.from_pretrained(tmp_path / "exported")(text)["input_ids"]
    assert hf_ids == list("naïve\tcafé ".encode()) + [256]


def test_byte_level_tokenizer_json_matches_the_byte_tokenizer():
    hf = byte_level_tokenizer()
    text = "héllo\x00 wörld\n\t€ 🙂"
    assert hf.encode(text).ids == list(text.encode())
    assert hf.decode(list(text.encode())) == text
    assert hf.get_vocab_size() == VOCAB


@pytest.mark.parametrize(
    "option, value",
    [("use_short_conv", True), ("attn", {"layers": [1], "num_heads": 4}), ("attnres_block_size", 2),
     ("hidden_act", "powlu"), ("model_type", "gla")],
)
def test_unsupported_fla_options_are_named(option, value):
    with pytest.raises(ValueError, match=option):
        config_from_fla({"model_type": "hgrn2", "hidden_size": 64, "expand_ratio": 16, option: value})


def test_fla_config_fields_left_out_take_fla_defaults():
    config, vocab, tie = config_from_fla({"model_type": "hgrn2", "hidden_size": 512, "num_heads": 4})
    assert (config.n_layers, config.expand_ratio, config.glu_hidden, vocab, tie) == (24, 128, 1536, 32000, False)
    config, *_ = config_from_fla({"model_type": "hgrn2", "hidden_size": 512, "expand_ratio": None, "num_heads": 4})
    assert config.expand_ratio == 128 and config.n_heads == 4
    with pytest.raises(ValueError, match="multiple of expand_ratio"):
        config_from_fla({"model_type": "hgrn2", "hidden_size": 100, "expand_ratio": 16})


@pytest.mark.parametrize("option, value", [("norm", "layernorm"), ("mlp_act", "none"), ("direction", "bidirectional")])
def test_export_refuses_what_fla_cannot_express(option, value):
    with pytest.raises(ValueError, match=f"backbone.{option}"):
        config_to_fla(HGRN2Config(d_model=32, expand_ratio=8, **{option: value}), VOCAB, False, 256)


def test_import_needs_a_tokenizer_or_says_how_to_give_one(cpu_fla, tmp_path):
    folder = save_fla(fla_model(), tmp_path / "fla")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        language_model_from_fla(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        language_model_from_fla(tmp_path)


def test_fine_tuning_starts_from_the_imported_weights(cpu_fla, tmp_path):
    """The README's recipe: import, then fit with the model YAML and the InitFromPretrained callback."""
    from tests.test_cli import tiny_lm_config

    fla_folder = save_fla(fla_model(hidden_size=32, expand_ratio=8, num_hidden_layers=2), tmp_path / "fla")
    main(["import-fla", "--folder", str(fla_folder), "--out", str(tmp_path / "fla.ckpt"), "--tokenizer", "bytes"])
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f_{n}(x):\n    return x + {n}\n\n" for n in range(200)))
    config, run = tiny_lm_config(tmp_path, str(corpus), max_steps=1)
    # The imported checkpoint is one LightningCLI loads as it is (weights_only) ...
    main(["validate", "--config", str(config), "--model", str(tmp_path / "fla.yaml"),
          "--ckpt_path", str(tmp_path / "fla.ckpt")])
    # ... and the start of a fine-tuning run. One step at a learning rate of 1e-12 barely moves the weights:
    # what remains shows where training started.
    main(["fit", "--config", str(config), "--model", str(tmp_path / "fla.yaml"),
          "--trainer.callbacks+=hgrn2_lightning.interop.InitFromPretrained",
          "--trainer.callbacks.path", str(tmp_path / "fla.ckpt"),
          "--model.init_args.optim.lr", "1e-12", "--model.init_args.optim.min_lr", "0",
          "--model.init_args.optim.warmup_steps", "0"])
    tuned = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    imported = torch.load(tmp_path / "fla.ckpt", weights_only=False)["state_dict"]
    for name, tensor in imported.items():
        assert torch.allclose(tuned[name], tensor, atol=1e-6), name
    # ... and a checkpoint that `hgrn2 fit` wrote goes back to fla's names and layout.
    main(["export-fla", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "tuned")])
    original, exported = read_fla_weights(fla_folder), read_fla_weights(tmp_path / "tuned")
    assert original.keys() == exported.keys()
    assert all(torch.allclose(original[name], exported[name], atol=1e-6) for name in original)


def test_fine_tuning_a_different_model_is_refused_with_the_differences(tmp_path):
    pretrained = LanguageModel(HGRN2Config(d_model=32, n_layers=2, expand_ratio=8), vocab_size=VOCAB,
                               tokenizer="bytes")
    checkpoint = tmp_path / "pretrained.ckpt"
    save_checkpoint(pretrained, checkpoint)
    other = LanguageModel(HGRN2Config(d_model=32, n_layers=3, expand_ratio=8), vocab_size=VOCAB, tokenizer="bytes")
    with pytest.raises(ValueError, match="backbone.n_layers: 3 here, 2 in"):
        InitFromPretrained(str(checkpoint)).setup(None, other, "fit")


def test_the_gpu_tests_run_each_fla_kernel_with_one_launch_configuration(monkeypatch):
    """fla's autotuning (minutes) kept its GPU tests from finishing in a device command; `fla_kernels_untuned`
    leaves each kernel one configuration, and must still find them under fla's decorators."""
    import fla.ops.gla.chunk as fla_chunk

    assert fla_kernels_untuned(monkeypatch) > 10
    kernel = fla_chunk.chunk_gla_fwd_A_kernel_intra_sub_inter
    while not hasattr(kernel, "configs"):
        kernel = kernel.fn
    assert len(kernel.configs) == 1


def bfloat16_errors(fla, ours, tokens) -> tuple[float, float, float]:
    """Both models in bfloat16 on the same tokens: (ours against fla, ours against exact, fla against exact).

    The exact logits are our model in float64 with the same bfloat16 weights. Two pure-bfloat16 models are each
    about 1e-2 from them at these sizes (every activation rounds to 8 bits, about 1.6e-3 a rounding, and from the
    first element that rounds differently on, the two models' later roundings are independent), so they may
    differ by more than 1e-2 between themselves with no fault in either."""
    fla, ours = fla.to(torch.bfloat16), ours.to(torch.bfloat16).eval()
    with torch.no_grad():
        mine, theirs = ours(tokens).cpu(), fla_logits(fla, tokens).cpu()
        exact = copy.deepcopy(ours).to("cpu", torch.float64)(tokens.cpu())
    return relative_error(mine, theirs), relative_error(mine, exact), relative_error(theirs, exact)


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_bfloat16_logits_are_no_further_from_exact_than_flas(cpu_fla, tmp_path, shape):
    """ours holds the gate in float32 inside the scan where fla rounds log(lambda) and k to bfloat16: no further
    from the exact logits than fla's model, and an extra rounding anywhere in ours would show."""
    model = fla_model(**SHAPES[shape]["options"])
    ours = language_model_from_fla(save_fla(model, tmp_path / "fla"), tokenizer="bytes").model
    tokens = torch.randint(0, VOCAB, (2, SHAPES[shape]["T"]))
    against_fla, our_error, their_error = bfloat16_errors(model, ours, tokens)
    assert our_error < their_error, f"ours {our_error:.2e} from exact, fla {their_error:.2e}"
    assert against_fla < 2 * their_error


GPU_SHAPES = {**{name: shape["options"] for name, shape in SHAPES.items()},
              "d256-e64": {"hidden_size": 256, "expand_ratio": 64, "num_hidden_layers": 4}}


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [48, 300])  # fla's layer runs fused_recurrent_gla up to 64 tokens, chunk_gla beyond
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=list(GPU_SHAPES))
def test_gpu_logits_equal_fla_as_it_is(tmp_path, monkeypatch, shape, dtype, T):
    """fla with its Triton kernels and fused norms, against ours with our Triton scan."""
    # Triton takes float32 dots in TF32 unless told otherwise (ours ask for IEEE): a 1e-3 error of its own,
    # so fla's kernels, compiled in this test, are asked for IEEE float32 too.
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    fla_kernels_untuned(monkeypatch)
    model = fla_model(on_cpu=False, **GPU_SHAPES[shape]).cuda()
    ours = language_model_from_fla(save_fla(model, tmp_path / "fla"), tokenizer="bytes").model.cuda().eval()
    tokens = torch.randint(0, VOCAB, (2, T), device="cuda")
    if dtype == torch.float32:
        with torch.no_grad():
            assert relative_error(ours(tokens), fla_logits(model, tokens)) < 1e-4
        return
    against_fla, our_error, their_error = bfloat16_errors(model, ours, tokens)
    # The literal bar (ours against fla under 1e-2), shown with `pytest -s` for the record.
    print(f"bf16 {shape} T {T}: ours vs fla {against_fla:.2e}; vs exact: ours {our_error:.2e}, fla {their_error:.2e}")
    assert our_error < 1.25 * their_error, f"ours {our_error:.2e} from exact, fla {their_error:.2e}"


# lm-evaluation-harness -----------------------------------------------------------------------------------------


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A random byte-level model whose head can only pick ASCII bytes: its samples decode one byte a character."""
    torch.manual_seed(0)
    module = LanguageModel(HGRN2Config(d_model=32, n_layers=2, expand_ratio=8), vocab_size=VOCAB, tokenizer="bytes")
    with torch.no_grad():
        module.model.backbone.lower_bound_logits.normal_(0, 1.5)
        module.model.head.weight[128:] = 0  # logit 0, below the best of 128 random ASCII logits
    path = tmp_path / "tiny.ckpt"
    save_checkpoint(module, path)
    return path, module.model.eval()


def requests(kind, *args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=n) for n, args in enumerate(args_list)]


def direct_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(tokens[:, :-1])[0, -len(continuation):].log_softmax(-1)
    targets = torch.tensor(continuation)
    return logprobs.gather(-1, targets[:, None]).sum().item(), bool((logprobs.argmax(-1) == targets).all())


def test_lm_eval_log_likelihoods_are_the_models(tiny_checkpoint):
    """Batched, padded and cut into segments of 7 tokens, the scores equal one plain forward pass's."""
    from hgrn2_lightning.lm_eval_adapter import HGRN2EvalLM

    path, model = tiny_checkpoint
    lm = HGRN2EvalLM(pretrained=str(path), batch_size=2, max_length=7)
    greedy = list(b"The cat")
    with torch.no_grad():
        for _ in range(5):
            greedy.append(int(model(torch.tensor([greedy]))[0, -1].argmax()))
    pairs = [("The cat", bytes(greedy[7:]).decode()), ("", "sat on the mat"), ("A", "b"),
             ("a much longer context than the others,", " and its continuation")]
    results = lm.loglikelihood(requests("loglikelihood", *pairs))
    for (context, continuation), (logprob, is_greedy) in zip(pairs, results):
        context_ids = list(context.encode()) or [256]
        expected, expected_greedy = direct_logprob(model, context_ids, list(continuation.encode()))
        assert logprob == pytest.approx(expected, rel=1e-5)
        assert is_greedy == expected_greedy
    assert results[0][1] and not results[3][1]

    documents = ["a whole document, scored token by token in segments", "x"]
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(d,) for d in documents]))
    for document, logprob in zip(documents, rolling):
        assert logprob == pytest.approx(direct_logprob(model, [256], list(document.encode()))[0], rel=1e-5)


def test_lm_eval_generation_is_greedy_decoding_cut_at_the_stop(tiny_checkpoint):
    from hgrn2_lightning.generate import generate
    from hgrn2_lightning.lm_eval_adapter import HGRN2EvalLM

    path, model = tiny_checkpoint
    lm = HGRN2EvalLM(pretrained=str(path))
    prompt = "def f(x):"
    full = bytes(int(t) for t in generate(model, torch.tensor([list(prompt.encode())]), 16, temperature=0)).decode()
    stop = full[6:8]
    outputs = lm.generate_until(requests("generate_until", (prompt, {"until": [], "max_gen_toks": 16}),
                                         (prompt, {"until": [stop], "max_gen_toks": 16})))
    assert outputs == [full, full[: full.index(stop)]]


TASKS = {
    "tiny_choice": (
        {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
         "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]},
        [{"question": "2 + 2 =", "choices": ["4", "5", "22"], "label": 0},
         {"question": "The sky is", "choices": ["green", "blue"], "label": 1},
         {"question": "def", "choices": [" f(x):", " 1"], "label": 0}],
    ),
    "tiny_generation": (
        {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
         "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6}, "metric_list": [{"metric": "exact_match"}]},
        [{"prompt": "Q: 1 + 1?\nA:", "answer": " 2"}, {"prompt": "Say hi:", "answer": " hi"}],
    ),
    "tiny_perplexity": (
        {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
         "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
        [{"text": "the quick brown fox jumps over the lazy dog"}, {"text": "import os\nprint(os.getcwd())"}],
    ),
}


def test_lm_eval_runs_local_tasks_end_to_end(tiny_checkpoint, tmp_path, monkeypatch):
    """lm-eval's own evaluator, with tasks from local files, reaches the model by its registered name."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import hgrn2_lightning.lm_eval_adapter  # noqa: F401  (registers "hgrn2")

    path, model = tiny_checkpoint
    for name, (config, docs) in TASKS.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        task = dict(task=name, dataset_path="json", test_split="test",
                    dataset_kwargs={"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf-cache")},
                    **config)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(task))
    results = lm_eval.simple_evaluate(
        model="hgrn2", model_args={"pretrained": str(path), "batch_size": 2}, tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(tmp_path)), bootstrap_iters=0, log_samples=True,
    )
    choice_docs = TASKS["tiny_choice"][1]
    expected_scores = [[direct_logprob(model, list(d["question"].encode()), list((" " + c).encode()))[0]
                        for c in d["choices"]] for d in choice_docs]
    samples = sorted(results["samples"]["tiny_choice"], key=lambda s: s["doc_id"])
    for sample, scores in zip(samples, expected_scores):
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(scores, rel=1e-5)
    accuracy = sum(max(range(len(s)), key=s.__getitem__) == d["label"] for s, d in zip(expected_scores, choice_docs))
    assert results["results"]["tiny_choice"]["acc,none"] == pytest.approx(accuracy / len(choice_docs))

    generations = [s["resps"][0][0] for s in sorted(results["samples"]["tiny_generation"], key=lambda s: s["doc_id"])]
    assert all("\n" not in text and len(text) <= 6 for text in generations)
    assert results["results"]["tiny_generation"]["exact_match,none"] == sum(
        text == d["answer"] for text, d in zip(generations, TASKS["tiny_generation"][1])) / 2

    texts = [d["text"] for d in TASKS["tiny_perplexity"][1]]
    logprob = sum(direct_logprob(model, [256], list(text.encode()))[0] for text in texts)
    words = sum(len(text.split()) for text in texts)
    assert results["results"]["tiny_perplexity"]["word_perplexity,none"] == pytest.approx(
        math.exp(-logprob / words), rel=1e-4)
