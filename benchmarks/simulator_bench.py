"""The simulator on a replay pool: `simulator.run` with an MLP utility (scored by the network) and with
its (image × type) table, against a vectorised NumPy simulator and a minimal JAX simulator of the same
model (batched arrays over all users, one key per turn, no per-user keys, image seeds drawn for the
shown slate only).

One user-step is one turn of one user: the logging policy's random slate (one per category), the L × M
images scored, the softmax choice, the belief update and the next turn's candidates.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import common
from pasta_jax import candidates, parallel, simulator, types
from pasta_jax.agent import baselines
from pasta_jax.user_model import utility


@dataclasses.dataclass(frozen=True)
class Sizes:
  """prompts × pool_per_prompt images of width dim; MLP dim -> hidden -> num_types."""

  prompts: int = 2500
  pool_per_prompt: int = 8
  dim: int = 768
  hidden: tuple[int, ...] = (512, 512)
  num_types: int = 16
  num_candidates: int = 25
  num_categories: int = 5
  slate_size: int = 4
  images_per_prompt: int = 4
  turns: int = 5

  def interaction(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
      {
        "turns": self.turns,
        "slate_size": self.slate_size,
        "images_per_prompt": self.images_per_prompt,
        "num_candidates": self.num_candidates,
        "categories": tuple(f"c{i}" for i in range(self.num_categories)),
      }
    )

  def mlp_flops_per_user_step(self) -> float:
    """Dense FLOPs of scoring one slate's L × M images once (2 per multiply-add)."""
    widths = (self.dim, *self.hidden, self.num_types)
    per_image = sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
    return float(self.slate_size * self.images_per_prompt * per_image)

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "pool_images": self.prompts * self.pool_per_prompt}


QUICK = Sizes(prompts=40, pool_per_prompt=5, dim=32, hidden=(16, 16), num_types=4)


def make_generator(sizes: Sizes, seed: int = 0) -> candidates.ReplayGenerator:
  """A replay pool of random features: each prompt has one expansion into random prompts and its own
  pool_per_prompt images."""
  rng = np.random.default_rng(seed)
  p, c = sizes.prompts, sizes.num_candidates
  category = np.repeat(np.arange(sizes.num_categories), c // sizes.num_categories)
  return candidates.ReplayGenerator(
    expansions=jnp.asarray(rng.integers(0, p, (p, 1, c)), jnp.int32),
    category=jnp.asarray(np.broadcast_to(category, (p, 1, c)), jnp.int32),
    num_expansions=jnp.ones((p,), jnp.int32),
    start_prompts=jnp.arange(min(p, 100), dtype=jnp.int32),
    text=jnp.asarray(rng.standard_normal((p, sizes.dim)), jnp.float32),
    image_rows=jnp.arange(p * sizes.pool_per_prompt, dtype=jnp.int32).reshape(p, -1),
    image=jnp.asarray(rng.standard_normal((p * sizes.pool_per_prompt, sizes.dim)), jnp.float32),
  )


def make_users(sizes: Sizes, seed: int = 1) -> utility.FittedUsers:
  """Fitted users scoring images alone (MLP dim -> hidden -> K, gelu, mean over images)."""
  model = utility.UtilityModel(
    num_types=sizes.num_types, hidden=sizes.hidden, use_text_features=False
  )
  example = types.OptionFeatures(image=jnp.zeros((1, 1, sizes.dim)), text=jnp.zeros((1, 0)))
  return utility.FittedUsers(
    model=model,
    params=model.init(jax.random.key(seed), example),
    log_priors=jnp.full((sizes.num_types,), -np.log(sizes.num_types)),
  )


def policy(sizes: Sizes) -> baselines.RandomSlate:
  return baselines.RandomSlate(num_categories=sizes.num_categories, slate_size=sizes.slate_size)


def _run_args(sizes: Sizes, generator, users, num_users: int, tabulate: bool) -> tuple:
  """(key, user ids, user types, env params, policy, policy params) of one evaluation run."""
  params = simulator.make_params(sizes.interaction(), generator, users, users, tabulate=tabulate)
  ids, user_types = np.arange(num_users, dtype=np.int32), np.full(num_users, -1, np.int32)
  return jax.random.key(0), ids, user_types, params, policy(sizes), None


def run_fn(sizes: Sizes, generator, users, num_users: int, tabulate: bool, mesh):
  """A call of `simulator.run` as evaluation makes it (no images or text kept)."""
  return functools.partial(
    simulator.run,
    *_run_args(sizes, generator, users, num_users, tabulate),
    mesh,
    keep_images=False,
    keep_text=False,
  )


_rollout = jax.jit(simulator.rollout, static_argnames=("policy", "keep_images", "keep_text"))


def program(sizes: Sizes, generator, users, num_users: int, tabulate: bool, mesh) -> common.Program:
  """sim_table_n<N> or sim_mlp_n<N>: `run_fn`, lowered as the rollout of one of the
  ceil(N / simulator.USERS_PER_CALL) equal device calls `simulator.run` makes."""
  key, ids, user_types, params, slate_policy, policy_params = _run_args(
    sizes, generator, users, num_users, tabulate
  )
  size = parallel.data_size(mesh)
  chunk = -(-min(simulator.USERS_PER_CALL, num_users) // size) * size
  sharding, replicated = parallel.data_sharding(mesh), parallel.replicated(mesh)

  def lower():
    return _rollout.lower(
      key,
      parallel.put(ids[:chunk], sharding),
      parallel.put(user_types[:chunk], sharding),
      parallel.put(params, replicated),
      slate_policy,
      policy_params,
      keep_images=False,
      keep_text=False,
    )

  steps = num_users * sizes.turns
  flops = None if tabulate else steps * sizes.mlp_flops_per_user_step()
  return common.Program(
    f"sim_{'table' if tabulate else 'mlp'}_n{num_users}",
    run_fn(sizes, generator, users, num_users, tabulate, mesh),
    lower,
    -(-num_users // chunk),
    flops,
  )


# The references: all users at once, one key per turn.


def _numpy_gelu(x: np.ndarray) -> np.ndarray:
  return (
    0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x**3)))
  )


