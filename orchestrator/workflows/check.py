"""`dpo check`: every check that needs no training step, so that what passes here does not fail at load.

The config was validated when it was loaded; here the device, the model and the reference model are
checked without their weights (config.json, tokenizer, vocabulary, positions, LoRA targets, attention:
trainables/model_checks.py, the same check the engine runs first), then the data files are read,
validated and tokenised with the model's tokenizer, exactly as `dpo train` and every sweep trial do.
Nothing is trained or written.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import ExperimentConfig
from orchestrator.config.spec import resolve_run


@dataclass(frozen=True)
class CheckReport:
    train_pairs: int
    held_out_pairs: int
    sft_examples: int | None  # data.sft_train, when the config has one (checked as `dpo sft` reads it)


def check(config: ExperimentConfig) -> CheckReport:
    """Validate the model, the device and the data as training would; raises a UserError naming the problem."""
    from trainables.entrypoints import load_preference_data, load_sft_data

    spec = resolve_run(config)
    data = load_preference_data(spec.model, spec.data, spec.preference, spec.runtime)
    sft_examples = None
    if config.data.sft_train:
        sft = resolve_run(config, stage="sft")
        sft_examples = len(load_sft_data(sft.model, sft.data, sft.runtime)[1])
    return CheckReport(train_pairs=len(data.train), held_out_pairs=len(data.eval), sft_examples=sft_examples)
