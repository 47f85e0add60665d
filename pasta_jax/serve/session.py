"""One person's session: H turns of the chosen policy's slates, the person's choices and the agent's
live posterior over user types, saved as canonical records (validated) and exportable in the PASTA
release layout.

The environment is the simulator's (`simulator.Observation`, the generator's expansions and images), but
the choice is the person's: after each click the belief is updated by `posterior.update` under the
fitted user model, exactly as the simulator updates it after a simulated user's choice.
"""

import dataclasses
import functools
import os
import secrets
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pasta_jax import files, simulator, types
from pasta_jax.data import schema
from pasta_jax.serve import workspace as workspace_lib
from pasta_jax.user_model import posterior

SESSIONS_DIR = os.path.join("serve", "sessions")
RECORDS_FILE = "records.jsonl"
FEATURES_FILE = "features.npz"
SUMMARY_FILE = "session.json"
EXPORT_DIR = "pasta_release"


class SessionError(ValueError):
  """A request the session cannot take (a bad column, a finished session); the message says why."""


@functools.partial(jax.jit, static_argnames=("images_per_prompt", "policy"))
def next_slate(
  key,
  generator,
  prompt,
  history,
  history_mask,
  history_images,
  turn,
  log_belief,
  policy,
  policy_params,
  images_per_prompt,
):
  """(candidates, seeds i32[L_C, M], observation, slate i32[L]) of one turn starting from `prompt`;
  history_images f32[H, M, D]: the images of the option chosen at each turn so far (zeros after)."""
  k_gen, k_seed, k_policy = jax.random.split(key, 3)
  candidates, category = generator.generate(k_gen, prompt)
  seeds = jax.random.randint(
    k_seed, category.shape + (images_per_prompt,), 0, jnp.iinfo(jnp.int32).max
  )
  obs = simulator.Observation(
    history=history,
    history_mask=history_mask,
    turn=turn,
    candidate_text=generator.text_features(candidates),
    candidate_images=generator.render(candidates, seeds),
    category=category,
    log_belief=log_belief,
    history_images=history_images,
  )
  return candidates, seeds, obs, policy(k_policy, obs, policy_params)


@jax.jit
def updated_belief(fitted, log_belief, images, text, chosen):
  """log b_{t+1} after choosing column `chosen` of a slate (images f32[L, M, D], text f32[L, D])."""
  utilities, tau = fitted.utilities(images, text)
  return posterior.update(log_belief, utilities, tau, jnp.ones(text.shape[:1], bool), chosen)


@dataclasses.dataclass
class FeatureRows:
  """The session's own feature table, grown one row at a time."""

  image: list = dataclasses.field(default_factory=list)
  text: list = dataclasses.field(default_factory=list)

  def add_text(self, row: np.ndarray) -> int:
    self.text.append(np.asarray(row, np.float32))
    return len(self.text) - 1

  def add_image(self, row: np.ndarray) -> int:
    self.image.append(np.asarray(row, np.float32))
    return len(self.image) - 1

  def table(self, dim: int) -> types.FeatureTable:
    def stack(rows):
      return np.stack(rows) if rows else np.zeros((0, dim), np.float32)

    return types.FeatureTable(image=stack(self.image), text=stack(self.text))


def new_session_id() -> str:
  return secrets.token_hex(6)


