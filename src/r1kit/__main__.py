"""``python -m r1kit`` (what ``torchrun ... -m r1kit train grpo|sft ...`` runs on every rank): the CLI."""

import sys

from r1kit.cli import main

sys.exit(main())
