"""The mistakes a user fixes: each is reported as one line that says what to change, not as a traceback
(pipeline/process.py). `UserError` is their base; a stage raises the subclass that names the kind."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user must fix (a setting, a file, a missing upstream stage): reported as one
    line saying what to change, not as a traceback (see `pipeline.process.run`)."""


class ConfigError(UserError, ValueError):
    """A recipe or command-line setting the user must change."""


class DataError(UserError, ValueError):
    """A dataset the user must fix."""


class MissingArtifact(UserError, RuntimeError):
    """An upstream stage has not produced a complete artifact."""


class CorruptManifest(UserError, RuntimeError):
    """A manifest that cannot be read (truncated by a full disk, edited by hand)."""


class RecipeChanged(UserError, RuntimeError):
    """An interrupted run's checkpoints, and a recipe changed since in a way that alters the run."""


class StageBusy(UserError, RuntimeError):
    """The same stage of the same run is already running."""


class DiskError(UserError, OSError):
    """Not enough free space, or an output directory that cannot be written."""


class RewardError(UserError):
    """A reward source that failed, or returned something that is not one reward per completion. It
    may happen on one process only, so every process that meets one says so (pipeline.process)."""

    on_one_rank = True


class NonFiniteLoss(UserError, FloatingPointError):
    """A loss went NaN or infinite: the run stops rather than train on garbage (one line, every process)."""


class IterationFailed(UserError, RuntimeError):
    """An iteration's generation or scoring failed on some process (after its last iteration was saved)."""


class Diverged(UserError, RuntimeError):
    """A judge diverged from the reward and the recipe says to stop (ppo.on_divergence: stop)."""