class Session:
  """A person's session with one policy. `view()` is what the page and the terminal show."""

  def __init__(
    self,
    ws: workspace_lib.Workspace,
    policy_name: str,
    start: workspace_lib.StartPrompt,
    typed_prompt: str | None = None,
    similarity: float | None = None,
    session_id: str | None = None,
  ):
    if policy_name not in ws.policies:
      raise SessionError(
        f"unknown agent {policy_name!r}; this workdir offers {sorted(ws.policies)}"
      )
    self.ws, self.policy_name, self.start = ws, policy_name, start
    self.typed_prompt, self.similarity = typed_prompt, similarity
    self.session_id = session_id or new_session_id()
    self.started = time.time()
    it = ws.config.interaction
    self.turns, self.slate_size, self.images_per_prompt = (
      it.turns,
      it.slate_size,
      it.images_per_prompt,
    )
    self.categories = tuple(it.categories)
    self.key = jax.random.fold_in(
      jax.random.key(ws.config.seed), int(self.session_id, 16) % (2**31)
    )
    self.rows = FeatureRows()
    self.records: list[schema.ChoiceRecord] = []
    self.choices: list[int] = []
    start_text = np.asarray(ws.generator.text_features(start.prompt))
    self.prompt, self.prompt_text = start.prompt, start.text
    self.prompt_row = self.rows.add_text(start_text)
    self.history = jnp.zeros((self.turns + 1, start_text.shape[-1])).at[0].set(start_text)
    self.history_images = jnp.zeros(
      (self.turns, self.images_per_prompt, start_text.shape[-1]), jnp.float32
    )
    self.log_belief = posterior.initial(jnp.asarray(ws.fitted.log_priors))
    self.beliefs = [np.exp(np.asarray(self.log_belief))]
    self._show_slate()

  @property
  def turn(self) -> int:
    return len(self.choices)

  @property
  def done(self) -> bool:
    return self.turn >= self.turns

  @property
  def directory(self) -> str:
    return os.path.join(self.ws.workdir, SESSIONS_DIR, self.session_id)

  def _show_slate(self) -> None:
    policy, params = self.ws.policies[self.policy_name]
    mask = jnp.arange(self.turns + 1) <= self.turn
    out = next_slate(
      jax.random.fold_in(self.key, self.turn),
      self.ws.generator,
      self.prompt,
      self.history,
      mask,
      self.history_images,
      jnp.asarray(self.turn, jnp.int32),
      self.log_belief,
      policy,
      params,
      self.images_per_prompt,
    )
    candidates, seeds, obs, action = jax.device_get(out)
    self.slate = np.asarray(action)
    self.shown = jax.tree.map(lambda x: x[self.slate], candidates)
    self.seeds = np.asarray(seeds)[self.slate]
    self.text = np.asarray(obs.candidate_text)[self.slate]
    self.images = np.asarray(obs.candidate_images)[self.slate]
    self.category = np.asarray(obs.category)[self.slate]

  def options(self) -> list[dict]:
    """The current slate: text, category and image references of each column."""
    return [
      {
        "column": j,
        "text": self.ws.prompt_text(self._shown(j)),
        "category": self.categories[int(self.category[j])],
        "images": self.ws.image_refs_of(self._shown(j), self.seeds[j]),
        "attributes": self._attributes(j),
      }
      for j in range(self.slate_size)
    ]

  def _shown(self, column: int) -> Any:
    return jax.tree.map(lambda x: x[column], self.shown)

  def _attributes(self, column: int) -> list[int] | None:
    if not self.ws.synthetic:
      return None
    return [int(a) for a in np.asarray(self._shown(column).attributes)]

  def choose(self, column: int) -> None:
    """The person picks a column: records the turn, updates the belief, shows the next slate."""
    if self.done:
      raise SessionError(
        f"session {self.session_id} is finished ({self.turns} turns); start a new one"
      )
    if isinstance(column, bool) or not isinstance(column, int) or not 0 <= column < self.slate_size:
      raise SessionError(
        f"column {column!r} is not a column of the slate; expected 0..{self.slate_size - 1}"
      )
    self.records.append(self._record(column))
    self.log_belief = updated_belief(
      self.ws.fitted,
      self.log_belief,
      jnp.asarray(self.images),
      jnp.asarray(self.text),
      jnp.asarray(column, jnp.int32),
    )
    self.beliefs.append(np.exp(np.asarray(self.log_belief)))
    self.choices.append(column)
    self.prompt, self.prompt_text = self._shown(column), self.records[-1].options[column].text
    self.prompt_row = self.records[-1].options[column].text_row
    self.history = self.history.at[self.turn].set(self.text[column])
    self.history_images = self.history_images.at[self.turn - 1].set(self.images[column])
    self.save()
    if not self.done:
      self._show_slate()

  def _record(self, column: int) -> schema.ChoiceRecord:
    options = []
    for view, text, images in zip(self.options(), self.text, self.images):
      refs = view["images"]
      options.append(
        schema.Option(
          text=view["text"],
          category=view["category"],
          text_row=self.rows.add_text(text),
          images=tuple(
            schema.Image(ref=ref, row=self.rows.add_image(x)) for ref, x in zip(refs, images)
          ),
        )
      )
    user = f"person-{self.session_id}"
    return schema.ChoiceRecord(
      kind=schema.SESSION_TURN,
      user_id=user,
      session_id=f"{user}-s0",
      turn=self.turn,
      start_prompt=self.prompt_text,
      options=tuple(options),
      choice=column,
      user_type=None,
      start_text_row=self.prompt_row,
    )

  def spec(self) -> schema.RecordSpec:
    return schema.RecordSpec(self.categories, self.slate_size, self.images_per_prompt)

  def save(self) -> dict[str, str]:
    """Validates the turns so far and writes records.jsonl, features.npz and session.json."""
    table = self.rows.table(int(self.history.shape[-1]))
    schema.validate_records(self.records, self.spec(), f"session {self.session_id}", table)
    os.makedirs(self.directory, exist_ok=True)
    paths = {
      name: os.path.join(self.directory, name)
      for name in (RECORDS_FILE, FEATURES_FILE, SUMMARY_FILE)
    }
    schema.write_records(paths[RECORDS_FILE], self.records)
    schema.save_features(paths[FEATURES_FILE], table)
    files.write_json(paths[SUMMARY_FILE], self.summary())
    return paths

  def summary(self) -> dict:
    return {
      "session_id": self.session_id,
      "workdir": self.ws.workdir,
      "policy": self.policy_name,
      "typed_prompt": self.typed_prompt,
      "start_prompt": self.start.text,
      "similarity": self.similarity,
      "choices": self.choices,
      "posterior_per_turn": [b.tolist() for b in self.beliefs],
      "started": self.started,
      "turns": self.turns,
    }

  def export(self) -> str:
    """The finished session in the PASTA release layout under its folder; returns the folder."""
    if not self.done:
      raise SessionError(
        f"session {self.session_id} has {self.turn} of {self.turns} turns; finish it before "
        "exporting it in the release layout"
      )
    from pasta_jax.data import pasta_kaggle

    out = os.path.join(self.directory, EXPORT_DIR)
    try:
      pasta_kaggle.export(self.records, out)
    except schema.RecordError as e:
      raise SessionError(f"the release layout cannot hold this session: {e}") from None
    return out

  def view(self) -> dict:
    """JSON-ready state: turn, slate (until done), choices, posterior before each turn and now."""
    return {
      "session_id": self.session_id,
      "policy": self.policy_name,
      "turn": self.turn,
      "turns": self.turns,
      "done": self.done,
      "start_prompt": self.start.text,
      "typed_prompt": self.typed_prompt,
      "similarity": self.similarity,
      "current_prompt": self.prompt_text,
      "slate": [] if self.done else self.options(),
      "choices": self.choices,
      "history": [r.options[r.choice].text for r in self.records],
      "posterior": [float(p) for p in self.beliefs[-1]],
      "posterior_history": [b.tolist() for b in self.beliefs],
      "type_labels": type_labels(self.ws),
      "saved": os.path.join(self.directory, RECORDS_FILE) if self.records else None,
    }


