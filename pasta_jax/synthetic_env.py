"""The synthetic world in the simulator: its environment, and its planted users' rater log under the
logging policy (random slate, one per category) as canonical records.

Above both `data.synthetic` (the world) and `simulator` (the interaction), which do not import each other.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pasta_jax import parallel, simulator, types
from pasta_jax.agent import baselines
from pasta_jax.data import schema, synthetic


@dataclasses.dataclass(frozen=True)
class RaterLog:
  """The synthetic rater log: canonical records, their feature table and the planted truth."""

  records: list[schema.ChoiceRecord]
  table: types.FeatureTable
  world: synthetic.World
  user_types: np.ndarray  # i32[num_users]


def env_params(
  world: synthetic.World,
  config: ml_collections.ConfigDict,
  users: simulator.UserModel | simulator.TabulatedUserModel | None = None,
  belief: simulator.UserModel | simulator.TabulatedUserModel | None = None,
  reward: str = "every_turn",
) -> simulator.EnvParams:
  """The simulator on this world; planted users and belief unless given."""
  planted = synthetic.PlantedUsers(world)
  return simulator.make_params(
    config.interaction,
    synthetic.SyntheticExpander(world),
    planted if users is None else users,
    planted if belief is None else belief,
    reward,
  )


def generate_rater_log(key: chex.PRNGKey, config: ml_collections.ConfigDict) -> RaterLog:
  """Planted users' sessions under the logging policy (random slate, one per category), as records.

  User u has planted type z_u ~ priors and `sessions_per_user` sessions; session s of user u is the
  simulator's user u * sessions_per_user + s, so a user's log does not depend on how many users there are.
  """
  w, it = config.world, config.interaction
  k_world, k_types, k_sessions = jax.random.split(key, 3)
  world = synthetic.make_world(k_world, config)
  user_types = jax.random.categorical(k_types, world.type_log_priors, shape=(w.num_users,))
  session_ids = jnp.arange(w.num_users * w.sessions_per_user)
  policy = baselines.RandomSlate(num_categories=len(it.categories), slate_size=it.slate_size)
  trajectories = simulator.run(
    k_sessions,
    session_ids,
    user_types[session_ids // w.sessions_per_user],
    env_params(world, config),
    policy,
    None,
    parallel.make_mesh(config.mesh),
  )
  records, table = trajectories_to_records(trajectories, world, w.sessions_per_user)
  return RaterLog(records=records, table=table, world=world, user_types=np.asarray(user_types))


def trajectories_to_records(
  trajectories: simulator.Trajectories,
  world: synthetic.World,
  sessions_per_user: int = 1,
  user_prefix: str = "user",
) -> tuple[list[schema.ChoiceRecord], types.FeatureTable]:
  """Canonical records and their feature table from simulated trajectories on this world (`simulator.to_records`);
  images are referenced as synthetic://<prompt id>/<seed>."""
  ids = np.asarray(synthetic.prompt_id(world, trajectories.shown))  # [S, T, L]
  start_ids = np.asarray(synthetic.prompt_id(world, trajectories.start))  # [S]
  seeds = np.asarray(trajectories.seeds).ravel()
  refs = np.char.add(
    np.char.add(
      np.char.add("synthetic://", np.repeat(ids.ravel(), seeds.size // ids.size).astype(str)), "/"
    ),
    seeds.astype(str),
  )
  images = np.asarray(trajectories.images)
  return simulator.to_records(
    trajectories,
    ids,
    start_ids,
    lambda i: synthetic.prompt_text(*synthetic.prompt_of_id(world, i)),
    np.arange(seeds.size).reshape(images.shape[:-1]),
    images.reshape(seeds.size, -1),
    refs,
    world.categories,
    sessions_per_user,
    user_prefix,
  )
