"""Config checks that run before anything compiles, and the config hash stamped on every artefact."""

import hashlib
import json
import os

import ml_collections

from pasta_jax import candidates, simulator
from pasta_jax.agent.data import DATA_MIXES
from pasta_jax.data import synthetic
from pasta_jax.user_model import em, select_k, utility

STAGES = ("data", "user_model", "simulate", "agent", "evaluate")
DATA_SOURCES = ("synthetic", "pasta_kaggle")


class ConfigError(ValueError):
  """An invalid config value; the message names the field."""


def check(ok: bool, field: str, value, requirement: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {requirement}")


def check_positive_int(config, field: str) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  check(is_int(value) and value >= 1, field, value, "must be a positive integer")


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_real_data(config: ml_collections.ConfigDict, stages: tuple[str, ...]) -> None:
  """The paths and settings the PASTA release needs: CLIP always; the replay cache and SDXL to simulate."""
  paths = ["data.kaggle_dir", "embed.clip_checkpoint", "embed.cache_dir"]
  if "simulate" in stages:
    paths += ["candidates.replay_cache", "embed.sdxl_checkpoint", "embed.render_dir"]
  for field in paths:
    section, name = field.split(".")
    check(bool(config[section][name]), field, config[section][name], "must name a file or directory")
  for field in ("embed.batch_size", "embed.render_steps", "embed.render_batch_size", "candidates.pool_size"):
    check_positive_int(config, field)
  e = config.embed
  check(is_int(e.render_size) and e.render_size >= 0, "embed.render_size", e.render_size,
        "must be 0 (the checkpoint's size) or a side in pixels")
  check(e.guidance_scale >= 0, "embed.guidance_scale", e.guidance_scale, "must be >= 0")
  check(config.candidates.pool_size >= config.interaction.images_per_prompt, "candidates.pool_size",
        config.candidates.pool_size, f"must be >= interaction.images_per_prompt="
        f"{config.interaction.images_per_prompt}, so that no image repeats within a column")
  check(config.candidates.unexpanded in candidates.UNEXPANDED, "candidates.unexpanded",
        config.candidates.unexpanded, f"one of {candidates.UNEXPANDED}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field."""
  stages = tuple(config.stages)
  check(all(s in STAGES for s in stages), "stages", stages, f"each stage must be one of {STAGES}")
  check(list(stages) == sorted(stages, key=STAGES.index), "stages", stages, f"stages run in the order {STAGES}")
  check(config.mesh.data == -1 or config.mesh.data >= 1, "mesh.data", config.mesh.data, "-1 or a device count")
  check(config.data.source in DATA_SOURCES, "data.source", config.data.source, f"one of {DATA_SOURCES}")
  if config.data.source == "pasta_kaggle":
    _check_real_data(config, stages)

  it = config.interaction
  for field in ("num_candidates", "slate_size", "images_per_prompt", "turns"):
    check_positive_int(config, f"interaction.{field}")
  categories = tuple(it.categories)
  check(len(set(categories)) == len(categories) >= 1, "interaction.categories", categories,
        "must be distinct names")
  check(it.num_candidates % len(categories) == 0, "interaction.num_candidates", it.num_candidates,
        f"must be a multiple of the {len(categories)} categories")
  check(it.slate_size <= len(categories), "interaction.slate_size", it.slate_size,
        f"at most one prompt per category: at most {len(categories)}")

  w = config.world
  for field in ("num_types", "num_users", "sessions_per_user", "feature_dim", "values_per_attribute"):
    check_positive_int(config, f"world.{field}")
  check(0.0 < w.heldout_fraction < 1.0, "world.heldout_fraction", w.heldout_fraction, "must be in (0, 1)")
  check(w.choice_inverse_temperature > 0, "world.choice_inverse_temperature", w.choice_inverse_temperature,
        "must be > 0")
  for field in ("image_noise", "text_noise", "type_weight_scale"):
    check(w[field] >= 0, f"world.{field}", w[field], "must be >= 0")
  num_heldout = round(w.heldout_fraction * w.num_users)
  check(1 <= num_heldout < w.num_users, "world.heldout_fraction", w.heldout_fraction,
        f"must leave at least one held-out and one training user of {w.num_users}")
  check(w.logging_policy == "random_per_category", "world.logging_policy", w.logging_policy,
        "only 'random_per_category' is implemented")
  if config.data.source == "synthetic":
    try:
      synthetic.validate_world_config(config)
    except ValueError as e:
      raise ConfigError(str(e)) from None

  um = config.user_model
  check_positive_int(config, "user_model.num_types")
  check(all(is_int(h) and h >= 1 for h in um.hidden), "user_model.hidden", um.hidden,
        "must be positive layer widths")
  check(um.activation in utility.ACTIVATIONS, "user_model.activation", um.activation,
        f"one of {tuple(utility.ACTIVATIONS)}")
  check(um.aggregation in utility.AGGREGATIONS, "user_model.aggregation", um.aggregation,
        f"one of {utility.AGGREGATIONS}")
  check(um.init_inverse_temperature > 0, "user_model.init_inverse_temperature", um.init_inverse_temperature,
        "must be > 0")
  check(isinstance(um.init_from, str) and (not um.init_from or os.path.isdir(um.init_from)), "user_model.init_from",
        um.init_from, "must be '' or the directory of a saved fitted model (pretraining's WORKDIR/fitted/k<K>)")

  e = config.em
  check(e.mode in em.MODES, "em.mode", e.mode, f"one of {em.MODES}")
  for field in ("epochs", "batch_users", "m_steps", "restarts", "checkpoint_every_epochs", "log_every_epochs"):
    check_positive_int(config, f"em.{field}")
  check(e.learning_rate > 0, "em.learning_rate", e.learning_rate, "must be > 0")
  check(0 < e.prior_step <= 1, "em.prior_step", e.prior_step, "must be in (0, 1]")
  check(0 <= e.prior_floor < 1, "em.prior_floor", e.prior_floor, "must be in [0, 1)")
  check(0 <= e.collapse_mass < 1, "em.collapse_mass", e.collapse_mass, "must be in [0, 1)")
  check(e.on_collapse in ("warn", "raise"), "em.on_collapse", e.on_collapse, "'warn' or 'raise'")

  s = config.select_k
  check(len(s.ks) >= 1 and all(is_int(k) and k >= 1 for k in s.ks), "select_k.ks", s.ks,
        "must be one or more positive integers")
  check(s.criterion in select_k.CRITERIA, "select_k.criterion", s.criterion, f"one of {select_k.CRITERIA}")
  check(s.heldout_tolerance >= 0, "select_k.heldout_tolerance", s.heldout_tolerance, "must be >= 0")

  check_positive_int(config, "simulate.num_users")
  check(config.simulate.reward in simulator.REWARDS, "simulate.reward", config.simulate.reward,
        f"one of {simulator.REWARDS}")

  a = config.agent
  mixes = tuple(a.data_mixes)
  check(len(mixes) >= 1 and len(set(mixes)) == len(mixes) and all(m in DATA_MIXES for m in mixes),
        "agent.data_mixes", mixes, f"distinct values from {DATA_MIXES}")
  check(0 < a.sim_fraction < 1, "agent.sim_fraction", a.sim_fraction, "must be in (0, 1)")
  check(all(is_int(h) and h >= 1 for h in a.hidden), "agent.hidden", a.hidden, "must be positive layer widths")
  for learner in ("iql", "bc"):
    for field in ("batch_size", "steps", "steps_per_dispatch", "checkpoint_every_steps"):
      check_positive_int(config, f"agent.{learner}.{field}")
    for field in ("steps", "checkpoint_every_steps"):
      check(a[learner][field] % a[learner].steps_per_dispatch == 0, f"agent.{learner}.{field}", a[learner][field],
            f"must be a multiple of agent.{learner}.steps_per_dispatch={a[learner].steps_per_dispatch}")
  check(0.5 <= a.iql.expectile < 1, "agent.iql.expectile", a.iql.expectile, "must be in [0.5, 1)")
  check(0 <= a.iql.discount < 1, "agent.iql.discount", a.iql.discount, "must be in [0, 1)")
  check(0 < a.iql.polyak <= 1, "agent.iql.polyak", a.iql.polyak, "must be in (0, 1]")
  for field, value in (("iql.learning_rate", a.iql.learning_rate), ("bc.learning_rate", a.bc.learning_rate)):
    check(value > 0, f"agent.{field}", value, "must be > 0")

  check_positive_int(config, "evaluate.num_users")
  check_positive_int(config, "evaluate.bootstrap_samples")


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, indent=2, default=list)


def config_hash(config: ml_collections.ConfigDict) -> str:
  """sha256 of the resolved config (sorted JSON) without `stages`, which selects work but changes no
  result; first 16 hex digits."""
  content = config.to_dict()
  content.pop("stages", None)
  return hashlib.sha256(json.dumps(content, sort_keys=True, default=list).encode()).hexdigest()[:16]
