"""The QLoRA script of issue 20 on SmolLM2-135M, four ways, each in its own process (CPU, fp32):

    (a) bnb + PEFT      from_pretrained(quantization_config=BitsAndBytesConfig(4-bit NF4, double quant, fp32 compute)),
                        prepare_model_for_kbit_training, get_peft_model(LoraConfig(r=16, lora_alpha=32, "all-linear"))
    (b) NF4Config + PEFT the same with lowrank_ext.NF4Config(blocksize=64, double_quant=True) (compute_dtype None: fp32)
    (c) inject + Trainer lowrank_ext.load_pretrained(path, LoRAConfig(r=16, alpha=32, "all-linear", quantize="nf4")),
                        then lowrank_ext.hf.to_peft_model (the one added line)
    (d) PEFT dense      from_pretrained(path) in fp32, get_peft_model(LoraConfig(...)) (no quantization)

each trained by transformers.Trainer (torch AdamW, lr 2e-4, gradient checkpointing non-reentrant in all four) on
the same KJV batches (4 x 128 tokens, read in order), `--steps` steps (20), 2 threads. Per configuration: time per
step = the median of steps 3..N (on_step_begin -> on_step_end), peak RSS = VmHWM of the process (load included).

    python bench/bench_hf.py [--steps 20] [--model DIR]        the table and the ratios
    python bench/bench_hf.py --config b                       one configuration (what the table runs per process)

Goals (issue 20, "Measure"): (b), (c) no slower than (d) and faster than (a); peak RSS of (b), (c) <= 0.6x (d).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the repo root, for an in-place build

CONFIGS = {"a": "bitsandbytes 4-bit + PEFT", "b": "NF4Config + PEFT", "c": "inject + Trainer (to_peft_model)",
           "d": "PEFT on the dense fp32 model"}
THREADS = 2
BATCH, SEQ = 4, 128


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("lowrank_ext bench_hf: /proc/self/status must have VmHWM, got none")


def _model(config: str, path: str):
    """The trainable model of one configuration, built as its user script builds it."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import lowrank_ext
    import lowrank_ext.hf

    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    if config == "a":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(path, quantization_config=q))
        return get_peft_model(model, lora)
    if config == "b":
        q = lowrank_ext.NF4Config(blocksize=64, double_quant=True)
        model = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(path, quantization_config=q))
        return get_peft_model(model, lora)
    if config == "c":
        cfg = lowrank_ext.LoRAConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear", quantize="nf4")
        return lowrank_ext.hf.to_peft_model(lowrank_ext.load_pretrained(path, cfg))
    if config == "d":
        return get_peft_model(AutoModelForCausalLM.from_pretrained(path), lora)
    raise ValueError(f"lowrank_ext bench_hf: --config must be one of {sorted(CONFIGS)}, got {config!r}")


def run_one(config: str, path: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    import transformers
    from transformers import TrainerCallback

    from lowrank_ext.finetune.data import prepare_data
    from lowrank_ext.finetune.hf_trainer import _Rows

    tok = transformers.AutoTokenizer.from_pretrained(path)
    train, _ = prepare_data("kjv", tok, SEQ, train_tokens=(steps * BATCH + 64) * SEQ, eval_blocks=1, seed=0)
    torch.manual_seed(0)
    model = _model(config, path)
    times: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times[-1] = time.perf_counter() - times[-1]

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = transformers.TrainingArguments(
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_hf_{config}_{os.getpid()}"),
        max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=2e-4, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        train_sampling_strategy="sequential", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(train, BATCH, steps),
                                   callbacks=[Timer()])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    trainer.train()
    timed = times[2:] if len(times) > 2 else times  # steps 3..N
    return {"config": config, "s_per_step": statistics.median(timed), "peak_rss_mib": _vm_hwm_mib(),
            "loss_first": losses[0], "loss_last": losses[-1], "steps": len(times)}


def _table(rows: dict[str, dict]) -> str:
    out = ["| config | s/step (median 3..N) | peak RSS (VmHWM) | loss step 1 -> N |", "| --- | --- | --- | --- |"]
    for k, r in rows.items():
        out.append(f"| ({k}) {CONFIGS[k]} | {r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} MiB | "
                   f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    t, m = (lambda x, y: rows[x]["s_per_step"] / rows[y]["s_per_step"]), \
        (lambda x, y: rows[x]["peak_rss_mib"] / rows[y]["peak_rss_mib"])
    have = set(rows)
    ratios = []
    for x, y in (("b", "d"), ("c", "d"), ("b", "a"), ("c", "a")):
        if {x, y} <= have:
            ratios.append(f"time ({x})/({y}) {t(x, y):.2f}x")
    for x, y in (("b", "d"), ("c", "d")):
        if {x, y} <= have:
            ratios.append(f"RSS ({x})/({y}) {m(x, y):.2f}x")
    return "\n".join(out) + "\n\n" + "; ".join(ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default=None, help="run one configuration, print JSON")
    p.add_argument("--configs", default="abcd", help="which configurations the table runs")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default=None, help="model directory (default: the packaged SmolLM2-135M-Instruct)")
    a = p.parse_args()
    if a.model is None:
        from lowrank_ext.finetune.models import _cached_smollm2

        a.model = str(_cached_smollm2()[0])
    if a.config:
        print("RESULT " + json.dumps(run_one(a.config, a.model, a.steps)), flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    rows = {}
    for c in a.configs:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--config", c, "--steps", str(a.steps),
                               "--model", a.model], check=False, env=env, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"({c}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            continue
        rows[c] = json.loads(line[-1][len("RESULT "):])
        print(f"({c}) {CONFIGS[c]}: {rows[c]} [{time.perf_counter() - t0:.0f} s]", flush=True)
    print(_table(rows))


if __name__ == "__main__":
    main()
