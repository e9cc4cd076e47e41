"""The `dpo` command line: one command table (main.py), its argument groups and the handlers of the
after-the-fact commands (analysis.py). `main` is the only place where a UserError becomes an exit code."""
