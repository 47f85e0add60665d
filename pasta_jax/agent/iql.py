"""Offline IQL over slates (Kostrikov et al., as in ikostrikov/implicit_q_learning), and the fused
updates shared with behaviour cloning.

IQL: twin critics f_1, f_2 score prompts, the slate value is q_i(h, P) = mean_{p∈P} f_i(h, p), and
V(h) is a state value. One update, in this order: V ← V - ∇ mean L_τ(min_i q̄_i(s, a) - V(s)) with
the target critics q̄ (L_τ the expectile loss); Q ← Q - ∇ mean Σ_i (q_i(s, a) - (r +
γ·not_done·V(s')))² with the V just updated; q̄ ← polyak·q + (1 - polyak)·q̄. Adam on V and on Q.
Myopic IQL is the same with γ = 0.

The loop (`train_loop.run`): `steps_per_dispatch` updates per jitted `lax.scan`; each update's batch
is drawn in the graph from the device-resident (replicated) datasets with key fold_in(key, step), so
a run does not depend on the device count; the batch is sharded over the mesh's "data" axis and
parameters are replicated."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Protocol

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from pasta_jax import parallel, train_loop
from pasta_jax.agent import data, value


class LoopSettings(Protocol):
  """What the fused loop reads from a learner's settings."""

  config_name: str  # The config block of the settings, for error messages: "agent.iql".
  batch_size: int
  steps: int
  steps_per_dispatch: int
  checkpoint_every_steps: int


class Learner(Protocol):
  """A hashable (static) training rule: `init` builds the state (with a `step` i32[] and a raw `key`
  data field; called eagerly, once per run), `update` applies one batch and returns scalar metrics
  (traced)."""

  settings: LoopSettings
  name: str

  def init(self, key: chex.PRNGKey, example: data.Transitions) -> Any: ...

  def update(self, state, batch: data.Transitions) -> tuple[Any, dict[str, chex.Array]]: ...


@functools.cache
def adam(learning_rate: float) -> optax.GradientTransformation:
  """optax.adam(learning_rate), one object per rate so that equal train states share compiled
  programs."""
  return optax.adam(learning_rate)


@functools.cache
def apply_fn(network: nn.Module) -> Callable[..., Any]:
  """`network.apply`, one object per (hashable) network, for the same reason as `adam`."""
  return network.apply


def new_train_state(
  key: chex.PRNGKey, network: nn.Module, tx: optax.GradientTransformation, *inputs: chex.Array
) -> train_state.TrainState:
  """A TrainState of `network` initialised from `key` on `inputs`, with step i32[] 0."""
  params = value.init_variables(key, network, *inputs)
  return train_state.TrainState(
    step=jnp.zeros((), jnp.int32),
    apply_fn=apply_fn(network),
    params=params,
    tx=tx,
    opt_state=tx.init(params),
  )


def _train_step(
  state,
  _,
  datasets: tuple[data.Transitions, ...],
  learner: Learner,
  counts: tuple[int, ...],
  batch_sharding: jax.sharding.Sharding,
):
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  batch = jax.lax.with_sharding_constraint(data.sample_batch(key, datasets, counts), batch_sharding)
  return learner.update(state, batch)


def dispatch(
  state,
  datasets: tuple[data.Transitions, ...],
  *,
  learner: Learner,
  counts: tuple[int, ...],
  mesh: jax.sharding.Mesh,
):
  """`steps_per_dispatch` updates in one scan: (state, metrics {name: f32[steps_per_dispatch]})."""
  step = functools.partial(
    _train_step,
    datasets=datasets,
    learner=learner,
    counts=counts,
    batch_sharding=parallel.data_sharding(mesh),
  )
  return jax.lax.scan(step, state, None, length=learner.settings.steps_per_dispatch)


run_dispatch = jax.jit(dispatch, static_argnames=("learner", "counts", "mesh"), donate_argnums=0)


def check_settings(
  learner: Learner, mesh: jax.sharding.Mesh, stop_after_step: int | None = None
) -> None:
  s, prefix = learner.settings, f"config.{learner.settings.config_name}"
  devices = parallel.data_size(mesh)
  if s.batch_size % devices:
    raise ValueError(
      f"{prefix}.batch_size={s.batch_size} must be a multiple of the data axis size {devices}"
    )
  for field in ("steps", "checkpoint_every_steps"):
    if getattr(s, field) % s.steps_per_dispatch:
      raise ValueError(
        f"{prefix}.{field}={getattr(s, field)} must be a multiple of {prefix}.steps_per_dispatch="
        f"{s.steps_per_dispatch}"
      )
  if stop_after_step is not None and stop_after_step % s.steps_per_dispatch:
    raise ValueError(
      f"stop_after_step={stop_after_step} must be a multiple of {prefix}.steps_per_dispatch="
      f"{s.steps_per_dispatch}"
    )


