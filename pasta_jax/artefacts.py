"""The workdir's artefacts as typed values: what a stage reads from its upstream, loaded once.

Paths are relative to the workdir; the stages write them and `pipeline.STAGE_SPECS` names them as outputs,
so every one is covered by a done-marker's digests.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pasta_jax import checkpoint, files, types
from pasta_jax.data import layout, schema, synthetic
from pasta_jax.user_model import utility

RECORDS = "data/records.jsonl"
FEATURES = "data/features.npz"
SPLIT = "data/split.json"
SHARDS = "data/shards"
WORLD = "data/world.npz"
MANIFEST = "data_manifest.json"
FITTED = "user_model/fitted"
POSTERIORS = "user_model/posteriors.npz"
ALIGNMENT = "user_model/planted_alignment.npz"
SIM_TRAJECTORIES = "simulate/trajectories.npz"
SIM_RECORDS = "simulate/records.jsonl"
SIM_FEATURES = "simulate/features.npz"
POOL = "simulate/pool.npz"
POLICIES = "agent/policies"
REPORT = "report.json"


@dataclasses.dataclass(frozen=True)
class StageData:
  """The data stage's validated records and features, split by user.

  records: every canonical record; table: their feature rows; train / heldout: `types.Choices` of the
  training and held-out users (padded, masked); train_users / heldout_users: who each row is.
  """

  records: list[schema.ChoiceRecord]
  table: types.FeatureTable
  train: types.Choices
  heldout: types.Choices
  train_users: schema.UserIndex
  heldout_users: schema.UserIndex


def load_table(config: ml_collections.ConfigDict, workdir: str) -> types.FeatureTable:
  """The data stage's feature table."""
  return schema.load_features(
    os.path.join(workdir, FEATURES), config.world.feature_dim, "re-run the data stage"
  )


def load_layout(workdir: str) -> dict[str, layout.SplitLayout]:
  """The training and held-out users' shard layout (`layout.load`)."""
  return layout.load(os.path.join(workdir, SHARDS))


def load_data(config: ml_collections.ConfigDict, workdir: str) -> StageData:
  path = os.path.join(workdir, RECORDS)
  records = schema.read_records(path)
  table = load_table(config, workdir)
  spec = schema.RecordSpec.from_config(config)
  schema.validate_records(records, spec, path, table)
  split_path = os.path.join(workdir, SPLIT)
  split = check_split(
    files.read_json(split_path, remedy="re-run the data stage"), records, split_path
  )
  train, train_users = _rows(records, spec, split["train"], config)
  heldout, heldout_users = _rows(records, spec, split["heldout"], config)
  return StageData(
    records=records,
    table=table,
    train=train,
    heldout=heldout,
    train_users=train_users,
    heldout_users=heldout_users,
  )


def _rows(
  records: list[schema.ChoiceRecord],
  spec: schema.RecordSpec,
  user_ids: list[str],
  config: ml_collections.ConfigDict,
) -> tuple[types.Choices, schema.UserIndex]:
  """`schema.to_choices` of these users in rows of `data.turns_per_row` turns (`schema.row_length`)."""
  lengths = schema.history_lengths(records, user_ids)
  turns = schema.row_length(lengths, config.data.get("turns_per_row", 0))
  return schema.to_choices(records, spec, user_ids, turns_per_row=turns)


def _split_problem(user, field: str, seen: dict[str, str], users: set[str]) -> str | None:
  """What is wrong with `user` listed in `field` of the split, given the users listed before it
  (`seen`: user -> field) and the users with records."""
  if not isinstance(user, str):
    return f"user id {user!r} is not a string"
  if user in seen:
    return f"user {user!r} is listed " + (
      "twice" if seen[user] == field else f"also in field '{seen[user]}'"
    )
  if user not in users:
    return f"user {user!r} has no records in {RECORDS}"
  return None


def check_split(split, records: list[schema.ChoiceRecord], path: str) -> dict[str, list[str]]:
  """`split` (the JSON of `path`) as {"train": [user id], "heldout": [user id]}; RecordError naming
  the file, the field and the user for a missing field, a non-string id, a user listed twice or on
  both sides, or a user without records."""
  errors, seen = [], {}
  users = {r.user_id for r in records}
  for field in ("train", "heldout"):
    ids = split.get(field) if isinstance(split, dict) else None
    if not isinstance(ids, list):
      errors.append(f"{path}: field '{field}': expected a list of user ids, got {ids!r}")
      continue
    for user in ids:
      problem = _split_problem(user, field, seen, users)
      if problem is not None:
        errors.append(f"{path}: field '{field}': {problem}; re-run the data stage")
      if isinstance(user, str):
        seen.setdefault(user, field)
  schema.raise_if_any(errors)
  return split


def load_world(config: ml_collections.ConfigDict, workdir: str) -> synthetic.World:
  return synthetic.load_world(os.path.join(workdir, WORLD), config)


def load_fitted_users(
  config: ml_collections.ConfigDict, workdir: str, feature_dim: int
) -> utility.FittedUsers:
  """The K = config.user_model.num_types model saved by the user_model stage, on features of width
  `feature_dim` (its variables do not depend on the slate sizes)."""
  model = utility.from_config(config)
  like = jax.eval_shape(
    lambda: {
      "params": model.init(jax.random.key(0), utility.example_options(feature_dim)),
      "log_priors": jnp.zeros((model.num_types,), jnp.float32),
    }
  )
  saved = checkpoint.restore_tree(os.path.join(workdir, FITTED), like)
  return utility.FittedUsers(model=model, params=saved["params"], log_priors=saved["log_priors"])


def save_posteriors(workdir: str, posteriors: np.ndarray, users: schema.UserIndex) -> None:
  files.save_npz(
    os.path.join(workdir, POSTERIORS), posteriors=posteriors, user_ids=np.asarray(users.ids)
  )


def load_posteriors(workdir: str, users: schema.UserIndex) -> np.ndarray:
  """f32[U, K] type posteriors of the training users, in `users` order."""
  path = os.path.join(workdir, POSTERIORS)
  saved = files.load_npz(path, ("posteriors", "user_ids"), "re-run the user_model stage")
  if list(saved["user_ids"]) != list(users.ids):
    raise ValueError(
      f"{path}: its users differ from {SPLIT}'s training users; re-run the user_model stage"
    )
  return saved["posteriors"]


def save_alignment(workdir: str, planted_type_of_fitted_type: np.ndarray) -> None:
  files.save_npz(
    os.path.join(workdir, ALIGNMENT), planted_type_of_fitted_type=planted_type_of_fitted_type
  )


def load_alignment(workdir: str) -> np.ndarray:
  """i32[K]: the planted type each fitted type was matched to (synthetic data only)."""
  return files.load_npz(
    os.path.join(workdir, ALIGNMENT),
    ("planted_type_of_fitted_type",),
    "re-run the user_model stage",
  )["planted_type_of_fitted_type"]
