"""What a live session needs from a trained workdir: its config, the fitted user model (the agent's
belief), the candidate generator, the policies a person can pick, and start prompts.

Every missing piece raises `WorkspaceError` with a message a person can act on; a workdir without a
trained agent still serves the greedy and random baselines, with a `notice` saying so.
"""

import collections
import dataclasses
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from pasta_jax import artefacts, files, provenance
from pasta_jax.agent import baselines, registry
from pasta_jax.data import synthetic
from pasta_jax.user_model import utility

MAIN_POLICY = "iql/real+sim"
NUM_STARTS = 24


class WorkspaceError(ValueError):
  """The workdir cannot serve a session; the message says why and what to run."""


@dataclasses.dataclass(frozen=True)
class StartPrompt:
  """text: what the person reads; prompt: the generator's prompt (a pytree)."""

  text: str
  prompt: Any


@dataclasses.dataclass(frozen=True)
class Workspace:
  """A workdir's artefacts, loaded once for every session it serves.

  policies: name -> (policy, params), trained ones first, then the baselines; notice: what is missing,
  for the page (None when nothing is); world: the planted world on synthetic data, else None;
  vocabulary and image_refs: the replay pool's prompts and images on real data, else None.
  """

  workdir: str
  config: ml_collections.ConfigDict
  fitted: utility.FittedUsers
  generator: Any
  policies: dict[str, tuple[Any, Any]]
  starts: tuple[StartPrompt, ...]
  notice: str | None
  world: synthetic.World | None
  vocabulary: tuple[str, ...] | None
  image_refs: np.ndarray | None

  @property
  def synthetic(self) -> bool:
    return self.world is not None

  @property
  def render_dir(self) -> str:
    return self.config.embed.render_dir

  def prompt_text(self, prompt) -> str:
    """The text of one generator prompt."""
    if self.synthetic:
      pid = int(synthetic.prompt_id(self.world, prompt))
      return synthetic.prompt_text(*synthetic.prompt_of_id(self.world, pid))
    return self.vocabulary[int(prompt)]

  def image_refs_of(self, prompt, seeds: np.ndarray) -> list[str]:
    """The canonical image references of one prompt rendered under seeds i32[M]: synthetic://<prompt
    id>/<seed> on the synthetic world (as in its rater log), the pool's PNG paths otherwise."""
    if self.synthetic:
      pid = int(synthetic.prompt_id(self.world, prompt))
      return [f"synthetic://{pid}/{int(s)}" for s in seeds]
    rows = np.asarray(self.generator.pool_rows(np.asarray(prompt)[None], np.asarray(seeds)[None]))[
      0
    ]
    return [str(self.image_refs[row]) for row in rows]


def _tuples(tree):
  """JSON lists back into the tuples the config held."""
  if isinstance(tree, dict):
    return {key: _tuples(value) for key, value in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(value) for value in tree)
  return tree


def run_command(workdir: str) -> str:
  return f"python -m pasta_jax.main --config=configs/quickstart.py --workdir={workdir}"


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config the pipeline wrote to WORKDIR/config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise WorkspaceError(
      f"{workdir} holds no pipeline run (no config.json); train one first: {run_command(workdir)}"
    )
  try:
    saved = files.read_json(path, remedy="re-run the pipeline on this workdir")
  except ValueError as e:
    raise WorkspaceError(str(e)) from None
  return ml_collections.ConfigDict(_tuples(saved["config"]))


def _require_stage(workdir: str, stage: str) -> None:
  if provenance.read_marker(workdir, stage) is None:
    raise WorkspaceError(
      f"{workdir} has no fitted {stage.replace('_', ' ')} (the {stage} stage has not finished); "
      f"run it first: {run_command(workdir)}"
    )


def _trained(config, workdir: str, dim: int, fitted) -> tuple[dict, str | None]:
  """The trained policies, or none with the notice that says why."""
  if provenance.read_marker(workdir, "agent") is None:
    notice = (
      f"{workdir} has no trained agent (the agent stage has not finished): only the greedy and random "
      f"baselines are offered. Train one with: {run_command(workdir)}"
    )
    return {}, notice
  names = sorted(registry.trained_policies(config), key=lambda name: name != MAIN_POLICY)
  return {name: registry.load_policy(config, workdir, name, dim, fitted) for name in names}, None


def _baselines(config, fitted: utility.FittedUsers) -> dict[str, tuple[Any, Any]]:
  sizes = dict(
    num_categories=len(config.interaction.categories), slate_size=config.interaction.slate_size
  )
  return {
    "greedy": (baselines.Greedy(**sizes), fitted),
    "random": (baselines.RandomSlate(**sizes), None),
  }


def _start_prompts(config, generator, world, vocabulary, count: int) -> tuple[StartPrompt, ...]:
  """Start prompts to pick from: the generator's own start distribution (synthetic world) or the pool's
  start prompts (real data), distinct by text."""
  if world is None:
    return tuple(
      StartPrompt(vocabulary[int(i)], int(i)) for i in np.asarray(generator.start_prompts)
    )
  key = jax.random.key(config.seed)
  starts = {}
  for i in range(count):
    prompt = jax.device_get(generator.start(jax.random.fold_in(key, i)))
    pid = int(synthetic.prompt_id(world, prompt))
    starts.setdefault(
      pid, StartPrompt(synthetic.prompt_text(*synthetic.prompt_of_id(world, pid)), prompt)
    )
  return tuple(starts.values())


def load(workdir: str, num_starts: int = NUM_STARTS) -> Workspace:
  """The workspace of a workdir whose data and user_model stages have run; WorkspaceError otherwise."""
  config = load_config(workdir)
  for stage in ("data", "user_model"):
    _require_stage(workdir, stage)
  data = artefacts.load_data(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, data.table.dim)
  world = vocabulary = image_refs = None
  if config.data.source == "synthetic":
    world = artefacts.load_world(config, workdir)
    generator = synthetic.SyntheticExpander(world)
  else:
    from pasta_jax import candidates

    _require_stage(workdir, "simulate")
    generator, vocabulary, image_refs = candidates.load_generator(
      os.path.join(workdir, artefacts.POOL)
    )
  trained, notice = _trained(config, workdir, data.table.dim, fitted)
  return Workspace(
    workdir=workdir,
    config=config,
    fitted=fitted,
    generator=generator,
    policies={**trained, **_baselines(config, fitted)},
    starts=_start_prompts(config, generator, world, vocabulary, num_starts),
    notice=notice,
    world=world,
    vocabulary=vocabulary,
    image_refs=image_refs,
  )


def trigrams(text: str) -> collections.Counter:
  """Character trigrams of the lower-cased, space-padded text."""
  padded = f"  {' '.join(text.lower().split())}  "
  return collections.Counter(padded[i : i + 3] for i in range(len(padded) - 2))


def cosine(a: collections.Counter, b: collections.Counter) -> float:
  dot = sum(count * b[gram] for gram, count in a.items())
  norm = math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))
  return dot / norm if norm else 0.0


def nearest_start(text: str, starts: tuple[StartPrompt, ...]) -> tuple[int, float]:
  """(index, cosine similarity) of the start prompt nearest to a typed prompt by character trigrams."""
  query = trigrams(text)
  similarities = [cosine(query, trigrams(start.text)) for start in starts]
  best = int(np.argmax(similarities))
  return best, similarities[best]