def fit(
  learner: Learner,
  datasets: tuple[data.Transitions, ...],
  counts: tuple[int, ...],
  key: chex.PRNGKey,
  mesh: jax.sharding.Mesh,
  checkpoint_dir: str | None = None,
  show_progress: bool = True,
  stop_after_step: int | None = None,
  writer=None,
) -> tuple[Any, dict[str, np.ndarray]]:
  """Trains `learner` for `settings.steps` updates on batches of counts[i] transitions from
  datasets[i].

  The datasets are replicated on every device of `mesh`. Resumes from the latest checkpoint in
  `checkpoint_dir` (saved every `checkpoint_every_steps` and at the end); a resumed run ends
  bit-identical to an uninterrupted one. `stop_after_step` ends the run early (as a killed run
  would). Step s is the update taking state.step from s to s + 1. `writer` (a clu MetricWriter)
  receives each metric's mean over every dispatch, at step = updates done.

  Returns (state, history): history {metric: f32[n], "step": i32[n]} over the n updates this call
  ran. Raises TrainingDivergedError naming the step and the metric (or state leaf) that is not
  finite."""
  settings = learner.settings
  check_settings(learner, mesh, stop_after_step)
  replicated = parallel.replicated(mesh)
  state = parallel.put(
    learner.init(key, jax.tree.map(lambda x: np.asarray(x[:1]), datasets[0])), replicated
  )
  datasets = parallel.put(datasets, replicated)
  schedule = train_loop.Schedule(
    name=learner.name,
    unit="step",
    total=settings.steps,
    per_chunk=settings.steps_per_dispatch,
    save_every=settings.checkpoint_every_steps,
  )
  return train_loop.run(
    state,
    lambda s: run_dispatch(s, datasets, learner=learner, counts=counts, mesh=mesh),
    schedule,
    lambda s: s.step,
    checkpoint_dir=checkpoint_dir,
    stop_after=stop_after_step,
    writer=writer,
    show_progress=show_progress,
  )


# IQL.


@dataclasses.dataclass(frozen=True)
class IQLSettings(train_loop.FromConfig):
  """config.agent.iql."""

  config_name = "agent.iql"
  expectile: float
  discount: float
  learning_rate: float
  polyak: float
  batch_size: int
  steps: int
  steps_per_dispatch: int
  checkpoint_every_steps: int

  def myopic(self) -> "IQLSettings":
    """The same settings with discount 0: each slate's value is its immediate reward."""
    return dataclasses.replace(self, discount=0.0)


@struct.dataclass
class IQLPolicy(value.ScorePolicy):
  """Top-L by min_i f_i(h, p) over the twin critics; params: `IQLState.critic`."""

  def network(self) -> nn.Module:
    return value.TwinPromptValue(self.hidden, self.num_categories)


@struct.dataclass
class IQLState:
  """critic_state: the twin `TwinPromptValue` critics' TrainState; value_state: the `StateValue`'s;
  target_critic: the target critics' variables; key: raw PRNG key data of the batch stream. Both
  train states step together: `step` (i32[]) is the number of updates done."""

  critic_state: train_state.TrainState
  value_state: train_state.TrainState
  target_critic: Any
  key: chex.Array

  @property
  def critic(self) -> Any:
    """The critics' variables: the params of `IQLPolicy`."""
    return self.critic_state.params

  @property
  def step(self) -> chex.Array:
    return self.critic_state.step


def expectile_loss(diff: chex.Array, expectile: float) -> chex.Array:
  """L_τ(u) = |τ - 1(u < 0)|·u², elementwise (u = target - prediction)."""
  return jnp.where(diff > 0, expectile, 1 - expectile) * diff**2


def value_loss(v: chex.Array, target_q: chex.Array, expectile: float) -> chex.Array:
  """mean_B L_τ(target_q - v): v, target_q f32[B] -> scalar."""
  return jnp.mean(expectile_loss(target_q - v, expectile))


def td_target(
  reward: chex.Array, not_done: chex.Array, next_v: chex.Array, discount: float
) -> chex.Array:
  """r + γ·not_done·V(s'): f32[B]."""
  return reward + discount * not_done * next_v


def critic_loss(q: chex.Array, target: chex.Array) -> chex.Array:
  """mean_B Σ_i (q_i - target)²: q f32[2, B], target f32[B] -> scalar."""
  return jnp.mean(jnp.sum((q - target) ** 2, axis=0))


