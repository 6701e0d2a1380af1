"""Interop with flash-linear-attention (fla): its Hugging Face HGRN2 checkpoints, in and out.

An fla checkpoint is a folder written by `HGRN2ForCausalLM.save_pretrained`: config.json
(model_type "hgrn2") and model.safetensors, often with the tokenizer's files beside them.

    hgrn2 import-fla --folder hgrn2-fla --out hgrn2-fla.ckpt     an fla folder -> our checkpoint (+ model YAML)
    hgrn2 export-fla --ckpt_path last.ckpt --out hgrn2-export    our checkpoint -> an fla folder

The two models compute the same function, with three twists the mapping absorbs exactly:
- fla's lower bounds are cumsum(softmax(Gamma)) - softmax(Gamma)[0] (layer l gets P_1 + ... + P_l), ours
  the exclusive cumsum (P_0 + ... + P_{l-1}). Softmax ignores a shift of its inputs, so our Gamma is
  fla's rolled up by one layer: P_j = P^fla_{j+1}.
- fla's output norm (its fused `rms_norm_linear`) uses eps 1e-5 whatever config.norm_eps says, while
  ours uses norm_eps. RMSNorm_eps(x) = RMSNorm_{a^2 eps}(a x), so a q scale of
  e^-0.5 * sqrt(norm_eps / 1e-5) instead of fla's e^-0.5 gives fla's function with our norm.
- fla's in-projections are three matrices (q, f, i), its MLP two (gate, up); ours are concatenated.
"""

import json
import math
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from datamodules.tokenizers import load_tokenizer
from hgrn2_lightning.lm import LanguageModel
from hgrn2_lightning.model import HGRN2Config
from hgrn2_lightning.optim import OptimConfig

FLA_OUTPUT_NORM_EPS = 1e-5
"""The eps of fla's output norm: `HGRN2Attention` calls `rms_norm_linear` without one (fla 0.6.0)."""

FLA_DEFAULTS = {
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "expand_ratio": 128,
    "num_heads": None,
    "use_short_conv": False,
    "use_lower_bound": True,
    "hidden_ratio": 4,
    "intermediate_size": None,
    "hidden_act": "swish",
    "elementwise_affine": True,
    "norm_eps": 1e-6,
    "attn": None,
    "attnres_block_size": None,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "vocab_size": 32000,
}
"""fla 0.6.0's HGRN2Config defaults: a config.json written as a diff against them leaves these out."""

# The backbone options that give weights their meaning: a model initialised from another must share them.
ARCHITECTURE_FIELDS = ("d_model", "n_layers", "expand_ratio", "glu_hidden", "mlp_act", "norm", "norm_eps",
                       "use_lower_bound", "direction", "scale")


def fla_equivalent_scale(expand_ratio: int, norm_eps: float) -> float:
    """The q scale that makes our mixer compute fla's exactly: see the module docstring."""
    return expand_ratio**-0.5 * math.sqrt(norm_eps / FLA_OUTPUT_NORM_EPS)


