"""Checkpoints that appear whole or not at all.

``transformers.Trainer`` writes ``checkpoint-N/`` in place, file by file (model, optimizer,
scheduler, RNG states, ``trainer_state.json`` last). A run killed while it saves leaves a newest
checkpoint folder without some of those files, and ``--resume_from_checkpoint`` (which picks the
newest ``checkpoint-N`` by name) then fails, or silently resumes from a half-written state.

:class:`AtomicCheckpoints` makes every process write the checkpoint into a staging folder
``.partial-checkpoint-N/checkpoint-N`` beside the final one; after all processes are done
(a barrier), the process that saves renames it to ``checkpoint-N`` in one ``os.replace`` (atomic
on POSIX file systems) and only then rotates old checkpoints (``save_total_limit``). A kill at any
moment leaves either the complete new checkpoint or none (a ``.partial-*`` folder, which no resume
picks and the next save at that step replaces).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

__all__ = ["AtomicCheckpoints", "PARTIAL_PREFIX"]

PARTIAL_PREFIX = ".partial-"


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpoints:
    """Mixin for a ``transformers.Trainer`` subclass (list it before ``Trainer``): checkpoints are
    staged and renamed into place once complete on every process."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, name)
        staging_root = os.path.join(run_dir, PARTIAL_PREFIX + name)
        staged = os.path.join(staging_root, name)
        if self.args.should_save and os.path.isdir(staging_root):
            shutil.rmtree(staging_root)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        # Trainer derives the checkpoint's folder from _get_output_dir: point it at the staging
        # root for this one save (rotation inside it finds only this checkpoint: a no-op).
        self._get_output_dir = lambda trial=None: staging_root  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            del self._get_output_dir
        best = self.state.best_model_checkpoint
        if best is not None and os.path.normpath(best).startswith(os.path.normpath(staging_root)):
            # Trainer found the best checkpoint in the staging folder: record where it will be
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, staging_root))
            if self.args.should_save:
                from transformers.trainer import TRAINER_STATE_NAME

                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states)
        if self.args.should_save:
            if os.path.isdir(final):  # an older checkpoint of the same step (e.g. a re-run)
                shutil.rmtree(final)
            os.replace(staged, final)
            _fsync_dir(run_dir)
            shutil.rmtree(staging_root, ignore_errors=True)
            self._rotate_into_place(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate_into_place(self, run_dir: str) -> None:
        """``save_total_limit`` over the final folders (transformers 5: a function; 4.x: a method)."""
        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:  # transformers 4.x
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)  # type: ignore[attr-defined]
            return
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
