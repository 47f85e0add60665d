"""The PASTA interaction as a functional environment (gymnax style), vmapped over users, scanned over turns.

A user of latent type z starts from a prompt. Each turn the candidate generator proposes L_C prompts in
C categories, each rendered into M images; the agent's action is L candidate indices (the slate); the
user picks a column with the softmax choice model of `users`; the reward is the chosen column's
utility for that user (every turn, or only at the last turn). The agent's belief over types is the
Bayesian posterior under the `belief` model (the fitted user model), updated after each choice.

The generator is a `CandidateGenerator` (`synthetic.SyntheticExpander`, `candidates.ReplayGenerator`);
`users` and `belief` are `UserModel`s (`synthetic.PlantedUsers`, `utility.FittedUsers`) or, on the fast
path when the generator is a `PooledGenerator`, `TabulatedUserModel`s (`utility.UtilityTable`).

The observation is computed from the state and never holds the user's true type. A `Policy` sees the
observation only; a `PrivilegedPolicy` (the oracle baseline) is handed the whole `EnvState`.
"""

import concurrent.futures
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.extend import random as jax_random

from pasta_jax import files, parallel, types
from pasta_jax.config_checks import check, check_positive_int
from pasta_jax.data import schema
from pasta_jax.user_model import choice as choice_model
from pasta_jax.user_model import posterior, utility

REWARDS = ("every_turn", "final_turn")


@runtime_checkable
class CandidateGenerator(Protocol):
  """Proposes and renders the candidates of each turn; a prompt is any pytree the generator defines."""

  def start(self, key: chex.PRNGKey) -> Any:
    """A start prompt."""

  def generate(self, key: chex.PRNGKey, prompt: Any) -> tuple[Any, chex.Array]:
    """(candidate prompts [L_C], category i32[L_C]) expanding `prompt`."""

  def text_features(self, prompts: Any) -> chex.Array:
    """prompts [...] -> f32[..., D]."""

  def render(self, prompts: Any, seeds: chex.Array) -> chex.Array:
    """prompts [...], seeds i32[..., M] -> image features f32[..., M, D]."""


@runtime_checkable
class PooledGenerator(CandidateGenerator, Protocol):
  """A generator that renders from a pool of images, so user models can score images by pool row."""

  image: chex.Array  # f32[N_img, D] the pool's image features.

  def pool_rows(self, prompts: Any, seeds: chex.Array) -> chex.Array:
    """prompts [...], seeds i32[..., M] -> pool rows i32[..., M] of the images shown."""


@runtime_checkable
class UserModel(Protocol):
  """Users of K types: the responders (planted or fitted users) and the agent's belief model."""

  @property
  def log_priors(self) -> chex.Array:
    """f32[K] log prior of each type."""

  def utilities(self, images: chex.Array, text: chex.Array) -> tuple[chex.Array, chex.Array]:
    """images f32[..., L, M, D], text f32[..., L, D] -> (utilities f32[..., L, K], τ f32[])."""


@runtime_checkable
class TabulatedUserModel(Protocol):
  """A user model whose utilities are precomputed per pool image (with a `PooledGenerator`)."""

  @property
  def log_priors(self) -> chex.Array:
    """f32[K] log prior of each type."""

  def utilities_at(self, rows: chex.Array) -> tuple[chex.Array, chex.Array]:
    """pool rows i32[..., L, M] -> (utilities f32[..., L, K], τ f32[])."""


@struct.dataclass
class EnvParams:
  """The environment: who proposes (generator), who responds (users), who believes (belief), and sizes.

  belief_is_users: the belief model is the responders' model, so each slate is scored once per turn.
  """

  generator: CandidateGenerator
  users: UserModel | TabulatedUserModel
  belief: UserModel | TabulatedUserModel
  turns: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)
  images_per_prompt: int = struct.field(pytree_node=False)
  num_categories: int = struct.field(pytree_node=False)
  reward: str = struct.field(pytree_node=False, default="every_turn")
  belief_is_users: bool = struct.field(pytree_node=False, default=False)


