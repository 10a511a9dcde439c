"""lowrank_ext inside the Hugging Face stack: transformers' `from_pretrained(quantization_config=...)`, PEFT's
`get_peft_model`, and transformers.Trainer / TRL / accelerate checkpoints, with lowrank_ext's kernels underneath.

This layer imports transformers and peft; `import lowrank_ext` does not load it (the root package reaches its
names lazily). It sits above `distributed` and below `finetune` (docs/architecture.md).
"""

__all__: list[str] = []

# PEFT's get_peft_model on NF4 models (item 2 of issue 20)
from lowrank_ext.hf.peft_lora import NF4LoraLinear, enable_peft, merge_and_unload

__all__ += ["NF4LoraLinear", "enable_peft", "merge_and_unload"]
