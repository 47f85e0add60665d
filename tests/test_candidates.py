"""The replay candidate generator (an external LMM's cached expansions) and the simulator's tabulated fast path."""

import json
import re

import jax
import numpy as np
import pytest

from pasta_jax import candidates, parallel, simulator, types
from pasta_jax.agent import baselines
from pasta_jax.user_model import utility

CATEGORIES = ("rephrase", "expansion", "style", "subject_change", "creative")
STARTS = ("a cat", "a dog")
TEXTS = tuple(f"{c} edit {j}" for c in CATEGORIES for j in range(5))
DIM, POOL, TURNS = 6, 6, 3


def _line(prompt, order):
  return {
    "prompt": prompt,
    "candidates": [{"text": TEXTS[i], "category": TEXTS[i].split(" ")[0]} for i in order],
  }


def _write(path, lines):
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  return str(path)


@pytest.fixture(scope="module")
def cache_lines():
  rng = np.random.default_rng(0)
  lines = [_line(p, rng.permutation(len(TEXTS))) for p in STARTS + TEXTS]
  return lines + [
    _line("a cat", rng.permutation(len(TEXTS)))
  ]  # A second sampled expansion of "a cat".


@pytest.fixture(scope="module")
def features():
  rng = np.random.default_rng(1)
  vocabulary = STARTS + TEXTS
  image = rng.normal(size=(len(vocabulary) * POOL, DIM)).astype(np.float32)
  text = {t: rng.normal(size=DIM).astype(np.float32) for t in vocabulary}
  pool = {t: np.arange(i * POOL, (i + 1) * POOL) for i, t in enumerate(vocabulary)}
  return text, pool, image


def _load(path, features, starts=STARTS, unexpanded="error"):
  """(generator, vocabulary) of the cache with the features of `features` (text -> f32[D], text -> pool rows,
  image table) aligned with its vocabulary."""
  text, pool, image = features
  cache = candidates.read_replay_cache(path, starts, CATEGORIES, len(TEXTS), TURNS, unexpanded)
  vocabulary = cache.vocabulary
  rows = np.stack([pool[t] for t in vocabulary])
  return candidates.build_generator(
    cache, np.stack([text[t] for t in vocabulary]), rows, image
  ), vocabulary


def test_replay_generator_serves_the_cached_expansions(tmp_path, cache_lines, features):
  generator, vocabulary = _load(_write(tmp_path / "cache.jsonl", cache_lines), features)
  cat = vocabulary.index("a cat")
  assert int(generator.num_expansions[cat]) == 2
  served = set()
  for seed in range(20):
    prompts, category = generator.generate(jax.random.key(seed), np.int32(cat))
    texts = [vocabulary[i] for i in np.asarray(prompts)]
    served.add(tuple(texts))
    assert [CATEGORIES[c] for c in np.asarray(category)] == [t.split(" ")[0] for t in texts]
  expected = {
    tuple(c["text"] for c in line["candidates"])
    for line in cache_lines
    if line["prompt"] == "a cat"
  }
  assert served == expected
  text, pool, image = features
  seeds = np.array([[7, 0, 13, 5]])
  shown = pool["a cat"][[1, 2, 3, 4]]  # Four consecutive pool images from seed 7 % POOL = 1.
  np.testing.assert_array_equal(generator.render(np.array([cat]), seeds), image[shown][None])
  wrapped = generator.pool_rows(np.array([cat]), np.array([[4, 0, 0, 0]]))
  np.testing.assert_array_equal(wrapped, pool["a cat"][[4, 5, 0, 1]][None])
  np.testing.assert_array_equal(generator.text_features(np.int32(cat)), text["a cat"])


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda lines: lines[:1] + ["{not json"], "line 2: not JSON"),
    (
      lambda lines: [dict(lines[0], candidates=lines[0]["candidates"][:24])] + lines[1:],
      "line 1: field 'candidates': expected a list of 25, got 24",
    ),
    (
      lambda lines: (
        [
          dict(
            lines[0],
            candidates=[dict(lines[0]["candidates"][0], category="poem")]
            + lines[0]["candidates"][1:],
          )
        ]
        + lines[1:]
      ),
      r"line 1: field 'candidates\[0\].category': unknown category 'poem'",
    ),
    (
      lambda lines: (
        [
          dict(
            lines[0],
            candidates=[dict(c, category="style") for c in lines[0]["candidates"][:2]]
            + lines[0]["candidates"][2:],
          )
        ]
        + lines[1:]
      ),
      "line 1: field 'candidates': expected 5 per",
    ),
    (lambda lines: [dict(lines[0], prompt=3)] + lines[1:], "line 1: field 'prompt'"),
    (
      lambda lines: [line for line in lines if line["prompt"] != TEXTS[7]],
      f"no cache entry for prompt '{TEXTS[7]}' \\(a candidate at line",
    ),
    (
      lambda lines: [line for line in lines if line["prompt"] != "a dog"],
      "no cache entry for prompt 'a dog' \\(a start prompt",
    ),
  ],
)
def test_malformed_cache_entries_name_the_file_line_and_field(
  tmp_path, cache_lines, features, edit, message
):
  lines = edit(list(cache_lines))
  path = tmp_path / "cache.jsonl"
  path.write_text(
    "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
  )
  with pytest.raises(candidates.ReplayCacheError, match=f"{re.escape(str(path))}: .*{message}"):
    _load(str(path), features)


