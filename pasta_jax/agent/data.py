"""Offline training data for the agent: logged sessions as padded arrays, reward labels from the fitted
user model, transitions from logged sessions or simulated trajectories, and the real / simulated / mixed
datasets of the paper's ablation (batches drawn in the graph from device-resident transitions)."""

import collections
import dataclasses
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pasta_jax import simulator, types
from pasta_jax.agent import value
from pasta_jax.data import schema
from pasta_jax.user_model import posterior

DATA_MIXES = ("real", "sim", "real+sim")

SESSIONS_PER_CALL = 1024


@dataclasses.dataclass(frozen=True)
class Sessions:
  """S complete H-turn sessions as arrays; slates of fewer than L options and options of fewer than M
  images are padded (zeros, row 0) and masked.

  user: i32[S] row of the session's user in the user list given to `sessions_from_records`;
  history: f32[S, H + 1, D] text features of the start prompt and of the prompt chosen each turn;
  slate_text: f32[S, H, L, D]; image_rows: i32[S, H, L, M]; category: i32[S, H, L]; choice: i32[S, H];
  option_mask: bool[S, H, L] real options; image_mask: bool[S, H, L, M] real images (None: all real).
  """

  user: np.ndarray
  history: np.ndarray
  slate_text: np.ndarray
  image_rows: np.ndarray
  category: np.ndarray
  choice: np.ndarray
  option_mask: np.ndarray | None = None
  image_mask: np.ndarray | None = None


def _padded_slate(
  record: schema.ChoiceRecord, category_index: dict[str, int], slate_size: int, images: int
) -> tuple[np.ndarray, ...]:
  """One turn's slate padded to L options of M images: text rows i32[L], image rows i32[L, M],
  categories i32[L], option mask bool[L], image mask bool[L, M] (padding: row 0, masked)."""
  text_rows = np.zeros(slate_size, np.int32)
  image_rows = np.zeros((slate_size, images), np.int32)
  category = np.zeros(slate_size, np.int32)
  option_mask = np.zeros(slate_size, bool)
  image_mask = np.zeros((slate_size, images), bool)
  for j, option in enumerate(record.options):
    text_rows[j], category[j], option_mask[j] = (
      option.text_row,
      category_index[option.category],
      True,
    )
    image_rows[j, : len(option.images)] = [image.row for image in option.images]
    image_mask[j, : len(option.images)] = True
  return text_rows, image_rows, category, option_mask, image_mask


def sessions_from_records(
  records: Sequence[schema.ChoiceRecord],
  table: types.FeatureTable,
  spec: schema.RecordSpec,
  user_ids: Sequence[str],
  turns: int,
  source: str,
) -> Sessions:
  """Complete sessions of the given users (validated records, slates of at most `spec.slate_size`
  options of at most `spec.images_per_option` images); a session of another length, or a start
  prompt without a text row, is a RecordError naming the session."""
  user_row = {u: i for i, u in enumerate(user_ids)}
  by_session = collections.defaultdict(list)
  for r in records:
    if r.user_id in user_row:
      by_session[r.session_id].append(r)
  category_index = {c: i for i, c in enumerate(spec.categories)}
  user, history, slates, choice = [], [], [], []
  for session_id, turns_ in by_session.items():
    if len(turns_) != turns:
      raise schema.RecordError(
        f"{source}: session {session_id!r}: field 'turn': {len(turns_)} turns; the agent "
        f"needs complete sessions of {turns}"
      )
    if turns_[0].start_text_row < 0:
      raise schema.RecordError(
        f"{source}: session {session_id!r}, turn 0: field 'start_text_row': the start "
        "prompt has no text features (embed it first)"
      )
    user.append(user_row[turns_[0].user_id])
    chosen = [r.choice for r in turns_]
    history_rows = [turns_[0].start_text_row] + [r.options[r.choice].text_row for r in turns_]
    history.append(table.text[history_rows])
    slates.append(
      [_padded_slate(r, category_index, spec.slate_size, spec.images_per_option) for r in turns_]
    )
    choice.append(chosen)
  text_rows, image_rows, category, option_mask, image_mask = (
    np.asarray([[turn[i] for turn in session] for session in slates]) for i in range(5)
  )
  slate_text = np.where(option_mask[..., None], np.asarray(table.text)[text_rows], 0.0)
  return Sessions(
    user=np.asarray(user, np.int32),
    history=np.stack(history).astype(np.float32),
    slate_text=slate_text.astype(np.float32),
    image_rows=image_rows,
    category=category,
    choice=np.asarray(choice, np.int32),
    option_mask=option_mask,
    image_mask=image_mask,
  )


