"""The `hgrn2` command: LightningCLI's fit / validate / test / predict, plus the project's own tools.

    hgrn2 fit --config configs/lm/demo.yaml          train (any model, any DataModule, by class path)
    hgrn2 fit --config ... --ckpt_path last          resume the same run exactly
    hgrn2 generate --ckpt_path ... --prompt "def "   sample text from a language model
    hgrn2 prepare-text --train 'corpus/*.txt' --out data/corpus --tokenizer tokenizer.json
"""

import os
import sys

from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI

from datamodules.text import prepare_text
from hgrn2_lightning.generate import generate_command

TOOLS = {"generate": generate_command, "prepare-text": prepare_text}


class HGRN2CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # What the data decides (vocabulary, tokenizer, classes) reaches the model from one place.
        # A link whose target the chosen model lacks is skipped, so one CLI serves every task.
        for source, target in (
            ("data.vocab_size", "model.init_args.vocab_size"),
            ("data.tokenizer_spec", "model.init_args.tokenizer"),
            ("data.num_classes", "model.init_args.num_classes"),
        ):
            parser.link_arguments(source, target, apply_on="instantiate")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tensorboard's optional TensorFlow import is noisy
    if args and args[0] in TOOLS:
        CLI(TOOLS[args[0]], args=args[1:], as_positional=False)
        return
    HGRN2CLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        parser_kwargs={"parser_mode": "omegaconf", "description": __doc__},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "plugins": [{"class_path": "hgrn2_lightning.checkpoint.AtomicCheckpointIO"}],
            "use_distributed_sampler": False,
        },
    )


if __name__ == "__main__":
    main()
