"""Memory of a fine-tuning run: gradient checkpointing, a peak estimate made from config.json alone, and the
split of a measured peak.

    enable_gradient_checkpointing(model)   recompute each transformer block's forward in backward
                                           (torch.utils.checkpoint, non-reentrant)
    chunked_lm_loss(model, batch)          the causal-LM loss with the output head + cross-entropy checkpointed
                                           in chunks: the [tokens, vocab] logits are never held whole
    estimate(model_dir_or_config, ...)     bytes of base weights, adapters, gradients, optimizer state and
                                           activations (with and without checkpointing) for full fine-tuning,
                                           LoRA and QLoRA: `python -m lowrank_ext memory`
    trim_freed_memory()                    glibc: free heap pages handed back to the OS (between steps)
    measured_split(model, optimizer)       the bytes a live run holds: NF4 base, other weights, adapter +
                                           gradients + optimizer state (the finetune summary)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lowrank_ext.adapters.targets import is_linear_like, output_head_name, select_targets
from lowrank_ext.nf4 import nf4_nbytes
from lowrank_ext.nn.layout import linear_in_out

__all__ = ["ROUTER_AUX_LOSS_MODEL_TYPES", "Estimate", "UnmodeledBlock", "chunked_loss_blocker", "chunked_lm_loss",
           "enable_gradient_checkpointing", "estimate", "format_estimate", "import_model_code", "measured_split",
           "runtime_bytes", "supports_chunked_loss", "trim_freed_memory"]


# ------------------------------------------------------------------------------------- checkpointing
def _save_contracting(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep the output of every fused NF4 + LoRA projection that maps more
    features to fewer (a Llama block's down_proj, and k_proj / v_proj under GQA), recompute everything else.
    Recomputing a projection costs in x out multiply-adds per token and keeping its output costs `out` values,
    so the projections with the most inputs per output are the cheapest to keep. On SmolLM2 (k, v: 576 -> 192,
    down: 1536 -> 576) that is 960 values per token and block — 2 MiB a block for 4 x 128 tokens — for 31% of
    the block's projection FLOPs not recomputed. (With a frozen NF4 base the backward computes no weight
    gradient, so a full recompute would add ~50% to a step, not the textbook ~33%.)"""
    from torch.utils.checkpoint import CheckpointPolicy

    if op is torch.ops.lowrank_ext.nf4_lora_linear.default and args[0].shape[-1] > args[8]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_kwargs() -> dict:
    import functools

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return {"use_reentrant": False,
            "context_fn": functools.partial(create_selective_checkpoint_contexts, _save_contracting)}


