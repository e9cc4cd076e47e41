"""The Ray layer: the only code that imports ray. Thin on purpose: it starts or joins Ray, runs the
sweep's reference pass as a task, builds the Tuner, and turns one trial (or study stage) into a Ray Train
job whose workers call the engine with the run spec.

    cluster.py         start or join Ray (loopback-only locally), check that a trial fits
    loopback.py        optional hardening of a local Ray: every server on 127.0.0.1
    reference_task.py  the reference log-probs, computed once per sweep as a Ray task
    tuner.py           the Tuner: searcher, search space, scheduler (Tune over Train)
    searchers.py       the incremental beta procedure as a Tune searcher; grid and random spaces
    trial.py           one trial: the Tune function trainable and the Train worker function
    handoff.py         the sweep's MLflow parent run, handed to trials that start before it is open
    probes.py          optional timing probes of a trial's start-up (perf/* metrics)
    jobs.py            a study's SFT and fixed-value DPO stages as Ray Train jobs
"""
