"""Fakes 8 CPU devices (before JAX starts) and provides a tiny synthetic world shared by the tests."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import common  # noqa: E402
from pasta_jax.data import schema, synthetic  # noqa: E402


def tiny_config():
  """A world and user model small enough for unit tests (seconds)."""
  c = common.base_config()
  c.world.num_types = 3
  c.world.num_users = 64
  c.world.sessions_per_user = 2
  c.world.feature_dim = 16
  c.world.values_per_attribute = 3
  c.world.choice_inverse_temperature = 2.0
  c.user_model.num_types = 3
  c.user_model.hidden = (8,)
  c.em.epochs = 4
  c.em.batch_users = 16
  c.em.m_steps = 2
  c.em.learning_rate = 1e-2
  c.em.restarts = 2
  c.em.checkpoint_every_epochs = 1
  c.select_k.ks = (1, 3)
  c.simulate.num_users = 48
  c.agent.hidden = (16,)
  for learner in (c.agent.iql, c.agent.bc):
    learner.batch_size = 32
    learner.steps = 200
    learner.steps_per_dispatch = 100
    learner.checkpoint_every_steps = 100
  c.evaluate.num_users = 64
  c.evaluate.bootstrap_samples = 200
  return c


@pytest.fixture(scope="session")
def config():
  return tiny_config()


@pytest.fixture(scope="session")
def rater_log(config):
  """synthetic.RaterLog of the tiny world (records, feature table, planted world)."""
  return synthetic.generate_rater_log(jax.random.key(0), config)


@pytest.fixture(scope="session")
def choices(config, rater_log):
  """(types.Choices as NumPy, schema.UserIndex) of every user of the tiny world."""
  return schema.to_choices(rater_log.records, schema.RecordSpec.from_config(config))


def pytest_configure(config):
  assert jax.device_count() == 8, f"tests expect 8 fake CPU devices, got {jax.devices()}"