def config_from_fla(fla_config: dict) -> tuple[HGRN2Config, int, bool]:
    """fla's config.json -> (our backbone config, vocab size, tied embeddings). Unsupported options raise."""
    cfg = {**FLA_DEFAULTS, **fla_config}
    if cfg.get("model_type") != "hgrn2":
        raise ValueError(
            f"config.json has model_type {cfg.get('model_type')!r}, not 'hgrn2': only fla's HGRN2ForCausalLM "
            f"checkpoints can be imported"
        )
    unsupported = {
        "use_short_conv": "short convolutions on q, f and i (this app's HGRU2 has none)",
        "attn": "hybrid softmax-attention layers",
        "attnres_block_size": "attention residuals between blocks",
    }
    for option, what in unsupported.items():
        if cfg[option]:
            raise ValueError(
                f"config.json sets {option}={cfg[option]!r}: {what}, which this app does not implement. "
                f"Only checkpoints trained with {option} off (fla's default) can be imported"
            )
    if cfg["hidden_act"] not in ("swish", "silu"):
        raise ValueError(
            f"config.json sets hidden_act={cfg['hidden_act']!r}: this app's GLU supports SwiGLU ('swish') only"
        )
    d = cfg["hidden_size"]
    # fla's layer derives the head size like this: expand_ratio wins, num_heads only stands in for it.
    expand_ratio = cfg["expand_ratio"]
    if expand_ratio is None:
        if not cfg["num_heads"]:
            raise ValueError("config.json sets neither expand_ratio nor num_heads: one of them gives the head size")
        expand_ratio = d // cfg["num_heads"]
    if d % expand_ratio:
        raise ValueError(
            f"config.json has hidden_size {d} and expand_ratio {expand_ratio}: fla then uses fewer channels for "
            f"q and f than for i, which this app does not support (hidden_size must be a multiple of expand_ratio)"
        )
    intermediate = cfg["intermediate_size"]
    if intermediate is None:  # fla's GatedMLP: 2/3 * hidden_ratio * d, rounded up to a multiple of 256
        intermediate = int(d * (cfg["hidden_ratio"] or 4) * 2 / 3)
        intermediate = 256 * math.ceil(intermediate / 256)
    config = HGRN2Config(
        d_model=d,
        n_layers=cfg["num_hidden_layers"],
        expand_ratio=expand_ratio,
        mlp_hidden=intermediate,
        mlp_act="silu",
        norm="rmsnorm",
        norm_eps=cfg["norm_eps"],
        use_lower_bound=bool(cfg["use_lower_bound"]),
        scale=fla_equivalent_scale(expand_ratio, cfg["norm_eps"]),
        init_std=cfg["initializer_range"],
    )
    return config, cfg["vocab_size"], bool(cfg["tie_word_embeddings"])


def config_to_fla(config: HGRN2Config, vocab_size: int, tie_embeddings: bool, eot_id: int) -> dict:
    """Our backbone config -> fla's config.json. Options fla's model cannot express raise."""
    unsupported = {
        "direction": ("causal", "fla's HGRN2ForCausalLM is a causal language model"),
        "norm": ("rmsnorm", "fla's blocks use RMSNorm"),
        "mlp_act": ("silu", "fla's GatedMLP is SwiGLU"),
    }
    for option, (needed, why) in unsupported.items():
        if getattr(config, option) != needed:
            raise ValueError(
                f"backbone.{option} is {getattr(config, option)!r}, but only {needed!r} can be exported: {why}"
            )
    return {
        "architectures": ["HGRN2ForCausalLM"],
        "model_type": "hgrn2",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_heads": config.n_heads,
        "expand_ratio": config.expand_ratio,
        "attn_mode": "chunk",
        "use_short_conv": False,
        "conv_size": 4,
        "use_lower_bound": config.use_lower_bound,
        "hidden_ratio": 4,
        "intermediate_size": config.glu_hidden,
        "hidden_act": "swish",
        "max_position_embeddings": 2048,
        "elementwise_affine": True,
        "norm_eps": config.norm_eps,
        "attn": None,
        "use_cache": True,
        "pad_token_id": None,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "tie_word_embeddings": tie_embeddings,
        "initializer_range": config.init_std,
        "fuse_norm": True,
        "fuse_swiglu": True,
        "fuse_cross_entropy": True,
        "fuse_linear_cross_entropy": False,
        "use_l2warp": False,
        "attnres_block_size": None,
        "vocab_size": vocab_size,
        "dtype": "float32",
    }


