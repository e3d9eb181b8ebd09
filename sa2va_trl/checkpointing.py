"""Checkpoints that are complete or ignored, exact resume, and a checkpoint push that includes the EMA.

transformers' `Trainer._save_checkpoint` writes ``checkpoint-<step>/`` in stages (weights, optimizer, scheduler,
RNG states, ``trainer_state.json``), pushes it to the Hub, deletes old checkpoints (``save_total_limit``), and only
then do the callbacks' ``on_save`` hooks run (the EMA writes its files there). Three consequences, fixed by
`CheckpointingMixin`:

- A crash while saving leaves a folder that looks like a checkpoint; ``resume_from_checkpoint=True`` picks the
  highest step whether it is complete or not.
- With ``hub_strategy: checkpoint`` (or ``all_checkpoints``) the pushed checkpoint had no EMA files: the Hub copy
  could not resume the run.
- With ``save_total_limit``, the older (complete) checkpoints were deleted before the new one had its EMA files, so
  a crash in between left nothing to resume from.

The mixin's `_save_checkpoint` lets transformers write its files with the push and the rotation held back, then
has every callback with a ``save_to_checkpoint(checkpoint_dir, model=..., processing_class=...)`` method write its
files (`sa2va_trl.ema.EMACallback` has one), waits for every process, and writes ``checkpoint_complete.json`` last
(atomically: a temporary name, then a rename). That marker lists every file of the checkpoint with its size. Only
then does it push and rotate. A checkpoint folder is *complete* when the marker is there and every listed file has
its listed size; anything else is ignored when resuming (and the skip is logged). A folder of the same step left
by an earlier run is deleted before the new one is written, so a stale marker never vouches for new files.

Resuming: `CheckpointingMixin.train` resolves ``resume_from_checkpoint=True`` (or ``"true"`` / ``"last"``, as a
recipe or the command line gives it) to the last complete checkpoint, refuses an incomplete path with the reason,
and puts the path into ``args.resume_from_checkpoint`` so callbacks (the EMA) find it. transformers restores the
RNG states (python, numpy, torch) saved in the checkpoint, so a resumed run samples what the uninterrupted run
sampled. One gap is closed here: TRL's `RepeatSampler` draws every epoch's order from one generator seeded once,
and transformers 5 does not replay earlier epochs when it resumes, so a run resumed in epoch e > 0 visited the rows
in another order; the mixin's training sampler re-seeds with ``seed + epoch`` at every epoch (epoch 0 keeps TRL's
order).

Use it before the Trainer class in the bases: ``class MyTrainer(CheckpointingMixin, GRPOTrainer)``
(`sa2va_trl.trainer.Sa2VAGRPOTrainer` does). transformers / TRL methods it overrides, written for transformers
5.23 and TRL 1.16 (`tests/test_checkpointing.py` fails if they are renamed): `train`, `_save_checkpoint`,
`_push_from_checkpoint`, `_get_train_sampler`.

From the command line:

    python -m sa2va_trl.checkpointing check outputs/demo            # each checkpoint: complete or why not
    python -m sa2va_trl.checkpointing mark outputs/demo/checkpoint-100   # vouch for one written without a marker
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLETE_MARKER",
    "CheckpointingMixin",
    "EpochSeededRepeatSampler",
    "IncompleteCheckpointError",
    "checkpoint_problem",
    "get_last_complete_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "resolve_resume_checkpoint",
    "write_completion_marker",
]

COMPLETE_MARKER = "checkpoint_complete.json"
FORMAT_VERSION = 1
EMA_MODEL_DIR = "ema_model"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TRUE = {"true", "yes", "last", "1"}
_FALSE = {"false", "no", "none", "0", ""}

#: transformers 5.23 / TRL 1.16 methods `CheckpointingMixin` overrides (tested against renames).
OVERRIDDEN_METHODS = ("train", "_save_checkpoint", "_push_from_checkpoint", "_get_train_sampler")


class IncompleteCheckpointError(ValueError):
    """A checkpoint asked for by path is incomplete (interrupted while saving, or damaged)."""


# --- the completion marker ----------------------------------------------------------------------------------------


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_sizes(checkpoint_dir: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(checkpoint_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, checkpoint_dir).replace(os.sep, "/")
            if rel != COMPLETE_MARKER and ".tmp" not in name:
                sizes[rel] = os.path.getsize(path)
    return dict(sorted(sizes.items()))


def write_completion_marker(checkpoint_dir: str, step: int | None = None) -> dict:
    """Write ``checkpoint_complete.json`` into ``checkpoint_dir``: every file (relative path -> size in bytes), the
    step, and the format version. Call it after every file of the checkpoint is on disk (on every process).

    The marker is written to a temporary name, flushed to disk and renamed, so it is either whole or absent.

    Returns:
        The marker's content.
    """
    marker = {"format_version": FORMAT_VERSION, "global_step": step, "files": _file_sizes(checkpoint_dir)}
    path = os.path.join(checkpoint_dir, COMPLETE_MARKER)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(checkpoint_dir)
    return marker


def checkpoint_problem(checkpoint_dir: str) -> str | None:
    """None when ``checkpoint_dir`` is a complete checkpoint, else why not (one line)."""
    if not os.path.isdir(checkpoint_dir):
        return "no such directory"
    path = os.path.join(checkpoint_dir, COMPLETE_MARKER)
    if not os.path.isfile(path):
        return f"no {COMPLETE_MARKER} (the save was interrupted, or the checkpoint was written without one)"
    try:
        with open(path) as f:
            marker = json.load(f)
        files = dict(marker["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {COMPLETE_MARKER} ({e})"
    if not files:
        return f"{COMPLETE_MARKER} lists no files"
    for rel, size in files.items():
        file = os.path.join(checkpoint_dir, *rel.split("/"))
        if not os.path.isfile(file):
            return f"{rel} is missing"
        actual = os.path.getsize(file)
        if actual != size:
            return f"{rel} has {actual} bytes, {COMPLETE_MARKER} says {size}"
    return None


def is_complete_checkpoint(checkpoint_dir: str) -> bool:
    """Whether ``checkpoint_dir`` has its completion marker and every file the marker lists, at its size."""
    return checkpoint_problem(checkpoint_dir) is None


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the ``checkpoint-<step>`` folders in ``folder``, by step."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(folder, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def get_last_complete_checkpoint(folder: str) -> str | None:
    """The complete ``checkpoint-<step>`` folder of ``folder`` with the highest step, or None.

    Incomplete folders with a higher step are skipped, each with a warning saying why.
    """
    for _, path in reversed(list_checkpoints(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping incomplete checkpoint %s: %s.", path, problem)
    return None


def resolve_resume_checkpoint(value, output_dir: str) -> str | None:
    """The checkpoint a run resumes from.

    Args:
        value: ``None`` / ``False`` / ``"false"``: none. ``True`` / ``"true"`` / ``"last"``: the last complete
            checkpoint in ``output_dir`` (an error if there is none). A path: that checkpoint, which must be complete.
        output_dir: where ``True`` looks.

    Raises:
        IncompleteCheckpointError: the path is incomplete (the message gives the reason and the last complete
            checkpoint next to it, if any).
        FileNotFoundError: ``True`` but no complete checkpoint in ``output_dir``.
    """
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in _TRUE):
        path = get_last_complete_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint asks for the last checkpoint, but {output_dir!r} has no complete "
                "checkpoint-<step> folder (incomplete ones are listed above, if any)."
            )
        return path
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return None
    path = os.fspath(value)
    problem = checkpoint_problem(path)
    if problem is not None:
        parent = os.path.dirname(os.path.abspath(path))
        alternative = get_last_complete_checkpoint(parent)
        hint = f" The last complete checkpoint there is {alternative}." if alternative else ""
        raise IncompleteCheckpointError(
            f"Cannot resume from {path!r}: {problem}.{hint} If you know it is complete (a checkpoint written before "
            f"sa2va-trl wrote {COMPLETE_MARKER}), vouch for it with `python -m sa2va_trl.checkpointing mark {path}`."
        )
    return path


# --- the training sampler -----------------------------------------------------------------------------------------


def _repeat_sampler_class():
    from trl.trainer.utils import RepeatSampler

    return RepeatSampler


class EpochSeededRepeatSampler(_repeat_sampler_class()):
    """TRL's `RepeatSampler` whose order depends on (seed, epoch) only: `set_epoch(e)` re-seeds it with ``seed + e``.

    The Trainer calls `set_epoch` before every epoch (also in a resumed run), so a run resumed in a later epoch
    visits the rows in the order the uninterrupted run did. Epoch 0's order is the stock sampler's.

    Example:
        >>> sampler = EpochSeededRepeatSampler(list(range(6)), mini_repeat_count=1, batch_size=3, seed=0)
        >>> orders = []
        >>> for epoch in (0, 1, 2):
        ...     sampler.set_epoch(epoch)
        ...     orders.append(list(sampler))
        >>> resumed = EpochSeededRepeatSampler(list(range(6)), mini_repeat_count=1, batch_size=3, seed=0)
        >>> resumed.set_epoch(2)  # a run resumed in epoch 2
        >>> list(resumed) == orders[2]
        True
    """

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(int(self.seed) + self.epoch)

    @classmethod
    def from_sampler(cls, sampler) -> EpochSeededRepeatSampler:
        return cls(
            data_source=sampler.data_source,
            mini_repeat_count=sampler.mini_repeat_count,
            batch_size=sampler.batch_size,
            repeat_count=sampler.repeat_count,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
        )


# --- the Trainer mixin --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _overridden(args, **values):
    saved = {name: getattr(args, name) for name in values}
    for name, value in values.items():
        setattr(args, name, value)
    try:
        yield saved
    finally:
        for name, value in saved.items():
            setattr(args, name, value)


class CheckpointingMixin:
    """Complete-or-ignored checkpoints, push and rotation after completion, exact resume (see the module docs).

    Put it first in the bases of a `transformers.Trainer` subclass. Callbacks that keep state in checkpoints can
    define ``save_to_checkpoint(checkpoint_dir, model=None, processing_class=None)``: it is called on every process
    inside the checkpoint save, before the completion marker, the push and the rotation (their ``on_save`` then
    finds the files already written).
    """

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """transformers' `train`, resuming only from a complete checkpoint (see `resolve_resume_checkpoint`); the
        path also goes into ``args.resume_from_checkpoint``, where callbacks look for it."""
        path = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if path is not None:
            logger.info("Resuming from %s.", path)
            self.args.resume_from_checkpoint = path
        return super().train(resume_from_checkpoint=path, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                             **kwargs)

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            logger.info("Replacing %s, left by an earlier run.", folder)
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        # transformers' files; its push and rotation would run before the callbacks' files exist: held back
        with _overridden(self.args, push_to_hub=False, save_total_limit=None) as held:
            super()._save_checkpoint(model, trial)
        for callback in self.callback_handler.callbacks:
            save = getattr(callback, "save_to_checkpoint", None)
            if callable(save):
                save(folder, model=self.model, processing_class=self.processing_class)
        self.accelerator.wait_for_everyone()  # every process's files are on disk
        if self.args.should_save:
            write_completion_marker(folder, step=self.state.global_step)
        if held["push_to_hub"]:
            self._push_from_checkpoint(folder)
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=held["save_total_limit"],
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """transformers' push of a checkpoint; a loadable EMA model in the checkpoint (``ema_model/``) also replaces
        the one in ``output_dir``, so the pushed top level holds the policy and its EMA of the same step."""
        from transformers.trainer_utils import HubStrategy

        in_progress = getattr(self, "push_in_progress", None)
        busy = in_progress is not None and not in_progress.is_done()
        will_push = (
            self.is_world_process_zero()
            and self.args.hub_strategy != HubStrategy.END
            and (self.args.hub_always_push or not busy)
        )
        source = os.path.join(checkpoint_folder, EMA_MODEL_DIR)
        if will_push and os.path.isdir(source):
            target = os.path.join(self.args.output_dir, EMA_MODEL_DIR)
            if os.path.isdir(target):
                shutil.rmtree(target)
            shutil.copytree(source, target)
        super()._push_from_checkpoint(checkpoint_folder)

    def _get_train_sampler(self, *args, **kwargs):
        """TRL's sampler, re-seeded with ``seed + epoch`` at every epoch (`EpochSeededRepeatSampler`)."""
        sampler = super()._get_train_sampler(*args, **kwargs)
        if type(sampler) is _repeat_sampler_class() and sampler.shuffle and sampler.seed is not None:
            return EpochSeededRepeatSampler.from_sampler(sampler)
        return sampler


# --- command line ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sa2va_trl.checkpointing", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="say which checkpoints are complete (an output_dir or checkpoint folders)")
    check.add_argument("paths", nargs="+")
    mark = sub.add_parser("mark", help="write the completion marker of checkpoints you know are complete")
    mark.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    status = 0
    for path in args.paths:
        folders = [p for _, p in list_checkpoints(path)] if not _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path))) else [path]
        if not folders:
            print(f"{path}: no checkpoint-<step> folders")
            status = 1
        for folder in folders:
            if args.command == "mark":
                marker = write_completion_marker(folder, step=_step_of(folder))
                print(f"{folder}: marked complete ({len(marker['files'])} files)")
                continue
            problem = checkpoint_problem(folder)
            print(f"{folder}: {'complete' if problem is None else 'INCOMPLETE: ' + problem}")
            status = status or int(problem is not None)
    return status


def _step_of(folder: str) -> int | None:
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(folder)))
    return int(match.group(1)) if match else None


if __name__ == "__main__":
    sys.exit(main())