def validate_config(config) -> None:
  """Raises ConfigError naming the first invalid `interaction` or `simulate` field."""
  it = config.interaction
  for field in ("num_candidates", "slate_size", "images_per_prompt", "turns"):
    check_positive_int(config, f"interaction.{field}")
  categories = tuple(it.categories)
  check(
    len(set(categories)) == len(categories) >= 1,
    "interaction.categories",
    categories,
    "must be distinct names",
  )
  check(
    it.num_candidates % len(categories) == 0,
    "interaction.num_candidates",
    it.num_candidates,
    f"must be a multiple of the {len(categories)} categories",
  )
  check(
    it.slate_size <= len(categories),
    "interaction.slate_size",
    it.slate_size,
    f"at most one prompt per category: at most {len(categories)}",
  )
  check_positive_int(config, "simulate.num_users")
  check(
    config.simulate.reward in REWARDS,
    "simulate.reward",
    config.simulate.reward,
    f"one of {REWARDS}",
  )


def tabulated(model: Any, generator: CandidateGenerator) -> Any:
  """`model` as an (image × type) `utility.UtilityTable` of the generator's pool when its utilities depend
  on the image alone and the generator renders from a pool; otherwise `model` itself."""
  if isinstance(generator, PooledGenerator) and utility.can_tabulate(model):
    return utility.tabulate(model, generator.image)
  return model


def make_params(
  interaction, generator, users, belief, reward: str = "every_turn", tabulate: bool = True
) -> EnvParams:
  """EnvParams with the sizes of `config.interaction` (turns, slate size, images per prompt, categories).

  With `tabulate`, fitted users that score images alone are replaced by their table over a pooled
  generator's images (`tabulated`). Passing the same object as `users` and `belief` scores each slate once.
  """
  belief_is_users = belief is users
  if tabulate:
    users = tabulated(users, generator)
    belief = users if belief_is_users else tabulated(belief, generator)
  return EnvParams(
    generator=generator,
    users=users,
    belief=belief,
    turns=interaction.turns,
    slate_size=interaction.slate_size,
    images_per_prompt=interaction.images_per_prompt,
    num_categories=len(interaction.categories),
    reward=reward,
    belief_is_users=belief_is_users,
  )


@struct.dataclass
class Observation:
  """What the agent sees before choosing turn t's slate.

  history: f32[H + 1, D] text features of the start prompt (row 0) and the prompts chosen so far
    (row t + 1 after turn t; zeros after); history_mask: bool[H + 1]; turn: i32[].
  candidate_text: f32[L_C, D]; candidate_images: f32[L_C, M, D]; category: i32[L_C].
  log_belief: f32[K] log posterior over the belief model's types given the choices so far.
  candidate_rows: i32[L_C, M] pool rows of the candidates' images (`PooledGenerator`s), else None.
  history_images: f32[H, M, D] the images of the option chosen at each turn (row t after turn t, that
    is while history_mask[t + 1]; zeros after).

  Inside `rollout` the observation is recomputed each turn from the state's prompts and seeds, so
  features no policy reads are never computed.
  """

  history: chex.Array
  history_mask: chex.Array
  turn: chex.Array
  candidate_text: chex.Array
  candidate_images: chex.Array
  category: chex.Array
  log_belief: chex.Array
  candidate_rows: chex.Array | None = None
  history_images: chex.Array | None = None


@struct.dataclass
class EnvState:
  """user_type: i32[] the responding user's true type; prompt: the prompt the current turn starts from;
  candidates: prompts [L_C] of the current turn; category: i32[L_C]; seed_key: the key of their image
  seeds (`candidate_seeds`); history: prompts [H + 1], the start prompt then the prompts chosen (rows
  after `turn` repeat the start prompt); history_seeds: i32[H, M] the image seeds of the option chosen
  at each turn (zeros for turns not played); turn: i32[]; log_belief: f32[K]; obs: the agent's
  observation of this state (None inside `rollout`'s scan, which carries prompts and keys only)."""

  user_type: chex.Array
  prompt: Any
  candidates: Any
  category: chex.Array
  seed_key: chex.PRNGKey
  history: Any
  history_seeds: chex.Array
  turn: chex.Array
  log_belief: chex.Array
  obs: Observation | None = None


