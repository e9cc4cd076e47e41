"""After-the-fact analysis: MLflow runs to pandas, stability verdicts, beta selection, plots, reports."""