def _numpy_log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
  top = x.max(axis=axis, keepdims=True)
  return x - top - np.log(np.exp(x - top).sum(axis=axis, keepdims=True))


def _slate(xp, scores, category, num_categories: int, slate_size: int):
  """Top slate_size candidates by score, one per category: scores, category [N, L_C] -> [N, L]."""
  member = category[:, None, :] == xp.arange(num_categories)[None, :, None]
  masked = xp.where(member, scores[:, None, :], -xp.inf)
  best = xp.argmax(masked, axis=-1)
  order = xp.argsort(-xp.max(masked, axis=-1), axis=-1)[:, :slate_size]
  return xp.take_along_axis(best, order, axis=-1)


@dataclasses.dataclass(frozen=True)
class Model:
  """The user model as plain arrays: the MLP's (kernel, bias) layers and heads, or the table."""

  layers: tuple
  heads: np.ndarray
  table: np.ndarray
  tau: float
  log_priors: np.ndarray


def plain_model(users: utility.FittedUsers, generator) -> Model:
  p = jax.device_get(users.params)["params"]
  layers = tuple(
    (p[f"trunk_{i}"]["kernel"], p[f"trunk_{i}"]["bias"]) for i in range(len(users.model.hidden))
  )
  table = utility.tabulate(users, generator.image)
  return Model(
    layers=layers,
    heads=p["heads"]["kernel"],
    table=np.asarray(table.scores),
    tau=float(np.exp(p["log_inverse_temperature"])),
    log_priors=np.asarray(users.log_priors),
  )


