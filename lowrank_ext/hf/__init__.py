"""lowrank_ext inside the Hugging Face stack: transformers' `from_pretrained(quantization_config=...)`, PEFT's
`get_peft_model`, and transformers.Trainer / TRL / accelerate checkpoints, with lowrank_ext's kernels underneath.

This layer imports transformers and peft; `import lowrank_ext` does not load it (the root package reaches its
names lazily). It sits above `distributed` and below `finetune` (docs/architecture.md).

    quantizer.py    NF4Config: from_pretrained(path, quantization_config=NF4Config()) builds Linear4bit layers as the
                    checkpoint streams in; save_pretrained writes bitsandbytes' bytes (pages.py: the mmap pages freed)
    peft_lora.py    enable_peft(): peft.get_peft_model on a model of lowrank_ext Linear4bit layers builds
                    NF4LoraLinear (one fused nf4_lora_linear per layer); merge_and_unload(model, requantize=...)
    peft_model.py   to_peft_model(model): a lowrank_ext.inject model as a peft.PeftModel (LowrankPeftModel), so
                    Trainer / TRL / accelerate checkpoint, resume and save_model it as an adapter model;
                    register_accelerate_hooks(accelerator): adapter-only accelerate save_state / load_state
"""

from lowrank_ext.hf.peft_lora import NF4LoraLinear, enable_peft, merge_and_unload  # get_peft_model on NF4 models
from lowrank_ext.hf.peft_model import LowrankPeftModel, register_accelerate_hooks, to_peft_model  # Trainer / TRL
from lowrank_ext.hf.quantizer import NF4Config, NF4HfQuantizer  # from_pretrained(quantization_config=NF4Config())

__all__: list[str] = ["LowrankPeftModel", "NF4Config", "NF4HfQuantizer", "NF4LoraLinear", "enable_peft", "merge_and_unload",
                      "register_accelerate_hooks", "to_peft_model"]