def enable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Keep only each transformer block's input (and the output of its contracting projections: _save_contracting)
    for backward and recompute the rest of the block's forward there (torch.utils.checkpoint,
    use_reentrant=False, a selective policy): our custom ops run again in the recompute, and the dropout masks are
    the same (checkpoint restores the RNG state). A transformers model uses its own switch
    (`activation_checkpointing_enable` / `gradient_checkpointing_enable`, which also turns the KV cache off in
    training); any other module gets each block of lowrank_ext.distributed.transformer_blocks wrapped."""
    kwargs = _checkpoint_kwargs()
    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        fn = getattr(model, name, None)
        if callable(fn) and getattr(model, "supports_gradient_checkpointing", False):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias, on older transformers
                fn(kwargs)
            return model
    from lowrank_ext.distributed import transformer_blocks

    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"lowrank_ext finetune: --gradient-checkpointing must find transformer blocks (an "
                         f"nn.ModuleList of layers holding adapter layers) in the model, got none in "
                         f"{type(model).__name__}")
    for block in blocks:
        _checkpoint_forward(block)
    return model


def _checkpoint_forward(block: nn.Module) -> None:
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def checkpointed(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, **_checkpoint_kwargs(), **kwargs)
        return forward(*args, **kwargs)

    block.forward = checkpointed


_LOSS_CHUNK = 1 << 22  # logits elements (16 MiB of fp32) per chunk of the checkpointed loss


# Causal LMs whose forward adds the router load-balancing loss in the one standard form (read in each family's
# modeling file): loss = CE + router_aux_loss_coef · load_balancing_loss_func(router_logits, num_experts,
# num_experts_per_tok, attention_mask), all gated on config.output_router_logits. chunked_lm_loss adds that term
# with the model's own function and attributes; each family here is held to the model's own loss by a test.
# Any other family that outputs router logits (its own signature or coefficient: Doge, JetMoE, ...) trains on
# the model's own loss instead (supports_chunked_loss is False).
ROUTER_AUX_LOSS_MODEL_TYPES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


def chunked_loss_blocker(model: nn.Module) -> str | None:
    """Why chunked_lm_loss would not be the model's own objective for `model` (None: it is exactly). The one rule
    behind supports_chunked_loss and chunked_lm_loss's refusal."""
    cfg = getattr(model, "config", None)
    if cfg is None or not callable(getattr(model, "get_output_embeddings", None)):
        return "it is not a transformers causal LM (no config / output embeddings)"
    for k in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(cfg, k, None) not in (None, 1.0):
            return f"its logits are scaled or soft-capped (config.{k} = {getattr(cfg, k)!r})"
    decoder = model._modules.get("model")  # a direct child: not one a wrapper forwards (prompt tuning's prepends)
    if not isinstance(decoder, nn.Module) or model.get_output_embeddings() is None:
        return "it has no `model` decoder child and output head"
    # the decoder must be the bare model (hidden states out), not a wrapped causal LM (a PEFT model's .model)
    inner_head = getattr(decoder, "get_output_embeddings", None)
    if callable(inner_head) and inner_head() is not None:
        return "its `model` child is a whole causal LM (a wrapper), not the bare decoder"
    # terms a forward adds to the cross-entropy: a router aux loss (MoE), Bamba's z-loss, a custom loss function
    model_type = getattr(cfg, "model_type", None)
    if getattr(cfg, "output_router_logits", False) and model_type not in ROUTER_AUX_LOSS_MODEL_TYPES:
        return (f"its forward adds a router auxiliary loss (config.output_router_logits) in a form not reproduced "
                f"for model_type {model_type!r} (done for {ROUTER_AUX_LOSS_MODEL_TYPES})")
    if (getattr(cfg, "z_loss_coefficient", None) or 0) > 0:
        return f"its forward adds a z-loss (config.z_loss_coefficient = {cfg.z_loss_coefficient})"
    if "_loss_function" in vars(model) or getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        return f"it uses its own loss function (loss_type {getattr(model, 'loss_type', None)!r} or one set on it)"
    return None


def supports_chunked_loss(model: nn.Module) -> bool:
    """True for a transformers causal LM whose training loss is the cross-entropy of `lm_head(decoder(x))` (Llama,
    Mistral, Qwen2, ...: a `model` decoder, an output head, no logit scaling or soft-capping), plus the router aux
    loss of ROUTER_AUX_LOSS_MODEL_TYPES: there chunked_lm_loss is exactly the model's own objective. False for
    everything else (the finetune command then trains on `model(input_ids, labels=...).loss`)."""
    return chunked_loss_blocker(model) is None


def _autocast_once(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in the dtype autocast would cast it to for a matmul (itself outside autocast or when it is
    not a float32 tensor): one cast for many matmuls with it."""
    device = weight.device.type
    if weight.dtype != torch.float32 or not torch.is_autocast_enabled(device):
        return weight
    return weight.to(torch.get_autocast_dtype(device))


class _FrozenHeadCE(torch.autograd.Function):
    """Σ_t CE(h_t · Wᵀ, y_t) / n over chunks of rows, for a frozen head W [V, H]; the gradient with respect to h is
    computed in forward, chunk by chunk, and is all that is kept (the [rows, V] logits never outlive their chunk):

        p = softmax(h_c · Wᵀ)      g_c = (p - onehot(y_c)) · W / n      loss += Σ (logsumexp - logit[y])
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, rows: int, n: int) -> torch.Tensor:
        need = h.requires_grad and torch.is_grad_enabled() or ctx.needs_input_grad[0]
        grad = torch.empty_like(h) if need else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # Under autocast each `@` would cast the frozen fp32 head (vocab x hidden: 28M elements in SmolLM2) to
        # bf16 again: twice per chunk. Cast it once per call instead, with the same rounding (what autocast does).
        weight = _autocast_once(weight)
        for i in range(0, h.shape[0], rows):
            logits = (h[i:i + rows] @ weight.t()).float()
            yc = y[i:i + rows]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if grad is not None:
                p = logits.sub_(lse[:, None]).exp_()
                p[torch.arange(p.shape[0], device=p.device), yc] -= 1.0
                grad[i:i + rows] = (p.div_(n).to(weight.dtype) @ weight).to(h.dtype)
            del logits
        ctx.save_for_backward(grad if grad is not None else h.new_empty(0))
        return total / n

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None


