"""`python -m megatron_moe.cli`: the command line, as the `megatron-moe` script runs it."""

import sys

from megatron_moe.cli import main

sys.exit(main())
