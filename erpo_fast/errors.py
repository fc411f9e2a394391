"""erpo-fast's one error hierarchy.

    ErpoError
    ├── UserError (ValueError)          bad input; the CLI prints one line and exits with code 2
    │   ├── ConfigError                 unknown key, malformed / out-of-range / contradictory setting
    │   │   └── RewardSpecError         a custom reward spec that does not import
    │   ├── DataError                   a dataset file (or prompt) that cannot be used
    │   ├── ModelLoadError              a model folder that cannot be loaded
    │   ├── CheckpointError             a missing, incomplete or corrupted checkpoint
    │   └── RunDirError                 an output directory that cannot be used for this run
    ├── NonFiniteLogitsError (ValueError)  NaN/inf logits while sampling: the policy diverged
    └── TrainingAborted (RuntimeError)  the run stopped on purpose; exit code 1
        ├── WeightSyncError             the engine does not sample from the learner's weights
        └── RewardFunctionError         every response of a batch failed verification: the verifier is broken

Every class is defined here; the modules that raise them re-export them under their old names.
"""

from __future__ import annotations


class ErpoError(Exception):
    """Base of every error erpo-fast raises on purpose."""


class UserError(ErpoError, ValueError):
    """Bad input from the user (config, data, model folder, checkpoint, output directory): one line, exit 2."""


class ConfigError(UserError):
    """A bad configuration: unknown key, malformed value, out-of-range or contradictory settings."""


class RewardSpecError(ConfigError):
    """A custom reward spec that does not name an importable function of (response, answer)."""


class DataError(UserError):
    """A dataset file that cannot be used; the message names the file and, where it can, the line or row."""


class ModelLoadError(UserError):
    """A model directory that cannot be loaded: missing, not a directory, no config or no tokenizer."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or corrupted."""


class RunDirError(UserError):
    """The output directory cannot be used for this run."""


class NonFiniteLogitsError(ErpoError, ValueError):
    """Some rows' logits hold NaN/+inf or no finite value: the policy has diverged (or the input is broken)."""


class TrainingAborted(ErpoError, RuntimeError):
    """The run stopped on purpose (non-finite losses, a diverged policy, a failed weight-sync check).

    Checkpoints already written are kept; the message says why and where they are.
    """


class WeightSyncError(TrainingAborted):
    """The engine's log-probs on the probe prompt do not match the learner's: the weight sync failed."""


class RewardFunctionError(TrainingAborted):
    """Every response of a batch failed verification (raised, returned None or a non-finite value, timed out):
    the verifier itself is broken, and training on all-zero rewards would only waste the run."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
