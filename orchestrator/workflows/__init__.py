"""What each command does, start to end, on top of the config, Ray and tracking layers.

    check.py          `dpo check`: every check that needs no training step
    local_run.py      `dpo train` and `dpo sft`: the engine in this process, metrics to metrics.jsonl
    output_dir.py     whose output_dir it is: the checks and claim (run.json) before `dpo train` / `dpo sft`
    run_lock.py       the lock a run holds on its folder: dpo train's output_dir, a sweep's or study's root
    config_change.py  `--resume` with changed result keys: refused, listing them (or --force-config-change)
    plan.py           `dpo plan`: memory, checkpoint and communication per GPU before anything runs
    sweep.py          `dpo sweep`: validation, Ray, reference pass, Tuner, summary
    study.py          `dpo study`: SFT-then-DPO versus DPO-only, with study_records.py for its runs and tables
    export.py         `dpo export`: a trial's best checkpoint as a verified Hugging Face model directory
    demo_assets.py    the embedded default model (and its SFT model) and data
    downstream.py     the quick start's end check: benchmarks and held-out answers before and after DPO
"""
