"""`from_pretrained(path, quantization_config=lowrank_ext.NF4Config())`: a transformers quantization method.

Importing this module registers `NF4Config` and `NF4HfQuantizer` with transformers under quant_method
"lowrank_ext" (`register_quantization_config` / `register_quantizer`). Then:

    AutoModelForCausalLM.from_pretrained(path, quantization_config=NF4Config())   a dense checkpoint: quantized
    AutoModelForCausalLM.from_pretrained(saved_dir)                               our own NF4 checkpoint: read back
    AutoModelForCausalLM.from_pretrained(bnb_dir, quantization_config=NF4Config()) a bitsandbytes 4-bit NF4 one

How a load goes (transformers' loader, our ops inside it):
1. before the model is built (`merge_quantization_configs`, see `_merge_configs`): a checkpoint quantized by
   another method (bitsandbytes fp4 or 8-bit, GPTQ, ...) given with NF4Config is refused; a bitsandbytes 4-bit NF4
   checkpoint becomes an NF4Config with its double quant (its bytes are bitsandbytes' format, which is ours).
2. `_process_model_before_weight_loading` (model on the meta device): the targets are the modules bitsandbytes
   would quantize — exactly an nn.Linear or a transformers Conv1D, minus `get_modules_to_not_convert` (tied
   weights, the output embedding, the last module, `skip_modules`, the model's `_keep_in_fp32_modules`).
   They stay meta modules until their weight arrives.
3. each target's weight, as it streams in (one tensor at a time: transformers loads synchronously when a
   quantizer quantizes on the fly), goes to `_QuantizeNF4`: quantize_nf4(weight [out, in], blocksize,
   double_quant) — a Conv1D's [in, out] weight transposed first (nn/layout.py's rule); the dense tensor is
   dropped, and so are its pages of the checkpoint's memory map (hf/pages.py: transformers keeps the map open as
   long as the model lives, since the dense tensors it loads are views of it). A pre-quantized checkpoint's
   `weight`, `weight.absmax`, ... `weight.quant_state.bitsandbytes__nf4` are gathered per module by one
   WeightConverter and read by `_DeserializeNF4` with `NF4Weight.from_bnb_state_dict` (never requantized).
   An op's error (a malformed 4-bit tensor) is logged by transformers with the others and the load then fails
   with its RuntimeError ("issues during automatic conversion of the weights").
4. `_process_model_after_weight_loading`: every target must have been loaded (a module missing from the
   checkpoint would otherwise be initialized at random with a warning: here it is an error); the targets become
   `Linear4bit` layers, and the model is marked the way PEFT's `prepare_model_for_kbit_training` and Trainer look
   for a trainable 4-bit model (`is_loaded_in_4bit`).

`save_pretrained` writes Linear4bit's state dict (bitsandbytes' keys and bytes) and `config.quantization_config`
(`NF4Config.to_dict`), from which step 3's pre-quantized path rebuilds the same layers.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowrank_ext._reference.nf4 import VALID_BLOCKSIZES
from lowrank_ext.hf.pages import release_file_pages
from lowrank_ext.nf4 import BNB_WEIGHT_SUFFIXES, NF4Weight, quantize_nf4
from lowrank_ext.nn.layout import is_conv1d, weight_is_transposed
from lowrank_ext.nn.linear4bit import Linear4bit, check_compute_dtype

__all__ = ["QUANT_METHOD", "NF4Config", "NF4HfQuantizer"]

QUANT_METHOD = "lowrank_ext"
_BNB_BLOCKSIZE = 64  # bitsandbytes' 4-bit layers always quantize in blocks of 64


def _err(op: str, arg: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"lowrank_ext::{op}: {arg} must {expected}, got {got}")


class NF4Config(QuantizationConfigMixin):
    """lowrank_ext's NF4 quantization for `from_pretrained(..., quantization_config=NF4Config())`.

    blocksize: elements per absmax block (one of 32, 64, ..., 4096; bitsandbytes' 4-bit layers use 64).
    double_quant: quantize the absmax to 8 bits too (bitsandbytes' `bnb_4bit_use_double_quant`).
    compute_dtype: the dtype each NF4 matmul runs in (bitsandbytes' `bnb_4bit_compute_dtype`); None: the input's.
    skip_modules: module names (or patterns, transformers' `should_convert_module` rule) kept dense; None keeps
        what transformers keeps for bitsandbytes (tied weights, the output embedding); a list replaces that default,
        as bitsandbytes' `llm_int8_skip_modules` does.
    """

    def __init__(self, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | str | None = None, skip_modules: list[str] | None = None,
                 **kwargs: Any) -> None:
        op = "NF4Config"
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise _err(op, "quant_method", f"be {QUANT_METHOD!r}", repr(method))
        if kwargs:
            raise TypeError(f"lowrank_ext::{op}: arguments must be blocksize, double_quant, compute_dtype, "
                            f"skip_modules, got unknown {sorted(kwargs)}")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int):
            raise TypeError(f"lowrank_ext::{op}: blocksize must be an int, got {type(blocksize).__name__}")
        if blocksize not in VALID_BLOCKSIZES:
            raise _err(op, "blocksize", f"be one of {VALID_BLOCKSIZES}", blocksize)
        if not isinstance(double_quant, bool):
            raise TypeError(f"lowrank_ext::{op}: double_quant must be a bool, got {type(double_quant).__name__}")
        if skip_modules is not None and not (isinstance(skip_modules, (list, tuple))
                                             and all(isinstance(s, str) for s in skip_modules)):
            raise TypeError(f"lowrank_ext::{op}: skip_modules must be None or a list of module names, "
                            f"got {skip_modules!r}")
        self.quant_method = QUANT_METHOD
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = check_compute_dtype(op, compute_dtype)
        self.skip_modules = None if skip_modules is None else list(skip_modules)

    def to_dict(self) -> dict[str, Any]:
        """What config.json's `quantization_config` holds (compute_dtype by name: JSON has no torch.dtype)."""
        cd = self.compute_dtype
        return {"quant_method": QUANT_METHOD, "blocksize": self.blocksize, "double_quant": self.double_quant,
                "compute_dtype": None if cd is None else str(cd).removeprefix("torch."),
                "skip_modules": None if self.skip_modules is None else list(self.skip_modules)}

    @classmethod
    def from_checkpoint_config(cls, saved: dict | QuantizationConfigMixin, given: NF4Config) -> NF4Config:
        """The NF4Config for a checkpoint whose config.json holds `saved` (a quantization_config), loaded with
        `given`: ours as saved (its bytes decide); a bitsandbytes 4-bit NF4 one read as NF4 (blocksize 64, its
        double quant, its compute dtype unless `given` names one, its skip list); any other method refused."""
        op = "from_pretrained"
        q = saved if isinstance(saved, dict) else saved.to_dict()
        method = q.get("quant_method")
        if method == QUANT_METHOD:
            saved_cfg = cls.from_dict(dict(q))
            if saved_cfg.to_dict() != given.to_dict():  # transformers' rule and warning: the checkpoint's config wins
                warnings.warn(f"lowrank_ext::from_pretrained: the checkpoint is quantized with {saved_cfg.to_dict()}; "
                              f"that config is used, not the NF4Config given ({given.to_dict()})", stacklevel=2)
            return saved_cfg
        if method == "bitsandbytes" or q.get("load_in_4bit") or q.get("load_in_8bit"):
            if not q.get("load_in_4bit") or q.get("load_in_8bit"):
                raise _err(op, "a checkpoint loaded with NF4Config", "be quantized by lowrank_ext or bitsandbytes "
                           "4-bit NF4 (or not at all)", f"bitsandbytes 8-bit (load_in_8bit={q.get('load_in_8bit')})")
            qtype = q.get("bnb_4bit_quant_type", "fp4")
            if qtype != "nf4":
                raise _err(op, "a bitsandbytes 4-bit checkpoint loaded with NF4Config",
                           "have bnb_4bit_quant_type 'nf4'", repr(qtype))
            cd = q.get("bnb_4bit_compute_dtype")
            return cls(blocksize=_BNB_BLOCKSIZE, double_quant=bool(q.get("bnb_4bit_use_double_quant", False)),
                       compute_dtype=given.compute_dtype if given.compute_dtype is not None else cd,
                       skip_modules=q.get("llm_int8_skip_modules"))
        raise _err(op, "a checkpoint loaded with NF4Config", "be quantized by lowrank_ext or bitsandbytes 4-bit NF4 "
                   "(or not at all)", f"quant_method={method!r}")


class _NF4Op(ConversionOps):
    """An op that reports to the one quantizer of this load (transformers deep-copies a converter, with its ops,
    for every module: the copies must share the quantizer, which collects the loaded layers and the errors)."""

    def __init__(self, quantizer: NF4HfQuantizer) -> None:
        self.hf_quantizer = quantizer

    def __deepcopy__(self, memo: dict) -> _NF4Op:
        return type(self)(self.hf_quantizer)


class _QuantizeNF4(_NF4Op):
    """A dense target weight as it arrives -> quantize_nf4(weight), kept for its module's Linear4bit; the dense
    tensor and its pages of the checkpoint's memory map are dropped. Other tensors (a converter may produce a
    target together with other tensors) pass through."""

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model: nn.Module | None = None,
                missing_keys: set[str] | None = None, **kwargs) -> dict:
        q = self.hf_quantizer
        rest = {}
        for name, value in input_dict.items():
            if not q.param_needs_quantization(model, name):
                rest[name] = value
                continue
            value = value[0] if isinstance(value, list) else value
            module_name = name.rpartition(".")[0]
            try:
                module = model.get_submodule(module_name)
                # the injector's / load_pretrained's rule: W [out, in] (a Conv1D stores it [in, out])
                w = value.t().contiguous() if weight_is_transposed(module) else value
                q.keep(model, module_name, quantize_nf4(w, q.quantization_config.blocksize,
                                                           q.quantization_config.double_quant), missing_keys)
            except Exception as e:
                q.load_errors[module_name] = f"{type(e).__name__}: {e}"
                raise
            release_file_pages(value)
            del value, w
        return rest


class _DeserializeNF4(_NF4Op):
    """One module's tensors of a pre-quantized checkpoint (keyed by the serialized names: `weight`,
    `weight.absmax`, ...) -> a Linear4bit over those bytes for a target; a dense weight (only `weight`) passes
    through, cast to its model tensor's dtype."""

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model: nn.Module | None = None,
                missing_keys: set[str] | None = None, **kwargs) -> dict:
        q = self.hf_quantizer
        module_name = full_layer_name.rpartition(".")[0]
        sd = {f"{module_name}.{k}": (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        if module_name not in q.targets:
            if len(sd) > 1:
                q.load_errors[module_name] = (f"the checkpoint stores it 4-bit ({sorted(input_dict)}) but NF4Config keeps it "
                                              f"dense (skip_modules / transformers' default skips)")
                raise _err("from_pretrained", f"{module_name!r}", "be dense in the checkpoint", "4-bit tensors")
            ref = model.get_parameter_or_buffer(full_layer_name)
            t = sd[full_layer_name]
            if t.is_floating_point() and ref.is_floating_point() and t.dtype != ref.dtype:
                t = t.to(ref.dtype)  # what transformers does for a dense model's weight
            return {"weight": t}
        try:
            w = NF4Weight.from_bnb_state_dict(sd, f"{module_name}.")  # every key / byte validated there
            q.keep(model, module_name, w, missing_keys)
        except Exception as e:
            q.load_errors[module_name] = f"{type(e).__name__}: {e}"
            raise
        return {}


class NF4HfQuantizer(HfQuantizer):
    """transformers' side of NF4Config (module docstring): targets chosen as for bitsandbytes, each quantized
    (or deserialized) into a `Linear4bit` as its tensors arrive."""

    requires_calibration = False
    quantization_config: NF4Config
    serialized_names: ClassVar[dict[str, list[str]]] = {"weight": list(BNB_WEIGHT_SUFFIXES)}  # bnb's keys

    def __init__(self, quantization_config: NF4Config, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.targets: set[str] = set()
        self.load_errors: dict[str, str] = {}
        self.loaded: dict[str, NF4Weight] = {}  # module -> its NF4 weight, until the load is finished

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def update_device_map(self, device_map):
        # as bitsandbytes: no device_map loads onto the current CUDA device when there is one (our kernels run on both)
        if device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}
        return device_map

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs) -> bool:
        module_name, _, leaf = param_name.rpartition(".")
        return leaf == "weight" and module_name in self.targets

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> None:
        skip = self.get_modules_to_not_convert(model, self.quantization_config.skip_modules,
                                               getattr(model, "_keep_in_fp32_modules", None))
        self.modules_to_not_convert = skip
        # the modules bitsandbytes' replace_with_bnb_linear converts: exactly nn.Linear, or a Conv1D
        self.targets = {name for name, m in model.named_modules()
                        if (type(m) is nn.Linear or is_conv1d(m)) and should_convert_module(name, skip)}
        self.load_errors, self.loaded = {}, {}

    def keep(self, model: nn.Module, module_name: str, weight: NF4Weight, missing_keys: set[str] | None) -> None:
        """Record target `module_name`'s NF4 weight (its module becomes a Linear4bit once loading is done: see
        `_process_model_after_weight_loading`); its dense weight is marked loaded, so transformers neither reports
        nor initializes it."""
        old = model.get_submodule(module_name)
        want = (_out_features(old), _in_features(old))
        if tuple(weight.shape) != want:
            raise _err("from_pretrained", f"{module_name}.weight", f"have shape {want} ([out, in])",
                       tuple(weight.shape))
        self.loaded[module_name] = weight
        old.weight._is_hf_initialized = True  # still the meta tensor: nothing is allocated for it
        if missing_keys is not None:
            missing_keys.discard(f"{module_name}.weight")

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeNF4(self)

    def get_load_operations(self) -> dict:
        return {"deserialize": _DeserializeNF4}

    def get_weight_conversions(self) -> list:
        if not self.pre_quantized:
            return []
        return [WeightConverter(list(BNB_WEIGHT_SUFFIXES), "weight", [_DeserializeNF4(self)])]

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        names = sorted((self.targets - set(self.loaded)) | set(self.load_errors))
        if names:
            detail = "; ".join(f"{n}: {self.load_errors.get(n, 'no weight in the checkpoint')}" for n in names[:3])
            raise _err("from_pretrained", "every module NF4Config quantizes", "load as NF4",
                       f"{len(names)} that did not ({detail})")
        # The Linear4bit layers go in only now, after transformers' own post-loading steps, which would break them:
        # it replaces every non-persistent buffer by an uninitialized one (the double-quant constants are such
        # buffers) and runs `_init_weights` on modules it has not marked loaded, some of which (GPT-2's attention)
        # write their children's `weight` — a tensor for a meta nn.Linear, an NF4Weight for a Linear4bit.
        for name in sorted(self.loaded):
            old = model.get_submodule(name)
            new = Linear4bit(self.loaded.pop(name), old.bias, self.quantization_config.compute_dtype)
            parent, child = get_module_from_name(model, name)
            setattr(parent, child, new)
        model.is_loaded_in_4bit = True  # PEFT's prepare_model_for_kbit_training and Trainer look for this
        from lowrank_ext.hf.peft_lora import enable_peft

        enable_peft()  # the QLoRA script's get_peft_model then builds our fused layers, with no added line
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """`model.dequantize()`: every Linear4bit becomes an nn.Linear holding deq(W) (in `dtype`, else the weight's
        own dtype), as transformers does for bitsandbytes (a Conv1D target comes back as an nn.Linear too)."""
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
            w = layer.weight.dequantize(dtype)
            new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            device=w.device, dtype=w.dtype)
            with torch.no_grad():
                new.weight.copy_(w)
                if layer.bias is not None:
                    new.bias.copy_(layer.bias)
            parent, child = get_module_from_name(model, name)
            setattr(parent, child, new)
        model.is_loaded_in_4bit = False
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _in_features(m: nn.Module) -> int:
    return int(m.weight.shape[0] if is_conv1d(m) else m.in_features)


def _out_features(m: nn.Module) -> int:
    return int(m.weight.shape[1] if is_conv1d(m) else m.out_features)


# ---- registration (once per process: transformers refuses a second registration under one name)
if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
    register_quantization_config(QUANT_METHOD)(NF4Config)
if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
    register_quantizer(QUANT_METHOD)(NF4HfQuantizer)

# transformers' merge of a checkpoint's quantization_config with the one given to from_pretrained requires the two
# to be the same class, so a bitsandbytes NF4 checkpoint could never load through NF4Config, and another method's
# checkpoint would fail with transformers' message. This wraps it for an NF4Config argument only (the one hook
# transformers calls before the model is built); every other call goes to transformers' own function unchanged.
_transformers_merge = AutoHfQuantizer.merge_quantization_configs.__func__


def _merge_configs(cls, quantization_config, quantization_config_from_args):
    if isinstance(quantization_config_from_args, NF4Config):
        return NF4Config.from_checkpoint_config(quantization_config, quantization_config_from_args)
    return _transformers_merge(cls, quantization_config, quantization_config_from_args)


if not getattr(AutoHfQuantizer.merge_quantization_configs, "_lowrank_ext", False):
    _merge_configs._lowrank_ext = True
    AutoHfQuantizer.merge_quantization_configs = classmethod(_merge_configs)
