"""On-policy learning in the fitted simulator (PPO, PureJaxRL style): each iteration rolls out
`num_envs` users of the fitted simulator (`simulator.reset`/`step`, vmapped over users, scanned over
the H turns), computes GAE advantages and takes `epochs` x `minibatches` clipped-PPO Adam steps;
`iterations_per_dispatch` iterations are one jitted `lax.scan`, and the whole run goes through
`train_loop.run` (Orbax checkpoints, resume, NaN guard).

The policy scores the L_C candidates with an MLP over what `inputs` names (`value.INPUTS`) and
samples a slate as L draws without replacement (Plackett-Luce), each among the candidates of
categories not yet shown, so the slate's log-probability is exact; evaluation shows the top-L by
score, at most one per category. With "utilities" in `inputs` the score is
exp(a)·Σ_k b_k u_k(c) + g·MLP(...), with the fitted model's utilities u_k(c) of each candidate under
the belief b (exactly greedy's score at a = g = 0), so learning starts from greedy.
"""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from pasta_jax import simulator, train_loop
from pasta_jax.agent import slate, value

MASKED = -1e9  # The logit of a candidate whose category is on the slate (finite: no NaN gradients).


@dataclasses.dataclass(frozen=True)
class PPOSettings(train_loop.FromConfig):
  """config.agent.ppo."""

  config_name = "agent.ppo"
  inputs: str
  hidden: tuple[int, ...]
  learning_rate: float
  num_envs: int
  iterations: int
  epochs: int
  minibatches: int
  discount: float
  gae_lambda: float
  clip: float
  entropy_coef: float
  value_coef: float
  max_grad_norm: float
  iterations_per_dispatch: int
  checkpoint_every_iterations: int


@struct.dataclass
class Features:
  """What the policy reads of an observation (fields not in `inputs` are None).

  history f32[..., H + 1, D], history_mask bool[..., H + 1], turn i32[...], text f32[..., L_C, D],
  category i32[..., L_C]; belief f32[..., K] type posterior; images f32[..., L_C, D] candidates'
  image features averaged over the M images; history_images f32[..., H, D] the same of the option
  chosen at each turn (zeros for turns not played); utilities f32[..., L_C, K] the belief model's
  per-type utility of each candidate and expected f32[..., L_C] its average under the belief.
  """

  history: chex.Array
  history_mask: chex.Array
  turn: chex.Array
  text: chex.Array
  category: chex.Array
  belief: chex.Array | None = None
  images: chex.Array | None = None
  history_images: chex.Array | None = None
  utilities: chex.Array | None = None
  expected: chex.Array | None = None


def features(obs: simulator.Observation, users, inputs: frozenset[str]) -> Features:
  """The `Features` of one observation; `users` is the belief model (read with "utilities")."""
  belief = jnp.exp(obs.log_belief)
  utilities = simulator.candidate_utilities(users, obs)[0] if "utilities" in inputs else None
  return Features(
    history=obs.history,
    history_mask=obs.history_mask,
    turn=obs.turn,
    text=obs.candidate_text,
    category=obs.category,
    belief=belief if "belief" in inputs else None,
    images=value.pooled_images(obs.candidate_images) if "images" in inputs else None,
    history_images=(value.pooled_images(obs.history_images) if "chosen_images" in inputs else None),
    utilities=utilities,
    expected=None if utilities is None else utilities @ belief,
  )