def numpy_simulator(
  sizes: Sizes, generator, model: Model, num_users: int, use_table: bool, seed: int = 0
):
  """Vectorised NumPy rollout of num_users users; returns (rewards f32[N, H], log_belief f32[N, K])."""
  rng = np.random.default_rng(seed)
  g = jax.tree.map(np.asarray, generator)
  n, m, k = num_users, sizes.images_per_prompt, sizes.num_types
  users = np.arange(n)
  user_type = rng.integers(0, k, n)
  prompt = rng.choice(g.start_prompts, n)
  log_belief = np.broadcast_to(_numpy_log_softmax(model.log_priors, 0), (n, k))
  rewards = np.empty((n, sizes.turns), np.float32)
  pool = g.image_rows.shape[1]
  for t in range(sizes.turns):
    cands, category = g.expansions[prompt, 0], g.category[prompt, 0]
    action = _slate(np, rng.random(cands.shape), category, sizes.num_categories, sizes.slate_size)
    shown = np.take_along_axis(cands, action, axis=1)
    first = rng.integers(0, np.iinfo(np.int32).max, shown.shape + (m,))[..., 0]
    rows = g.image_rows[
      shown[..., None], (first[..., None] % pool + np.arange(m)) % pool
    ]  # [N, L, M]
    if use_table:
      scores = model.table[rows]
    else:
      x = g.image[rows.reshape(-1)]
      for kernel, bias in model.layers:
        x = _numpy_gelu(x @ kernel + bias)
      scores = (x @ model.heads).reshape(rows.shape + (k,))
    utilities = scores.mean(axis=2)  # [N, L, K]
    own = utilities[users, :, user_type]
    gumbel = -np.log(-np.log(rng.random(own.shape)))
    chosen = np.argmax(model.tau * own + gumbel, axis=1)
    log_p = _numpy_log_softmax(model.tau * utilities, axis=1)[users, chosen]
    log_belief = _numpy_log_softmax(log_belief + log_p, axis=1)
    rewards[:, t] = own[users, chosen]
    prompt = shown[users, chosen]
  return rewards, log_belief


@functools.partial(jax.jit, static_argnames=("sizes", "num_users", "use_table"))
def minimal_jax_simulator(
  key, sizes: Sizes, generator, model_arrays, num_users: int, use_table: bool
):
  """The NumPy simulator in JAX: (rewards f32[N, H], log_belief f32[N, K])."""
  layers, heads, table, tau, log_priors = model_arrays
  n, m, k = num_users, sizes.images_per_prompt, sizes.num_types
  users = jnp.arange(n)
  pool = generator.image_rows.shape[1]
  k_type, k_start, key = jax.random.split(key, 3)
  user_type = jax.random.randint(k_type, (n,), 0, k)
  prompt = jax.random.choice(k_start, generator.start_prompts, (n,))

  def turn(carry, t):
    prompt, log_belief = carry
    k_seed, k_slate, k_choice = jax.random.split(jax.random.fold_in(key, t), 3)
    cands, category = generator.expansions[prompt, 0], generator.category[prompt, 0]
    action = _slate(
      jnp,
      jax.random.uniform(k_slate, cands.shape),
      category,
      sizes.num_categories,
      sizes.slate_size,
    )
    shown = jnp.take_along_axis(cands, action, axis=1)
    first = jax.random.randint(k_seed, shown.shape + (m,), 0, jnp.iinfo(jnp.int32).max)[..., 0]
    rows = generator.image_rows[shown[..., None], (first[..., None] % pool + jnp.arange(m)) % pool]
    if use_table:
      scores = table[rows]
    else:
      x = generator.image[rows.reshape(-1)]
      for kernel, bias in layers:
        x = jax.nn.gelu(x @ kernel + bias)
      scores = (x @ heads).reshape(rows.shape + (k,))
    utilities = scores.mean(axis=2)
    own = utilities[users, :, user_type]
    chosen = jax.random.categorical(k_choice, tau * own, axis=1)
    log_p = jax.nn.log_softmax(tau * utilities, axis=1)[users, chosen]
    log_belief = jax.nn.log_softmax(log_belief + log_p, axis=1)
    return (shown[users, chosen], log_belief), own[users, chosen]

  initial = jnp.broadcast_to(jax.nn.log_softmax(log_priors), (n, k))
  (_, log_belief), rewards = jax.lax.scan(turn, (prompt, initial), jnp.arange(sizes.turns))
  return rewards.T, log_belief


def model_arrays(model: Model):
  return (
    jax.tree.map(jnp.asarray, model.layers),
    jnp.asarray(model.heads),
    jnp.asarray(model.table),
    jnp.float32(model.tau),
    jnp.asarray(model.log_priors),
  )


def mesh():
  return parallel.make_mesh()
