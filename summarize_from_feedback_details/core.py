"""The small shared core: what every stage must do the same way.

Kept deliberately boring: command-line presets, user-facing errors, the pad-token rule (Detail 3.2),
atomic writes, seeding. Anything two stages need identically lives here exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

PAD_TOKEN = "[PAD]"
# Detail 1: comparisons of these labelling batches are CNN/DM articles, not Reddit posts.
CNNDM_BATCHES = ("batch0_cnndm", "cnndm0", "cnndm2")
PadChoice = Literal["[PAD]", "eos"]


class UserInputError(ValueError):
    """An error the user caused (bad path, malformed row, sizes that do not divide, ...).

    Raised before expensive work starts; the message names the input and the fix. Stage entry points
    print it as one line and exit with status 2 instead of a traceback.
    """


def cli(presets: Mapping[str, tuple[str, T]], main: Callable[[T], Any], description: str) -> None:
    """Parse `args` with tyro from named presets (`pythia` = the paper, `embedded` = offline CPU task).

    Usage: `python -m summarize_from_feedback_details.<stage> {pythia,embedded} [--field value ...]`.
    """
    import tyro

    args = tyro.extras.overridable_config_cli(presets, description=description, use_underscores=True)
    run_main(main, args)


def run_main(main: Callable[[T], Any], args: T) -> None:
    """Run a stage; a `UserInputError` becomes one clear line on stderr and exit status 2."""
    try:
        main(args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------------------------
# Tokenizer: Detail 3.2, a dedicated pad token
# ----------------------------------------------------------------------------------------------
def set_pad_token(tokenizer: Any, pad_token: PadChoice = PAD_TOKEN) -> Any:
    """Give `tokenizer` the pad token of the paper (a dedicated `[PAD]`) or, as an ablation, EOS.

    Detail 3.2: never pad with EOS. If pad == EOS, masking the padding also masks the EOS, the model
    never learns to stop and the EOS trick (Detail 23) breaks. With the Pythia tokenizer `[PAD]`
    becomes id 50277, inside Pythia's 50,304 embedding rows, so no embedding is resized.
    Note: transformers 5 reports `<|padding|>` (id 1) as Pythia's pad by default; we always set it.
    """
    if tokenizer.eos_token_id is None:
        raise UserInputError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS token; "
            "set `eos_token` in its tokenizer_config.json (Pythia: <|endoftext|>)"
        )
    if pad_token == "eos":
        tokenizer.pad_token = tokenizer.eos_token
    elif pad_token == PAD_TOKEN:
        if tokenizer.pad_token != PAD_TOKEN:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    else:
        raise UserInputError(f"pad_token must be '[PAD]' or 'eos', got {pad_token!r}")
    check_pad_token(tokenizer, allow_pad_equals_eos=pad_token == "eos")
    return tokenizer


def check_pad_token(tokenizer: Any, allow_pad_equals_eos: bool = False) -> None:
    """Refuse a tokenizer without a pad token or whose pad token is its EOS (Detail 3.2)."""
    name = getattr(tokenizer, "name_or_path", "?")
    if tokenizer.pad_token_id is None:
        raise UserInputError(f"tokenizer {name!r} has no pad token; add a dedicated '[PAD]' token")
    if tokenizer.pad_token_id == tokenizer.eos_token_id and not allow_pad_equals_eos:
        raise UserInputError(
            f"tokenizer {name!r} pads with its EOS token (id {tokenizer.eos_token_id}): masking the padding "
            "would also mask EOS and the model would never learn to stop (Detail 3.2). Use a tokenizer with a "
            "dedicated '[PAD]' token, or pass `--pad_token eos` to run this ablation on purpose"
        )


def load_tokenizer(name_or_path: str, pad_token: PadChoice = PAD_TOKEN) -> Any:
    """Load a tokenizer by hub id or local path and set its pad token (Detail 3.2)."""
    from transformers import AutoTokenizer

    local = Path(name_or_path)
    if looks_like_local_path(name_or_path) and not local.exists():
        raise UserInputError(f"tokenizer/model path {name_or_path!r} does not exist; check the path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"cannot load a tokenizer from {name_or_path!r} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "pass a hub id such as EleutherAI/pythia-1b-deduped or a directory written by save_pretrained"
        ) from error
    return set_pad_token(tokenizer, pad_token)


def looks_like_local_path(name: str) -> bool:
    """A hub id is `owner/name`; anything that exists, starts with . or /, or has more parts is local."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1


def column(dataset: Any, name: str) -> list[Any]:
    """One column of a `datasets.Dataset` as a Python list, in one Arrow conversion (row iteration is slow)."""
    return dataset.with_format("arrow")[name].to_pylist()


def rows(dataset: Any, names: list[str]) -> list[dict[str, Any]]:
    """The rows of `dataset` restricted to `names`, as dicts, in one Arrow conversion."""
    return dataset.select_columns(names).with_format("arrow")[:].to_pylist()


# ----------------------------------------------------------------------------------------------
# Files: nothing a run produced is lost or half-written
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path` in one rename.

    A crash leaves the previous `path` (if any) untouched and no half-written directory that a later
    stage could load.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write json atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def seed_everything(seed: int, rank: int = 0) -> int:
    """G-2: the per-process seed is `seed + rank * 100003`; returns it."""
    import numpy as np
    import torch

    local_seed = seed + rank * 100003
    random.seed(local_seed)
    np.random.seed(local_seed % 2**32)
    torch.manual_seed(local_seed)
    return local_seed
