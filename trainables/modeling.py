"""Loading causal LMs and tokenizers safely, and fingerprinting them for caches.

Every model in the project (policy, reference, exported checkpoints) loads through `load_causal_lm`:
safetensors only, `trust_remote_code` only when the config says so, dropout disabled by default (as TRL
does, so step 0 of DPO starts exactly at ln 2). Works for a local directory written by save_pretrained
or a hub name. A model, tokenizer or device that cannot be used is a ModelError (a user error, exit 2);
trainables/model_checks.py checks everything that needs no weights before any work. Tested by
`python -m pytest tests/test_engine.py tests/test_adversarial_model.py -q`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from trainables.errors import UserError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(UserError):
    """A model, tokenizer or device that cannot be used; the message names the config key and the path."""


class ModelLoadError(ModelError, OSError):
    """A model or tokenizer that does not load (an OSError too, as the loaders raised before)."""


def excerpt(text: object, limit: int = 200) -> str:
    """At most `limit` characters of a message or value, on one line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def resolve_device(device: str | None = None, key: str = "train.device") -> torch.device:
    """`auto`/None picks CUDA when present, else CPU; a device this machine does not have is a ModelError."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ModelError(f"{key}: {excerpt(repr(device), 80)} is not a device; use auto, cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(f"{key}: {device} asks for a CUDA GPU but this machine has none that PyTorch can use; "
                             "set it to auto or cpu (or install a CUDA build of PyTorch)")
        if resolved.index is not None and resolved.index >= count:
            raise ModelError(f"{key}: {device} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}; set it to one of them, cuda or auto")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"{key}: {device} (Apple GPU) is not available on this machine; set it to auto or cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"{key}: {device} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return resolved


def usable_attn_implementation(requested: str | None, *, warn: bool = True) -> str | None:
    """The attention kernel to load with: flash_attention_2 falls back to sdpa (a warning, or an info line
    when warn is False) when the flash-attn package or a CUDA GPU is missing."""
    if requested != "flash_attention_2":
        return requested
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        return requested
    logger.log(logging.WARNING if warn else logging.INFO,
               "model.attn_implementation: flash_attention_2 needs the flash-attn package and a CUDA GPU, which this "
               "machine lacks; using sdpa (same results, slower on long rows). Install flash-attn, or set "
               "model.attn_implementation: sdpa to silence this")
    return "sdpa"


def resolve_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`auto` means bf16 autocast on a CUDA device that supports it, full fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def check_trainable_dtype(dtype: str, lora: bool) -> None:
    """The engine's own guard (the config refuses the same at resolution): ModelError for model.dtype
    float16, or bfloat16 without LoRA (trainables/precision.py says why)."""
    from trainables.precision import check_weight_dtype

    try:
        check_weight_dtype(dtype, lora)
    except ValueError as error:
        raise ModelError(str(error)) from None


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant torch.utils.checkpoint through Hugging Face's
    own switch): the layers keep only their inputs for backward; losses and gradients are unchanged."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                         "checkpointing in transformers; set train.gradient_checkpointing: false")
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache is useless in training and HF warns about it under checkpointing


def load_causal_lm(
    path: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    disable_dropout: bool = True,
):
    """Load a Hugging Face causal LM from a directory or hub name (safetensors weights only)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        revision=revision,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        dtype=_DTYPES[dtype],
    )
    attn_implementation = usable_attn_implementation(attn_implementation, warn=False)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as error:  # flash-attn reported present but unusable (a broken or mismatched install)
        if attn_implementation != "flash_attention_2":
            raise ModelLoadError(f"could not load {path!r}: {excerpt(error)}") from error
        logger.warning("model.attn_implementation: flash_attention_2 could not be used (%s); using sdpa (same "
                       "results, slower on long rows). Fix the flash-attn install, or set model.attn_implementation: "
                       "sdpa", excerpt(error, 160))
        kwargs["attn_implementation"] = "sdpa"
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        if attn_implementation and "attn_implementation" in str(error):
            logger.warning("model %s does not support attn_implementation=%s; using its default", path, attn_implementation)
            kwargs.pop("attn_implementation")
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            raise ModelLoadError(
                f"could not load {path!r} as a causal LM with safetensors weights: {excerpt(error)}. "
                "Give a directory written by save_pretrained(safe_serialization=True) or a hub name."
            ) from error
    if disable_dropout:
        disable_dropout_in(model)
    return model


