"""Errors shared by the training loops."""


class TrainingDivergedError(FloatingPointError):
  """A non-finite metric or parameter; the message names the run, the step (or epoch) and the metric."""
