"""Local Hugging Face model folders: checking them, loading in float32, and acting on weights a
checkpoint lacks. Shared by single-task distillation (:mod:`bert_emd.distill`) and multi-task
learning (:mod:`bert_emd.mtl`).

- :func:`check_model_folder` -- a folder with ``config.json``, or a one-line error;
- :func:`float32_kwargs` -- the ``from_pretrained`` keyword that loads a model in float32;
- :func:`check_trained_weights` -- refuse (or warn about) a model that predicts with an untrained
  head (:class:`UntrainedHeadError`);
- :func:`load_tokenizer` -- the tokenizer of a local folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from .errors import MissingFileError, UsageError

__all__ = ["UntrainedHeadError", "check_model_folder", "check_trained_weights", "float32_kwargs", "load_tokenizer"]

logger = logging.getLogger(__name__)


class UntrainedHeadError(UsageError):
    """A model loaded for its predictions (a teacher, the model scored by ``evaluate``) lacks
    weights of its checkpoint (typically the task head: a bare encoder checkpoint), which
    ``from_pretrained`` would initialise at random."""


def check_model_folder(path: str | os.PathLike, option: str | None = None) -> str:
    """``path`` as a string if it is a local Hugging Face model folder (one with ``config.json``);
    otherwise a :class:`MissingFileError` (a :class:`~bert_emd.errors.UsageError`) saying which of
    the two it is not. Checked before ``from_pretrained``, whose error for a missing folder is
    about Hub repository names. ``option``: the option that named it (``--teacher``), for the
    message."""
    folder = os.fspath(path)
    who = f"{option} {folder}" if option else folder
    if not os.path.isdir(folder):
        raise MissingFileError(f"{who}: no such folder")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise MissingFileError(f"{who} has no config.json (not a Hugging Face model folder)")
    return folder


def check_trained_weights(
    folder: str,
    missing: Sequence[str],
    *,
    role: str,
    predicts: bool,
    allow_untrained: bool = False,
    opt_out: str | None = None,
) -> None:
    """Act on the weights that ``from_pretrained`` did not find in ``folder``'s checkpoint
    (``loading_info["missing_keys"]``: freshly, randomly initialised).

    Args:
        folder: the checkpoint folder.
        missing: the missing weight names (for a bare encoder checkpoint loaded as a classifier:
            ``classifier.weight``, ``classifier.bias``; without a pooler also the pooler).
        role: what the model is, for the messages (``"teacher"``, ``"student"``, ...).
        predicts: the model is used for its predictions (a teacher, an evaluated model): missing
            weights are refused with :class:`UntrainedHeadError` naming them and the fix, unless
            ``allow_untrained`` (then one warning). Otherwise (a student or a model to fine-tune,
            which train their head) one info line.
        allow_untrained: go on with a warning instead of refusing.
        opt_out: the option that sets ``allow_untrained``, named in the refusal.
    """
    missing = sorted(missing)
    if not missing:
        return
    names = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    if not predicts:
        logger.info("%s %s: %s not in the checkpoint, initialised at random (trained from here)", role, folder, names)
        return
    if allow_untrained:
        logger.warning("%s %s: %s not in the checkpoint, initialised at random (seeded): it predicts with an "
                       "untrained head, as %s allows", role, folder, names, opt_out or "the caller")
        return
    hint = f", or pass {opt_out} to go on with a random head" if opt_out else ""
    raise UntrainedHeadError(
        f"the {role} {folder} has no trained task head: {names} not in the checkpoint (it would predict with "
        f"random weights); fine-tune it on the task first (bert-emd finetune --model {folder} ...){hint}"
    )


def float32_kwargs() -> dict[str, Any]:
    """The keyword of ``from_pretrained`` / ``from_config`` that loads or builds a model in float32
    (``dtype`` in transformers 5, ``torch_dtype`` in 4.x), whatever dtype its checkpoint or config
    names.

    Why: transformers 5 loads a checkpoint in the dtype it was saved in, and a config copied from a
    bfloat16 checkpoint builds a bfloat16 model. Our students and fine-tuned models train next to
    float32 modules (the distillation projection, the multi-task heads), and ``--bf16`` is autocast
    over float32 master weights: a bfloat16 checkpoint as teacher, student or encoder silently made
    ``--bf16`` train (and save) bfloat16 weights, and failed without ``--bf16`` (bfloat16 hidden
    states into the float32 projection or heads). Loading every model in float32 restores the
    behaviour of transformers 4, whose default this was.
    """
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved in a local model folder (no hub look-up)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise MissingFileError(f"{os.fspath(path)}: no such folder")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise MissingFileError(f"no tokenizer in {path}: the folder needs its tokenizer files ({err})") from err
