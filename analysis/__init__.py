"""After-the-fact analysis: MLflow runs to pandas, stability verdicts, beta selection, plots, reports.

Entry points: `analysis.runs.load_sweep` (runs -> pandas), `analysis.selection.select_trial` (the rule
that picks beta), `analysis.report.write_report` (Markdown/HTML/PNG) and `analysis.report.analyze` (all
three, as `dpo analyze` runs them). The best checkpoint is exported by orchestrator/workflows/export.py (`dpo export`).
"""