def candidate_utilities(
  model: UserModel | TabulatedUserModel, obs: Observation
) -> tuple[chex.Array, chex.Array]:
  """(utilities f32[L_C, K], τ) of every candidate: by pool row when `model` is tabulated."""
  if isinstance(model, TabulatedUserModel):
    return model.utilities_at(obs.candidate_rows)
  return model.utilities(obs.candidate_images, obs.candidate_text)


def observe(params: EnvParams, state: EnvState) -> Observation:
  """The agent's observation of `state` (whose `obs` is ignored)."""
  generator = params.generator
  mask = jnp.arange(params.turns + 1) <= state.turn
  history = jnp.where(mask[:, None], generator.text_features(state.history), 0.0)
  seeds = candidate_seeds(state.seed_key, state.category.shape[0], params.images_per_prompt)
  pooled = isinstance(generator, PooledGenerator)
  rows = generator.pool_rows(state.candidates, seeds) if pooled else None
  images = generator.image[rows] if pooled else generator.render(state.candidates, seeds)
  chosen = jax.tree.map(lambda x: x[1:], state.history)
  history_images = _render(generator, chosen, state.history_seeds)
  return Observation(
    history=history,
    history_mask=mask,
    turn=state.turn,
    candidate_text=generator.text_features(state.candidates),
    candidate_images=images,
    category=state.category,
    log_belief=state.log_belief,
    candidate_rows=rows,
    history_images=jnp.where(mask[1:, None, None], history_images, 0.0),
  )


SEED_MAX = np.iinfo(np.int32).max


def candidate_seeds(key: chex.PRNGKey, num_candidates: int, images: int) -> chex.Array:
  """Image seeds of every candidate: randint(key, [L_C, M], 0, SEED_MAX) -> i32[L_C, M]."""
  return jax.random.randint(key, (num_candidates, images), 0, SEED_MAX)


def _bits_at(key: chex.PRNGKey, counters: chex.Array) -> chex.Array:
  """Element `counters` (u32[...]) of jax.random.bits(key, shape, uint32) for any shape of that size."""
  k = jax.random.key_data(key)
  zeros = jnp.zeros_like(counters)
  high, low = jax_random.threefry2x32_p.bind(k[0], k[1], zeros, counters)
  return high ^ low


def seeds_of(key: chex.PRNGKey, action: chex.Array, num_candidates: int, images: int) -> chex.Array:
  """candidate_seeds(key, L_C, M)[action] (action i32[L] -> i32[L, M]) hashing only those L × M counters.

  Partitionable threefry is counter-based: element i of a draw depends on the key and i alone, so the
  rows shown are drawn without the others. randint's arithmetic is repeated on those bits (2 words per
  value, reduced modulo the span). Other PRNG implementations draw all rows and gather.
  """
  if not (
    jax.config.jax_threefry_partitionable and str(jax.random.key_impl(key)) == "threefry2x32"
  ):
    return candidate_seeds(key, num_candidates, images)[action]
  counters = (action[:, None] * images + jnp.arange(images)).astype(jnp.uint32)
  k_high, k_low = jax.random.split(key)
  span = jnp.uint32(SEED_MAX)
  multiplier = jnp.uint32(2**16) % span
  multiplier = (multiplier * multiplier) % span
  offset = (_bits_at(k_high, counters) % span) * multiplier + _bits_at(k_low, counters) % span
  return (offset % span).astype(jnp.int32)


def _propose(
  key: chex.PRNGKey, params: EnvParams, prompt: Any
) -> tuple[Any, chex.Array, chex.PRNGKey]:
  """(candidates [L_C], category i32[L_C], the key of their image seeds) expanding `prompt`."""
  k_gen, k_seed = jax.random.split(key)
  candidates, category = params.generator.generate(k_gen, prompt)
  return candidates, category, k_seed


def _with_obs(params: EnvParams, state: EnvState) -> EnvState:
  return state.replace(obs=observe(params, state))


def reset(
  key: chex.PRNGKey,
  params: EnvParams,
  user_type: chex.Array | None = None,
  start_prompt: Any = None,
) -> tuple[Observation, EnvState]:
  """A new user: type ~ users.log_priors unless given; start prompt from the generator unless given."""
  state = _with_obs(params, _reset(key, params, user_type, start_prompt))
  return state.obs, state