def chunked_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy of `model(batch, labels=batch).loss`, without ever holding the
    [tokens, vocab] logits: the output head and the loss run on chunks of ~16 MiB of logits. A frozen bias-free
    head (the usual case: QLoRA, tied embeddings) computes each chunk's gradient with respect to the hidden
    states in forward (_FrozenHeadCE: nothing recomputed); any other head runs each chunk under
    torch.utils.checkpoint (non-reentrant), so backward recomputes the chunk's logits instead of keeping them.

        loss = Σ_chunks Σ_t CE(lm_head(h_t), y_t) / N        h = decoder(x)[:, :-1], y = x[:, 1:], N = B·(T-1)
               (+ router_aux_loss_coef · load_balancing_loss(router logits), as the model adds it: Mixtral, ...)

    A model whose own loss is something else (chunked_loss_blocker names why) is refused with a ValueError:
    never a different objective."""
    blocker = chunked_loss_blocker(model)
    if blocker is not None:
        raise ValueError(f"lowrank_ext::chunked_lm_loss: model must be a causal LM whose loss is the cross-entropy "
                         f"of its output head (plus a known router aux loss), got a {type(model).__name__}: "
                         f"{blocker}; use the model's own loss")
    router = bool(getattr(model.config, "output_router_logits", False))
    out = model.model(input_ids=batch, use_cache=False, **({"output_router_logits": True} if router else {}))
    ce = _chunked_ce(model, out.last_hidden_state, batch)
    if not router:
        return ce
    # the model's own aux term (ROUTER_AUX_LOSS_MODEL_TYPES): its module's function, its attributes, no mask
    # (lm_loss passes none either): loss = CE + coef · load_balancing_loss_func(router_logits, E, k, None)
    modeling = sys.modules[type(model).__module__]
    aux = modeling.load_balancing_loss_func(out.router_logits, model.num_experts, model.num_experts_per_tok, None)
    return ce + model.router_aux_loss_coef * aux.to(ce.device)


def _chunked_ce(model: nn.Module, hidden: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Σ_chunks Σ_t CE(lm_head(h_t), y_t) / N for the decoder's hidden states (chunked_lm_loss)."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    head = model.get_output_embeddings()
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = batch[:, 1:].reshape(-1)
    rows = max(1, _LOSS_CHUNK // head.out_features)
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        return _FrozenHeadCE.apply(h, head.weight, y, rows, y.numel())

    def part(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(hc).float(), yc, reduction="sum")

    total = sum(checkpoint(part, h[i:i + rows], y[i:i + rows], use_reentrant=False) if torch.is_grad_enabled()
                else part(h[i:i + rows], y[i:i + rows]) for i in range(0, h.shape[0], rows))
    return total / y.numel()


# ------------------------------------------------------------------------------------------- allocator
def trim_freed_memory() -> bool:
    """glibc's malloc_trim(0): hand the free pages inside its heaps back to the OS (the finetune command calls it
    before the first step and after each one). Freed activations of one step otherwise stay resident between
    the live tensors of the next; measured on the default job: ~40 MiB lower peak RSS, no measurable cost.
    Returning *every* large block at once (mallopt M_MMAP_THRESHOLD = 1 MiB: every tensor its own mmap) lowers
    the peak by ~250 MiB more, but a page fault per fresh page cost 1.5x the step time on the 2-core CI machine,
    so it is not done. Returns False where it does not apply (not glibc)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------- estimate
_NF4_BLOCK = 64


