"""Adapter layers: Linear4bit (NF4 inference), LoRALinear (dense base), QLoRALinear (NF4 base), and the
(IA)³ layers IA3Linear (dense base) and QIA3Linear (NF4 base). patch_model / unpatch_model swap the fused
model ops into a transformers model (lowrank_ext/nn/fused_model.py).

Each LoRA adapter layer holds any number of named adapters, each a plain LoRA, DoRA or VeRA adapter
(`variant`); the math is in lowrank_ext/nn/functional.py. IA3 layers: lowrank_ext/nn/ia3.py.
"""

from lowrank_ext.nn.fused_model import patch_model, unpatch_model
from lowrank_ext.nn.ia3 import IA3_LAYERS, IA3Linear, QIA3Linear
from lowrank_ext.nn.linear4bit import Linear4bit
from lowrank_ext.nn.lora import AdapterSpec, LoRALinear, QLoRALinear

ADAPTER_LAYERS = (LoRALinear, QLoRALinear)

__all__ = ["ADAPTER_LAYERS", "IA3_LAYERS", "AdapterSpec", "IA3Linear", "Linear4bit", "LoRALinear", "QIA3Linear",
           "QLoRALinear", "patch_model", "unpatch_model"]