def map_sessions(
  kernel: Callable[..., chex.Array],
  inputs: Callable[[np.ndarray], tuple],
  num_sessions: int,
  sessions_per_call: int = SESSIONS_PER_CALL,
) -> np.ndarray:
  """`kernel(*inputs(rows))` over the sessions, `sessions_per_call` at a time: the outputs
  [sessions_per_call, ...] of every call stacked on the host, [num_sessions, ...].

  `inputs(rows)` gives one call's arguments for the sessions `rows` i64[sessions_per_call] (the last
  call's padded by repeating the last session), so a call reads the features of `sessions_per_call`
  sessions only and every call has the same shapes (one compilation). The next call is dispatched
  before a call's output is copied to the host, so copying overlaps computing.
  """
  if sessions_per_call < 1:
    raise ValueError(f"agent.data.map_sessions: sessions_per_call={sessions_per_call} must be >= 1")
  if num_sessions < 1:
    raise ValueError("agent.data.map_sessions: no sessions; the records hold no complete session")
  host, pending = None, None
  for start in range(0, num_sessions, sessions_per_call):
    rows = np.minimum(np.arange(start, start + sessions_per_call), num_sessions - 1)
    current = start, kernel(*inputs(rows))
    if pending is not None:
      host = _copy_rows(host, *pending, num_sessions)
    pending = current
  return _copy_rows(host, *pending, num_sessions)


def _copy_rows(
  host: np.ndarray | None, start: int, out: chex.Array, num_sessions: int
) -> np.ndarray:
  """Copies the real sessions of one call's output `out` [C, ...] into host rows from `start`
  (allocating host [num_sessions, ...] on the first call); returns host."""
  out = np.asarray(out)
  if host is None:
    host = np.empty((num_sessions,) + out.shape[1:], out.dtype)
  real = min(len(out), num_sessions - start)
  host[start : start + real] = out[:real]
  return host


