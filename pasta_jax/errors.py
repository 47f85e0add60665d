"""Errors shared across modules: training divergence and unreadable intermediate files."""


class TrainingDivergedError(FloatingPointError):
  """A non-finite metric or parameter; the message names the run, the step (or epoch) and the metric."""


class CorruptFileError(RuntimeError):
  """An intermediate file or directory that exists but cannot be read back (truncated or
  corrupted); the message names it and says what to delete and which stage to re-run. Raised
  `from` the underlying library error, and nothing is deleted or overwritten."""