def test_features_not_aligned_with_the_vocabulary_are_named(tmp_path, cache_lines, features):
  path = _write(tmp_path / "cache.jsonl", cache_lines)
  cache = candidates.read_replay_cache(path, STARTS, CATEGORIES, len(TEXTS), TURNS)
  rows = np.zeros((len(cache.vocabulary), POOL), np.int32)
  with pytest.raises(
    candidates.ReplayCacheError,
    match=f"{re.escape(path)}: {len(cache.vocabulary)} prompts, but "
    f"{len(cache.vocabulary) - 1} text feature rows",
  ):
    candidates.build_generator(cache, np.zeros((len(cache.vocabulary) - 1, DIM)), rows, features[2])


def _fitted_on_images(num_types=3, aggregation="mean"):
  model = utility.UtilityModel(
    num_types=num_types, hidden=(5,), aggregation=aggregation, use_text_features=False
  )
  example = types.OptionFeatures(
    image=np.zeros((4, 4, DIM), np.float32), text=np.zeros((4, DIM), np.float32)
  )
  return utility.FittedUsers(
    model=model,
    params=model.init(jax.random.key(2), example),
    log_priors=np.log(np.array([0.5, 0.3, 0.2], np.float32)),
  )


def _env(generator, users, belief):
  return simulator.EnvParams(
    generator=generator,
    users=users,
    belief=belief,
    turns=TURNS,
    slate_size=4,
    images_per_prompt=4,
    num_categories=len(CATEGORIES),
  )


@pytest.mark.parametrize("aggregation", ["mean", "max", "logsumexp"])
def test_tabulated_fast_path_matches_the_general_path(tmp_path, cache_lines, features, aggregation):
  generator, _ = _load(_write(tmp_path / "cache.jsonl", cache_lines), features)
  fitted = _fitted_on_images(aggregation=aggregation)
  table = utility.tabulate(fitted, features[2], batch_size=7)
  assert table.scores.shape == (features[2].shape[0], 3)
  policy = baselines.RandomSlate(num_categories=len(CATEGORIES), slate_size=4)
  ids, types_ = np.arange(40), np.full(40, -1)

  def run(users):
    return simulator.run(
      jax.random.key(3),
      ids,
      types_,
      _env(generator, users, users),
      policy,
      None,
      parallel.make_mesh(),
    )

  general, fast = run(fitted), run(table)
  np.testing.assert_array_equal(fast.choice, general.choice)
  np.testing.assert_array_equal(fast.slate, general.slate)
  np.testing.assert_allclose(fast.utilities, general.utilities, atol=1e-5)
  np.testing.assert_allclose(fast.log_belief, general.log_belief, atol=1e-5)


