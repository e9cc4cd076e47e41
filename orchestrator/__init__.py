"""Driver side of the DPO orchestrator: config, CLI, sweeps, searchers, study pipeline, tracking."""
