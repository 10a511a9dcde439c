"""lowrank_ext inside the Hugging Face stack: transformers' `from_pretrained(quantization_config=...)`, PEFT's
`get_peft_model`, and transformers.Trainer / TRL / accelerate checkpoints, with lowrank_ext's kernels underneath.

This layer imports transformers and peft; `import lowrank_ext` does not load it (the root package reaches its
names lazily). It sits above `distributed` and below `finetune` (docs/architecture.md).
"""

from lowrank_ext.hf.quantizer import NF4Config, NF4HfQuantizer

__all__: list[str] = ["NF4Config", "NF4HfQuantizer"]
