"""The application: fine-tune a causal LM with lowrank_ext's adapters, offline.

    cli.py              `python -m lowrank_ext finetune|bench` (every subcommand, its flags and errors)
    cli_args.py         the argument parser (torch-free: `--help` imports no torch)
    run_dirs.py         where finetune writes (a new run directory per run without --output)
    trainer.py          Trainer, TrainConfig: the loop, schedule, clipping, checkpoints, evaluation
    data.py             text corpora (KJV, Lee news, .txt/.jsonl) -> packed token blocks
    models.py           the packaged SmolLM2 (from its GGUF file) or any local transformers causal LM
    rank_allocation.py  per-module LoRA ranks from gradient spectra within a parameter budget
    backends.py         lowrank_ext's layers, or PEFT's on the dense model as the baseline
    bench_command.py    `bench`: runs bench/bench_*.py side by side and charts the ratios

Built on lowrank_ext's core (checkpoints are written by its atomic_write, lowrank_ext/_atomic.py) and
lowrank_ext.adapters. Heavy libraries (transformers, peft, tqdm, matplotlib)
are imported inside the functions that use them.
"""
