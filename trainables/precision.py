"""Which weight dtypes may train, as a torch-free rule shared by the config (at resolution, so `dpo check`,
`dpo train`, `dpo sweep` and `dpo study` refuse before any work) and the engine (its own guard).

The engine trains fp32 master weights and computes in bf16 under autocast (train.precision: bf16, or
auto on a CUDA GPU with bf16), or under FSDP's bf16 mixed-precision policy; checkpoints keep the fp32
masters, so resume is exact. What it refuses, and why:
- model.dtype: bfloat16 with full-weight training: AdamW on bf16 weights without an fp32 master copy
  rounds most updates away (one step at lr 5e-7 changed 0.07% to 1% of the elements, issue 18), so
  training silently stops. Under model.lora the bf16 base is frozen and the adapters are fp32: allowed.
- model.dtype: float16, even under LoRA: a frozen fp16 base still computes and back-propagates in fp16,
  and there is no loss scaler here to keep small gradients from flushing to zero.
Tested by `python -m pytest tests/test_precision.py -q`.
"""

from __future__ import annotations

FIX = ("keep model.dtype: float32 and set train.precision: bf16 (bf16 compute under autocast over fp32 master "
       "weights)")


def check_weight_dtype(dtype: str, lora: bool) -> None:
    """ValueError naming model.dtype and the fix when weights of `dtype` would not train safely."""
    if dtype == "float16":
        raise ValueError(f"model.dtype: float16 cannot train safely (fp16 compute needs a loss scaler, which this "
                         f"engine does not run); {FIX}, or, with model.lora, use model.dtype: bfloat16 for the frozen base")
    if dtype == "bfloat16" and not lora:
        raise ValueError(f"model.dtype: bfloat16 with full-weight training would stop learning (AdamW updates round "
                         f"away on bf16 weights without an fp32 master copy); {FIX}, or add model.lora to train "
                         f"adapters over a frozen bfloat16 base")