def state_dict_from_fla(
    weights: dict[str, Tensor], config: HGRN2Config, vocab_size: int, tie_embeddings: bool, output_norm_weight: bool
) -> dict[str, Tensor]:
    """fla's tensors (HGRN2ForCausalLM names) -> our CausalLM's state dict, in float32.

    `output_norm_weight` is fla's elementwise_affine: without it the output norms have no weight (ones).
    """
    remaining = dict(weights)  # each tensor is taken once; what is left over means a config we do not know
    d, n_layers, hidden = config.d_model, config.n_layers, config.glu_hidden

    def take(name: str, *shape: int) -> Tensor:
        if name not in remaining:
            raise ValueError(f"the checkpoint has no tensor {name}, which its config.json implies")
        tensor = remaining.pop(name)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, but config.json implies {shape}")
        return tensor.float()

    ours = {"embed.weight": take("model.embeddings.weight", vocab_size, d)}
    for layer in range(n_layers):
        fla, our = f"model.layers.{layer}.", f"backbone.blocks.{layer}."
        ours[our + "mixer_norm.weight"] = take(fla + "attn_norm.weight", d)
        ours[our + "mixer.in_proj.weight"] = torch.cat([take(f"{fla}attn.{x}_proj.weight", d, d) for x in "qfi"])
        ours[our + "mixer.out_norm.weight"] = (
            take(fla + "attn.g_norm.weight", d) if output_norm_weight else torch.ones(d)
        )
        ours[our + "mixer.out_proj.weight"] = take(fla + "attn.o_proj.weight", d, d)
        ours[our + "mlp_norm.weight"] = take(fla + "mlp_norm.weight", d)
        gate, up = take(fla + "mlp.gate_proj.weight", hidden, d), take(fla + "mlp.up_proj.weight", hidden, d)
        ours[our + "mlp.in_proj.weight"] = torch.cat([gate, up])
        ours[our + "mlp.out_proj.weight"] = take(fla + "mlp.down_proj.weight", d, hidden)
    ours["backbone.lower_bound_logits"] = (
        take("model.lower_bounds", n_layers, d).roll(-1, dims=0)
        if config.use_lower_bound
        else torch.zeros(n_layers, d)  # unused: the layers have no bound
    )
    ours["backbone.final_norm.weight"] = take("model.norm.weight", d)
    if tie_embeddings:
        remaining.pop("lm_head.weight", None)  # some writers keep the tied copy
        ours["head.weight"] = ours["embed.weight"]
    else:
        ours["head.weight"] = take("lm_head.weight", vocab_size, d)
    if remaining:
        raise ValueError(
            f"the checkpoint has tensors its config.json does not explain: {sorted(remaining)[:6]}: it was "
            f"written by an fla model with options this app does not implement"
        )
    return ours


def state_dict_to_fla(state: dict[str, Tensor], config: HGRN2Config, tie_embeddings: bool) -> dict[str, Tensor]:
    """Our CausalLM's state dict -> fla's tensors (HGRN2ForCausalLM names), contiguous and unshared."""
    d = config.d_model
    # fla's mixer computes RMSNorm_1e-5(e^-0.5 q S); ours RMSNorm_eps(scale q S). Scaling i (hence S) by
    # `fold` makes the two equal; it is exactly 1 for a model imported from fla.
    scale = config.expand_ratio**-0.5 if config.scale is None else config.scale
    fold = scale / fla_equivalent_scale(config.expand_ratio, config.norm_eps)
    fla = {"model.embeddings.weight": state["embed.weight"]}
    for layer in range(config.n_layers):
        our, out = f"backbone.blocks.{layer}.", f"model.layers.{layer}."
        fla[out + "attn_norm.weight"] = state[our + "mixer_norm.weight"]
        q, f, i = state[our + "mixer.in_proj.weight"].split(d)
        fla[out + "attn.q_proj.weight"], fla[out + "attn.f_proj.weight"] = q, f
        fla[out + "attn.i_proj.weight"] = i if fold == 1.0 else i * fold
        fla[out + "attn.g_norm.weight"] = state[our + "mixer.out_norm.weight"]
        fla[out + "attn.o_proj.weight"] = state[our + "mixer.out_proj.weight"]
        fla[out + "mlp_norm.weight"] = state[our + "mlp_norm.weight"]
        gate, up = state[our + "mlp.in_proj.weight"].split(config.glu_hidden)
        fla[out + "mlp.gate_proj.weight"], fla[out + "mlp.up_proj.weight"] = gate, up
        fla[out + "mlp.down_proj.weight"] = state[our + "mlp.out_proj.weight"]
    if config.use_lower_bound:
        fla["model.lower_bounds"] = state["backbone.lower_bound_logits"].roll(1, dims=0)
    fla["model.norm.weight"] = state["backbone.final_norm.weight"]
    if not tie_embeddings:  # a tied head is the embedding: Hugging Face writes it once
        fla["lm_head.weight"] = state["head.weight"]
    return {name: tensor.detach().contiguous().clone() for name, tensor in fla.items()}


