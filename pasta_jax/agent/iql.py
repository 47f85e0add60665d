"""Offline IQL over slates (Kostrikov et al., as in ikostrikov/implicit_q_learning), and the fused training
loop shared with behaviour cloning.

IQL: twin critics f_1, f_2 score prompts, the slate value is q_i(h, P) = mean_{p∈P} f_i(h, p), and V(h) is a
state value. One update, in this order: V ← V - ∇ mean L_τ(min_i q̄_i(s, a) - V(s)) with the target
critics q̄ (L_τ the expectile loss); Q ← Q - ∇ mean Σ_i (q_i(s, a) - (r + γ·not_done·V(s')))² with the V
just updated; q̄ ← polyak·q + (1 - polyak)·q̄. Adam on V and on Q. Myopic IQL is the same with γ = 0.

The loop: `steps_per_dispatch` updates per jitted `lax.scan`; each update's batch is drawn in the graph
from the device-resident (replicated) datasets with key fold_in(key, step), so a run does not depend on
the device count; the batch is sharded over the mesh's "data" axis and parameters are replicated.
"""

import dataclasses
import functools
from typing import Any, Protocol

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from pasta_jax import checkpoint, parallel, progress
from pasta_jax.agent import data, value
from pasta_jax.errors import TrainingDivergedError


class LoopSettings(Protocol):
  """What the fused loop reads from a learner's settings."""

  batch_size: int
  steps: int
  steps_per_dispatch: int
  checkpoint_every_steps: int


class Learner(Protocol):
  """A hashable (static) training rule: `init` builds the state (with `step` i32[] and raw `key` data
  fields; called eagerly, once per run), `update` applies one batch and returns scalar metrics (traced)."""

  settings: LoopSettings
  config_name: str  # The config block of the settings, for error messages: "agent.iql".
  name: str

  def init(self, key: chex.PRNGKey, example: data.Transitions) -> Any: ...

  def update(self, state, batch: data.Transitions) -> tuple[Any, dict[str, chex.Array]]: ...


def _train_step(state, _, datasets: tuple[data.Transitions, ...], learner: Learner, counts: tuple[int, ...],
                batch_sharding: jax.sharding.Sharding):
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  batch = jax.lax.with_sharding_constraint(data.sample_batch(key, datasets, counts), batch_sharding)
  return learner.update(state, batch)


def dispatch(state, datasets: tuple[data.Transitions, ...], *, learner: Learner, counts: tuple[int, ...],
             mesh: jax.sharding.Mesh):
  """`steps_per_dispatch` updates in one scan: (state, metrics {name: f32[steps_per_dispatch]})."""
  step = functools.partial(_train_step, datasets=datasets, learner=learner, counts=counts,
                           batch_sharding=parallel.data_sharding(mesh))
  return jax.lax.scan(step, state, None, length=learner.settings.steps_per_dispatch)


run_dispatch = jax.jit(dispatch, static_argnames=("learner", "counts", "mesh"), donate_argnums=0)


