"""Every check of the models, the tokenizer and the device that needs no weights and no training step.

`check_model_can_train` runs in `dpo check` (orchestrator/workflows/check.py) and in the engine before any
work (trainables/entrypoints.py: loading the data, before the reference pass), so what passes `check` does
not fail at load. It reads only config.json (AutoConfig), the tokenizer and the weight files' headers, and
builds the model on the meta device (no memory, no weights), then refuses with a ModelError (exit 2) that
names the config key and the path:
- a model folder without a readable config.json, without safetensors weights, or whose config.json does
  not describe a causal LM transformers can build (code shipped with a model runs only with
  model.trust_remote_code);
- a vocabulary (embedding rows) smaller than the tokenizer's ids, special tokens included, or weight
  files whose tensors do not have the shapes config.json describes (or are of another architecture);
- data.max_length beyond the model's positions (max_position_embeddings, n_positions, ...);
- a reference.path model that does not share the policy's vocabulary (rows and token ids);
- model.lora.target_modules that match no module of the model;
- a train.device this machine does not have.
flash_attention_2 without flash-attn falls back to sdpa with a warning (modeling.usable_attn_implementation).
Tested by `python -m pytest tests/test_adversarial_model.py -q`.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainables.modeling import ModelError, excerpt, load_tokenizer, resolve_device, usable_attn_implementation
from trainables.settings import DataArgs, ModelArgs, PreferenceArgs, RuntimeArgs
from trainables.tokenization import prepare_tokenizer

logger = logging.getLogger(__name__)

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx", "seq_length")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SAVE_HINT = "give a folder written by save_pretrained(safe_serialization=True) or a hub name"


@dataclass
class ModelShape:
    """What the checks know of one model without its weights."""

    key: str  # the config key that names it: model.path or reference.path
    path: str
    config: Any  # transformers PretrainedConfig
    meta_model: torch.nn.Module  # the architecture on the meta device
    local: Path | None  # the folder, None for a hub model

    @property
    def where(self) -> str:
        return f"{self.key}={excerpt(self.path, 120)}"

    @property
    def vocab_rows(self) -> int:
        """Token rows of the input and output embeddings (the smaller, when they differ)."""
        rows = [module.num_embeddings for module in [self.meta_model.get_input_embeddings()]
                if isinstance(module, torch.nn.Embedding)]
        output = self.meta_model.get_output_embeddings()
        if isinstance(output, torch.nn.Linear):
            rows.append(output.out_features)
        declared = getattr(self.config.get_text_config(), "vocab_size", None)
        if isinstance(declared, int) and not isinstance(declared, bool):
            rows.append(declared)
        return min(rows) if rows else 0


def check_model_can_train(model_args: ModelArgs, data_args: DataArgs, preference_args: PreferenceArgs | None = None,
                          runtime_args: RuntimeArgs | None = None):
    """Refuse (ModelError) a model, tokenizer, reference or device that training would fail on or train wrong
    with; return the policy's tokenizer, prepared for training. preference_args / runtime_args None: the
    reference model / the device are not checked (a sweep's workers get theirs from Ray)."""
    if runtime_args is not None:
        resolve_device(runtime_args.device)
    policy = read_model(model_args.path, "model.path", model_args)
    tokenizer_key = "model.tokenizer_path" if model_args.tokenizer_path else "model.path"
    tokenizer = load_prepared_tokenizer(model_args, tokenizer_key)
    token_ids = tokenizer_id_count(tokenizer)
    check_fits(policy, token_ids, tokenizer_key, data_args.max_length)
    check_weight_shapes(policy)
    if model_args.lora_rank is not None:
        check_lora_targets(policy, model_args.lora_target_modules, model_args.trust_remote_code)
    usable_attn_implementation(model_args.attn_implementation)  # warns of the fallback to sdpa before any work
    reference_path = _separate_reference(model_args, preference_args)
    if reference_path is not None:
        reference = read_model(reference_path, "reference.path", model_args)
        check_fits(reference, token_ids, tokenizer_key, data_args.max_length)
        check_weight_shapes(reference)
        check_same_vocabulary(reference, policy, tokenizer, model_args.trust_remote_code)
    return tokenizer


def load_prepared_tokenizer(model_args: ModelArgs, key: str | None = None):
    """The policy's tokenizer with a pad token (its eos when it has none); a ModelError names the key."""
    key = key or ("model.tokenizer_path" if model_args.tokenizer_path else "model.path")
    path = model_args.tokenizer_path or model_args.path
    try:
        tokenizer = load_tokenizer(path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code)
    except ModelError as error:
        raise ModelError(f"{key}: {error}") from error
    try:
        return prepare_tokenizer(tokenizer)
    except ValueError as error:
        raise ModelError(f"{key}: the tokenizer of {excerpt(path, 120)} has neither a pad nor an eos token, so answers "
                         "cannot end and rows cannot be padded; give a tokenizer with an eos token") from error


def tokenizer_id_count(tokenizer) -> int:
    """How many embedding rows the tokenizer's ids need: its largest id + 1 (added and special tokens included)."""
    ids = list(tokenizer.get_vocab().values())
    return max(len(tokenizer), max(ids) + 1 if ids else 0)


def _separate_reference(model_args: ModelArgs, preference_args: PreferenceArgs | None) -> str | None:
    if preference_args is None or preference_args.reference_mode == "none" or not preference_args.reference_path:
        return None
    same = Path(preference_args.reference_path).expanduser().resolve() == Path(model_args.path).expanduser().resolve()
    return None if same else preference_args.reference_path


# ---- one model: its files and its config, read without the weights ------------------------------------

def read_model(path: str, key: str, model_args: ModelArgs) -> ModelShape:
    """config.json (and, for a local folder, the weights' presence and headers) of the model at `path`."""
    local = Path(path).expanduser()
    if local.exists():
        _check_local_files(local, key)
    config = _read_config(path, key, model_args)
    meta_model = _meta_model(config, path, key, model_args.trust_remote_code)
    return ModelShape(key, path, config, meta_model, local if local.exists() else None)


def _check_local_files(folder: Path, key: str) -> None:
    where = f"{key}={excerpt(folder, 120)}"
    if not folder.is_dir():
        raise ModelError(f"{where} is a file, not a model folder; {SAVE_HINT}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        adapters = " (it holds LoRA adapters: give the merged model, as `dpo export` writes it)" \
            if (folder / "adapter_config.json").is_file() else ""
        raise ModelError(f"{where} has no config.json{adapters}; {SAVE_HINT}")
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ModelError(f"{where}: config.json is not readable JSON ({excerpt(error, 120)}); re-save the model with "
                         "save_pretrained or restore the file") from error
    if not isinstance(settings, dict) or not isinstance(settings.get("model_type"), str):
        raise ModelError(f"{where}: config.json has no model_type (e.g. \"llama\"); it must be the config that "
                         "save_pretrained wrote")
    for name in ("vocab_size", *POSITION_KEYS):
        value = settings.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelError(f"{where}: config.json {name} must be a positive whole number, got {excerpt(repr(value), 60)}")
    for weights in _weight_files(folder, where):
        if not weights.is_file():
            raise ModelError(f"{where}: weight file {weights.name} is missing; {SAVE_HINT}")


def _weight_files(folder: Path, where: str) -> list[Path]:
    if (folder / WEIGHTS).exists():
        return [folder / WEIGHTS]
    index = folder / WEIGHTS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ModelError(f"{where}: {WEIGHTS_INDEX} is not a readable shard index ({excerpt(error, 100)}); "
                             "re-save the model with save_pretrained") from error
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    found = f" (only {', '.join(pickled[:3])}: pickled weights, which are never loaded)" if pickled else ""
    raise ModelError(f"{where} holds no safetensors weights ({WEIGHTS}){found}; {SAVE_HINT}")


def _read_config(path: str, key: str, model_args: ModelArgs):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code)
    except Exception as error:  # noqa: BLE001 - the user's config.json or hub name: any failure is bad input
        raise ModelError(_config_failure(path, key, error)) from error


def _config_failure(path: str, key: str, error: Exception) -> str:
    text = str(error)
    where = f"{key}={excerpt(path, 120)}"
    if "trust_remote_code" in text or "custom code" in text:
        return (f"{where}: the model needs Python code shipped with it, which never runs unless you set "
                "model.trust_remote_code: true (only for a model whose code you trust)")
    return f"{where}: its config cannot be read ({excerpt(text, 200)}); {SAVE_HINT}"


def _meta_model(config, path: str, key: str, trust_remote_code: bool) -> torch.nn.Module:
    """The architecture on the meta device: no memory, no weights; a config it cannot build is refused."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - a config.json that describes no buildable causal LM is bad input
        kind = excerpt(repr(getattr(config, "model_type", "?")), 40)
        reason = "" if "Unrecognized configuration class" in str(error) else f" ({excerpt(error, 200)})"
        raise ModelError(f"{key}={excerpt(path, 120)}: config.json (model_type {kind}) does not describe a causal "
                         f"language model transformers can build{reason}; {SAVE_HINT}") from error


def check_weight_shapes(shape: ModelShape) -> None:
    """The weight files of a local model hold the architecture config.json describes: each tensor named like a
    parameter of it has that parameter's shape, and at least one does. Read from the files' headers only."""
    from safetensors import safe_open

    if shape.local is None or getattr(shape.config, "quantization_config", None):
        return  # a hub model's files are not here; quantized weights are stored packed
    expected = {name: tuple(tensor.shape) for name, tensor in shape.meta_model.state_dict().items()}
    prefix = getattr(shape.meta_model, "base_model_prefix", "") + "."
    matched = 0
    for weights in _weight_files(shape.local, shape.where):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except Exception as error:  # noqa: BLE001 - a damaged weight file is bad input
            raise ModelError(f"{shape.where}: weight file {weights.name} cannot be read ({excerpt(error, 120)}); "
                             f"re-save or re-download the model") from error
        for name, dims in found.items():
            wanted = expected.get(name, expected.get(name[len(prefix):] if name.startswith(prefix) else prefix + name))
            if wanted is None:
                continue
            matched += 1
            if dims != wanted:
                raise ModelError(f"{shape.where}: config.json gives {name} the shape {list(wanted)} but {weights.name} "
                                 f"holds {list(dims)}; config.json and the weights belong to different models: restore "
                                 "the config.json saved with these weights (vocab_size, positions, sizes)")
    if expected and not matched:
        raise ModelError(f"{shape.where}: none of the tensors in its weight files belongs to the "
                         f"{excerpt(shape.config.model_type, 40)} architecture of its config.json; the weights are of "
                         "another model: keep config.json and the weights that save_pretrained wrote together")


# ---- the model against the tokenizer, the data and the other model ------------------------------------

def check_fits(shape: ModelShape, token_ids: int, tokenizer_key: str, max_length: int) -> None:
    """The tokenizer's ids fit the vocabulary and data.max_length fits the positions."""
    rows = shape.vocab_rows
    if rows < token_ids:
        raise ModelError(f"{shape.where}: the model has {rows} vocabulary rows (config.json vocab_size) but the tokenizer "
                         f"({tokenizer_key}) uses {token_ids} token ids, special tokens included; use the tokenizer "
                         "saved with this model, or a model whose vocabulary covers the tokenizer")
    text_config = shape.config.get_text_config()
    for name in POSITION_KEYS:
        positions = getattr(text_config, name, None)
        if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
            if max_length > positions:
                raise ModelError(f"data.max_length: {max_length} tokens is beyond the {positions} positions of "
                                 f"{shape.where} (config.json {name}); set data.max_length to {positions} or less")
            return


def check_same_vocabulary(reference: ModelShape, policy: ModelShape, tokenizer, trust_remote_code: bool) -> None:
    """The reference reads the policy's token ids as the same tokens: same vocabulary rows and, when the
    reference folder has a tokenizer, the same id for every token of the policy's tokenizer."""
    if reference.vocab_rows != policy.vocab_rows:
        raise ModelError(f"{reference.where}: its vocabulary has {reference.vocab_rows} rows, the policy's "
                         f"(model.path) {policy.vocab_rows}; DPO compares both models on the same token ids, so the "
                         "reference must share the policy's vocabulary (usually it is the model DPO starts from)")
    if reference.local is None or not any((reference.local / name).is_file()
                                          for name in ("tokenizer.json", "tokenizer_config.json")):
        return
    try:
        reference_vocab = load_tokenizer(str(reference.local), trust_remote_code=trust_remote_code).get_vocab()
    except ModelError as error:
        raise ModelError(f"reference.path: {error}") from error
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if reference_vocab.get(token) != token_id:
            raise ModelError(f"{reference.where}: its tokenizer gives the token {excerpt(repr(token), 40)} the id "
                             f"{reference_vocab.get(token)}, the policy's tokenizer {token_id}; the reference must "
                             "use the policy's tokenizer (the same token ids)")


def check_lora_targets(shape: ModelShape, target_modules, trust_remote_code: bool) -> None:
    """model.lora.target_modules match modules of the model (peft's own matching, on the meta device)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ModelError("model.lora needs the peft package: pip install -e '.[lora]' (or remove model.lora)") from error
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config, trust_remote_code=trust_remote_code)  # a fresh copy: peft changes the model it wraps
    try:
        lean = {"low_cpu_mem_usage": True} if "low_cpu_mem_usage" in inspect.signature(get_peft_model).parameters else {}
        get_peft_model(model, LoraConfig(r=1, target_modules=targets, task_type="CAUSAL_LM"), **lean)  # peft >= 0.13
    except Exception as error:  # noqa: BLE001 - peft refusing the user's target list is bad input
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in shape.meta_model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise ModelError(f"model.lora.target_modules: {excerpt(repr(targets), 80)} cannot get adapters in "
                         f"{shape.where} ({excerpt(error, 120)}); its linear modules are "
                         f"{excerpt(', '.join(linear), 200)}, or use all-linear") from error
