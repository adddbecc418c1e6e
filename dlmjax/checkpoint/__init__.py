"""Checkpoints, in two parts with one owner each.

* `dlmjax.checkpoint.run`: a run's own checkpoints and resuming from them (`Checkpointer`: train state, data
  iterator and config per step; atomic commits, retention, fallback to the previous step, unreadable steps moved
  aside, clear errors when the storage refuses a write).
* `dlmjax.checkpoint.params`: parameters alone (`load`: the params subtree of any checkpoint, into the shardings
  of a mesh, optionally cast; `save_params`: params-only exports).

Neither imports `dlmjax.train`: what a checkpoint needs to know about the model (parameter shapes and logical
axes) comes from `dlmjax.models.specs`.
"""
from dlmjax.checkpoint.params import CONFIG_FILE, PARAMS_ITEM, is_params_export, load, read_config, save_params
from dlmjax.checkpoint.run import (TMP_MARKER, UNREADABLE_SUFFIX, Checkpointer, CheckpointWarning,
                                   find_checkpoint_dir)
from dlmjax.errors import CheckpointError, CheckpointRestoreError

__all__ = ["CONFIG_FILE", "PARAMS_ITEM", "TMP_MARKER", "UNREADABLE_SUFFIX", "CheckpointError",
           "CheckpointRestoreError", "CheckpointWarning", "Checkpointer", "find_checkpoint_dir", "is_params_export",
           "load", "read_config", "save_params"]