def prompt_inputs(policy: value.ScorePolicy, batch: data.Transitions) -> tuple:
  """The prompt networks' inputs of each transition's state and slate, as `policy` reads them."""
  return (
    batch.history,
    batch.history_mask,
    batch.turn,
    batch.slate_text,
    batch.slate_category,
    *policy.prompt_inputs(batch.log_belief, batch.history_images, batch.slate_images),
  )


def slate_q(
  critic_apply: Callable[..., Any],
  params,
  batch: data.Transitions,
  policy: value.ScorePolicy,
) -> chex.Array:
  """q_i(s, P) of each transition's state and slate for both twins (`critic_apply`: the twin
  critics' apply; `policy`: what they read), averaged over the slate's real options
  (`batch.slate_mask`): f32[2, B]."""
  return value.slate_value(critic_apply(params, *prompt_inputs(policy, batch)), batch.slate_mask)


@dataclasses.dataclass(frozen=True)
class IQL:
  """The IQL learner for `fit`."""

  policy: IQLPolicy
  settings: IQLSettings

  @property
  def name(self) -> str:
    return f"IQL (discount {self.settings.discount})"

  def init(self, key: chex.PRNGKey, example: data.Transitions) -> IQLState:
    k_critic, k_value, k_run = jax.random.split(key, 3)
    tx = adam(self.settings.learning_rate)
    p = self.policy
    critic = new_train_state(k_critic, p.network(), tx, *prompt_inputs(p, example))
    state_value = new_train_state(
      k_value,
      value.StateValue(p.hidden),
      tx,
      example.history,
      example.history_mask,
      example.turn,
      *p.state_inputs(example.log_belief, example.history_images),
    )
    return IQLState(
      critic_state=critic,
      value_state=state_value,
      target_critic=jax.tree.map(jnp.copy, critic.params),
      key=jax.random.key_data(k_run),
    )

  def update(
    self, state: IQLState, batch: data.Transitions
  ) -> tuple[IQLState, dict[str, chex.Array]]:
    """One IQL update, V → Q → target; metrics are the losses and mean values before it."""
    s, critic, value_state = self.settings, state.critic_state, state.value_state
    p = self.policy
    target_q = jnp.min(slate_q(critic.apply_fn, state.target_critic, batch, p), axis=0)

    def v_loss(params):
      v = value_state.apply_fn(
        params,
        batch.history,
        batch.history_mask,
        batch.turn,
        *p.state_inputs(batch.log_belief, batch.history_images),
      )
      return value_loss(v, target_q, s.expectile), v

    (v_loss_value, v), grads = jax.value_and_grad(v_loss, has_aux=True)(value_state.params)
    value_state = value_state.apply_gradients(grads=grads)
    next_v = value_state.apply_fn(
      value_state.params,
      batch.history,
      batch.next_history_mask,
      batch.next_turn,
      *p.state_inputs(batch.next_log_belief, batch.history_images),
    )
    target = td_target(batch.reward, batch.not_done, next_v, s.discount)

    def q_loss(params):
      q = slate_q(critic.apply_fn, params, batch, p)
      return critic_loss(q, target), q

    (q_loss_value, q), grads = jax.value_and_grad(q_loss, has_aux=True)(critic.params)
    critic = critic.apply_gradients(grads=grads)
    state = state.replace(
      critic_state=critic,
      value_state=value_state,
      target_critic=optax.incremental_update(critic.params, state.target_critic, s.polyak),
    )
    metrics = {
      "value_loss": v_loss_value,
      "critic_loss": q_loss_value,
      "v": jnp.mean(v),
      "q": jnp.mean(q),
    }
    return state, metrics


def train(
  learner,
  real: data.Transitions | None,
  sim: data.Transitions | None,
  data_mix: str,
  sim_fraction: float,
  key: chex.PRNGKey,
  mesh: jax.sharding.Mesh,
  checkpoint_dir: str | None = None,
  show_progress: bool = True,
  stop_after_step: int | None = None,
  writer=None,
) -> tuple[object, dict[str, np.ndarray]]:
  """Trains `learner` (an `IQL`, or a `bc.BC`) on batches of `data_mix` (see `data.mix_sources`) of
  `learner.settings.batch_size` transitions; see `fit`.

  The trained policy is `learner.policy` with params `state.critic` (IQL) or `state.params` (BC).
  """
  datasets, counts = data.mix_sources(
    data_mix, sim_fraction, learner.settings.batch_size, real, sim
  )
  return fit(
    learner,
    datasets,
    counts,
    key,
    mesh,
    checkpoint_dir,
    show_progress,
    stop_after_step,
    writer,
  )
