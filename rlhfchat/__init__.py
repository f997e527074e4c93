"""rlhfchat: build-your-own StableVicuna.

data -> SFT -> reward model -> PPO -> eval -> chat and feedback -> delta, from one recipe file.
"""

__version__ = "0.1.0"
