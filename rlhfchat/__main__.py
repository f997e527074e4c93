"""`python -m rlhfchat ...`: the same command line as `rlhfchat ...` (so `accelerate launch -m rlhfchat ppo ...` works)."""

import os
import sys

from rlhfchat.cli import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
