"""The `hgrn2` command: LightningCLI's fit / validate / test / predict, plus the project's own tools.

    hgrn2 fit --config configs/lm/demo.yaml          train (any model, any DataModule, by class path)
    hgrn2 fit --config ... --ckpt_path last          resume the same run exactly
    hgrn2 generate --ckpt_path ... --prompt "def "   sample text from a language model
    hgrn2 prepare-text --train 'corpus/*.txt' --out data/corpus --tokenizer tokenizer.json
    hgrn2 lra make-listops --out data/listops-1000 --seed 0     generate LRA ListOps in the release format
    hgrn2 import-fla --folder hgrn2-fla --out model.ckpt         an fla / Hugging Face HGRN2 folder -> checkpoint
    hgrn2 export-fla --ckpt_path model.ckpt --out hgrn2-fla      and back

An input the command cannot use (a config value, a dataset's path or format, a loss gone non-finite) stops it with
a message saying what to fix; HGRN2_TRACEBACK=1 adds the traceback.
"""

import os
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from typing import NoReturn

from jsonargparse import CLI, ArgumentParser, DefaultHelpFormatter
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.listops import make_listops
from datamodules.text import prepare_text
from hgrn2_lightning.generate import generate_command
from hgrn2_lightning.interop import export_fla, import_fla
from hgrn2_lightning.predictions import PredictionWriter
from hgrn2_lightning.throughput import ThroughputMonitor

# Commands of the project's own, beside the Trainer's; a dict value makes a group (`hgrn2 lra make-listops`).
TOOLS = {
    "generate": generate_command,
    "prepare-text": prepare_text,
    "lra": {"make-listops": make_listops},
    "import-fla": import_fla,
    "export-fla": export_fla,
}


class KeepLayoutHelp(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """`--help` shows the command table above as it is laid out."""


class ShortErrors:
    """A wrong option or config key (`--trainer.max_epoch`, a typo in the YAML) stops the command with the error and
    where the options are listed. jsonargparse's own `error` prints the parser's usage first, which for fit is every
    Trainer flag (some 50 lines) and pushes the one line that names the key out of view. The parsers jsonargparse
    makes for a class's arguments (exit_on_error off) raise as before, for the parse to report; HGRN2_TRACEBACK=1
    gives jsonargparse's full report."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("HGRN2_TRACEBACK"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self  # a config file's key is checked by the root parser
        command = parser.prog.replace(" [options]", "")
        self.exit(2, f"error: {_refused_config(message) or message}\n(`{command} --help` lists the options)\n")


class HGRN2Parser(ShortErrors, LightningArgumentParser):
    """fit / validate / test / predict's parser."""


class ToolParser(ShortErrors, ArgumentParser):
    """The tools' parser."""


class HGRN2CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # What the data decides (vocabulary, tokenizer, classes) reaches the model from one place.
        # A link whose target the chosen model lacks is skipped, so one CLI serves every task.
        for source, target in (
            ("data.vocab_size", "model.init_args.vocab_size"),
            ("data.tokenizer_spec", "model.init_args.tokenizer"),
            ("data.num_classes", "model.init_args.num_classes"),
            ("data.input_channels", "model.init_args.input_channels"),
            ("data.paired", "model.init_args.paired"),
        ):
            parser.link_arguments(source, target, apply_on="instantiate")

    def _run_subcommand(self, subcommand: str) -> None:
        """validate / test / predict with `--ckpt_path last` and no last checkpoint stop here: Lightning would
        only warn and evaluate the untrained weights (fit starting afresh is what resuming wants). Without any
        `--ckpt_path` they run on the freshly initialised weights, which is rarely meant: a warning says so."""
        ckpt_path = None if subcommand == "fit" else self.config_init[subcommand].get("ckpt_path")
        if subcommand != "fit" and ckpt_path is None:
            warnings.warn(f"{subcommand} without --ckpt_path runs the model's freshly initialised weights: give "
                          f"--ckpt_path last (the config's run) or a checkpoint's path to evaluate a trained model")
        if ckpt_path != "last":
            return super()._run_subcommand(subcommand)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*there is no last checkpoint available")
            try:
                return super()._run_subcommand(subcommand)
            except UserWarning:
                folders = sorted({str(c.dirpath) for c in self.trainer.checkpoint_callbacks if c.dirpath})
                raise FileNotFoundError(
                    f"{subcommand} --ckpt_path last: no last checkpoint in {folders or 'the run'}; give the config "
                    f"of the trained run (its checkpoint folder) or the checkpoint's path"
                ) from None


USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, MisconfigurationException)
"""What the project (and Lightning, about trainer flags: devices the machine lacks) raises about a user's inputs,
each worded to say what and how to fix it (a config value, a dataset's path or format, a non-finite loss): the
command stops with the message alone, without the traceback, unless HGRN2_TRACEBACK is set."""


def _refused_config(message: str) -> str | None:
    """The class's own message when a model or DataModule refused its config (a value it checks, a key it lacks),
    on one line: jsonargparse wraps it, with the whole config, in an error that lists what each member of the union
    (the class, or None) said, as `- ` items, indented alike; a parse error puts `Parser key "model":` before it."""
    head, union, rest = message.partition("Does not validate against any of the Union subtypes")
    errors = rest.partition("Errors:")[2].partition("Given value type:")[0].strip("\n")
    indent = errors[: len(errors) - len(errors.lstrip())]
    members = ("\n" + errors).split(f"\n{indent}- ")[1:]
    reasons = [" ".join(m.split()) for m in members if "Expected a <class 'NoneType'>" not in m]
    return f"{head.strip()} {reasons[0]}".strip() if union and reasons else None


def _own_message(error: Exception) -> str:
    """The error's message; of an error a DataLoader worker raised, the worker's own line (torch re-raises it with
    the worker's whole traceback as its message)."""
    message = str(error)
    if "\nOriginal Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return message


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tensorboard's optional TensorFlow import is noisy
    try:
        if args and args[0] in TOOLS:
            CLI(TOOLS[args[0]], args=args[1:], as_positional=False, parser_class=ToolParser, prog=f"hgrn2 {args[0]}")
        else:
            _run_cli(argv)
    except USER_ERRORS as error:
        if os.environ.get("HGRN2_TRACEBACK"):
            raise
        reason = _refused_config(str(error))
        if reason is None:
            reason = f"{_own_message(error)}\n(HGRN2_TRACEBACK=1 shows where it was raised)"
        raise SystemExit(f"error: {reason}") from None


def _run_cli(argv: list[str] | None) -> None:
    HGRN2CLI(
        parser_class=HGRN2Parser,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        # allow_abbrev off: argparse would take --trainer.max_step for --trainer.max_steps without a word. prog:
        # the command's name however it was started (`python -m hgrn2_lightning` too), for the errors' hint.
        parser_kwargs={"prog": "hgrn2", "parser_mode": "omegaconf", "description": __doc__,
                       "formatter_class": KeepLayoutHelp, "allow_abbrev": False},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "plugins": [{"class_path": "hgrn2_lightning.checkpoint.AtomicCheckpointIO"}],
            # Persistent: every fit logs tokens (images) per second and MFU, and writes throughput.json; predict
            # writes predictions.pt.
            "callbacks": [ThroughputMonitor(), PredictionWriter()],
            "use_distributed_sampler": False,
        },
    )


if __name__ == "__main__":
    main()