@dataclass
class _Shape:
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, cfg: dict) -> _Shape:
        def get(*names, default=None):
            for n in names:
                if cfg.get(n) is not None:
                    return cfg[n]
            if default is None:
                raise ValueError(f"lowrank_ext memory: config.json must give {' or '.join(names)}, got fields "
                                 f"{sorted(cfg)[:12]}")
            return default

        hidden = int(get("hidden_size", "n_embd", "d_model"))
        heads = int(get("num_attention_heads", "n_head"))
        return cls(vocab=int(get("vocab_size")), hidden=hidden,
                   inter=int(get("intermediate_size", "n_inner", default=4 * hidden)),
                   layers=int(get("num_hidden_layers", "n_layer")), heads=heads,
                   kv_heads=int(get("num_key_value_heads", default=heads)),
                   head_dim=int(get("head_dim", default=hidden // heads)))

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one block (Llama / Mistral / Qwen naming)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.inter
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass
class Estimate:
    """Bytes per component for one method ("full", "lora", "qlora")."""

    method: str
    base: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int           # saved for backward + the backward's largest transient (loss over the vocab)
    activations_ckpt: int      # the same with gradient checkpointing
    runtime: int               # the process before any weight: interpreter, torch, transformers (measured)
    notes: dict = field(default_factory=dict)

    def total(self, checkpointing: bool) -> int:
        return (self.runtime + self.base + self.adapters + self.gradients + self.optimizer
                + (self.activations_ckpt if checkpointing else self.activations))


def runtime_bytes() -> int:
    """This process's resident memory now (/proc/self/statm): what torch + transformers + lowrank_ext cost before
    any weight is loaded — the floor every estimate adds (it is ~0.7 GB for torch's CPU+CUDA libraries alone)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def import_model_code(model_dir: str | os.PathLike) -> None:
    """Import what a run imports before its first weight (transformers and the model's code, by building the model
    on the meta device: no weight is allocated or read), so that runtime_bytes() measures the same floor."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        with init_empty_weights(include_buffers=False):
            AutoModelForCausalLM.from_config(cfg)
    except (OSError, ValueError, KeyError):  # not a causal LM transformers builds: the estimate still reads the config
        pass


def _read_config(model: str | os.PathLike | dict) -> dict:
    if isinstance(model, dict):
        return model
    path = Path(model)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise FileNotFoundError(f"lowrank_ext memory: --model must be a model directory with config.json (or the "
                                f"config.json itself), got {str(model)!r}")
    cfg = json.loads(cfg_file.read_text())
    return cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg


def _activations(s: _Shape, tokens: int, targets: set[str], r: int, dtype_bytes: int, dropout: bool,
                 method: str, chunked_loss: bool = True) -> tuple[int, int, dict]:
    """(bytes without, with checkpointing) of activations in one training step of `tokens` = batch x seq_len.

    What autograd saves per block and token, in elements of the compute dtype (counted once per tensor; checked
    against torch.autograd.graph.saved_tensors_hooks in tests/test_memory.py):
      two RMSNorms: input, rstd, normalized output                          2 x (2h + 1)
      attention (SDPA, GQA without repeating k/v): q and k after RoPE, v,   2q + 2kv + heads
        the output and its logsumexp
      MLP: gate and up outputs, silu(gate), their product                   4i
      each adapted projection: u = x_d·Aᵀ                                    r
        with dropout also the dropped input x_d and its mask (1 byte)       in + in/4 (+ o_proj's own input, q)
    The loss over the vocabulary keeps the log-softmax and, in backward, two more tensors of its size: 3 x tokens x
    vocab fp32 at the peak. With checkpointing a block keeps only its input (h per token) and the outputs of its
    contracting adapted projections (_save_contracting: k, v, down for a GQA Llama), one block is recomputed
    at a time (its activations and their gradients: 2 x one block), and the output head + loss run in chunks of
    ~16 MiB of logits (chunked_lm_loss) when `chunked_loss`."""
    h, q, kv, i = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.inter
    per_block = 2 * (2 * h + 1) + 2 * q + 2 * kv + s.heads + 4 * i
    for name, (fin, _) in s.projections().items():
        if name in targets and method != "full":
            per_block += r + ((fin + fin / 4 + (q if name == "o_proj" else 0)) if dropout else 0)
    block_bytes = int(per_block * tokens * dtype_bytes)
    loss = 3 * tokens * s.vocab * 4
    loss_ckpt = 3 * min(tokens * s.vocab, _LOSS_CHUNK) * 4 + tokens * h * 4 if chunked_loss else loss
    embed = tokens * h * dtype_bytes  # the embedding output (the first block's input)
    without = s.layers * block_bytes + loss + embed
    kept = sum(fout for n, (fin, fout) in s.projections().items() if fin > fout and n in targets and method != "full")
    with_ckpt = s.layers * tokens * (h + kept) * dtype_bytes + 2 * block_bytes + loss_ckpt + embed
    return without, with_ckpt, {"per_block": block_bytes, "loss": loss, "loss_ckpt": loss_ckpt}


def _meta_model(cfg: dict) -> nn.Module:
    """The causal LM `cfg` describes, built on the meta device (no memory, no weights read). A config without
    `model_type` (a bare dict of sizes) is read as a Llama block."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(cfg.get("model_type", "llama"), **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


class UnmodeledBlock(ValueError):
    """The model's blocks are not the Llama block the estimate's activation and byte counts describe (GPT-2's
    Conv1D block, NeoX's fused qkv ...): callers print "n/a" with this reason, never a number for another shape."""


def _modeled_targets(s: _Shape, model: nn.Module, targets: list[str] | str | None) -> set[str]:
    """The projection names (q_proj ... down_proj) `targets` adapts in `model`, selected by the one target rule
    (adapters/targets.py, Conv1D included); a ValueError when the model's blocks are not the Llama block the
    activation and byte counts below describe (then the caller prints "n/a", never a number for another shape)."""
    want = s.projections()
    head = output_head_name(model)
    per_leaf: dict[str, int] = {}
    for name, m in model.named_modules():
        if name == head or not is_linear_like(m):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if want.get(leaf) != linear_in_out(m):
            raise UnmodeledBlock(f"lowrank_ext memory: the model's blocks must be Llama blocks (q/k/v/o_proj, gate/up/"
                             f"down_proj of the config's sizes) for an estimate, got {name!r} ({type(m).__name__}, "
                             f"in/out {linear_in_out(m)}) in a {getattr(model.config, 'model_type', '?')!r} model")
        per_leaf[leaf] = per_leaf.get(leaf, 0) + 1
    if per_leaf != dict.fromkeys(want, s.layers):
        raise UnmodeledBlock(f"lowrank_ext memory: the model's blocks must be Llama blocks (each of {sorted(want)} once "
                         f"per layer, {s.layers} layers) for an estimate, got {per_leaf}")
    names = select_targets(model, targets if targets else "all-linear", op="memory")
    picked = {n.rsplit(".", 1)[-1] for n in names}
    if not names or any(sum(n.endswith("." + p) for n in names) != s.layers for p in picked):
        raise ValueError(f"lowrank_ext memory: targets must be among {sorted(want)} (each adapted in every layer), "
                         f"got {targets!r} selecting {len(names)} modules")
    return picked


def estimate(model: str | os.PathLike | dict, *, rank: int = 16, seq_len: int = 2048, batch_size: int = 1,
             targets: list[str] | None = None, variant: str = "lora", optimizer: str = "paged-adamw",
             dtype_bytes: int = 4, dropout: bool = True, runtime: int | None = None) -> list[Estimate]:
    """Estimates for full fine-tuning, LoRA and QLoRA of the model whose config.json is in `model` (no weight is
    read). `targets`: a target_modules list (default: all seven projections). optimizer: adamw / paged-adamw (two
    fp32 states per trainable parameter), paged-adamw8bit (two 8-bit states + an fp32 absmax per 256). variant:
    lora / dora (+ a magnitude per output row) / vera (shared frozen A, B; trains only two vectors per layer).

    Modelled: Llama blocks (Llama, Mistral, Qwen2, SmolLM2, ... tested on Llama and Qwen2 configs). Any other
    block (GPT-2's Conv1D c_attn / c_fc, ...) is a ValueError saying so, not a number for another shape."""
    cfg = _read_config(model)
    s = _Shape.of(cfg)
    meta = _meta_model(cfg)
    targets = _modeled_targets(s, meta, targets)
    if optimizer not in ("adamw", "paged-adamw", "paged-adamw8bit"):
        raise ValueError(f"lowrank_ext memory: --optimizer must be adamw, paged-adamw or paged-adamw8bit, got "
                         f"{optimizer!r}")
    if variant not in ("lora", "dora", "vera"):
        raise ValueError(f"lowrank_ext memory: --variant must be lora, dora or vera, got {variant!r}")
    tokens = seq_len * batch_size
    per_layer = {n: fin * fout for n, (fin, fout) in s.projections().items()}
    target_numel = s.layers * sum(v for n, v in per_layer.items() if n in targets)
    total_params = sum(p.numel() for p in meta.parameters())  # the model's own count (biases, tied head once)
    if variant == "vera":
        adapter_params = s.layers * sum(rank + fout for n, (_, fout) in s.projections().items() if n in targets)
    else:
        adapter_params = s.layers * sum(rank * (fin + fout) + (fout if variant == "dora" else 0)
                                        for n, (fin, fout) in s.projections().items() if n in targets)
    frozen_extra = 0
    if variant == "vera":  # the shared A [r, max_in], B [max_out, r], frozen
        ins, outs = zip(*(s.projections()[n] for n in targets))
        frozen_extra = 4 * rank * (max(ins) + max(outs))

    def opt_bytes(n: int) -> int:
        return 2 * n + 4 * -(-2 * n // 256) if optimizer == "paged-adamw8bit" and n >= 4096 else 8 * n

    rt = runtime_bytes() if runtime is None else runtime
    out = []
    for method in ("full", "lora", "qlora"):
        without, with_ckpt, notes = _activations(s, tokens, targets, rank, dtype_bytes, dropout, method)
        if method == "full":
            base, trainable = dtype_bytes * total_params, total_params
            adapters = 0
        else:
            trainable = adapter_params
            adapters = 4 * adapter_params + frozen_extra
            dense = (total_params - target_numel) * dtype_bytes
            if method == "lora":
                base = total_params * dtype_bytes
            else:
                base = dense + s.layers * sum(nf4_nbytes(v, _NF4_BLOCK) for n, v in per_layer.items() if n in targets)
        out.append(Estimate(method, base, adapters, 4 * trainable, opt_bytes(trainable), without, with_ckpt, rt,
                            {**notes, "trainable": trainable, "total_params": total_params, "tokens": tokens}))
    return out


def format_estimate(estimates: list[Estimate]) -> str:
    """The classic table: one column per method, one row per component, sizes in GiB / MiB."""
    def size(b: int) -> str:
        return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"

    names = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA (NF4)"}
    rows = [("", [names[e.method] for e in estimates]),
            ("trainable parameters", [f"{e.notes['trainable']:,}" for e in estimates]),
            ("runtime (torch, measured)", [size(e.runtime) for e in estimates]),
            ("base weights", [size(e.base) for e in estimates]),
            ("adapters", [size(e.adapters) if e.adapters else "-" for e in estimates]),
            ("gradients", [size(e.gradients) for e in estimates]),
            ("optimizer state", [size(e.optimizer) for e in estimates]),
            ("activations", [size(e.activations) for e in estimates]),
            ("activations, checkpointed", [size(e.activations_ckpt) for e in estimates]),
            ("total", [size(e.total(False)) for e in estimates]),
            ("total, checkpointed", [size(e.total(True)) for e in estimates])]
    w0 = max(len(r[0]) for r in rows)
    w = [max(len(r[1][j]) for r in rows) for j in range(len(estimates))]
    return "\n".join("  " + k.ljust(w0) + "  " + "  ".join(v.rjust(w[j]) for j, v in enumerate(vals))
                     for k, vals in rows)


# ----------------------------------------------------------------------------------------- measured
def measured_split(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes the model and optimizer hold now: "nf4" (packed codes, absmax bytes and double-quant constants of
    every NF4 layer), "other" (every other frozen parameter and buffer, tied ones once), "adapter" (trainable
    parameters, their gradients' size, and the optimizer state)."""
    from lowrank_ext.nn.linear4bit import NF4WeightHolder

    seen: set[int] = set()
    nf4 = other = adapter = 0

    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") else t
        return local.numel() * local.element_size()

    for m in model.modules():
        if isinstance(m, NF4WeightHolder):
            for p in m.nf4_parameters():
                seen.add(id(p))
                nf4 += nbytes(p)
            for n in ("weight_nested_absmax", "weight_nested_map", "weight_offset"):
                t = getattr(m, n, None)
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    nf4 += nbytes(t)
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        if getattr(t, "requires_grad", False):
            adapter += 2 * nbytes(t)  # the parameter and its gradient
        else:
            other += nbytes(t)
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.numel() > 1:
                    adapter += nbytes(v)
    return {"nf4": nf4, "other": other, "adapter": adapter}