def read_fla_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of a Hugging Face folder: model.safetensors or pytorch_model.bin, whole or sharded."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index_name).is_file():
            shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
        elif (folder / single_name).is_file():
            shards = [single_name]
        else:
            continue
        weights = {}
        for shard in shards:
            weights.update(_read_weight_file(folder / shard))
        return weights
    raise FileNotFoundError(
        f"{folder} has no model.safetensors or pytorch_model.bin (whole or sharded with an index.json): "
        f"give the folder that `save_pretrained` wrote"
    )


def _read_weight_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return _safetensors().load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            "reading and writing Hugging Face checkpoints needs the safetensors package: pip install safetensors"
        ) from error
    return safetensors.torch


def language_model_from_fla(folder: str | Path, tokenizer: str | None = None) -> LanguageModel:
    """An fla / Hugging Face HGRN2 folder as our LanguageModel (float32, on the CPU).

    `tokenizer` is "bytes" or a tokenizer.json; None takes the folder's own tokenizer.json.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: give the folder of a Hugging Face HGRN2 checkpoint "
            f"(config.json and model.safetensors, as `save_pretrained` writes them)"
        )
    fla_config = json.loads((folder / "config.json").read_text())
    config, vocab_size, tie = config_from_fla(fla_config)
    if tokenizer is None:
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no tokenizer.json: give the model's tokenizer with --tokenizer PATH "
                f"(a Hugging Face tokenizer.json), or --tokenizer bytes for a byte-level model"
            )
        tokenizer = str((folder / "tokenizer.json").resolve())
    tokenizer_vocab = load_tokenizer(tokenizer).vocab_size
    if tokenizer_vocab > vocab_size:
        raise ValueError(
            f"the tokenizer {tokenizer} has {tokenizer_vocab} tokens but the model only {vocab_size}: "
            f"give the tokenizer the model was trained with"
        )
    state = state_dict_from_fla(
        read_fla_weights(folder), config, vocab_size, tie, bool(fla_config.get("elementwise_affine", True))
    )
    module = LanguageModel(backbone=config, vocab_size=vocab_size, tie_embeddings=tie, tokenizer=tokenizer)
    module.model.load_state_dict(state)
    return module


def load_language_model(path: str | Path, tokenizer: str | None = None) -> LanguageModel:
    """A checkpoint of ours (`hgrn2 fit`, `hgrn2 import-fla`) or an fla folder, as a LanguageModel on the CPU.

    `tokenizer` ("bytes" or a tokenizer.json) replaces the one the checkpoint names."""
    if Path(path).is_dir():
        return language_model_from_fla(path, tokenizer)
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: give a checkpoint written by `hgrn2 fit` "
            f"(e.g. runs/lm-demo/checkpoints/last.ckpt) or an fla checkpoint folder"
        )
    # Memory-mapped: the optimizer state in the file is never read.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise ValueError(
            f"{path} is not a readable checkpoint (torch.load: {str(error).splitlines()[0]}): give a .ckpt written "
            f"by `hgrn2 fit` (a file cut short by a crash is not one: the run's previous checkpoint is)"
        ) from None
    hparams = checkpoint.get("hyper_parameters", {})
    if not {"backbone", "vocab_size", "tokenizer"} <= hparams.keys():
        raise ValueError(
            f"{path} is not a language-model checkpoint (its hyperparameters have no backbone, vocab_size "
            f"and tokenizer): give a checkpoint of a LanguageModel run (configs/lm)"
        )
    # Keys with a leading underscore are the CLI's bookkeeping (how it built the module), not arguments;
    # the CLI stores the nested configs as plain dicts.
    arguments = {name: value for name, value in hparams.items() if not name.startswith("_")}
    for name, config_class in (("backbone", HGRN2Config), ("optim", OptimConfig)):
        if isinstance(arguments.get(name), dict):
            arguments[name] = config_class(**arguments[name])
    module = LanguageModel(**{**arguments, "tokenizer": tokenizer or arguments["tokenizer"]})
    module.load_state_dict(checkpoint["state_dict"])
    return module


def import_fla(folder: str, out: str, tokenizer: str | None = None) -> None:
    """Convert an fla / Hugging Face HGRN2 checkpoint folder into a checkpoint of this app.

    Writes OUT, which `hgrn2 generate|validate|test --ckpt_path OUT` and `hgrn2 export-fla` read, and
    OUT with the suffix .yaml: the model's config, for fine-tuning with `hgrn2 fit --model OUT.yaml` and
    the InitFromPretrained callback (see the README).

    Args:
        folder: the checkpoint folder (config.json with model_type "hgrn2", model.safetensors).
        out: the checkpoint file to write, e.g. hgrn2-fla.ckpt.
        tokenizer: the model's tokenizer.json, or "bytes"; by default the folder's own tokenizer.json.
    """
    module = language_model_from_fla(folder, tokenizer)
    out_path = Path(out)
    save_checkpoint(module, out_path)
    model_yaml = out_path.with_suffix(".yaml")
    model_yaml.write_text(model_config_yaml(module, source=str(folder)))
    params = sum(p.numel() for p in module.model.parameters())
    print(f"imported {folder} ({params / 1e6:.1f}M parameters) into {out_path}; its model config is {model_yaml}")


def save_checkpoint(module: LanguageModel, path: Path) -> None:
    """The weights and hyperparameters of a LanguageModel, as `hgrn2 fit` writes them (without the training
    state). The hyperparameters are plain data with LightningCLI's instantiator, so the file loads with
    weights_only=True, as LightningCLI loads --ckpt_path."""
    config, vocab_size, tie = architecture(module)
    hparams = {
        "_class_path": "hgrn2_lightning.LanguageModel",
        "backbone": asdict(config),
        "vocab_size": vocab_size,
        "tie_embeddings": tie,
        "optim": asdict(module.optim),
        "tokenizer": module.hparams.tokenizer,
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": L.__version__},
        path,
    )


def architecture(module: LanguageModel) -> tuple[HGRN2Config, int, bool]:
    """(backbone config, vocab size, tied embeddings) of a built model. Read from the modules, not the
    hyperparameters: those hold the backbone as a dict when LightningCLI built the model."""
    model = module.model
    return model.backbone.config, model.embed.num_embeddings, model.head.weight is model.embed.weight


def model_config_yaml(module: LanguageModel, source: str) -> str:
    """The `--model` YAML that builds this model again: what fine-tuning from its weights needs."""
    backbone, _, tie = architecture(module)
    config = {
        "class_path": "hgrn2_lightning.LanguageModel",
        "init_args": {"backbone": asdict(backbone), "tie_embeddings": tie},
    }
    header = f"# The model of {source}, written by `hgrn2 import-fla`: use it as `hgrn2 fit --model THIS_FILE`.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def export_fla(ckpt_path: str, out: str) -> None:
    """Write a language-model checkpoint of this app as an fla / Hugging Face HGRN2 folder.

    The folder holds config.json, model.safetensors and the tokenizer (tokenizer.json and
    tokenizer_config.json); with fla installed, `AutoModelForCausalLM.from_pretrained(OUT)` loads it
    after `import fla`.

    Args:
        ckpt_path: a checkpoint written by `hgrn2 fit` (a LanguageModel) or `hgrn2 import-fla`.
        out: the folder to write (created; files of the same names are replaced).
    """
    module = load_language_model(ckpt_path)
    config, vocab_size, tie = architecture(module)
    fla_config = config_to_fla(config, vocab_size, tie, load_tokenizer(module.hparams.tokenizer).eot_id)
    weights = state_dict_to_fla(module.model.state_dict(), config, tie)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fla_config, indent=2) + "\n")
    _safetensors().save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_hf_tokenizer(module.hparams.tokenizer, folder)
    print(f"exported {ckpt_path} to {folder} (config.json, model.safetensors, tokenizer.json)")


def write_hf_tokenizer(spec: str, folder: Path) -> None:
    """The tokenizer in Hugging Face's files, so AutoTokenizer (and lm-eval's HF model) can load the folder.

    A tokenizer.json is copied with the tokenizer_config.json beside it, if any; the byte-level
    tokenizer is written as an equivalent byte-level BPE with no merges (ids 0-255 are the bytes).
    """
    from tokenizers import Tokenizer

    if spec == "bytes":
        byte_level_tokenizer().save(str(folder / "tokenizer.json"))
        eot = BYTES_EOT
    else:
        source = Path(spec)
        shutil.copyfile(source, folder / "tokenizer.json")
        for extra in ("tokenizer_config.json", "special_tokens_map.json"):
            if (source.parent / extra).is_file():
                shutil.copyfile(source.parent / extra, folder / extra)
        if (folder / "tokenizer_config.json").is_file():
            return
        eot = Tokenizer.from_file(spec).id_to_token(load_tokenizer(spec).eot_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


BYTES_EOT = "<|endoftext|>"


def byte_level_tokenizer():
    """Our ByteTokenizer as a `tokenizers` Tokenizer: byte b is id b, and BYTES_EOT is 256.

    Byte-level BPE maps every byte to a printable character first (GPT-2's table); with no merges each
    byte stays one token, so the vocabulary lists those characters in byte order.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(_printable_bytes())}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(BYTES_EOT, special=True)])
    return hf


