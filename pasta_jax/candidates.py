"""Candidate generators behind one interface (`simulator.CandidateGenerator`):

  start(key) -> prompt;  generate(key, prompt) -> (candidates[L_C], category i32[L_C]);
  text_features(prompts) -> f32[..., D];  render(prompts, seeds i32[..., M]) -> f32[..., M, D].

`data.synthetic.SyntheticExpander` is the synthetic world's expander. `ReplayGenerator` serves an external
LMM's cached expansions (Gemini, Gemma, any) from a JSON Lines file, so that a real LMM drives training
and evaluation with no model call at train time; its images come from a rendered pool, so responders
with a precomputed (image × type) table (`utility.UtilityTable`) score them by row. Each line is one
expansion of one prompt:

  {"prompt": "a cat", "candidates": [{"text": "a cat, watercolor", "category": "style"}, ...]}

with exactly L_C candidates, L_C / C in each of the C categories. A prompt may have several lines (several
sampled expansions); `generate` draws one of them. A prompt an agent can reach without an entry is either an
error when the cache is loaded (`unexpanded="error"`: the cache is closed under expansion up to H - 1 turns)
or is expanded like the most similar prompt (CLIP text cosine) that has one (`unexpanded="nearest"`), which
keeps the LMM and rendering budget linear in the number of cached expansions.
"""

import collections
import dataclasses
import json
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from pasta_jax import files
from pasta_jax.config_checks import check, check_positive_int

UNEXPANDED = ("error", "nearest")
MAX_REPORTED_ERRORS = 20


def validate_config(config: ml_collections.ConfigDict, simulate: bool) -> None:
  """Raises ConfigError naming the first invalid `candidates` field; the replay cache is needed when
  `simulate` (the simulate stage on real data)."""
  c = config.candidates
  if simulate:
    check(
      bool(c.replay_cache),
      "candidates.replay_cache",
      c.replay_cache,
      "must name a file or directory",
    )
  check_positive_int(config, "candidates.pool_size")
  images = config.interaction.images_per_prompt
  check(
    c.pool_size >= images,
    "candidates.pool_size",
    c.pool_size,
    f"must be >= interaction.images_per_prompt={images}, so that no image repeats within a column",
  )
  check(c.unexpanded in UNEXPANDED, "candidates.unexpanded", c.unexpanded, f"one of {UNEXPANDED}")


class ReplayCacheError(ValueError):
  """A missing or malformed cache entry; the message names the file, line and field or prompt."""


@struct.dataclass
class ReplayGenerator:
  """Cached expansions over a prompt vocabulary of P texts (a prompt is its i32 vocabulary index); a
  `simulator.PooledGenerator`.

  expansions: i32[P, R, L_C] vocabulary indices of candidates (R = most expansions of any prompt);
  category: i32[P, R, L_C]; num_expansions: i32[P] (0 for prompts that are never expanded);
  start_prompts: i32[S]; text: f32[P, D] text features; image_rows: i32[P, pool] rows of `image`
  rendered for each prompt; image: f32[N_img, D].
  """

  expansions: chex.Array
  category: chex.Array
  num_expansions: chex.Array
  start_prompts: chex.Array
  text: chex.Array
  image_rows: chex.Array
  image: chex.Array

  def start(self, key: chex.PRNGKey) -> chex.Array:
    return jax.random.choice(key, self.start_prompts)

  def generate(self, key: chex.PRNGKey, prompt: chex.Array) -> tuple[chex.Array, chex.Array]:
    which = jax.random.randint(key, (), 0, jnp.maximum(self.num_expansions[prompt], 1))
    return self.expansions[prompt, which], self.category[prompt, which]

  def text_features(self, prompts: chex.Array) -> chex.Array:
    return self.text[prompts]

  def pool_rows(self, prompts: chex.Array, seeds: chex.Array) -> chex.Array:
    """Rows of `image` shown for each prompt: M consecutive pool images (cyclically) from pool image
    seeds[..., 0] % pool, so no image repeats within a column when pool >= M. prompts i32[...],
    seeds i32[..., M] -> i32[..., M]."""
    pool = self.image_rows.shape[-1]
    offsets = (seeds[..., :1] % pool + jnp.arange(seeds.shape[-1])) % pool
    return self.image_rows[prompts[..., None], offsets]

  def render(self, prompts: chex.Array, seeds: chex.Array) -> chex.Array:
    """prompts i32[...], seeds i32[..., M] -> f32[..., M, D]."""
    return self.image[self.pool_rows(prompts, seeds)]


def _text(value, field: str) -> str:
  """`value` when it is a string with a non-blank character; ValueError naming `field` otherwise."""
  if not isinstance(value, str):
    raise ValueError(f"field '{field}': expected a string, got {type(value).__name__} {value!r}")
  if not value.strip():
    raise ValueError(f"field '{field}': empty text {value!r}; expected a prompt")
  return value