@jax.jit
def _finite_leaves(tree) -> chex.Array:
  """bool[n]: each floating leaf of `tree` is finite everywhere."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)])


def _floating_paths(tree) -> list[str]:
  return [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
          if jnp.issubdtype(x.dtype, jnp.inexact)]


def check_finite(name: str, metrics: dict[str, np.ndarray], first_step: int) -> None:
  """metrics {name: f32[S]} of steps first_step.. first_step + S - 1; raises TrainingDivergedError naming the
  first non-finite step and, at that step, the first non-finite metric."""
  names = list(metrics)
  values = np.stack([np.asarray(metrics[n]) for n in names])  # [M, S]
  bad = ~np.isfinite(values)
  if bad.any():
    step = int(np.flatnonzero(bad.any(axis=0))[0])
    metric = int(np.flatnonzero(bad[:, step])[0])
    raise TrainingDivergedError(f"{name}: metric '{names[metric]}' is {values[metric, step]} at step "
                                f"{first_step + step}")


def check_settings(learner: Learner, mesh: jax.sharding.Mesh, stop_after_step: int | None = None) -> None:
  s, prefix = learner.settings, f"config.{learner.config_name}"
  devices = parallel.data_size(mesh)
  if s.batch_size % devices:
    raise ValueError(f"{prefix}.batch_size={s.batch_size} must be a multiple of the data axis size {devices}")
  for field in ("steps", "checkpoint_every_steps"):
    if getattr(s, field) % s.steps_per_dispatch:
      raise ValueError(f"{prefix}.{field}={getattr(s, field)} must be a multiple of {prefix}.steps_per_dispatch="
                       f"{s.steps_per_dispatch}")
  if stop_after_step is not None and stop_after_step % s.steps_per_dispatch:
    raise ValueError(f"stop_after_step={stop_after_step} must be a multiple of {prefix}.steps_per_dispatch="
                     f"{s.steps_per_dispatch}")


def fit(learner: Learner, datasets: tuple[data.Transitions, ...], counts: tuple[int, ...], key: chex.PRNGKey,
        mesh: jax.sharding.Mesh, checkpoint_dir: str | None = None, show_progress: bool = True,
        stop_after_step: int | None = None) -> tuple[Any, dict[str, np.ndarray]]:
  """Trains `learner` for `settings.steps` updates on batches of counts[i] transitions from datasets[i].

  The datasets are replicated on every device of `mesh`. Resumes from the latest checkpoint in
  `checkpoint_dir` (saved every `checkpoint_every_steps` and at the end); a resumed run ends bit-identical
  to an uninterrupted one. `stop_after_step` ends the run early (as a killed run would). Step s is the
  update taking state.step from s to s + 1.

  Returns (state, history): history {metric: f32[n], "step": i32[n]} over the n updates this call ran.
  Raises TrainingDivergedError naming the step and the metric (or state leaf) that is not finite.
  """
  settings = learner.settings
  check_settings(learner, mesh, stop_after_step)
  replicated = parallel.replicated(mesh)
  state = jax.device_put(learner.init(key, jax.tree.map(lambda x: np.asarray(x[:1]), datasets[0])), replicated)
  datasets = jax.device_put(datasets, replicated)
  manager = None
  if checkpoint_dir is not None:
    manager = checkpoint.manager(checkpoint_dir, settings.checkpoint_every_steps)
    state = checkpoint.restore_latest(manager, state)
  paths = _floating_paths(state)
  start = int(jax.device_get(state.step))
  last = settings.steps if stop_after_step is None else min(settings.steps, stop_after_step)
  history = []
  bar = progress.progress(range(start, last, settings.steps_per_dispatch), learner.name, show_progress)
  for first in bar:
    state, metrics = run_dispatch(state, datasets, learner=learner, counts=counts, mesh=mesh)
    metrics, finite = jax.device_get((metrics, _finite_leaves(state)))
    check_finite(learner.name, metrics, first)
    if not np.all(finite):
      raise TrainingDivergedError(f"{learner.name}: state leaf '{paths[int(np.argmin(finite))]}' is not finite "
                                  f"after step {first + settings.steps_per_dispatch - 1}")
    history.append(metrics)
    if hasattr(bar, "set_postfix"):
      bar.set_postfix({k: f"{np.mean(v):.4f}" for k, v in metrics.items()})
    if manager is not None:
      done = first + settings.steps_per_dispatch
      checkpoint.save(manager, done, state, force=done == settings.steps)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  merged = {name: np.concatenate([m[name] for m in history]) for name in (history[0] if history else ())}
  merged["step"] = np.arange(start, start + len(history) * settings.steps_per_dispatch, dtype=np.int32)
  return state, merged


# IQL.


@dataclasses.dataclass(frozen=True)
class IQLSettings:
  expectile: float
  discount: float
  learning_rate: float
  polyak: float
  batch_size: int
  steps: int
  steps_per_dispatch: int
  checkpoint_every_steps: int

  @classmethod
  def from_config(cls, iql: ml_collections.ConfigDict) -> "IQLSettings":
    return cls(**{f.name: iql[f.name] for f in dataclasses.fields(cls)})

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
  """critic, target_critic: twin `TwinPromptValue` variables; value: `StateValue` variables; Adam states of
  both; step: i32[] updates done; key: raw PRNG key data of the batch stream."""

  critic: Any
  target_critic: Any
  value: Any
  critic_opt_state: Any
  value_opt_state: Any
  step: chex.Array
  key: chex.Array


def expectile_loss(diff: chex.Array, expectile: float) -> chex.Array:
  """L_τ(u) = |τ - 1(u < 0)|·u², elementwise (u = target - prediction)."""
  return jnp.where(diff > 0, expectile, 1 - expectile) * diff ** 2


def value_loss(v: chex.Array, target_q: chex.Array, expectile: float) -> chex.Array:
  """mean_B L_τ(target_q - v): v, target_q f32[B] -> scalar."""
  return jnp.mean(expectile_loss(target_q - v, expectile))


def td_target(reward: chex.Array, not_done: chex.Array, next_v: chex.Array, discount: float) -> chex.Array:
  """r + γ·not_done·V(s'): f32[B]."""
  return reward + discount * not_done * next_v


def critic_loss(q: chex.Array, target: chex.Array) -> chex.Array:
  """mean_B Σ_i (q_i - target)²: q f32[2, B], target f32[B] -> scalar."""
  return jnp.mean(jnp.sum((q - target) ** 2, axis=0))


def slate_q(critic: nn.Module, params, batch: data.Transitions) -> chex.Array:
  """q_i(s, P) of each transition's state and slate for both twins: f32[2, B]."""
  return value.slate_value(critic.apply(params, batch.history, batch.history_mask, batch.turn, batch.slate_text,
                                        batch.slate_category))


def optimizer_step(optimizer: optax.GradientTransformation, grads, opt_state, params):
  """(params, opt_state) after one step of `optimizer` on `grads`."""
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


@dataclasses.dataclass(frozen=True)
class IQL:
  """The IQL learner for `fit`."""

  policy: IQLPolicy
  settings: IQLSettings
  config_name = "agent.iql"

  @property
  def name(self) -> str:
    return f"IQL (discount {self.settings.discount})"

  def _networks(self) -> tuple[nn.Module, nn.Module]:
    return self.policy.network(), value.StateValue(self.policy.hidden)

  def _optimizer(self) -> optax.GradientTransformation:
    return optax.adam(self.settings.learning_rate)

  def init(self, key: chex.PRNGKey, example: data.Transitions) -> IQLState:
    critic_net, value_net = self._networks()
    k_critic, k_value, k_run = jax.random.split(key, 3)
    critic = value.init_variables(k_critic, critic_net, example.history, example.history_mask, example.turn,
                                  example.slate_text, example.slate_category)
    state_value = value.init_variables(k_value, value_net, example.history, example.history_mask, example.turn)
    optimizer = self._optimizer()
    return IQLState(critic=critic, target_critic=jax.tree.map(jnp.copy, critic), value=state_value,
                    critic_opt_state=optimizer.init(critic), value_opt_state=optimizer.init(state_value),
                    step=jnp.zeros((), jnp.int32), key=jax.random.key_data(k_run))

  def update(self, state: IQLState, batch: data.Transitions) -> tuple[IQLState, dict[str, chex.Array]]:
    """One IQL update, V → Q → target; metrics are the losses and mean values before it."""
    s, optimizer = self.settings, self._optimizer()
    critic_net, value_net = self._networks()
    target_q = jnp.min(slate_q(critic_net, state.target_critic, batch), axis=0)

    def v_loss(params):
      v = value_net.apply(params, batch.history, batch.history_mask, batch.turn)
      return value_loss(v, target_q, s.expectile), v

    (v_loss_value, v), grads = jax.value_and_grad(v_loss, has_aux=True)(state.value)
    new_value, value_opt_state = optimizer_step(optimizer, grads, state.value_opt_state, state.value)
    next_v = value_net.apply(new_value, batch.history, batch.next_history_mask, batch.next_turn)
    target = td_target(batch.reward, batch.not_done, next_v, s.discount)

    def q_loss(params):
      q = slate_q(critic_net, params, batch)
      return critic_loss(q, target), q

    (q_loss_value, q), grads = jax.value_and_grad(q_loss, has_aux=True)(state.critic)
    critic, critic_opt_state = optimizer_step(optimizer, grads, state.critic_opt_state, state.critic)
    state = state.replace(critic=critic, target_critic=optax.incremental_update(critic, state.target_critic, s.polyak),
                          value=new_value, critic_opt_state=critic_opt_state, value_opt_state=value_opt_state,
                          step=state.step + 1)
    metrics = {"value_loss": v_loss_value, "critic_loss": q_loss_value, "v": jnp.mean(v), "q": jnp.mean(q)}
    return state, metrics


def train(settings: IQLSettings, policy: IQLPolicy, real: data.Transitions | None, sim: data.Transitions | None,
          data_mix: str, sim_fraction: float, key: chex.PRNGKey, mesh: jax.sharding.Mesh,
          checkpoint_dir: str | None = None, show_progress: bool = True,
          stop_after_step: int | None = None) -> tuple[IQLState, dict[str, np.ndarray]]:
  """IQL on batches of `data_mix` (see `data.mix_sources`) for the network of `policy`; see `fit`.

  The trained policy is `policy` with params `state.critic`.
  """
  datasets, counts = data.mix_sources(data_mix, sim_fraction, settings.batch_size, real, sim)
  return fit(IQL(policy, settings), datasets, counts, key, mesh, checkpoint_dir, show_progress, stop_after_step)
