"""Exceptions the training entry point turns into a one-line message and an exit code."""


class TrainingAborted(RuntimeError):
    """The run stopped on purpose (non-finite losses, a diverged policy, a failed weight-sync check).

    Checkpoints already written are kept; the message says why and where they are.
    """
