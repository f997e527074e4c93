"""Hugging Face Hub ids wherever a model folder is taken, with one-line errors when the hub cannot be reached.

Two ways in, both called through `rlhfchat.models.resolve_model` and `delta`:

- `model_ref(name)` for what transformers loads (eval's models, the base model, later chat and serve): the hub id
  itself when the hub answers (transformers downloads into its cache); the cached snapshot folder when the hub cannot
  be reached but the model is in the cache (so nothing waits on retries); otherwise one line saying the hub cannot be
  reached. A model repository holding an rlhfchat delta is refused, as a delta folder is.
- `download(name)` for what rlhfchat reads itself (`delta apply --base/--delta`, `delta make --base`): the model's
  top-level files (its weights in one format, config, tokenizer) fetched with `huggingface_hub.snapshot_download`,
  and the local snapshot folder returned.

"Cannot be reached" is HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, or a request that fails to connect. Private and
gated repositories use the token of `hf auth login` (or HF_TOKEN), as huggingface_hub does.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhfchat.errors import RlhfchatError

# A folder's top-level files worth fetching: the weights (one format, see files_to_fetch) and everything small a
# model folder carries. Left out: other frameworks' weights (.h5, .msgpack, .onnx, .gguf, .tflite), subfolders
# (Llama repositories keep the original checkpoint in original/), images and the like.
_WEIGHTS = {"safetensors": (".safetensors", ".safetensors.index.json"), "bin": (".bin", ".bin.index.json")}
_SMALL = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".py", ".md")


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` reads as a hub model id (`owner/name`, or a bare legacy name like `gpt2`) rather than a path.

    Only the spelling is checked (huggingface_hub's own rules); an existing local path is never a hub id.
    """
    text = str(name)
    if not text or text.startswith((".", "/", "~")) or "\\" in text or Path(text).exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set (read now, so a test or a shell can set it at any time)."""
    from huggingface_hub import constants

    flags = [os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE")]
    return bool(constants.HF_HUB_OFFLINE) or any(f and f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def unreachable(name: str, what: str, why: str) -> RlhfchatError:
    """The one line for a hub id that cannot be fetched because the hub cannot be reached (`what`: the option or
    field that named it, e.g. `--base`)."""
    return RlhfchatError(f"{prefix(what)}{name}: no such folder here, and the Hugging Face Hub cannot be reached to fetch it "
                         f"({why}); fetch it once where the hub can be reached (it is then in the cache), or give a "
                         f"local folder")


def prefix(what: str) -> str:
    """How an error names the option or field that gave a model: `--base: ` (nothing when `what` is empty)."""
    return f"{what}: " if what else ""


def files_to_fetch(files: list[str]) -> list[str]:
    """The files of a hub repository that make a model folder: top-level only, its weights in one format
    (safetensors where it has them, else PyTorch .bin shards), and the small files (config, tokenizer, template).

    >>> files_to_fetch(["model.safetensors", "pytorch_model.bin", "config.json", "original/consolidated.00.pth"])
    ['config.json', 'model.safetensors']
    """
    top = [f for f in files if "/" not in f and not f.startswith(".")]
    kind = "safetensors" if any(f.endswith(".safetensors") for f in top) else "bin"
    keep = []
    for f in top:
        weights = next((k for k, suffixes in _WEIGHTS.items() if f.endswith(suffixes)), None)
        if weights is not None:
            if weights == kind:
                keep.append(f)
        elif f.endswith(_SMALL):
            keep.append(f)
    return sorted(keep)


def _cached(name: str) -> Path | None:
    """The model's snapshot folder in the local hub cache, or None when it was never fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _repo_files(name: str, what: str) -> tuple[list[str] | None, str]:
    """(the repository's file names as the hub lists them, ""), or (None, why) when the hub cannot be reached.

    A repository that does not exist, is private or is gated is a one-line error."""
    if offline():
        return None, "HF_HUB_OFFLINE is set"
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        info = model_info(name)
    except GatedRepoError:
        raise RlhfchatError(f"{prefix(what)}{name}: a gated model; accept its terms at https://huggingface.co/{name} "
                            f"and log in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise RlhfchatError(f"{prefix(what)}{name}: no such folder, and no such model on the Hugging Face Hub (a "
                            f"private one needs `hf auth login` or HF_TOKEN)") from None
    except OfflineModeIsEnabled:
        return None, "HF_HUB_OFFLINE is set"
    except Exception as e:  # noqa: BLE001 (connection errors are httpx's or requests', whichever is installed)
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None:  # the hub answered, with an error
            raise RlhfchatError(f"{prefix(what)}{name}: the Hugging Face Hub answered {status} "
                                f"({_first_line(e)})") from None
        return None, f"{type(e).__name__}: {_first_line(e)}"
    return [s.rfilename for s in info.siblings or []], ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"


def model_ref(name: str, what: str = "") -> str:
    """What to hand to `from_pretrained` for hub id `name`: the id when the hub answers, the cached snapshot folder
    when it cannot be reached but the model was fetched before; otherwise a one-line error. A delta is refused."""
    from rlhfchat.delta import card as delta

    files, why = _repo_files(name, what)
    if files is not None:
        if delta.MANIFEST in files:
            raise delta.is_a_delta(name)
        return name
    folder = _cached(name)
    if folder is None:
        raise unreachable(name, what, why)
    delta.refuse(folder, shown_as=name)
    return str(folder)


def download(name: str, what: str = "") -> Path:
    """The model folder of hub id `name`, fetched into the hub cache (only what files_to_fetch keeps) or found there
    when the hub cannot be reached; otherwise a one-line error."""
    files, why = _repo_files(name, what)
    if files is None:
        folder = _cached(name)
        if folder is None:
            raise unreachable(name, what, why)
        return folder
    from huggingface_hub import snapshot_download

    print(f"fetching {name} from the Hugging Face Hub", flush=True)
    try:
        return Path(snapshot_download(name, allow_patterns=files_to_fetch(files)))
    except OSError as e:
        raise RlhfchatError(f"{prefix(what)}{name}: fetching it from the Hugging Face Hub failed "
                            f"({_first_line(e)})") from None
