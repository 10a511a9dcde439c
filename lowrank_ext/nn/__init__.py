"""Adapter layers: Linear4bit (NF4 inference), LoRALinear (dense base), QLoRALinear (NF4 base).

Each adapter layer holds any number of named adapters, each a plain LoRA, DoRA or VeRA adapter
(`variant`); the math is in lowrank_ext/nn/functional.py.
"""

from lowrank_ext.nn.linear4bit import Linear4bit
from lowrank_ext.nn.lora import AdapterSpec, LoRALinear, QLoRALinear

ADAPTER_LAYERS = (LoRALinear, QLoRALinear)

__all__ = ["ADAPTER_LAYERS", "AdapterSpec", "Linear4bit", "LoRALinear", "QLoRALinear"]