def _reset(
  key: chex.PRNGKey, params: EnvParams, user_type: chex.Array | None, start_prompt: Any
) -> EnvState:
  k_type, k_start, k_obs = jax.random.split(key, 3)
  if user_type is None:
    user_type = jax.random.categorical(k_type, params.users.log_priors)
  prompt = params.generator.start(k_start) if start_prompt is None else start_prompt
  candidates, category, seed_key = _propose(k_obs, params, prompt)
  history = jax.tree.map(lambda x: jnp.broadcast_to(x, (params.turns + 1,) + jnp.shape(x)), prompt)
  return EnvState(
    user_type=jnp.asarray(user_type, jnp.int32),
    prompt=prompt,
    candidates=candidates,
    category=category,
    seed_key=seed_key,
    history=history,
    history_seeds=jnp.zeros((params.turns, params.images_per_prompt), jnp.int32),
    turn=jnp.zeros((), jnp.int32),
    log_belief=posterior.initial(params.belief.log_priors),
  )


@struct.dataclass
class StepInfo:
  """choice: i32[] chosen column; utility: f32[] its utility for the user; utilities: f32[L] every
  column's utility for the user; shown: prompts [L]; seeds: i32[L, M]; images: f32[L, M, D]."""

  choice: chex.Array
  utility: chex.Array
  utilities: chex.Array
  shown: Any
  seeds: chex.Array
  images: chex.Array


def _render(generator: CandidateGenerator, shown: Any, seeds: chex.Array) -> chex.Array:
  if isinstance(generator, PooledGenerator):
    return generator.image[generator.pool_rows(shown, seeds)]
  return generator.render(shown, seeds)


def _scored(
  model: UserModel, generator: CandidateGenerator, shown: Any, seeds: chex.Array
) -> tuple[chex.Array, chex.Array]:
  """(utilities f32[L, K], τ) of the L × M images shown and the L prompts, by the model's features."""
  return model.utilities(_render(generator, shown, seeds), generator.text_features(shown))


SCORE_BLOCK_ROWS = 2048


@jax.custom_batching.custom_vmap
def _scored_in_blocks(
  model: UserModel, generator: CandidateGenerator, shown: Any, seeds: chex.Array
) -> tuple[chex.Array, chex.Array]:
  """`_scored`, but vmapped over users on XLA:CPU it scores SCORE_BLOCK_ROWS images per step of a loop:
  XLA:CPU's GEMMs on tens of thousands of rows run ~35% slower than on cache-sized blocks."""
  return _scored(model, generator, shown, seeds)