class ActorCritic(nn.Module):
  """Candidate scores f32[..., L_C] and the state value f32[...] of `Features`."""

  hidden: tuple[int, ...]
  num_categories: int
  inputs: frozenset[str]

  @nn.compact
  def __call__(self, f: Features) -> tuple[chex.Array, chex.Array]:
    state = value.state_parts(f.history, f.history_mask, f.turn, f.belief, f.history_images)
    candidate = [f.text, jax.nn.one_hot(f.category, self.num_categories, dtype=f.text.dtype)]
    candidate += [f.images] if f.images is not None else []
    summary = [jnp.mean(f.text, axis=-2)]
    if f.utilities is not None:
      candidate += [f.utilities, f.expected[..., None]]
      summary += [jnp.max(f.expected, axis=-1, keepdims=True), jnp.mean(f.utilities, axis=-2)]
    scores = value.MLP(self.hidden, name="actor")(*[s[..., None, :] for s in state], *candidate)
    if f.utilities is not None:
      log_scale = self.param("greedy_log_scale", nn.initializers.zeros, ())
      gate = self.param("residual_gate", nn.initializers.zeros, ())
      scores = jnp.exp(log_scale) * f.expected + gate * scores
    return scores, value.MLP(self.hidden, name="critic")(*state, *summary)


def _slate_draws(
  logits: chex.Array, category: chex.Array, num_categories: int, picks: list[chex.Array]
) -> tuple[chex.Array, chex.Array]:
  """(log-probability, summed entropy) of drawing candidates `picks` (i32[] each) in order, each
  among the candidates of categories not drawn before."""
  used = jnp.zeros((num_categories,), bool)
  log_prob, entropy = jnp.zeros(()), jnp.zeros(())
  for pick in picks:
    allowed = ~used[category]
    log_p = jax.nn.log_softmax(jnp.where(allowed, logits, MASKED))
    log_prob += log_p[pick]
    entropy -= jnp.sum(jnp.exp(log_p) * jnp.where(allowed, log_p, 0.0))
    used = used.at[category[pick]].set(True)
  return log_prob, entropy


def sample_slate(
  key: chex.PRNGKey, logits: chex.Array, category: chex.Array, num_categories: int, size: int
) -> tuple[chex.Array, chex.Array]:
  """(slate i32[L], its log-probability f32[]): L draws without replacement from softmax(logits
  f32[L_C]), each among the candidates of categories not yet drawn."""
  used = jnp.zeros((num_categories,), bool)
  picks = []
  for k in jax.random.split(key, size):
    pick = jax.random.categorical(k, jnp.where(used[category], MASKED, logits))
    picks.append(pick)
    used = used.at[category[pick]].set(True)
  return jnp.stack(picks), _slate_draws(logits, category, num_categories, picks)[0]


def slate_log_prob(
  logits: chex.Array, category: chex.Array, slate_: chex.Array, num_categories: int
) -> tuple[chex.Array, chex.Array]:
  """(log-probability, summed per-draw entropy) of slate i32[L] under `sample_slate`."""
  return _slate_draws(logits, category, num_categories, list(slate_))


def gae(
  rewards: chex.Array, values: chex.Array, discount: float, lam: float
) -> tuple[chex.Array, chex.Array]:
  """(advantages, returns) f32[N, H] of complete H-turn episodes: rewards, values f32[N, H]."""

  def back(next_adv_value, x):
    next_adv, next_value = next_adv_value
    reward, v = x
    adv = reward + discount * next_value - v + discount * lam * next_adv
    return (adv, v), adv

  zeros = jnp.zeros(rewards.shape[0])
  _, adv = jax.lax.scan(back, (zeros, zeros), (rewards.T, values.T), reverse=True)
  return adv.T, adv.T + values


@struct.dataclass
class PPOPolicy:
  """Top-L by the trained scores, at most one per category; params {"network", "users"}: the
  `ActorCritic`'s variables and the belief model."""

  hidden: tuple[int, ...] = struct.field(pytree_node=False)
  num_categories: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)
  inputs: frozenset[str] = struct.field(pytree_node=False)

  def network(self) -> ActorCritic:
    return ActorCritic(self.hidden, self.num_categories, self.inputs)

  def __call__(self, key: chex.PRNGKey, obs: simulator.Observation, params) -> chex.Array:
    del key
    scores, _ = self.network().apply(params["network"], features(obs, params["users"], self.inputs))
    return slate.select_slate(scores, obs.category, self.num_categories, self.slate_size)


