"""`rlhfchat SUBCOMMAND ...`: maps each subcommand to the function that does it, and nothing else.

    rlhfchat pipeline RECIPE.yaml [key=value ...]
    rlhfchat data|sft|reward|ppo|dpo|kto|eval|report RECIPE.yaml [key=value ...]
    rlhfchat iterate RECIPE.yaml --feedback DB_URL [key=value ...]
    rlhfchat delta make|apply|verify ...
    rlhfchat chat MODEL | serve MODEL [MODEL ...] [--name NAME=PATH] [--rounds RUN_DIR] | discord MODEL
    rlhfchat feedback export --db URL --out FILE | feedback stats --db URL
    rlhfchat bench data|ppo|generate|delta ...

`rlhfchat --verbose COMMAND ...` (the flag may come anywhere) shows what the libraries underneath say; without it, their warnings and logs that
mean nothing to a user (quiet_libraries) are silenced here, once, before any of them is imported.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from rlhfchat import __version__
from rlhfchat.errors import RlhfchatError

STAGES = {
    "pipeline": ("rlhfchat.pipeline", "run the whole recipe: data -> sft -> reward -> ppo (or dpo, kto) -> eval -> "
                                      "report"),
    "data": ("rlhfchat.data.mixture", "read the sources, write canonical JSONL records and card.json"),
    "sft": ("rlhfchat.train.sft", "supervised fine-tuning (TRL SFTTrainer, loss on assistant tokens)"),
    "reward": ("rlhfchat.train.reward", "reward model from the SFT checkpoint (TRL RewardTrainer)"),
    "ppo": ("rlhfchat.train.ppo", "PPO against the reward model, KL-penalised to the SFT model"),
    "dpo": ("rlhfchat.train.dpo", "DPO on the preference pairs from the SFT model (TRL DPOTrainer; method: dpo)"),
    "kto": ("rlhfchat.train.kto", "KTO on unpaired good and bad replies from the SFT model (TRL KTOTrainer; "
                                  "method: kto)"),
    "eval": ("rlhfchat.eval.run", "benchmarks, win rates, exact answers of the run's models"),
    "report": ("rlhfchat.eval.report", "report.md with tables and plots from a run's metrics"),
}
BENCHES = {
    "data": "the data stage on synthetic files of the published sizes",
    "ppo": "PPO samples/s and memory on any policy and reward folders",
    "generate": "chat engine latency and throughput, one stream and concurrent",
    "delta": "delta make/apply throughput and memory against a plain copy",
}


SECTIONS = {"pipeline": (), "data": ("data",), "sft": ("base", "sft"), "reward": ("reward",), "ppo": ("ppo",),
            "dpo": ("dpo",), "kto": ("kto",), "eval": ("eval",), "report": ()}
"""The recipe sections a stage reads, listed field by field in its --help."""


def _fields_help(name: str) -> str:
    """Every recipe field the stage reads, with its type, default and documentation (from rlhfchat/config.py and config_inputs.py)."""
    from rlhfchat.config import Recipe
    from rlhfchat.typed import describe

    lines = ["recipe fields (any can be overridden with key=value, the value in YAML syntax):"]
    if not SECTIONS[name]:  # the whole recipe: its own fields, one line per section
        lines += describe(Recipe, "", expand=False)
        lines.append("(each stage's --help lists the fields of its sections: rlhfchat ppo --help, ...)")
    for section in SECTIONS[name]:
        lines += describe(type(getattr(Recipe(), section)), f"{section}.")
    return "\n".join(lines)


def _stage(args: argparse.Namespace) -> None:
    from rlhfchat.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    importlib.import_module(STAGES[args.command][0]).main(recipe)


def _delta(args: argparse.Namespace) -> None:
    from rlhfchat import delta

    shard = {"shard_size": args.shard_size_mb << 20} if getattr(args, "shard_size_mb", None) else {}
    if args.action == "make":
        manifest = delta.make_delta(args.base, args.target, args.out, base_name=args.base_name, name=args.name,
                                    **shard)
        print(f"delta written to {args.out} ({len(manifest.get('tensors', {}))} tensors); its model card is "
              f"{os.path.join(args.out, delta.CARD)}")
    elif args.action == "apply":
        out = delta.apply_delta(args.base, args.delta, args.out, legacy=args.legacy, **shard)
        print(f"model written to {out} (legacy layout: applied as its apply_delta.py does, nothing checked)"
              if args.legacy else f"model written to {out} and verified against the delta's manifest")
    else:
        delta.verify_delta(args.target, args.delta)
        print(f"{args.target}: matches {args.delta}")


def _bench(args: argparse.Namespace) -> None:
    importlib.import_module(f"rlhfchat.bench.{args.bench}").run(args)


def _module_main(module: str):
    def run(args: argparse.Namespace) -> None:
        importlib.import_module(module).main(args)

    return run


def quiet_libraries() -> None:
    """Silence what the libraries under rlhfchat print that means nothing to its user (see `--verbose`):

    - transformers' warnings, among them the LOAD REPORT table of every from_pretrained that leaves a head to train
      (a reward model's score layer from an SFT folder, the critic's trunk): TRANSFORMERS_VERBOSITY=error, which
      transformers reads when it is imported (a user's own setting is kept);
    - bitsandbytes' "Failed to load CPU gemm_4bit_forward" at import (an optional kernel), and any other of its
      warnings: its loggers at ERROR;
    - DeepSpeed's "Setting accelerator to CPU" and the like: its logger resets its level when created, so a filter;
    - Python warnings raised inside third-party code (FutureWarning, DeprecationWarning, UserWarning); rlhfchat's
      own and errors stay.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"rlhfchat(\.|$)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command` (the one being run), only that subcommand's own options are built.

    Every other subcommand is then its name and help line, which is all `rlhfchat --help` and argparse's "invalid
    choice" show: building a subcommand's options imports its module (the chat server's sqlalchemy and asyncio, a
    stage's recipe fields), 20 MB of memory and a third of a second that `rlhfchat bench ppo` would otherwise carry.
    """
    def full(name: str) -> bool:
        return command is None or name == command

    parser = argparse.ArgumentParser(
        prog="rlhfchat", description="Build-your-own StableVicuna: data -> SFT -> reward -> PPO -> eval -> chat."
    )
    parser.add_argument("--version", action="version", version=f"rlhfchat {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show the warnings and logs of the libraries underneath (transformers, bitsandbytes, "
                             "DeepSpeed, Python warnings), which are silenced otherwise")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, (_, help_text) in STAGES.items():
        if not full(name):
            sub.add_parser(name, help=help_text)
            continue
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_fields_help(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("recipe", metavar="RECIPE.yaml", help="recipe file (see recipes/)")
        p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                       help="override a recipe field, e.g. seed=1")
        p.set_defaults(func=_stage)

    p = sub.add_parser("delta", help="make, apply or verify a weight delta against a base model")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = dsub.add_parser("make", help="DELTA = TARGET - BASE, with a manifest that checks the base and a model card")
    d.add_argument("--base", required=True, help="the base model's folder or hub id")
    d.add_argument("--target", required=True, help="the fine-tuned model's folder (e.g. runs/NAME/ppo) or hub id")
    d.add_argument("--out", required=True, help="the delta folder to write")
    d.add_argument("--base-name", help="what the model card calls the base, e.g. its hub id (default: --base when "
                                       "it is a hub id, else its folder's name)")
    d.add_argument("--name", help="what the model card calls the delta, e.g. the hub id you will publish it under "
                                  "(default: the --out folder's name)")
    d.add_argument("--shard-size-mb", type=int, help="size of the delta's safetensors shards (default 500)")
    d = dsub.add_parser("apply", help="TARGET = BASE + DELTA, streamed tensor by tensor and verified")
    d.add_argument("--base", required=True, help="the base model's folder or hub id")
    d.add_argument("--delta", required=True, help="the delta's folder or hub id")
    d.add_argument("--out", required=True)
    d.add_argument("--shard-size-mb", type=int, help="size of the model's safetensors shards (default 500)")
    d.add_argument("--legacy", action="store_true",
                   help="the delta has no delta.json (the published StableVicuna layout, e.g. "
                        "CarperAI/stable-vicuna-13b-delta): apply it as its apply_delta.py does, with nothing "
                        "checked; without this flag a delta with no manifest is refused")
    d = dsub.add_parser("verify", help="check a model folder against a delta's manifest")
    d.add_argument("--target", required=True, help="the model folder (or hub id) to check")
    d.add_argument("--delta", required=True, help="the delta's folder or hub id")
    p.set_defaults(func=_delta)

    for name, module, help_text in (
        ("chat", "rlhfchat.chat.terminal", "chat with a model in the terminal"),
        ("serve", "rlhfchat.chat.server", "OpenAI-compatible API and web chat page (with an arena for 2+ models)"),
        ("discord", "rlhfchat.chat.discord_bot", "run the model as a Discord bot (token from DISCORD_TOKEN)"),
        ("feedback", "rlhfchat.chat.feedback", "export collected votes as preference records, or print counts "
                                               "and the arena leaderboard"),
        ("iterate", "rlhfchat.rounds", "the next round of the model from the feedback collected since the last one "
                                       "(retrain, evaluate against the last round, report)"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if not full(name):
            continue
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError as e:  # an optional extra that is not installed: say so when the command runs
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=lambda args, e=e, name=name: _missing_extra(name, e))
            continue
        # Each module's add_arguments keeps heavy imports (torch, gradio) inside its main, so --help stays fast.
        p.set_defaults(func=_module_main(module))

    p = sub.add_parser("bench", help="benchmarks; each prints one JSON line")
    if not full("bench"):
        return parser
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, help_text in BENCHES.items():
        b = bsub.add_parser(name, help=help_text, description=help_text)
        try:
            importlib.import_module(f"rlhfchat.bench.{name}").add_arguments(b)
        except ImportError as e:
            b.add_argument("rest", nargs=argparse.REMAINDER)
            b.set_defaults(func=lambda args, e=e, name=f"bench {name}": _missing_extra(name, e))
            continue
        b.set_defaults(func=_bench)
    return parser


def _missing_extra(name: str, error: ImportError) -> None:
    raise RlhfchatError(f"`rlhfchat {name}` needs a package that is not installed ({error}); "
                        f"install with: pip install 'rlhfchat[{'discord' if name == 'discord' else 'chat'}]'")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # also for the `rlhfchat` script, which is not __main__
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv  # global, so also after the command: `rlhfchat sft RECIPE --verbose`
    argv = [a for a in argv if a != "--verbose"]
    if not verbose:
        quiet_libraries()
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after an option (`iterate RECIPE.yaml --feedback DB key=value`) reach argparse late
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-")
                                                                      for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except RlhfchatError as e:
        leave_process_group()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Destroy the process group `accelerate launch` runs under (when a stage made one) before the interpreter ends.

    Left to the interpreter's finalization, gloo's worker threads can outlive it and abort the process (SIGABRT,
    "terminate called without an active exception") after its work is saved, so a finished run exits non-zero now
    and then. Called on a normal end or an RlhfchatError (every rank raises it alike), not after an unexpected one,
    where a rank still waiting in a collective could hang it.
    """
    dist = sys.modules.get("torch.distributed")  # never imports torch for commands that did not
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
