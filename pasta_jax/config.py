"""Config checks that run before anything compiles, and the config hash stamped on every artefact.

Each block is checked by the module that owns it (`validate_config` there); `validate` runs them all.
The `em` and `agent` blocks are checked here (`_check_em`, `_check_agent`) until their modules take them.
"""

import hashlib
import json

import ml_collections

from pasta_jax import candidates, simulator
from pasta_jax.agent.data import DATA_MIXES
from pasta_jax.config_checks import ConfigError, check, check_positive_int, check_widths, is_int
from pasta_jax.data import synthetic
from pasta_jax.embed import checks as embed_checks
from pasta_jax.evaluation import agents as agent_eval
from pasta_jax.user_model import em, select_k, utility

__all__ = [
  "ConfigError",
  "DATA_SOURCES",
  "STAGES",
  "check",
  "check_positive_int",
  "config_hash",
  "is_int",
  "to_json",
  "validate",
]

STAGES = ("data", "user_model", "simulate", "agent", "evaluate")
DATA_SOURCES = ("synthetic", "pasta_kaggle")


def _check_run(config: ml_collections.ConfigDict) -> None:
  """`stages` and `mesh`."""
  stages = tuple(config.stages)
  check(all(s in STAGES for s in stages), "stages", stages, f"each stage must be one of {STAGES}")
  check(
    list(stages) == sorted(stages, key=STAGES.index),
    "stages",
    stages,
    f"stages run in the order {STAGES}",
  )
  check(
    config.mesh.data == -1 or config.mesh.data >= 1,
    "mesh.data",
    config.mesh.data,
    "-1 or a device count",
  )


def _check_data(config: ml_collections.ConfigDict) -> None:
  """`data`, and on the PASTA release what it needs: a valid layout mapping (`data.kaggle_layout`), CLIP
  always; the replay cache and SDXL to simulate."""
  check(
    config.data.source in DATA_SOURCES, "data.source", config.data.source, f"one of {DATA_SOURCES}"
  )
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


def _check_em(config: ml_collections.ConfigDict) -> None:
  """The `em` block (user_model/em.py)."""
  e = config.em
  check(e.mode in em.MODES, "em.mode", e.mode, f"one of {em.MODES}")
  for field in ("epochs", "batch_users", "m_steps", "restarts", "checkpoint_every_epochs"):
    check_positive_int(config, f"em.{field}")
  check(e.learning_rate > 0, "em.learning_rate", e.learning_rate, "must be > 0")
  check(0 < e.prior_step <= 1, "em.prior_step", e.prior_step, "must be in (0, 1]")
  check(0 <= e.prior_floor < 1, "em.prior_floor", e.prior_floor, "must be in [0, 1)")
  check(0 <= e.collapse_mass < 1, "em.collapse_mass", e.collapse_mass, "must be in [0, 1)")
  check(e.on_collapse in ("warn", "raise"), "em.on_collapse", e.on_collapse, "'warn' or 'raise'")


def _check_agent(config: ml_collections.ConfigDict) -> None:
  """The `agent` block (agent/data.py, iql.py, bc.py)."""
  a = config.agent
  mixes = tuple(a.data_mixes)
  check(
    len(mixes) >= 1 and len(set(mixes)) == len(mixes) and all(m in DATA_MIXES for m in mixes),
    "agent.data_mixes",
    mixes,
    f"distinct values from {DATA_MIXES}",
  )
  check(0 < a.sim_fraction < 1, "agent.sim_fraction", a.sim_fraction, "must be in (0, 1)")
  check_widths(a.hidden, "agent.hidden")
  for learner in ("iql", "bc"):
    for field in ("batch_size", "steps", "steps_per_dispatch", "checkpoint_every_steps"):
      check_positive_int(config, f"agent.{learner}.{field}")
    per_dispatch = a[learner].steps_per_dispatch
    for field in ("steps", "checkpoint_every_steps"):
      check(
        a[learner][field] % per_dispatch == 0,
        f"agent.{learner}.{field}",
        a[learner][field],
        f"must be a multiple of agent.{learner}.steps_per_dispatch={per_dispatch}",
      )
  check(0.5 <= a.iql.expectile < 1, "agent.iql.expectile", a.iql.expectile, "must be in [0.5, 1)")
  check(0 <= a.iql.discount < 1, "agent.iql.discount", a.iql.discount, "must be in [0, 1)")
  check(0 < a.iql.polyak <= 1, "agent.iql.polyak", a.iql.polyak, "must be in (0, 1]")
  for learner in ("iql", "bc"):
    rate = a[learner].learning_rate
    check(rate > 0, f"agent.{learner}.learning_rate", rate, "must be > 0")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field."""
  _check_run(config)
  _check_data(config)
  simulator.validate_config(config)
  synthetic.validate_config(config)
  utility.validate_config(config)
  _check_em(config)
  select_k.validate_config(config)
  _check_agent(config)
  agent_eval.validate_config(config)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, indent=2, default=list)


def config_hash(config: ml_collections.ConfigDict) -> str:
  """sha256 of the resolved config (sorted JSON) without `stages`, which selects work but changes no
  result; first 16 hex digits."""
  content = config.to_dict()
  content.pop("stages", None)
  return hashlib.sha256(json.dumps(content, sort_keys=True, default=list).encode()).hexdigest()[:16]