def _slate_features(
  image: np.ndarray, sessions: Sessions, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """The slates of sessions `rows` i[C], gathered on the host from the feature table's image rows
  f32[N_img, D]: (image f32[C, H, L, M, D], text f32[C, H, L, D], image mask bool[C, H, L, M] or
  None)."""
  image_mask = None if sessions.image_mask is None else sessions.image_mask[rows]
  return image[sessions.image_rows[rows]], sessions.slate_text[rows], image_mask


def _option_mask(sessions: Sessions) -> np.ndarray:
  """bool[S, H, L] the options shown (every option when `sessions.option_mask` is None)."""
  if sessions.option_mask is None:
    return np.ones(sessions.category.shape, bool)
  return sessions.option_mask


@jax.jit
def expected_chosen_utility(
  users,
  image: chex.Array,
  text: chex.Array,
  choice: chex.Array,
  weights: chex.Array,
  image_mask: chex.Array | None = None,
) -> chex.Array:
  """Σ_k weights_k R^k(chosen column): image f32[S, H, L, M, D], text f32[S, H, L, D], choice i32[S, H],
  weights f32[S, K] (a user's type posterior), image_mask bool[S, H, L, M] (None: every image is
  real) -> f32[S, H]."""
  utilities, _ = users.utilities(image, text, image_mask)  # [S, H, L, K]
  chosen = jnp.take_along_axis(utilities, choice[..., None, None], axis=2)[:, :, 0]  # [S, H, K]
  return jnp.einsum("shk,sk->sh", chosen, weights)


def label_rewards(
  users,
  table: types.FeatureTable,
  sessions: Sessions,
  posteriors: np.ndarray,
  sessions_per_call: int = SESSIONS_PER_CALL,
) -> np.ndarray:
  """Reward of each logged turn: the fitted model's utility of the chosen column, averaged over the
  user's type posterior (posteriors f32[U, K], rows as in `sessions.user`): f32[S, H].
  `sessions_per_call` sessions per device call (`map_sessions`)."""
  image, posteriors = np.asarray(table.image), np.asarray(posteriors)

  def inputs(rows: np.ndarray) -> tuple:
    image_, text, image_mask = _slate_features(image, sessions, rows)
    weights = posteriors[sessions.user[rows]]
    return users, image_, text, sessions.choice[rows], weights, image_mask

  return map_sessions(expected_chosen_utility, inputs, len(sessions.choice), sessions_per_call)


@struct.dataclass
class Transitions:
  """N turns (logged or simulated), leading axis [N]: the state before turn t, the slate shown, the choice,
  the reward and the state after it.

  history: f32[N, H + 1, D] text features of the session's start prompt (row 0) and of the prompt chosen
    at turn t (row t + 1); the state before turn t reads rows <= t, the state after it rows <= t + 1.
  history_mask: bool[N, H + 1] rows <= turn; turn: i32[N] in [0, H).
  slate_text: f32[N, L, D]; slate_category: i32[N, L]; choice: i32[N] the chosen column.
  reward: f32[N]; next_history_mask: bool[N, H + 1] rows <= turn + 1; next_turn: i32[N] = turn + 1;
  not_done: f32[N] 0 after a session's last turn, else 1; slate_mask: bool[N, L] the options shown
  (a logged slate may lack unavailable ones; padding has zero text, category 0), None: every option.

  What a policy may read besides the text (None when no policy reads it; see `value.ScorePolicy`):
  log_belief: f32[N, K] the belief model's log posterior over types given the session's choices before
  turn t; next_log_belief: f32[N, K] the same after turn t's choice; slate_images: f32[N, L, D] each
  option's image features averaged over its real images (zeros on padding); history_images:
  f32[N, H, D] the same of the option chosen at each turn of the session (row u: turn u's; the state
  before turn t reads the rows u < t, history_mask[:, 1:], the state after it the rows u <= t). None
  of them is, or is computed from, the user's true type.
  """

  history: chex.Array
  history_mask: chex.Array
  turn: chex.Array
  slate_text: chex.Array
  slate_category: chex.Array
  choice: chex.Array
  reward: chex.Array
  next_history_mask: chex.Array
  next_turn: chex.Array
  not_done: chex.Array
  slate_mask: chex.Array | None = None
  log_belief: chex.Array | None = None
  next_log_belief: chex.Array | None = None
  slate_images: chex.Array | None = None
  history_images: chex.Array | None = None

  @property
  def size(self) -> int:
    return self.turn.shape[0]


def _transitions(
  history: np.ndarray,
  slate_text: np.ndarray,
  category: np.ndarray,
  choice: np.ndarray,
  reward: np.ndarray,
  option_mask: np.ndarray | None = None,
  log_belief: np.ndarray | None = None,
  slate_images: np.ndarray | None = None,
  history_images: np.ndarray | None = None,
) -> Transitions:
  """Session arrays (history [S, H + 1, D], slate_text [S, H, L, D], category [S, H, L], choice [S, H],
  reward [S, H], option_mask [S, H, L] or None for full slates; log_belief [S, H + 1, K] before each
  turn and after the last, slate_images [S, H, L, D], history_images [S, H, D], or None) flattened to
  S·H transitions, session-major (transition s·H + t is turn t of session s)."""
  sessions, turns = choice.shape
  if np.shape(reward) != (sessions, turns):
    raise ValueError(
      f"rewards have shape {np.shape(reward)}; the sessions need [S, H] = {(sessions, turns)}"
    )
  turn = np.tile(np.arange(turns, dtype=np.int32), sessions)
  rows = np.arange(turns + 1)

  def flat(x: np.ndarray | None) -> np.ndarray | None:
    return (
      None if x is None else np.asarray(x, np.float32).reshape((sessions * turns,) + x.shape[2:])
    )

  def per_turn(x: np.ndarray | None) -> np.ndarray | None:
    return None if x is None else np.repeat(np.asarray(x, np.float32), turns, axis=0)

  return Transitions(
    history=per_turn(history),
    history_mask=rows[None, :] <= turn[:, None],
    turn=turn,
    slate_text=np.asarray(slate_text, np.float32).reshape(
      (sessions * turns,) + slate_text.shape[2:]
    ),
    slate_category=np.asarray(category, np.int32).reshape(sessions * turns, -1),
    choice=np.asarray(choice, np.int32).reshape(-1),
    reward=np.asarray(reward, np.float32).reshape(-1),
    next_history_mask=rows[None, :] <= turn[:, None] + 1,
    next_turn=turn + 1,
    not_done=(turn + 1 < turns).astype(np.float32),
    slate_mask=(
      np.ones(np.shape(category), bool) if option_mask is None else np.asarray(option_mask, bool)
    ).reshape(sessions * turns, -1),
    log_belief=None if log_belief is None else flat(log_belief[:, :-1]),
    next_log_belief=None if log_belief is None else flat(log_belief[:, 1:]),
    slate_images=flat(slate_images),
    history_images=per_turn(history_images),
  )


def transitions_from_sessions(
  sessions: Sessions,
  rewards: np.ndarray,
  log_belief: np.ndarray | None = None,
  slate_images: np.ndarray | None = None,
  history_images: np.ndarray | None = None,
) -> Transitions:
  """Logged sessions with reward labels f32[S, H] (e.g. `label_rewards`) as S·H transitions; with
  log_belief f32[S, H + 1, K] (`session_beliefs`), slate_images f32[S, H, L, D]
  (`session_slate_images`) and history_images f32[S, H, D] (`chosen_images`) when a policy reads
  them."""
  return _transitions(
    sessions.history,
    sessions.slate_text,
    sessions.category,
    sessions.choice,
    rewards,
    sessions.option_mask,
    log_belief,
    slate_images,
    history_images,
  )


def transitions_from_trajectories(
  trajectories: simulator.Trajectories,
  with_belief: bool = False,
  slate_images: np.ndarray | None = None,
  history_images: np.ndarray | None = None,
) -> Transitions:
  """Simulated rollouts (N users × H turns; reads history, slate_text, category, choice, reward) as N·H
  transitions; `with_belief`: with the belief the environment computed before and after each turn
  (`log_belief`, from the belief model and the choices only); slate_images f32[N, H, L, D] and
  history_images f32[N, H, D] when a policy reads them."""
  t = trajectories
  return _transitions(
    np.asarray(t.history),
    np.asarray(t.slate_text),
    np.asarray(t.category),
    np.asarray(t.choice),
    np.asarray(t.reward),
    log_belief=np.asarray(t.log_belief) if with_belief else None,
    slate_images=slate_images,
    history_images=history_images,
  )


@jax.jit
def session_beliefs_kernel(users, image, text, option_mask, image_mask, choice) -> chex.Array:
  """`session_beliefs` of S sessions' gathered slates: image f32[S, H, L, M, D], text
  f32[S, H, L, D], option_mask bool[S, H, L], image_mask bool[S, H, L, M] or None, choice i32[S, H]
  -> f32[S, H + 1, K]."""
  utilities, tau = users.utilities(image, text, image_mask)  # [S, H, L, K]
  turn_mask = jnp.ones(choice.shape[-1], bool)
  return jax.vmap(posterior.filter_beliefs, in_axes=(None, 0, None, 0, 0, None))(
    users.log_priors, utilities, tau, option_mask, choice, turn_mask
  )


def session_beliefs(
  users,
  table: types.FeatureTable,
  sessions: Sessions,
  sessions_per_call: int = SESSIONS_PER_CALL,
) -> np.ndarray:
  """The belief model's (`users`, e.g. the fitted `utility.FittedUsers`) log posterior over types before
  each turn of a session and after its last, from the prior and that session's own slates and choices
  (as the simulator's `Observation.log_belief`): f32[S, H + 1, K]. `sessions_per_call` sessions per
  device call (`map_sessions`)."""
  image, option_mask = np.asarray(table.image), _option_mask(sessions)

  def inputs(rows: np.ndarray) -> tuple:
    image_, text, image_mask = _slate_features(image, sessions, rows)
    return users, image_, text, option_mask[rows], image_mask, sessions.choice[rows]

  return map_sessions(session_beliefs_kernel, inputs, len(sessions.choice), sessions_per_call)


pooled_images_kernel = jax.jit(value.pooled_images)


def session_slate_images(
  table: types.FeatureTable, sessions: Sessions, sessions_per_call: int = SESSIONS_PER_CALL
) -> np.ndarray:
  """Each shown option's image features averaged over its real images (`value.pooled_images`; zeros on
  padded options): f32[S, H, L, D]. `sessions_per_call` sessions per device call (`map_sessions`)."""
  image = np.asarray(table.image)

  def inputs(rows: np.ndarray) -> tuple:
    image_, _, image_mask = _slate_features(image, sessions, rows)
    return image_, image_mask

  return map_sessions(pooled_images_kernel, inputs, len(sessions.choice), sessions_per_call)


def chosen_images(slate_images: np.ndarray, choice: np.ndarray) -> np.ndarray:
  """The pooled images of the option chosen at each turn: slate_images f32[S, H, L, D]
  (`session_slate_images`), choice i32[S, H] -> f32[S, H, D]."""
  return np.take_along_axis(slate_images, choice[..., None, None], axis=2)[:, :, 0]


IMAGE_INPUTS = frozenset({"images", "chosen_images"})


def image_inputs(
  slate_images: np.ndarray | None, choice: np.ndarray, inputs: frozenset[str]
) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(slate_images f32[S, H, L, D], the chosen options' `chosen_images` f32[S, H, D]) as policies
  reading `inputs` read them (None when none does); slate_images may be None unless `inputs` meets
  IMAGE_INPUTS."""
  return (
    slate_images if "images" in inputs else None,
    chosen_images(slate_images, choice) if "chosen_images" in inputs else None,
  )


def select_inputs(transitions: Transitions, inputs: frozenset[str]) -> Transitions:
  """`transitions` without the fields a policy reading `inputs` (`value.OFFLINE_INPUTS`) does not
  read, so its batches gather nothing else."""
  belief = "belief" in inputs
  return transitions.replace(
    log_belief=transitions.log_belief if belief else None,
    next_log_belief=transitions.next_log_belief if belief else None,
    slate_images=transitions.slate_images if "images" in inputs else None,
    history_images=transitions.history_images if "chosen_images" in inputs else None,
  )


def mix_counts(data_mix: str, sim_fraction: float, batch_size: int) -> tuple[int, int]:
  """(real, simulated) transitions in each batch of `batch_size` under `data_mix`."""
  if data_mix not in DATA_MIXES:
    raise ValueError(f"data mix {data_mix!r}: must be one of {DATA_MIXES}")
  if data_mix == "real":
    return batch_size, 0
  if data_mix == "sim":
    return 0, batch_size
  num_sim = round(sim_fraction * batch_size)
  if not 0 < num_sim < batch_size:
    raise ValueError(
      f"data mix 'real+sim': sim_fraction={sim_fraction} of batch_size={batch_size} leaves "
      f"{num_sim} simulated transitions; both sources need at least one"
    )
  return batch_size - num_sim, num_sim


def mix_sources(
  data_mix: str,
  sim_fraction: float,
  batch_size: int,
  real: Transitions | None,
  sim: Transitions | None,
) -> tuple[tuple[Transitions, ...], tuple[int, ...]]:
  """The datasets each batch draws from under `data_mix` and how many transitions from each (real first)."""
  used = [
    (name, dataset, count)
    for name, dataset, count in zip(
      ("real", "sim"), (real, sim), mix_counts(data_mix, sim_fraction, batch_size)
    )
    if count
  ]
  for name, dataset, _ in used:
    if dataset is None or dataset.size == 0:
      raise ValueError(f"data mix {data_mix!r} needs {name} transitions; none were given")
  if len(used) == 2:
    for field in (f.name for f in dataclasses.fields(Transitions)):
      a, b = np.shape(getattr(real, field))[1:], np.shape(getattr(sim, field))[1:]
      if a != b:
        raise ValueError(
          f"data mix 'real+sim': field '{field}' has per-transition shape {a} in the real and {b} "
          "in the simulated transitions"
        )
  return tuple(dataset for _, dataset, _ in used), tuple(count for _, _, count in used)


def sample_batch(
  key: chex.PRNGKey, datasets: tuple[Transitions, ...], counts: tuple[int, ...]
) -> Transitions:
  """counts[i] transitions drawn uniformly with replacement from datasets[i] (key fold_in(key, i)),
  concatenated in order: a batch of sum(counts)."""
  parts = []
  for i, (dataset, count) in enumerate(zip(datasets, counts)):
    index = jax.random.randint(jax.random.fold_in(key, i), (count,), 0, dataset.size)
    parts.append(jax.tree.map(lambda x, index=index: x[index], dataset))
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
