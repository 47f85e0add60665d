"""Config checks that run before anything compiles, and the config hash stamped on every artefact.

Each block is checked by the module that owns it (`validate_config` there); `validate` runs them all,
then refuses a config whose largest arrays would not fit in this machine's memory (`check_memory`).
"""

import dataclasses
import hashlib
import json
import os

import ml_collections

from pasta_jax import candidates, simulator
from pasta_jax.agent import registry
from pasta_jax.config_checks import (
  MIN_BOOTSTRAP_SAMPLES,
  ConfigError,
  check,
  check_positive_int,
  field_value,
  is_int,
  num_training_users,
  training_rows,
)
from pasta_jax.data import layout, synthetic
from pasta_jax.embed import checks as embed_checks
from pasta_jax.evaluation import agents as agent_eval
from pasta_jax.user_model import em, select_k, utility

__all__ = [
  "Allocation",
  "ConfigError",
  "DATA_SOURCES",
  "MEMORY_FRACTION",
  "MIN_BOOTSTRAP_SAMPLES",
  "STAGES",
  "check",
  "check_memory",
  "check_positive_int",
  "config_hash",
  "is_int",
  "machine_memory_bytes",
  "memory_estimate",
  "to_json",
  "validate",
]

STAGES = ("data", "user_model", "simulate", "agent", "evaluate", "report")
DATA_SOURCES = ("synthetic", "pasta_kaggle", "records")
# Stages that need a candidate generator, which user-supplied records (data.source="records") lack.
GENERATOR_STAGES = ("simulate", "agent")
SEED_LIMIT = 2**63  # jax.random.key takes a signed 64-bit seed.
# The estimate counts the largest arrays only (not XLA's temporaries, the interpreter or the OS), so a
# stage whose estimate exceeds this share of physical memory would swap or be killed.
MEMORY_FRACTION = 0.8


def _check_run(config: ml_collections.ConfigDict) -> None:
  """`seed`, `stages` and `mesh`."""
  check(
    is_int(config.seed) and 0 <= config.seed < SEED_LIMIT,
    "seed",
    config.seed,
    "must be an integer in [0, 2**63)",
  )
  stages = tuple(config.stages)
  check(all(s in STAGES for s in stages), "stages", stages, f"each stage must be one of {STAGES}")
  check(
    list(stages) == sorted(stages, key=STAGES.index),
    "stages",
    stages,
    f"stages run in the order {STAGES}",
  )
  check(
    is_int(config.mesh.data) and (config.mesh.data == -1 or config.mesh.data >= 1),
    "mesh.data",
    config.mesh.data,
    "-1 or a device count",
  )


def _check_records_source(config: ml_collections.ConfigDict) -> None:
  """User-supplied records: `data.records` and `data.features` name files; the stages that need a
  candidate generator (`GENERATOR_STAGES`) need the replay cache, CLIP and SDXL (the release's pool)."""
  for field, what in (("records", "a JSON Lines records file"), ("features", "a features.npz")):
    path = config.data[field]
    check(
      isinstance(path, str) and os.path.isfile(path),
      f"data.{field}",
      path,
      f"must name an existing file: {what} in the format pasta_jax/data/schema.py writes",
    )
  needing = tuple(s for s in GENERATOR_STAGES if s in config.stages)
  if not needing:
    return
  check(
    bool(config.candidates.replay_cache),
    "candidates.replay_cache",
    config.candidates.replay_cache,
    f"stages {needing} need a candidate generator on data.source='records': name an LMM's replay "
    "cache (format in pasta_jax/candidates.py) with embed.clip_checkpoint and "
    "embed.sdxl_checkpoint, or run only the stages ('data', 'user_model', 'evaluate', 'report')",
  )
  simulate = "simulate" in config.stages
  candidates.validate_config(config, simulate)
  if simulate:
    embed_checks.validate_config(config, render=True)


def _check_data(config: ml_collections.ConfigDict) -> None:
  """`data`, and what each source needs: on the PASTA release a valid layout mapping
  (`data.kaggle_layout`), CLIP always, the replay cache and SDXL to simulate; on user-supplied
  records (`data.source="records"`) the records and features files (`_check_records_source`)."""
  check(
    config.data.source in DATA_SOURCES, "data.source", config.data.source, f"one of {DATA_SOURCES}"
  )
  turns_per_row = config.data.get("turns_per_row", 0)
  check(
    is_int(turns_per_row) and turns_per_row >= 0,
    "data.turns_per_row",
    turns_per_row,
    "a number of turns per row >= 1, or 0 (the 95th percentile of the users' history lengths)",
  )
  shards = config.data.get("shards", layout.DEFAULT_SHARDS)
  check(
    is_int(shards) and shards >= 1,
    "data.shards",
    shards,
    "a number of array_record files per split >= 1",
  )
  if config.data.source == "records":
    _check_records_source(config)
  if config.data.source == "pasta_kaggle":
    check(
      bool(config.data.kaggle_dir),
      "data.kaggle_dir",
      config.data.kaggle_dir,
      "must name a file or directory",
    )
    from pasta_jax.data import pasta_kaggle

    pasta_kaggle.validate_config(config)
    simulate = "simulate" in config.stages
    candidates.validate_config(config, simulate)
    embed_checks.validate_config(config, render=simulate)


