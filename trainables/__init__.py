"""Code that runs inside a trial worker: data, log-probs, losses, reference cache, loops (never imports ray).

Tested by `python -m pytest tests -q`.
"""