class PPOState(train_state.TrainState):
  """The `ActorCritic`'s TrainState; iteration i32[] iterations done; key raw PRNG key data."""

  iteration: chex.Array
  key: chex.Array


@struct.dataclass
class Batch:
  """N·H decisions: features, slate i32[L], log_prob, advantage, target f32[]."""

  features: Features
  slate: chex.Array
  log_prob: chex.Array
  advantage: chex.Array
  target: chex.Array


def collect(
  key: chex.PRNGKey, state: PPOState, policy: PPOPolicy, env: simulator.EnvParams, n: int
):
  """n users' episodes under the sampling policy: (Batch of n·H decisions, rewards f32[n, H])."""
  k_reset, k_run = jax.random.split(key)
  obs, env_state = jax.vmap(simulator.reset, in_axes=(0, None))(jax.random.split(k_reset, n), env)

  def turn(carry, k):
    obs, env_state = carry
    f = jax.vmap(features, in_axes=(0, None, None))(obs, env.belief, policy.inputs)
    logits, v = state.apply_fn(state.params, f)
    k_act, k_env = jax.random.split(k)
    slates, log_prob = jax.vmap(sample_slate, in_axes=(0, 0, 0, None, None))(
      jax.random.split(k_act, n), logits, obs.category, policy.num_categories, policy.slate_size
    )
    obs, env_state, reward, _, _ = jax.vmap(simulator.step, in_axes=(0, 0, 0, None))(
      jax.random.split(k_env, n), env_state, slates, env
    )
    return (obs, env_state), (f, slates, log_prob, v, reward)

  _, (f, slates, log_prob, v, reward) = jax.lax.scan(
    turn, (obs, env_state), jax.random.split(k_run, env.turns)
  )
  return (f, slates, log_prob), v.T, reward.T


def _flat(x: chex.Array) -> chex.Array:
  """[H, N, ...] -> [N·H, ...]."""
  return x.reshape((-1,) + x.shape[2:])


def ppo_loss(params, apply_fn, batch: Batch, s: PPOSettings, num_categories: int):
  """Clipped surrogate + value_coef · squared value error - entropy_coef · entropy, and metrics."""
  logits, v = apply_fn(params, batch.features)
  log_prob, entropy = jax.vmap(slate_log_prob, in_axes=(0, 0, 0, None))(
    logits, batch.features.category, batch.slate, num_categories
  )
  ratio = jnp.exp(log_prob - batch.log_prob)
  clipped = jnp.clip(ratio, 1 - s.clip, 1 + s.clip)
  actor = -jnp.mean(jnp.minimum(ratio * batch.advantage, clipped * batch.advantage))
  critic = jnp.mean((v - batch.target) ** 2)
  loss = actor + s.value_coef * critic - s.entropy_coef * jnp.mean(entropy)
  return loss, {"actor_loss": actor, "value_loss": critic, "entropy": jnp.mean(entropy)}