@dataclasses.dataclass(frozen=True)
class Allocation:
  """Memory a stage holds at once: what it is, the config fields that size it, and its bytes."""

  what: str
  fields: tuple[str, ...]
  nbytes: int


_F32 = 4
# A canonical record's Python objects, measured with tracemalloc: per turn, per option, per image.
_RECORD_BYTES = (600, 300, 200)
# Per slate slot of an evaluation rollout, in 4-byte words besides its M seeds: slate index, category,
# utility and the shown prompt (5 attributes and a template on the synthetic world).
_ROLLOUT_SLOT_WORDS = 9
_BASELINES = 4  # random, generator order, greedy, oracle (agent/registry.baseline_policies).
_SLATE = ("interaction.turns", "interaction.slate_size")
_TEXT = (*_SLATE, "world.feature_dim")
_IMAGES = (*_TEXT, "interaction.images_per_prompt")
_RATERS = ("world.num_users", "world.sessions_per_user")
_TRAINING = ("world.num_users", "world.heldout_fraction", "world.sessions_per_user")
_SIMULATED = ("simulate.num_users",)


def _image_features(
  config: ml_collections.ConfigDict, what: str, sessions: int, fields: tuple[str, ...], copies: int
) -> Allocation:
  """`copies` of the image features f32[sessions, H, L, M, D] of `sessions` H-turn sessions."""
  it = config.interaction
  slots = sessions * it.turns * it.slate_size * it.images_per_prompt
  nbytes = copies * slots * config.world.feature_dim * _F32
  return Allocation(f"{what} f32[{sessions}, H, L, M, D] x{copies}", fields + _IMAGES, nbytes)


def _text_features(
  config: ml_collections.ConfigDict, what: str, sessions: int, fields: tuple[str, ...], copies: int
) -> Allocation:
  """`copies` of the slate and history text features f32[sessions, H, L + 1, D]."""
  it = config.interaction
  slots = sessions * it.turns * (it.slate_size + 1)
  nbytes = copies * slots * config.world.feature_dim * _F32
  return Allocation(f"{what} f32[{sessions}, H, L + 1, D] x{copies}", fields + _TEXT, nbytes)


def _records(
  config: ml_collections.ConfigDict, what: str, sessions: int, fields: tuple[str, ...]
) -> Allocation:
  """The canonical records (Python objects) of `sessions` H-turn sessions."""
  per_turn, per_option, per_image = _RECORD_BYTES
  it = config.interaction
  per_record = per_turn + it.slate_size * (per_option + it.images_per_prompt * per_image)
  nbytes = sessions * it.turns * per_record
  return Allocation(f"{what} ({sessions} x H turns)", fields + ("interaction.turns",), nbytes)


def _synthetic(config: ml_collections.ConfigDict) -> bool:
  return config.data.source == "synthetic"


def _data_allocations(config: ml_collections.ConfigDict) -> list[Allocation]:
  """The synthetic rater log: trajectories, the feature table copied from them, records."""
  if not _synthetic(config):
    return []
  sessions = config.world.num_users * config.world.sessions_per_user
  return [
    _image_features(config, "rater log image features and table", sessions, _RATERS, 2),
    _text_features(config, "rater log text features and table", sessions, _RATERS, 2),
    _records(config, "rater log records", sessions, _RATERS),
  ]