def _parse_entry(
  raw: bytes, category_index: dict[str, int], num_candidates: int
) -> tuple[str, list[str], list[int]]:
  """(prompt, candidate texts, category indices) of one cache line; ValueError naming the field.

  Checks: UTF-8, JSON without duplicated keys or absurd nesting, an object with a non-blank string
  `prompt` and a list `candidates` of exactly `num_candidates` objects, each with a non-blank
  string `text` (an LMM may repeat a text) and a string `category` of `category_index`, the same
  number of candidates in every category.
  """
  try:
    obj = json.loads(raw.decode("utf-8"), object_pairs_hook=files.unique_keys)
  except UnicodeDecodeError as e:
    raise ValueError(f"invalid UTF-8 at byte {e.start} of the line") from None
  except RecursionError:
    raise ValueError("not JSON (nested too deeply)") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"not JSON ({e})") from None
  if not isinstance(obj, dict):
    raise ValueError(
      f"expected a JSON object with 'prompt' and 'candidates', got {type(obj).__name__}"
    )
  for key in ("prompt", "candidates"):
    if key not in obj:
      raise ValueError(f"field '{key}' is missing")
  prompt = _text(obj["prompt"], "prompt")
  candidates = obj["candidates"]
  if not isinstance(candidates, list) or len(candidates) != num_candidates:
    got = len(candidates) if isinstance(candidates, list) else type(candidates).__name__
    raise ValueError(f"field 'candidates': expected a list of {num_candidates}, got {got}")
  texts, cats = [], []
  for j, c in enumerate(candidates):
    field = f"candidates[{j}]"
    if not isinstance(c, dict):
      raise ValueError(f"field '{field}': expected an object with 'text' and 'category'")
    text = _text(c.get("text"), f"{field}.text")
    category = c.get("category")
    if not isinstance(category, str) or category not in category_index:
      raise ValueError(
        f"field '{field}.category': unknown category {category!r}; "
        f"expected one of {list(category_index)}"
      )
    texts.append(text)
    cats.append(category_index[category])
  counts = np.bincount(cats, minlength=len(category_index))
  if np.any(counts != num_candidates // len(category_index)):
    raise ValueError(
      f"field 'candidates': expected {num_candidates // len(category_index)} per category, got "
      f"{dict(zip(category_index, counts.tolist()))}"
    )
  return prompt, texts, cats


def _raise_if_any(errors: list[str]) -> None:
  if errors:
    more = len(errors) - MAX_REPORTED_ERRORS
    tail = [f"... and {more} more"] if more > 0 else []
    raise ReplayCacheError("\n".join(errors[:MAX_REPORTED_ERRORS] + tail))


def read_cache(
  path: str, categories: Sequence[str], num_candidates: int
) -> dict[str, list[tuple[list[str], list[int], int]]]:
  """prompt -> [(candidate texts, category indices, line number)] of a cache file (blank lines
  skipped); ReplayCacheError naming the file, the line and the field of every malformed line
  (`_parse_entry`), an unreadable file, or a file without any entry."""
  category_index = {c: i for i, c in enumerate(categories)}
  try:
    parsed, errors, lines = files.parse_json_lines(
      path, lambda raw: _parse_entry(raw, category_index, num_candidates), (ValueError,)
    )
  except OSError as e:
    raise ReplayCacheError(f"{path}: cannot be read ({e}); check candidates.replay_cache") from e
  _raise_if_any(errors)
  if not parsed:
    raise ReplayCacheError(f"{path}: no expansions; {files.why_empty(lines)}")
  entries = collections.defaultdict(list)
  for line_no, (prompt, texts, cats) in parsed:
    entries[prompt].append((texts, cats, line_no))
  return entries


def _check_reachable(path: str, entries, start_prompts: Sequence[str], turns: int) -> None:
  frontier = {p: None for p in start_prompts}
  for depth in range(turns):
    following = {}
    for prompt, parent_line in frontier.items():
      if prompt not in entries:
        where = "a start prompt" if parent_line is None else f"a candidate at line {parent_line}"
        raise ReplayCacheError(
          f"{path}: no cache entry for prompt {prompt!r} ({where}, reachable at turn "
          f"{depth} of {turns}); add a line with this prompt and its expansions"
        )
      if depth + 1 < turns:
        for texts, _, line_no in entries[prompt]:
          following.update({t: line_no for t in texts if t not in following})
    frontier = following


@dataclasses.dataclass(frozen=True)
class ReplayCache:
  """A validated replay cache: `entries` prompt -> [(candidate texts, category indices, line number)];
  `vocabulary` every start prompt, expanded prompt and candidate text, each once (index = prompt id)."""

  path: str
  entries: dict[str, list[tuple[list[str], list[int], int]]]
  start_prompts: tuple[str, ...]
  vocabulary: tuple[str, ...]


def read_replay_cache(
  path: str,
  start_prompts: Sequence[str],
  categories: Sequence[str],
  num_candidates: int,
  turns: int,
  unexpanded: str = "error",
) -> ReplayCache:
  """Reads and validates a cache. unexpanded="error": every prompt reachable from a start prompt within
  H - 1 turns must have an entry; "nearest": a prompt without one is expanded like its nearest neighbour
  (see `build_generator`), so the cache may hold only the expansions an LMM was actually asked for."""
  if unexpanded not in UNEXPANDED:
    raise ValueError(f"unexpanded={unexpanded!r}: one of {UNEXPANDED}")
  entries = read_cache(path, categories, num_candidates)
  if unexpanded == "error":
    _check_reachable(path, entries, start_prompts, turns)
  vocabulary = tuple(
    dict.fromkeys(
      list(start_prompts)
      + list(entries)
      + [t for lines in entries.values() for texts, _, _ in lines for t in texts]
    )
  )
  return ReplayCache(
    path=path, entries=dict(entries), start_prompts=tuple(start_prompts), vocabulary=vocabulary
  )


def nearest_expanded(
  cache: ReplayCache, text: np.ndarray, block: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
  """(source i[P], cosine f32[P]): for each vocabulary prompt, the prompt whose expansions it uses (itself when
  it has an entry, else the expanded prompt of highest cosine similarity of text features, text f32[P, D]) and
  that similarity (1 for expanded prompts). Computed `block` unexpanded prompts at a time."""
  unit = text / np.maximum(np.linalg.norm(text, axis=-1, keepdims=True), 1e-12)
  expanded = np.asarray([t in cache.entries for t in cache.vocabulary])
  source, cosine = np.arange(len(cache.vocabulary)), np.ones(len(cache.vocabulary), np.float32)
  keys = unit[expanded]
  index = np.flatnonzero(expanded)
  unexpanded = np.flatnonzero(~expanded)
  for start in range(0, len(unexpanded), block):
    rows = unexpanded[start : start + block]
    similarity = unit[rows] @ keys.T
    best = np.argmax(similarity, axis=-1)
    source[rows], cosine[rows] = index[best], similarity[np.arange(len(rows)), best]
  return source, cosine


def build_generator(
  cache: ReplayCache,
  text: np.ndarray,
  image_rows: np.ndarray,
  image: np.ndarray,
  source: np.ndarray | None = None,
) -> ReplayGenerator:
  """The generator over `cache.vocabulary`: text f32[P, D] and image_rows i32[P, pool] aligned with it,
  image f32[N_img, D]. A prompt without an entry is expanded like `source` i[P] (`nearest_expanded`, computed
  here unless given) says."""
  vocabulary, num_candidates = cache.vocabulary, len(next(iter(cache.entries.values()))[0][0])
  if text.shape[0] != len(vocabulary) or image_rows.shape[0] != len(vocabulary):
    raise ReplayCacheError(
      f"{cache.path}: {len(vocabulary)} prompts, but {text.shape[0]} text feature rows and "
      f"{image_rows.shape[0]} image pools"
    )
  index = {t: i for i, t in enumerate(vocabulary)}
  most = max(len(v) for v in cache.entries.values())
  expansions = np.zeros((len(vocabulary), most, num_candidates), np.int32)
  category = np.zeros_like(expansions)
  num_expansions = np.zeros((len(vocabulary),), np.int32)
  for prompt, lines in cache.entries.items():
    p = index[prompt]
    num_expansions[p] = len(lines)
    for r, (texts, cats, _) in enumerate(lines):
      expansions[p, r] = [index[t] for t in texts]
      category[p, r] = cats
  if source is None:
    source, _ = nearest_expanded(cache, text)
  return ReplayGenerator(
    expansions=jnp.asarray(expansions[source]),
    category=jnp.asarray(category[source]),
    num_expansions=jnp.asarray(num_expansions[source]),
    start_prompts=jnp.asarray([index[p] for p in cache.start_prompts], jnp.int32),
    text=jnp.asarray(text, jnp.float32),
    image_rows=jnp.asarray(image_rows, jnp.int32),
    image=jnp.asarray(image, jnp.float32),
  )


def save_generator(
  path: str, generator: ReplayGenerator, vocabulary: Sequence[str], image_refs: np.ndarray
) -> None:
  """The generator's arrays, its vocabulary and the reference (file) of every pool image (str[N_img]), as .npz."""
  arrays = {
    f.name: np.asarray(getattr(generator, f.name)) for f in dataclasses.fields(ReplayGenerator)
  }
  files.save_npz(
    path,
    vocabulary=np.asarray(vocabulary, np.str_),
    image_refs=np.asarray(image_refs, np.str_),
    **arrays,
  )


def load_generator(
  path: str, remedy: str = "re-run the simulate stage"
) -> tuple[ReplayGenerator, tuple[str, ...], np.ndarray]:
  """(generator, vocabulary, image refs) written by `save_generator`; ValueError naming the file otherwise."""
  fields = [f.name for f in dataclasses.fields(ReplayGenerator)]
  z = files.load_npz(path, fields + ["vocabulary", "image_refs"], remedy)
  generator = ReplayGenerator(**{name: jnp.asarray(z[name]) for name in fields})
  return generator, tuple(str(t) for t in z["vocabulary"]), z["image_refs"]
