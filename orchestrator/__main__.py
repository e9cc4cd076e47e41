"""`python -m orchestrator ...` is the same as the `dpo` command."""

import sys

from orchestrator.cli.main import main

sys.exit(main())
