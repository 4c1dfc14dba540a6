"""The command-line tools, one module each, installed as console scripts (pyproject.toml):

    harpe-prepare-data   prepare_data.py        jsonl corpora -> upsampling -> Megatron .bin/.idx
    harpe-convert        convert_checkpoint.py  Hugging Face <-> megatron_harpe checkpoints, verify
    harpe-evaluate       evaluate.py            RULER, perplexity and short-task evaluation
    harpe-plan-memory    plan_memory.py         memory, step time and layouts before asking for GPUs
    harpe-select-bases   select_bases.py        choose and plot HARPE's per-head RoPE bases
    harpe-analyze-heads  analyze_heads.py       how far each head attends against its base

`python tools/<name>.py` runs the same `main` (tools/ holds thin wrappers, e.g. for torchrun).
Each module's `main(argv)` returns an exit code; `entry_point()` runs it behind
megatron_harpe.cli's front door (quiet third-party output, one-line errors, exit codes).
"""
