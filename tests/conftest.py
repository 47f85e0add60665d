"""Fakes 8 CPU devices (before JAX starts) and provides a tiny synthetic world shared by the tests."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from configs import quickstart  # noqa: E402
from pasta_jax import synthetic_env  # noqa: E402
from pasta_jax.data import schema  # noqa: E402


def tiny_config():
  """The `tiny` variant of configs/quickstart.py: a world and models small enough for unit tests."""
  return quickstart.get_config("tiny")


@pytest.fixture(scope="session")
def config():
  return tiny_config()


@pytest.fixture(scope="session")
def rater_log(config):
  """synthetic_env.RaterLog of the tiny world (records, feature table, planted world)."""
  return synthetic_env.generate_rater_log(jax.random.key(0), config)


@pytest.fixture(scope="session")
def choices(config, rater_log):
  """(types.Choices as NumPy, schema.UserIndex) of every user of the tiny world."""
  return schema.to_choices(rater_log.records, schema.RecordSpec.from_config(config))


def pytest_configure(config):
  assert jax.device_count() == 8, f"tests expect 8 fake CPU devices, got {jax.devices()}"


@pytest.fixture(autouse=True, scope="module")
def fresh_compilation_caches():
  """Each test module starts with empty JAX compilation caches, so a long-lived xdist worker holds the
  executables of one module at a time rather than of every module it has run."""
  jax.clear_caches()
  yield
