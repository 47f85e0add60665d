"""Entry point: `python -m pasta_jax.main --config=configs/quickstart.py --workdir=DIR`."""

from absl import app, flags, logging
from ml_collections import config_flags

from pasta_jax import candidates, errors, files, parallel, pipeline, provenance
from pasta_jax import config as config_lib
from pasta_jax.data import schema
from pasta_jax.user_model import em

# Errors whose message names the input, the field and what to do: printed without a traceback.
INPUT_ERRORS = (
  provenance.StaleInputError,
  provenance.WorkdirBusyError,
  errors.CorruptFileError,
  errors.TrainingDivergedError,
  schema.RecordError,
  candidates.ReplayCacheError,
  files.OutsideRoot,
  em.CollapsedTypesError,
)

config_flags.DEFINE_config_file(
  "config", None, "Path to a config file with get_config().", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for every output of the run.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  parallel.maybe_initialize_distributed()
  try:
    config_lib.validate(FLAGS.config)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from None
  try:
    pipeline.run(FLAGS.config, FLAGS.workdir)
  except INPUT_ERRORS as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