def iteration(
  state: PPOState, env: simulator.EnvParams, policy: PPOPolicy, s: PPOSettings
) -> tuple[PPOState, dict[str, chex.Array]]:
  """One rollout of `num_envs` users and `epochs` x `minibatches` PPO steps on it."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.iteration)
  k_collect, k_shuffle = jax.random.split(key)
  (f, slates, log_prob), values, rewards = collect(k_collect, state, policy, env, s.num_envs)
  advantage, target = gae(rewards, values, s.discount, s.gae_lambda)
  advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
  batch = Batch(
    features=jax.tree.map(_flat, f),
    slate=_flat(slates),
    log_prob=_flat(log_prob),
    advantage=advantage.T.reshape(-1),
    target=target.T.reshape(-1),
  )
  size = batch.slate.shape[0] // s.minibatches

  def epoch(state, k):
    order = jax.random.permutation(k, batch.slate.shape[0])[: size * s.minibatches]
    shuffled = jax.tree.map(lambda x: x[order].reshape((s.minibatches, size) + x.shape[1:]), batch)

    def minibatch(state, mb):
      grads, metrics = jax.grad(ppo_loss, has_aux=True)(
        state.params, state.apply_fn, mb, s, policy.num_categories
      )
      return state.apply_gradients(grads=grads), metrics

    return jax.lax.scan(minibatch, state, shuffled)

  state, metrics = jax.lax.scan(epoch, state, jax.random.split(k_shuffle, s.epochs))
  metrics = jax.tree.map(jnp.mean, metrics)
  metrics |= {
    "return": jnp.mean(jnp.sum(rewards, axis=1)),
    "final_reward": jnp.mean(rewards[:, -1]),
  }
  return state.replace(iteration=state.iteration + 1), metrics


@functools.partial(jax.jit, static_argnames=("policy", "settings"), donate_argnums=0)
def run_iterations(state: PPOState, env: simulator.EnvParams, policy: PPOPolicy, settings):
  """`settings.iterations_per_dispatch` iterations in one scan: (state, metrics {name: f32[n]})."""

  def one(state, _):
    return iteration(state, env, policy, settings)

  return jax.lax.scan(one, state, None, length=settings.iterations_per_dispatch)


def example_features(
  turns: int, num_candidates: int, dim: int, num_types: int, inputs: frozenset[str]
) -> Features:
  """Zero `Features` of one observation with the shapes the network is built for."""
  has = inputs.__contains__
  return Features(
    history=jnp.zeros((turns + 1, dim)),
    history_mask=jnp.ones((turns + 1,), bool),
    turn=jnp.zeros((), jnp.int32),
    text=jnp.zeros((num_candidates, dim)),
    category=jnp.zeros((num_candidates,), jnp.int32),
    belief=jnp.zeros((num_types,)) if has("belief") else None,
    images=jnp.zeros((num_candidates, dim)) if has("images") else None,
    history_images=jnp.zeros((turns, dim)) if has("chosen_images") else None,
    utilities=jnp.zeros((num_candidates, num_types)) if has("utilities") else None,
    expected=jnp.zeros((num_candidates,)) if has("utilities") else None,
  )


def init_state(
  key: chex.PRNGKey, policy: PPOPolicy, env: simulator.EnvParams, s: PPOSettings
) -> PPOState:
  """A fresh PPOState, the network initialised on one observation of `env`."""
  k_init, k_obs, k_run = jax.random.split(key, 3)
  obs, _ = simulator.reset(k_obs, env)
  network = policy.network()
  params = network.init(k_init, features(obs, env.belief, policy.inputs))
  tx = optax.chain(optax.clip_by_global_norm(s.max_grad_norm), optax.adam(s.learning_rate))
  return PPOState(
    step=jnp.zeros((), jnp.int32),
    apply_fn=network.apply,
    params=params,
    tx=tx,
    opt_state=tx.init(params),
    iteration=jnp.zeros((), jnp.int32),
    key=jax.random.key_data(k_run),
  )


def train(
  settings: PPOSettings,
  policy: PPOPolicy,
  env: simulator.EnvParams,
  key: chex.PRNGKey,
  checkpoint_dir: str | None = None,
  show_progress: bool = True,
  stop_after: int | None = None,
  writer=None,
) -> tuple[PPOState, dict[str, np.ndarray]]:
  """PPO for `settings.iterations` iterations in `env` (the fitted simulator); see
  `train_loop.run`. The trained policy is `policy` with params {"network": state.params, "users":
  env.belief}."""
  schedule = train_loop.Schedule(
    name="PPO",
    unit="iteration",
    total=settings.iterations,
    per_chunk=settings.iterations_per_dispatch,
    save_every=settings.checkpoint_every_iterations,
  )
  return train_loop.run(
    init_state(key, policy, env, settings),
    lambda s: run_iterations(s, env, policy, settings),
    schedule,
    lambda s: s.iteration,
    checkpoint_dir=checkpoint_dir,
    stop_after=stop_after,
    writer=writer,
    show_progress=show_progress,
  )