def test_tabulate_refuses_a_model_that_reads_prompt_text(features):
  model = utility.UtilityModel(num_types=2, hidden=(), use_text_features=True)
  example = types.OptionFeatures(
    image=np.zeros((4, 4, DIM), np.float32), text=np.zeros((4, DIM), np.float32)
  )
  fitted = utility.FittedUsers(
    model=model, params=model.init(jax.random.key(0), example), log_priors=np.zeros(2, np.float32)
  )
  with pytest.raises(ValueError, match="use_text_features=True"):
    utility.tabulate(fitted, features[2])


def test_unexpanded_prompts_borrow_the_expansions_of_their_nearest_neighbour(
  tmp_path, cache_lines, features
):
  text, pool, image = features
  text = dict(text, **{TEXTS[7]: 2.0 * text[TEXTS[2]] + 1e-3})
  lines = [line for line in cache_lines if line["prompt"] != TEXTS[7]]
  path = _write(tmp_path / "cache.jsonl", lines)
  with pytest.raises(candidates.ReplayCacheError, match=f"no cache entry for prompt '{TEXTS[7]}'"):
    _load(path, (text, pool, image))
  generator, vocabulary = _load(path, (text, pool, image), unexpanded="nearest")
  borrowed, own = vocabulary.index(TEXTS[7]), vocabulary.index(TEXTS[2])
  for seed in range(5):
    served, category = generator.generate(jax.random.key(seed), np.int32(borrowed))
    expected, expected_category = generator.generate(jax.random.key(seed), np.int32(own))
    np.testing.assert_array_equal(served, expected)
    np.testing.assert_array_equal(category, expected_category)
  np.testing.assert_array_equal(generator.text_features(np.int32(borrowed)), text[TEXTS[7]])
  source, cosine = candidates.nearest_expanded(
    candidates.read_replay_cache(path, STARTS, CATEGORIES, len(TEXTS), TURNS, "nearest"),
    np.stack([text[t] for t in vocabulary]),
    block=1,
  )
  assert source[borrowed] == own and all(
    source[i] == i for i in range(len(vocabulary)) if i != borrowed
  )

  def unit(v):
    return v / np.linalg.norm(v)

  assert cosine[borrowed] == pytest.approx(
    float(unit(text[TEXTS[7]]) @ unit(text[TEXTS[2]])), abs=1e-6
  )
  assert np.all(np.delete(cosine, borrowed) == 1.0)


def test_a_saved_generator_loads_with_its_vocabulary_and_image_refs(
  tmp_path, cache_lines, features
):
  generator, vocabulary = _load(_write(tmp_path / "cache.jsonl", cache_lines), features)
  refs = np.asarray([f"images/{i:04d}.png" for i in range(features[2].shape[0])])
  candidates.save_generator(str(tmp_path / "pool.npz"), generator, vocabulary, refs)
  loaded, loaded_vocabulary, loaded_refs = candidates.load_generator(str(tmp_path / "pool.npz"))
  assert loaded_vocabulary == vocabulary
  np.testing.assert_array_equal(loaded_refs, refs)
  jax.tree.map(np.testing.assert_array_equal, loaded, generator)


def test_the_replay_generator_and_its_table_satisfy_the_simulators_protocols(
  tmp_path, cache_lines, features
):
  generator, _ = _load(_write(tmp_path / "cache.jsonl", cache_lines), features)
  table = utility.tabulate(_fitted_on_images(), features[2])
  assert isinstance(generator, simulator.CandidateGenerator)
  assert isinstance(generator, simulator.PooledGenerator)
  assert isinstance(table, simulator.TabulatedUserModel)
  assert not isinstance(table, simulator.UserModel)


def test_candidates_does_not_reexport_the_synthetic_expander():
  assert not hasattr(candidates, "SyntheticExpander")
