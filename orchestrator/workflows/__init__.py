"""What each command does, start to end, on top of the config, Ray and tracking layers.

    local_run.py      `dpo train` and `dpo sft`: the engine in this process, metrics to metrics.jsonl
    sweep.py          `dpo sweep`: validation, Ray, reference pass, Tuner, summary
    study.py          `dpo study`: SFT-then-DPO versus DPO-only, with study_records.py for its runs and tables
    export.py         `dpo export`: a trial's best checkpoint as a verified Hugging Face model directory
    quickstart.py     `dpo quickstart`: sweep -> analyze -> export
    demo_assets.py    the embedded default model and data
"""