def attach_lora(model, *, rank: int, alpha: float, dropout: float, target_modules, adapter_dir: str | None = None):
    """Wrap a causal LM with trainable LoRA adapters (new, or resumed from a saved adapter folder)."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError as error:
        raise ModelError("model.lora needs the peft package: pip install -e '.[lora]' (or remove model.lora)") from error
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def disable_dropout_in(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 so train-mode forwards are deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def load_tokenizer(path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """Load the tokenizer that belongs to a model directory or hub name."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        return _as_declared(tokenizer, path)
    except Exception as error:  # noqa: BLE001 - the user's tokenizer files: any failure to read them is bad input
        raise ModelLoadError(f"could not load a tokenizer from {path!r}: {excerpt(error)}. Point model.tokenizer_path "
                             "at a folder with the model's tokenizer files (tokenizer.json, tokenizer_config.json)") from error


# tokenizer_config.json classes that mean "the tokenizer.json file as it is" (no model-specific Python class)
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _as_declared(tokenizer, path: str):
    """The tokenizer the directory declares, when AutoTokenizer chose another one.

    transformers 5 picks the tokenizer class from config.json's model_type (e.g. Qwen2Tokenizer for any
    qwen2 model) even when tokenizer_config.json declares a generic tokenizer.json backend; a custom
    tokenizer saved beside such a model then turns words into no tokens at all. A local directory that
    declares a generic class gets exactly its tokenizer.json.
    """
    config_file = Path(path).expanduser() / "tokenizer_config.json"
    if not config_file.is_file() or not (config_file.parent / "tokenizer.json").is_file():
        return tokenizer
    declared = json.loads(config_file.read_text()).get("tokenizer_class")
    if declared not in GENERIC_TOKENIZER_CLASSES or type(tokenizer).__name__ in GENERIC_TOKENIZER_CLASSES:
        return tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(config_file.parent))


def _hash_file(path: Path, digest) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 23), b""):
            digest.update(block)


def model_fingerprint(path: str, revision: str | None = None) -> str:
    """Content hash of a local model (config + weights), or name@revision for a hub model.

    Local weights are hashed in full (about 1 GB/s), so a fine-tuned model with the same shapes and
    file sizes still gets a different fingerprint.
    """
    local = Path(path).expanduser()
    digest = hashlib.sha256()
    if not local.is_dir():
        digest.update(f"hub:{path}@{revision or 'main'}".encode())
        return digest.hexdigest()[:16]
    files = sorted(local.glob("*.safetensors")) + sorted(local.glob("config.json"))
    if not files:
        raise FileNotFoundError(f"{local} holds no *.safetensors weights or config.json")
    for file in files:
        digest.update(file.name.encode())
        _hash_file(file, digest)
    return digest.hexdigest()[:16]


def model_class_name(path: str) -> str:
    """The class config.json names (`architectures`) for a local model; the hub name stands for a hub one."""
    config_file = Path(path).expanduser() / "config.json"
    if not config_file.is_file():
        return f"hub:{path}"
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return "unreadable-config"
    return ",".join(str(name) for name in architectures) or "unnamed"


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def save_model_and_tokenizer(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """save_pretrained both (safetensors), unwrapping DDP if needed.

    state_dict: the weights to write instead of the model's own (the full state gathered from an FSDP model).
    """
    unwrapped = getattr(model, "module", model)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    unwrapped.save_pretrained(directory, safe_serialization=True, **extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