def _em_rows(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """(R, T): the rows of T turns that hold the training users' `types.Choices` (`training_rows`), R
  padded to a multiple of `em.batch_users` in mini-batch EM; None when the training users are
  unknown (`num_training_users`)."""
  layout = training_rows(config)
  if layout is None:
    return None
  _, turns, rows = layout
  e = config.em
  if e.mode == "minibatch":
    rows = -(-rows // e.batch_users) * e.batch_users
  return rows, turns


def _user_model_allocations(config: ml_collections.ConfigDict) -> list[Allocation]:
  """The rater log's table and records, and EM's padded choices and gathered options of every
  training user's rows (`_em_rows`; the end-of-epoch log-likelihood reads them all at once)."""
  layout = _em_rows(config)
  if layout is None:
    return []
  rows, turns = layout
  w, it = config.world, config.interaction
  slots = rows * turns * it.slate_size
  rater_sessions = w.num_users * w.sessions_per_user
  fields = _TRAINING + ("data.turns_per_row",)
  return [
    _image_features(config, "rater log feature table", rater_sessions, _RATERS, 1),
    _records(config, "rater log records", rater_sessions, _RATERS),
    Allocation(
      f"EM's gathered image options f32[{rows}, {turns}, L, M, D]",
      fields + _IMAGES,
      slots * it.images_per_prompt * w.feature_dim * _F32,
    ),
    Allocation(
      f"EM's gathered text options and padded choices [{rows}, {turns}, L, D + M + 3]",
      fields + _TEXT,
      slots * (w.feature_dim + it.images_per_prompt + 3) * _F32,
    ),
  ]


def _simulate_allocations(config: ml_collections.ConfigDict) -> list[Allocation]:
  """Trajectories of `simulate.num_users` users (images only on the synthetic world), the feature
  table copied from them, and their records."""
  users = config.simulate.num_users
  out = [
    _text_features(config, "simulated text features and table", users, _SIMULATED, 2),
    _records(config, "simulated records", users, _SIMULATED),
  ]
  if _synthetic(config):
    out.insert(
      0, _image_features(config, "simulated image features and table", users, _SIMULATED, 2)
    )
  return out


def _agent_allocations(config: ml_collections.ConfigDict) -> list[Allocation]:
  """The agent's sessions: the real training users' and the simulated users' text features."""
  out = [_text_features(config, "simulated sessions", config.simulate.num_users, _SIMULATED, 1)]
  users = num_training_users(config)
  if users is not None:
    sessions = users * config.world.sessions_per_user
    out.append(_text_features(config, "real sessions", sessions, _TRAINING, 1))
  return out


def _evaluate_allocations(config: ml_collections.ConfigDict) -> list[Allocation]:
  """Every policy's rollouts on every environment, kept without images or text."""
  it, users = config.interaction, config.evaluate.num_users
  policies = _BASELINES + config.agent.planning.enabled + len(registry.trained_policies(config))
  rollouts = policies * (2 if _synthetic(config) else 1)
  words = it.turns * (it.slate_size * (it.images_per_prompt + _ROLLOUT_SLOT_WORDS) + 3)
  words += (it.turns + 1) * config.user_model.num_types
  return [
    Allocation(
      f"{rollouts} policy x environment rollouts of {users} users",
      ("evaluate.num_users", *_SLATE, "interaction.images_per_prompt"),
      rollouts * users * words * _F32,
    )
  ]


_STAGE_ALLOCATIONS = {
  "data": _data_allocations,
  "user_model": _user_model_allocations,
  "simulate": _simulate_allocations,
  "agent": _agent_allocations,
  "evaluate": _evaluate_allocations,
}


def memory_estimate(config: ml_collections.ConfigDict) -> dict[str, list[Allocation]]:
  """stage -> the largest host and device arrays it holds at once, for each stage of `config.stages`
  that computes (the report stage only reads JSON; none for a `pretrain` config, whose sizes come
  from its records). Arithmetic only: nothing is allocated."""
  if "pretrain" in config:
    return {}
  return {
    stage: _STAGE_ALLOCATIONS[stage](config)
    for stage in config.stages
    if stage in _STAGE_ALLOCATIONS
  }


def machine_memory_bytes() -> int | None:
  """Physical memory of this machine; None where the OS does not say."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (AttributeError, OSError, ValueError):
    return None


def _gib(nbytes: float) -> str:
  return f"{nbytes / 2**30:.3g} GiB"


def check_memory(config: ml_collections.ConfigDict, memory_bytes: int | None = None) -> None:
  """Raises ConfigError when a stage's estimate (`memory_estimate`) exceeds `MEMORY_FRACTION` of
  `memory_bytes` (default: this machine's), naming the field of its largest array first, then every
  field that sizes the stage's arrays, and the estimate."""
  memory = machine_memory_bytes() if memory_bytes is None else memory_bytes
  if memory is None:
    return
  for stage, allocations in memory_estimate(config).items():
    total = sum(a.nbytes for a in allocations)
    if total <= MEMORY_FRACTION * memory:
      continue
    ordered = sorted(allocations, key=lambda a: -a.nbytes)
    fields = list(dict.fromkeys(f for a in ordered for f in a.fields))
    parts = "; ".join(f"{a.what}: {_gib(a.nbytes)}" for a in ordered)
    raise ConfigError(
      f"config.{fields[0]}={field_value(config, fields[0])!r}: the {stage} stage would hold about "
      f"{_gib(total)} ({parts}), more than {MEMORY_FRACTION:.0%} of this machine's {_gib(memory)}; "
      f"make smaller: {', '.join(fields)}"
    )


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field; last, one whose sizes would not fit in memory."""
  _check_run(config)
  simulator.validate_config(config)
  _check_data(config)
  synthetic.validate_config(config)
  utility.validate_config(config)
  select_k.validate_config(config)
  em.validate_config(config)
  registry.validate_config(config)
  agent_eval.validate_config(config)
  check_memory(config)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, indent=2, default=list)


def config_hash(config: ml_collections.ConfigDict) -> str:
  """sha256 of the resolved config (sorted JSON) without `stages`, which selects work but changes no
  result; first 16 hex digits."""
  content = config.to_dict()
  content.pop("stages", None)
  return hashlib.sha256(json.dumps(content, sort_keys=True, default=list).encode()).hexdigest()[:16]
