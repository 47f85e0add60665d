"""The synthetic world: edits per category, rendering, planted utilities, the logging policy."""

import ast
import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from pasta_jax import config_checks, simulator
from pasta_jax.agent import slate
from pasta_jax.data import synthetic


def _world(config):
  return synthetic.make_world(jax.random.key(3), config)


def test_expand_edits_only_the_slots_of_each_category(config):
  world = _world(config)
  prompt = synthetic.Prompt(attributes=jnp.array([0, 1, 2, 0, 1]), template=jnp.array(1))
  candidates, category = synthetic.expand(jax.random.key(0), world, prompt)
  attrs, templates = np.asarray(candidates.attributes), np.asarray(candidates.template)
  assert attrs.shape == (config.interaction.num_candidates, 5)
  np.testing.assert_array_equal(np.bincount(np.asarray(category)), [5] * 5)
  for i, c in enumerate(np.asarray(category)):
    name = world.categories[c]
    changed = set(np.flatnonzero(attrs[i] != np.asarray(prompt.attributes)))
    assert changed == set(synthetic.CATEGORY_EDITS[name]), (name, attrs[i])
    assert (templates[i] != 1) == (name == "rephrase")


def test_render_is_a_function_of_prompt_and_seed(config):
  world = _world(config)
  a = synthetic.Prompt(attributes=jnp.array([0, 1, 2, 0, 1]), template=jnp.array(0))
  b = synthetic.Prompt(attributes=jnp.array([1, 1, 2, 0, 1]), template=jnp.array(0))
  seeds = jnp.array([5, 6, 5])
  x = np.asarray(synthetic.render(world, a, seeds))
  np.testing.assert_array_equal(x[0], x[2])
  assert not np.allclose(x[0], x[1])
  np.testing.assert_array_equal(x, synthetic.render(world, a, seeds))
  assert not np.allclose(x[0], synthetic.render(world, b, seeds)[0])


def test_planted_utility_is_the_attribute_preference_without_noise(config):
  world = _world(config)
  prompt = synthetic.Prompt(
    attributes=jnp.array([[0, 1, 2, 0, 1], [2, 2, 0, 1, 0]]), template=jnp.array([0, 2])
  )
  noiseless = synthetic.attribute_code(world, prompt) @ world.image_projection  # [2, D]
  utility = synthetic.planted_utility(world, noiseless[:, None, :])  # [2, K*]
  expected = synthetic.attribute_code(world, prompt) @ world.type_weights.T
  np.testing.assert_allclose(utility, expected, atol=1e-4)


def test_select_slate_matches_enumeration_of_all_slates():
  rng = np.random.default_rng(0)
  num_categories, slate_size = 4, 3
  for _ in range(20):
    category = rng.integers(0, num_categories, size=9)
    scores = rng.normal(size=9)
    picked = np.asarray(
      slate.select_slate(jnp.asarray(scores), jnp.asarray(category), num_categories, slate_size)
    )
    feasible = [
      s
      for s in itertools.combinations(range(9), slate_size)
      if len(set(category[list(s)])) == slate_size
    ]
    best = max(feasible, key=lambda s: scores[list(s)].sum()) if feasible else None
    if best is None:
      continue
    assert len(set(category[picked])) == slate_size
    np.testing.assert_allclose(scores[picked].sum(), scores[list(best)].sum(), rtol=1e-6)


def test_logging_policy_picks_categories_uniformly(rater_log, config):
  counts = {c: 0 for c in config.interaction.categories}
  for record in rater_log.records:
    names = [o.category for o in record.options]
    assert len(set(names)) == len(names) == config.interaction.slate_size
    for name in names:
      counts[name] += 1
  observed = np.array(list(counts.values()))
  assert stats.chisquare(observed).pvalue > 1e-3


def test_rater_log_choices_follow_the_planted_choice_model(rater_log, choices):
  batch, users = choices
  loglik = synthetic.planted_user_loglik(rater_log.world, rater_log.table, batch)  # [U, K*]
  assert np.mean(np.argmax(loglik, axis=1) == users.types) > 0.8
  assert np.all(users.types >= 0) and set(np.unique(users.types)) <= set(
    range(rater_log.world.num_types)
  )


def _imports(module) -> set[str]:
  """Every name `module`'s source imports, anywhere in the file ("package.module" for `from package import
  module`)."""
  tree = ast.parse(inspect.getsource(module))
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_the_world_imports_neither_the_agent_nor_the_simulator():
  imported = _imports(synthetic)
  assert not {n for n in imported if n.startswith(("pasta_jax.agent", "pasta_jax.simulator"))}, (
    imported
  )


def test_the_world_plugs_into_the_simulator_through_its_protocols(config):
  world = _world(config)
  assert isinstance(synthetic.SyntheticExpander(world), simulator.CandidateGenerator)
  assert not isinstance(synthetic.SyntheticExpander(world), simulator.PooledGenerator)
  assert isinstance(synthetic.PlantedUsers(world), simulator.UserModel)


def test_invalid_world_settings_are_config_errors_naming_the_field(config):
  bad = config.copy_and_resolve_references()
  bad.world.values_per_attribute = 1
  with pytest.raises(config_checks.ConfigError, match=r"^config\.world\.values_per_attribute=1: "):
    synthetic.make_world(jax.random.key(0), bad)
