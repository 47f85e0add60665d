"""One mini-batch EM epoch (`em.run_epoch`: every restart's E-steps and M-steps over all users, then the
full-data log-likelihood) on random features of the paper's width.

FLOPs per epoch are XLA's counts of the pieces the epoch runs, each compiled without loops: per restart,
(U / B) × (E-step + m_steps × M-step gradient) on B users, plus the log-likelihood of all U users.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pasta_jax import parallel, types
from pasta_jax.user_model import em, utility


@dataclasses.dataclass(frozen=True)
class Sizes:
  users: int = 2000
  turns: int = 15
  slate_size: int = 4
  images_per_prompt: int = 4
  dim: int = 768
  hidden: tuple[int, ...] = (256,)
  num_types: int = 16
  batch_users: int = 64
  m_steps: int = 5
  restarts: int = 3
  images: int = 20000
  prompts: int = 5000


QUICK = Sizes(
  users=40,
  turns=3,
  dim=16,
  hidden=(8,),
  num_types=3,
  batch_users=8,
  m_steps=2,
  restarts=2,
  images=200,
  prompts=50,
)


def settings(sizes: Sizes) -> em.EMSettings:
  return em.EMSettings(
    mode="minibatch",
    epochs=1000,
    batch_users=sizes.batch_users,
    m_steps=sizes.m_steps,
    learning_rate=3e-3,
    prior_step=0.1,
    prior_floor=1e-6,
    restarts=sizes.restarts,
    collapse_mass=0.02,
    on_collapse="warn",
    checkpoint_every_epochs=1000,
  )


def dataset(sizes: Sizes, seed: int = 0) -> tuple[types.FeatureTable, types.Choices]:
  """Random features and choices: every user has `turns` full slates."""
  rng = np.random.default_rng(seed)
  u, t, slate = sizes.users, sizes.turns, sizes.slate_size
  table = types.FeatureTable(
    image=rng.standard_normal((sizes.images, sizes.dim)).astype(np.float32),
    text=rng.standard_normal((sizes.prompts, sizes.dim)).astype(np.float32),
  )
  choices = types.Choices(
    image_rows=rng.integers(0, sizes.images, (u, t, slate, sizes.images_per_prompt)).astype(
      np.int32
    ),
    text_rows=rng.integers(0, sizes.prompts, (u, t, slate)).astype(np.int32),
    category=rng.integers(0, 5, (u, t, slate)).astype(np.int32),
    choice=rng.integers(0, slate, (u, t)).astype(np.int32),
    option_mask=np.ones((u, t, slate), bool),
    turn_mask=np.ones((u, t), bool),
    user_index=np.arange(u, dtype=np.int32),
  )
  return table, choices


def model(sizes: Sizes) -> utility.UtilityModel:
  return utility.UtilityModel(
    num_types=sizes.num_types, hidden=sizes.hidden, use_text_features=True
  )


def program(sizes: Sizes) -> tuple[common.Program, int]:
  """(em_epoch: one epoch per call, the state carried from call to call; padded users)."""
  mesh = parallel.make_mesh()
  s, net = settings(sizes), model(sizes)
  table, placed = em.place(*dataset(sizes), s, mesh)
  state = em.init_state(
    jax.random.key(1), net, s, em.example_options(table, placed), placed.num_users
  )
  holder = {"state": jax.device_put(state, parallel.replicated(mesh))}
  flops = epoch_flops(em.unbatch(holder["state"], 0).params, net, table, placed, s)

  def epoch():
    holder["state"], metrics = em.run_epoch(holder["state"], table, placed, net, s, mesh)
    return metrics

  def lower():
    return em.run_epoch.lower(holder["state"], table, placed, net, s, mesh)

  return common.Program("em_epoch", epoch, lower, 1, flops), placed.num_users


def setup(sizes: Sizes):
  """(epoch() -> metrics, flops per epoch, compile seconds, padded users); the state is carried over."""
  epoch, padded = program(sizes)
  return epoch.call, epoch.flops, common.compile_s(epoch), padded


def epoch_flops(params, net, table, choices: types.Choices, s: em.EMSettings) -> float:
  """XLA's FLOPs of one epoch of all restarts (see the module docstring)."""
  batch = jax.tree.map(lambda x: x[: s.batch_users], choices)

  def loglik(params, choices):
    return jnp.sum(em.user_loglik(params, net, table, choices))

  forward_batch = common.cost_flops(jax.jit(loglik), params, batch)
  gradient_batch = common.cost_flops(jax.jit(jax.grad(loglik)), params, batch)
  forward_all = common.cost_flops(jax.jit(loglik), params, choices)
  batches = choices.num_users // s.batch_users
  return s.restarts * (batches * (forward_batch + s.m_steps * gradient_batch) + forward_all)


def sizes_dict(sizes: Sizes, padded_users: int) -> dict:
  return {
    **dataclasses.asdict(sizes),
    "padded_users": padded_users,
    "mode": "minibatch",
    "use_text_features": True,
  }