def _printable_bytes() -> list[str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the rest take
    the characters from 256 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


class InitFromPretrained(Callback):
    """Starts `hgrn2 fit` from pretrained weights: a checkpoint of this app or an fla / Hugging Face folder.

        hgrn2 fit ... --model hgrn2-fla.yaml \\
            --trainer.callbacks+=hgrn2_lightning.interop.InitFromPretrained --trainer.callbacks.path hgrn2-fla.ckpt

    The model must be built as the pretrained one (`hgrn2 import-fla` writes its YAML) and the data must use
    its tokenizer. A resumed run (--ckpt_path) loads its own checkpoint after this, so its weights win.
    """

    def __init__(self, path: str):
        self.path = path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, LanguageModel):
            raise TypeError(f"InitFromPretrained loads language models; the model is a {type(pl_module).__name__}")
        pretrained = load_language_model(self.path)
        check_same_model(pl_module, pretrained, self.path)
        pl_module.model.load_state_dict(pretrained.model.state_dict())


def check_same_model(module: LanguageModel, pretrained: LanguageModel, path: str) -> None:
    """Raises, naming every difference, unless `module` is built like `pretrained` and reads the same tokens."""
    (ours, *our_head), (theirs, *their_head) = architecture(module), architecture(pretrained)
    differences = [
        f"backbone.{name}: {getattr(ours, name)!r} here, {getattr(theirs, name)!r} in {path}"
        for name in ARCHITECTURE_FIELDS
        if getattr(ours, name) != getattr(theirs, name)
    ]
    for name, mine, other in zip(("vocab_size", "tie_embeddings"), our_head, their_head):
        if mine != other:
            differences.append(f"{name}: {mine!r} here, {other!r} in {path}")
    if differences:
        raise ValueError(
            "the model differs from the pretrained one: " + "; ".join(differences) + ". Build it from the "
            "pretrained model's config (`hgrn2 import-fla` writes it as a YAML: pass --model THAT.yaml) and "
            "train on data tokenized with its tokenizer"
        )
    ours, theirs = module.hparams.tokenizer, pretrained.hparams.tokenizer
    if not _same_tokenizer(ours, theirs):
        raise ValueError(
            f"the data's tokenizer {ours!r} is not the pretrained model's {theirs!r}: "
            f"set data.init_args.tokenizer to the model's tokenizer"
        )


def _same_tokenizer(a: str, b: str) -> bool:
    if a == b:
        return True
    if "bytes" in (a, b):
        return False
    return Path(a).is_file() and Path(b).is_file() and Path(a).read_bytes() == Path(b).read_bytes()

