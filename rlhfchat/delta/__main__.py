"""`python -m rlhfchat.delta make|apply|verify ...`: the same arguments and messages as `rlhfchat delta ...`."""

import sys

from rlhfchat.cli import main as cli_main

if __name__ == "__main__":
    sys.exit(cli_main(["delta", *sys.argv[1:]]))