@_scored_in_blocks.def_vmap
def _scored_in_blocks_rule(axis_size: int, in_batched, model, generator, shown, seeds):
  batched_params = any(jax.tree.leaves(in_batched[:2]))
  if batched_params or jax.default_backend() != "cpu" or not all(jax.tree.leaves(in_batched[2:])):
    axes = jax.tree.map(lambda b: 0 if b else None, in_batched)
    out = jax.vmap(_scored, in_axes=tuple(axes))(model, generator, shown, seeds)
    return out, (True, False)
  per_user = seeds.shape[1] * seeds.shape[2]
  users = max(1, SCORE_BLOCK_ROWS // per_user)
  blocks = -(-axis_size // users)

  def split(x):
    x = jnp.pad(x, [(0, blocks * users - axis_size)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((blocks, users) + x.shape[1:])

  def one_block(block):
    return jax.vmap(_scored, in_axes=(None, None, 0, 0))(model, generator, *block)

  utilities, tau = jax.lax.map(one_block, jax.tree.map(split, (shown, seeds)))
  utilities = utilities.reshape((blocks * users,) + utilities.shape[2:])[:axis_size]
  return (utilities, tau[0, 0]), (True, False)


def _slate_utilities(
  model: UserModel | TabulatedUserModel,
  generator: CandidateGenerator,
  shown: Any,
  seeds: chex.Array,
) -> tuple[chex.Array, chex.Array]:
  """(utilities f32[L, K], τ) of the shown slate: by pool row when `model` is tabulated, else from the
  features of the L × M images shown and the L prompts."""
  if isinstance(model, TabulatedUserModel):
    return model.utilities_at(generator.pool_rows(shown, seeds))
  return _scored_in_blocks(model, generator, shown, seeds)


def _transition(
  key: chex.PRNGKey, state: EnvState, action: chex.Array, params: EnvParams
) -> tuple[EnvState, chex.Array, chex.Array, StepInfo]:
  """(next state without its observation, reward, done, info) after showing the slate `action`."""
  k_choice, k_obs = jax.random.split(key)
  mask = jnp.ones(action.shape, bool)
  shown = jax.tree.map(lambda x: x[action], state.candidates)
  shown_seeds = seeds_of(state.seed_key, action, state.category.shape[0], params.images_per_prompt)
  utilities, tau = _slate_utilities(params.users, params.generator, shown, shown_seeds)  # [L, K]
  user_utilities = utilities[:, state.user_type]
  chosen = choice_model.sample(k_choice, user_utilities[:, None], tau, mask)[0]
  if params.belief_is_users:
    belief_utilities, belief_tau = utilities, tau
  else:
    belief_utilities, belief_tau = _slate_utilities(
      params.belief, params.generator, shown, shown_seeds
    )
  log_belief = posterior.update(state.log_belief, belief_utilities, belief_tau, mask, chosen)
  turn = state.turn + 1
  done = turn >= params.turns
  chosen_utility = user_utilities[chosen]
  reward = chosen_utility if params.reward == "every_turn" else jnp.where(done, chosen_utility, 0.0)
  prompt = jax.tree.map(lambda x: x[chosen], shown)
  history = jax.tree.map(lambda h, p: h.at[turn].set(p), state.history, prompt)
  candidates, category, seed_key = _propose(k_obs, params, prompt)
  info = StepInfo(
    choice=chosen,
    utility=chosen_utility,
    utilities=user_utilities,
    shown=shown,
    seeds=shown_seeds,
    images=_render(params.generator, shown, shown_seeds),
  )
  next_state = EnvState(
    user_type=state.user_type,
    prompt=prompt,
    candidates=candidates,
    category=category,
    seed_key=seed_key,
    history=history,
    history_seeds=state.history_seeds.at[state.turn].set(shown_seeds[chosen]),
    turn=turn,
    log_belief=log_belief,
  )
  return next_state, reward, done, info


def step(
  key: chex.PRNGKey, state: EnvState, action: chex.Array, params: EnvParams
) -> tuple[Observation, EnvState, chex.Array, chex.Array, StepInfo]:
  """Shows the slate `action` (i32[L] candidate indices); returns (obs, state, reward, done, info)."""
  next_state, reward, done, info = _transition(key, state, action, params)
  next_state = _with_obs(params, next_state)
  return next_state.obs, next_state, reward, done, info


class Policy(Protocol):
  """A slate policy: a hashable (static) object that sees the observation only."""

  def __call__(self, key: chex.PRNGKey, obs: Observation, params: Any) -> chex.Array:
    """i32[L] candidate indices of the slate."""


@runtime_checkable
class PrivilegedPolicy(Protocol):
  """A baseline that reads the environment's state, the user's true type included (the oracle)."""

  def act_with_state(self, key: chex.PRNGKey, state: EnvState, params: Any) -> chex.Array:
    """i32[L] candidate indices of the slate for `state` (whose observation is state.obs)."""


def act(
  policy: Policy | PrivilegedPolicy, key: chex.PRNGKey, state: EnvState, params: Any
) -> chex.Array:
  """The slate of `policy` in `state`: a privileged policy gets the state, any other only state.obs."""
  if isinstance(policy, PrivilegedPolicy):
    return policy.act_with_state(key, state, params)
  return policy(key, state.obs, params)


@struct.dataclass
class Trajectories:
  """Rollouts, leading axes [N users, H turns].

  user_id: i32[N]; user_type: i32[N]; start: prompts [N]; history: f32[N, H + 1, D] (final);
  slate: i32[N, H, L] candidate indices; shown: prompts [N, H, L]; category: i32[N, H, L];
  slate_text: f32[N, H, L, D]; images: f32[N, H, L, M, D]; seeds: i32[N, H, L, M]; choice: i32[N, H];
  utility: f32[N, H] chosen column's utility; utilities: f32[N, H, L]; reward: f32[N, H];
  log_belief: f32[N, H + 1, K] belief before each turn and after the last.
  """

  user_id: chex.Array
  user_type: chex.Array
  start: Any
  history: chex.Array
  slate: chex.Array
  shown: Any
  category: chex.Array
  slate_text: chex.Array
  images: chex.Array
  seeds: chex.Array
  choice: chex.Array
  utility: chex.Array
  utilities: chex.Array
  reward: chex.Array
  log_belief: chex.Array


SAVED_TRAJECTORY_FIELDS = (
  "user_id",
  "user_type",
  "history",
  "slate",
  "category",
  "slate_text",
  "choice",
  "utility",
  "utilities",
  "reward",
  "log_belief",
)


def save_trajectories(path: str, trajectories: Trajectories) -> None:
  """The array fields the agent and evaluation read (not the prompts or image features), as .npz."""
  files.save_npz(
    path, **{name: np.asarray(getattr(trajectories, name)) for name in SAVED_TRAJECTORY_FIELDS}
  )


def load_trajectories(path: str) -> Trajectories:
  """Trajectories saved by `save_trajectories`; prompts, seeds and images are None."""
  arrays = files.load_npz(path, SAVED_TRAJECTORY_FIELDS, "re-run the simulate stage")
  return Trajectories(start=None, shown=None, images=None, seeds=None, **arrays)


def user_key(key: chex.PRNGKey, user_id: chex.Array) -> chex.PRNGKey:
  return jax.random.fold_in(key, user_id)


def rollout_user(
  key: chex.PRNGKey,
  user_id: chex.Array,
  user_type: chex.Array,
  params: EnvParams,
  policy: Policy,
  policy_params: Any,
  keep_images: bool = True,
  keep_text: bool = True,
) -> Trajectories:
  """One user's H turns (scan). Keys: fold_in(key, user_id), then fold_in(·, t) per turn.

  The scan carries prompts, seeds and the belief; each turn's observation is rebuilt from them, so only
  the features the policy reads and the L × M images scored are gathered or rendered. `images` is None
  unless `keep_images`; `history` and `slate_text` are None unless `keep_text`.
  """
  k_user = user_key(key, user_id)
  drawn = jax.random.categorical(
    jax.random.fold_in(k_user, params.turns + 1), params.users.log_priors
  )
  state = _reset(
    jax.random.fold_in(k_user, params.turns),
    params,
    jnp.where(user_type >= 0, user_type, drawn),
    None,
  )
  generator = params.generator

  def turn(state, t):
    k_policy, k_env = jax.random.split(jax.random.fold_in(k_user, t))
    action = act(policy, k_policy, _with_obs(params, state), policy_params)
    next_state, reward, _, info = _transition(k_env, state, action, params)
    out = {
      "slate": action,
      "info": info.replace(images=info.images if keep_images else None),
      "reward": reward,
      "category": state.category[action],
      "log_belief": state.log_belief,
      "slate_text": generator.text_features(info.shown) if keep_text else None,
    }
    return next_state, out

  last, out = jax.lax.scan(turn, state, jnp.arange(params.turns))
  info = out["info"]
  history = jnp.asarray(generator.text_features(last.history)) if keep_text else None
  return Trajectories(
    user_id=user_id,
    user_type=last.user_type,
    start=jax.tree.map(lambda x: x[0], last.history),
    history=history,
    slate=out["slate"],
    shown=info.shown,
    category=out["category"],
    slate_text=out["slate_text"],
    images=info.images,
    seeds=info.seeds,
    choice=info.choice,
    utility=info.utility,
    utilities=info.utilities,
    reward=out["reward"],
    log_belief=jnp.concatenate([out["log_belief"], last.log_belief[None]], axis=0),
  )


def rollout(
  key: chex.PRNGKey,
  user_ids: chex.Array,
  user_types: chex.Array,
  params: EnvParams,
  policy: Policy,
  policy_params: Any,
  keep_images: bool = True,
  keep_text: bool = True,
) -> Trajectories:
  """All users (vmap over users of the per-user scan). user_types i32[N]: -1 draws the type from
  users.log_priors. A user's trajectory depends only on (key, user_id, type), not on N or the devices."""
  one = functools.partial(rollout_user, keep_images=keep_images, keep_text=keep_text)
  return jax.vmap(one, in_axes=(None, 0, 0, None, None, None))(
    key, user_ids, user_types, params, policy, policy_params
  )


_device_rollout = jax.jit(rollout, static_argnames=("policy", "keep_images", "keep_text"))

USERS_PER_CALL = 4096


def _padded_calls(user_ids: np.ndarray, user_types: np.ndarray, chunk: int):
  """(ids i32[chunk], types i32[chunk], real users) of each call; the last is padded with the last id."""
  for start in range(0, len(user_ids), chunk):
    ids, types_ = user_ids[start : start + chunk], user_types[start : start + chunk]
    extra = chunk - len(ids)
    yield (
      np.concatenate([ids, np.full((extra,), ids[-1], np.int32)]),
      np.concatenate([types_, np.full((extra,), -1, np.int32)]),
      len(ids),
    )


def _users_per_device_call(num_users: int, mesh: jax.sharding.Mesh, users_per_call: int) -> int:
  """The users of each of `run`'s device calls: min(users_per_call, num_users) rounded up to a multiple
  of the mesh's "data" axis."""
  if users_per_call < 1:
    raise ValueError(f"simulator.run: users_per_call={users_per_call} must be >= 1")
  if num_users < 1:
    raise ValueError("simulator.run: no users")
  size = parallel.data_size(mesh)
  return -(-min(users_per_call, num_users) // size) * size


def compile_runs(
  key: chex.PRNGKey,
  num_users: int,
  params: EnvParams,
  policies: Sequence[tuple[Policy | PrivilegedPolicy, Any]],
  mesh: jax.sharding.Mesh,
  users_per_call: int = USERS_PER_CALL,
  keep_images: bool = True,
  keep_text: bool = True,
) -> None:
  """Compiles the device program of `run` for each (policy, policy_params) on `num_users` users, all at
  once in threads (XLA compiles without holding the GIL), so that the `run` calls with the same
  arguments that follow find their programs compiled; policies whose params differ in values only
  share one program. Compiling runs nothing on the devices, so every
  process of a multi-host job may compile in any order."""
  chunk = _users_per_device_call(num_users, mesh, users_per_call)
  ids = parallel.put(np.zeros((chunk,), np.int32), parallel.data_sharding(mesh))
  params = parallel.put(params, parallel.replicated(mesh))

  def compile_one(policy_and_params):
    policy, policy_params = policy_and_params
    policy_params = parallel.put(policy_params, parallel.replicated(mesh))
    _device_rollout.lower(
      key, ids, ids, params, policy, policy_params, keep_images, keep_text
    ).compile()

  def program(policy, policy_params):
    leaves, structure = jax.tree.flatten(policy_params)
    return policy, structure, tuple(jax.typeof(x) for x in leaves)

  distinct = {program(*run_args): run_args for run_args in policies}
  with concurrent.futures.ThreadPoolExecutor(max(1, len(distinct))) as pool:
    list(pool.map(compile_one, distinct.values()))


def run(
  key: chex.PRNGKey,
  user_ids: np.ndarray,
  user_types: np.ndarray,
  params: EnvParams,
  policy: Policy,
  policy_params: Any,
  mesh: jax.sharding.Mesh,
  users_per_call: int = USERS_PER_CALL,
  keep_images: bool = True,
  keep_text: bool = True,
) -> Trajectories:
  """`rollout` with users sharded over the mesh's "data" axis, at most `users_per_call` (rounded up to a
  multiple of the axis) per device call, every call padded to the same size (one compilation).

  Returns host (NumPy) trajectories of the N requested users. For any device count and chunking the discrete
  outcomes (types, slates, seeds, choices) are identical and the float fields agree to float32 rounding (a
  different per-device batch may be vectorised differently). `images` (f32[N, H, L, M, D], the largest field)
  is None unless `keep_images`, and `history` and `slate_text` are None unless `keep_text`; fields not kept
  are not outputs of the device program either. The next call is dispatched before a call's outputs are
  copied into the host arrays, so copying overlaps computing.
  """
  user_ids, user_types = np.asarray(user_ids, np.int32), np.asarray(user_types, np.int32)
  chunk = _users_per_device_call(len(user_ids), mesh, users_per_call)
  sharding = parallel.data_sharding(mesh)
  params, policy_params = (
    parallel.put(x, parallel.replicated(mesh)) for x in (params, policy_params)
  )

  def dispatch(call):
    ids, types_, real = call
    out = _device_rollout(
      key,
      parallel.put(ids, sharding),
      parallel.put(types_, sharding),
      params,
      policy,
      policy_params,
      keep_images,
      keep_text,
    )
    return out, real

  host, done, pending = None, 0, None
  for call in _padded_calls(user_ids, user_types, chunk):
    current = dispatch(call)
    if host is None:
      host = jax.tree.map(lambda x: np.empty((len(user_ids),) + x.shape[1:], x.dtype), current[0])
    if pending is not None:
      done = _copy_into(host, *pending, done)
    pending = current
  _copy_into(host, *pending, done)
  return host


def _copy_into(host: Trajectories, out: Trajectories, real: int, done: int) -> int:
  """Copies the first `real` users of device trajectories `out` into host rows from `done`; returns the
  rows done after it."""
  for target, leaf in zip(jax.tree.leaves(host), jax.tree.leaves(out)):
    target[done : done + real] = parallel.host_array(leaf)[:real]
  return done + real


def to_records(
  trajectories: Trajectories,
  prompt_ids: np.ndarray,
  start_ids: np.ndarray,
  text_of: Callable[[int], str],
  image_rows: np.ndarray,
  image: np.ndarray,
  image_refs: np.ndarray,
  category_names: Sequence[str],
  sessions_per_user: int = 1,
  user_prefix: str = "user",
) -> tuple[list[schema.ChoiceRecord], types.FeatureTable]:
  """Canonical records and their feature table from trajectories.

  prompt_ids: i[S, H, L] and start_ids: i[S] identify the shown and start prompts (one text row per id);
  text_of(id) is a prompt's text; image_rows: i[S, H, L, M] the row of each shown image in image f32[N_img, D],
  whose references are image_refs str[N_img]. Trajectory n is session n % sessions_per_user of user
  n // sessions_per_user (its `user_id`).
  """
  num_sessions, turns, slate_size = np.shape(prompt_ids)
  dim = image.shape[-1]
  all_text = np.concatenate(
    [np.asarray(trajectories.slate_text).reshape(-1, dim), np.asarray(trajectories.history)[:, 0]]
  )
  ids = np.concatenate([np.asarray(prompt_ids).ravel(), np.asarray(start_ids)])
  unique, first, rows = np.unique(ids, return_index=True, return_inverse=True)
  text_row, start_row = (
    rows[: np.size(prompt_ids)].reshape(np.shape(prompt_ids)),
    rows[np.size(prompt_ids) :],
  )
  texts = {int(i): text_of(int(i)) for i in unique}
  choices, categories = np.asarray(trajectories.choice), np.asarray(trajectories.category)
  session_ids, user_types = np.asarray(trajectories.user_id), np.asarray(trajectories.user_type)
  records = []
  for s in range(num_sessions):
    user, session = divmod(int(session_ids[s]), sessions_per_user)
    user_id = f"{user_prefix}{user:06d}"
    start, start_row_t = texts[int(start_ids[s])], int(start_row[s])
    for t in range(turns):
      options = tuple(
        schema.Option(
          text=texts[int(prompt_ids[s, t, j])],
          category=category_names[categories[s, t, j]],
          text_row=int(text_row[s, t, j]),
          images=tuple(
            schema.Image(ref=str(image_refs[row]), row=int(row)) for row in image_rows[s, t, j]
          ),
        )
        for j in range(slate_size)
      )
      records.append(
        schema.ChoiceRecord(
          kind=schema.SESSION_TURN,
          user_id=user_id,
          session_id=f"{user_id}-s{session}",
          turn=t,
          start_prompt=start,
          options=options,
          choice=int(choices[s, t]),
          user_type=int(user_types[s]),
          start_text_row=start_row_t,
        )
      )
      chosen = options[choices[s, t]]
      start, start_row_t = chosen.text, chosen.text_row
  table = types.FeatureTable(
    image=np.asarray(image, np.float32), text=all_text[first].astype(np.float32)
  )
  return records, table
