"""The config layer: the typed schema, loading at the CLI edge, and resolution into the run spec and
storage layout. Importing it imports no torch and no ray.

    schema.py       every section, key, default and rule (pydantic); study_schema.py for `study:` and `benchmarks:`
    incremental.py  the incremental beta procedure's settings (defaults and rules shared with `sweep:`)
    loading.py      YAML + --set -> ExperimentConfig, validated once
    layout.py       every path of a sweep, study or run (StorageLayout, OutputLayout)
    spec.py         ExperimentConfig -> RunSpec / Experiment (what crosses Ray, MLflow and disk)
    reference.py    `dpo config-reference`: the table of every key
"""

from orchestrator.config.loading import load_config
from orchestrator.config.schema import ExperimentConfig
from orchestrator.errors import ConfigError

__all__ = ["ConfigError", "ExperimentConfig", "load_config"]