def type_labels(ws: workspace_lib.Workspace) -> list[str]:
  """'type k' for each fitted type, with the planted type it was matched to on synthetic data."""
  num_types = int(np.shape(ws.fitted.log_priors)[0])
  if not ws.synthetic:
    return [f"type {k}" for k in range(num_types)]
  from pasta_jax import artefacts

  planted = artefacts.load_alignment(ws.workdir)
  return [
    f"type {k}" + (f" (planted {int(planted[k])})" if planted[k] >= 0 else "")
    for k in range(num_types)
  ]


def start_session(
  ws: workspace_lib.Workspace,
  policy_name: str,
  prompt: str | None = None,
  start_index: int | None = None,
) -> Session:
  """A new session from a typed prompt (mapped to the nearest start prompt) or a start prompt's index."""
  if start_index is not None:
    if (
      isinstance(start_index, bool)
      or not isinstance(start_index, int)
      or not 0 <= start_index < len(ws.starts)
    ):
      raise SessionError(
        f"start prompt {start_index!r} does not exist; pick one of 0..{len(ws.starts) - 1}"
      )
    return Session(ws, policy_name, ws.starts[start_index])
  if not isinstance(prompt, str) or not prompt.strip():
    raise SessionError("the prompt is empty: type a prompt or pick a start prompt")
  index, similarity = workspace_lib.nearest_start(prompt, ws.starts)
  return Session(
    ws, policy_name, ws.starts[index], typed_prompt=prompt.strip(), similarity=similarity
  )


def load_records(directory: str, dim: int, spec: schema.RecordSpec) -> list[schema.ChoiceRecord]:
  """A saved session's records, validated against its features."""
  records = schema.read_records(os.path.join(directory, RECORDS_FILE))
  table = schema.load_features(os.path.join(directory, FEATURES_FILE), dim)
  schema.validate_records(records, spec, directory, table)
  return records
