"""Run an rlhfchat command and SIGKILL it at a chosen point, for the fault tests (tests/test_faults.py, test_delta.py).

    python tests/_faults.py FAULTS rlhfchat-arguments...

FAULTS is a comma-separated list of:
    checkpoint=N   SIGKILL right after the Nth Trainer checkpoint of this process is saved
    state=N        SIGKILL while the Nth Trainer checkpoint writes its trainer_state.json (its last file), halfway
    write=PATTERN  SIGKILL at the first atomic write whose destination's name matches PATTERN (fnmatch), after its
                   temporary is complete and before it is renamed into place (what a kill mid-write leaves)
    keep           at every atomic write, leave a copy of its complete temporary behind, as a kill at that write
                   would have left it; the process goes on
Nothing here is imported by rlhfchat: the faults are patched into this process only.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(faults: str) -> None:
    from rlhfchat import atomic

    spec = dict(f.split("=", 1) if "=" in f else (f, "") for f in faults.split(",") if f)
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        if atomic.is_temporary(src.name) and not src.name.endswith(".old"):
            if "write" in spec and fnmatch.fnmatch(dst.name, spec["write"]):
                _die()
            if "keep" in spec:  # a second temporary of the same write, in the same name pattern, this pid
                suffix = src.name[src.name.rindex(".", 0, -len(".tmp")):]  # ".<pid>.tmp"
                fd, copy = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=suffix, dir=dst.parent)
                os.close(fd)
                if src.is_dir():
                    os.unlink(copy)
                    shutil.copytree(src, copy)
                else:
                    shutil.copyfile(src, copy)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace

    if "checkpoint" in spec:
        from transformers import Trainer

        real_save, saved = Trainer._save_checkpoint, [0]

        def save_checkpoint(self, *args, **kwargs):
            out = real_save(self, *args, **kwargs)
            saved[0] += 1
            if saved[0] == int(spec["checkpoint"]) and self.args.process_index == 0:
                _die()
            return out

        Trainer._save_checkpoint = save_checkpoint

    if "state" in spec:
        from transformers import TrainerState

        real_state, states = TrainerState.save_to_json, [0]

        def save_to_json(self, json_path):
            states[0] += 1
            if states[0] == int(spec["state"]):
                real_state(self, json_path)
                Path(json_path).write_bytes(Path(json_path).read_bytes()[:100])
                _die()
            return real_state(self, json_path)

        TrainerState.save_to_json = save_to_json


if __name__ == "__main__":
    install(sys.argv[1])
    from rlhfchat.cli import main

    sys.exit(main(sys.argv[2:]))
