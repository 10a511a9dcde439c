"""The PEFT-compatible layer: configs, the injector, adapter management, adapter files, bitsandbytes import.

    config.py      LoRAConfig (PEFT's LoraConfig fields and defaults; to/from adapter_config.json)
    ia3.py         IA3Config and (IA)³ injection; prompt_tuning.py: PromptTuningConfig, PromptTuningModel;
    bitfit.py      BitFitConfig (only biases train); methods.py: inject(model, config) for every family
    state.py       the adapter state a model carries; ModulesToSave; set_adapter (which adapters train)
    injector.py    inject(model, config): adapter layers swapped in by plain recursion; inject_summary
    management.py  add / delete / disable / merge / mixed-batch / weighted adapters; LoRA+ param groups
    files.py       save_adapter / load_adapter in PEFT's adapter directory format
    bnb_import.py  from_bnb: bitsandbytes Linear4bit models reuse their NF4 bytes (never requantized)
    loading.py     load_pretrained: a transformers checkpoint quantized as its safetensors shards stream in

Built on the core (lowrank_ext.nf4, .ops, .nn) and imported by lowrank_ext.finetune; never the reverse.
"""

from lowrank_ext.adapters.bitfit import BitFitConfig
from lowrank_ext.adapters.bnb_import import from_bnb, linear4bit_from_state_dict, nf4_from_bnb_linear
from lowrank_ext.adapters.config import LoRAConfig
from lowrank_ext.adapters.files import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from lowrank_ext.adapters.ia3 import IA3Config
from lowrank_ext.adapters.injector import count_parameters, inject_summary
from lowrank_ext.adapters.loading import load_pretrained
from lowrank_ext.adapters.management import (
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    loraplus_param_groups,
    merge_adapter,
    merge_and_unload,
    mixed_batch,
    unmerge_adapter,
)
from lowrank_ext.adapters.methods import inject
from lowrank_ext.adapters.prompt_tuning import PromptTuningConfig, PromptTuningModel
from lowrank_ext.adapters.state import AdapterState, InjectSummary, ModulesToSave, get_state, set_adapter

__all__ = [
    "AdapterState",
    "BitFitConfig",
    "IA3Config",
    "InjectSummary",
    "LoRAConfig",
    "ModulesToSave",
    "PromptTuningConfig",
    "PromptTuningModel",
    "adapter_state_dict",
    "add_adapter",
    "add_weighted_adapter",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "from_bnb",
    "get_state",
    "inject",
    "inject_summary",
    "linear4bit_from_state_dict",
    "load_adapter",
    "load_pretrained",
    "loraplus_param_groups",
    "merge_adapter",
    "merge_and_unload",
    "mixed_batch",
    "nf4_from_bnb_linear",
    "read_adapter_config",
    "save_adapter",
    "set_adapter",
    "unmerge_adapter",
]
