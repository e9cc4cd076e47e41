"""MLflow: the records schema shared by writer and reader, the writer, the asynchronous step-metric
tracker of a trial, and the embedded tracking server. Importing the package imports no mlflow.

    schema.py         tags, run roles, params, metric names, run search (imported by analysis/ too)
    records.py        parent and trial runs: created or found again, params, tags, artifacts, ends
    trial_tracker.py  a trial's step metrics, buffered and sent in the background
    server.py         the embedded `mlflow server` on 127.0.0.1 and the tracking URI's resolution
"""
