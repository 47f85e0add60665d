"""Fakes 8 CPU devices (before JAX starts) and provides a tiny synthetic world shared by the tests."""

import os

DEVICE_COUNT = "--xla_force_host_platform_device_count"
NO_BACKEND_OPTIMIZATION = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a test process on `devices` fake CPU devices. The tests compile hundreds of small
  programs that each run for milliseconds, so LLVM's optimisations cost more than they save: without
  them the suite takes about 40% less time. Every process of a test uses the same flags, since the
  generated code, and so the last bits of a float, depend on them."""
  return f"{DEVICE_COUNT}={devices} {NO_BACKEND_OPTIMIZATION}"


def with_test_flags(flags: str) -> str:
  """`flags` with 8 fake devices unless it names a device count, and NO_BACKEND_OPTIMIZATION."""
  if DEVICE_COUNT not in flags:
    flags += f" {DEVICE_COUNT}=8"
  if "--xla_backend_optimization_level" not in flags:
    flags += " " + NO_BACKEND_OPTIMIZATION
  return flags.strip()


os.environ["XLA_FLAGS"] = with_test_flags(os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from xdist.scheduler import LoadScopeScheduling  # noqa: E402

from configs import quickstart  # noqa: E402
from pasta_jax import pipeline, synthetic_env  # noqa: E402
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


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """The workdir of the whole tiny quickstart run (`pipeline.run`), built once per test process."""
  workdir = str(tmp_path_factory.getbasetemp() / "tiny_run")
  pipeline.run(tiny_config(), workdir)
  return workdir


TINY_RUN_MODULES = (
  "tests/test_multihost.py",
  "tests/test_notebooks.py",
  "tests/test_pipeline.py",
  "tests/test_report.py",
  "tests/test_serve.py",
)
"""The test modules that read `tiny_workdir`: `make test` runs them on one xdist worker."""


LONGEST_MODULES = (
  "tests/test_simulator.py",
  "tests/test_agent_inputs.py",
  "tests/test_ppo.py",
  "tests/test_pretrain.py",
  "tests/test_ablations.py",
  "tests/test_parallel_checkpoint.py",
  "tests/test_provenance.py",
)
"""The modules that take longest after the tiny-run unit, longest first (measured with --durations)."""


def module_of(nodeid: str) -> str:
  """'tests/test_x.py::test_y[a]' -> 'tests/test_x.py'."""
  return nodeid.split("::", 1)[0]


def running_order(module: str) -> int:
  """Rank of a module in the session: the tiny-run unit, then LONGEST_MODULES, then the rest."""
  if module in TINY_RUN_MODULES:
    return 0
  if module in LONGEST_MODULES:
    return 1 + LONGEST_MODULES.index(module)
  return 1 + len(LONGEST_MODULES)


class ModulesAndTinyRun(LoadScopeScheduling):
  """xdist scheduling by test module, so that a module's fixtures are built by one worker, with the
  modules of TINY_RUN_MODULES as one unit, so that the tiny pipeline runs once per test session.
  Units are handed out in collection order, which `pytest_collection_modifyitems` makes longest
  first, so that no long unit starts last."""

  def __init__(self, config, log=None):
    super().__init__(config, log)
    config.option.loadscopereorder = False

  def _split_scope(self, nodeid: str) -> str:
    module = module_of(nodeid)
    return "tiny_run" if module in TINY_RUN_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  return ModulesAndTinyRun(config, log)


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: running_order(module_of(item.nodeid)))
  for item in items:
    if "tiny_workdir" in getattr(item, "fixturenames", ()):
      module = module_of(item.nodeid)
      if module not in TINY_RUN_MODULES:
        raise pytest.UsageError(f"{module} reads tiny_workdir: add it to conftest.TINY_RUN_MODULES")


def pytest_configure(config):
  assert jax.device_count() == 8, f"tests expect 8 fake CPU devices, got {jax.devices()}"


CLEAR_CACHES_ABOVE_BYTES = 3 << 30


def resident_bytes() -> int:
  """This process's resident memory in bytes (Linux /proc)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True, scope="module")
def bounded_compilation_caches():
  """Clears JAX's in-memory compilation caches before a test module once this process holds more than
  CLEAR_CACHES_ABOVE_BYTES, so a long-lived xdist worker does not keep every module's executables,
  while modules that run one after the other below that share the programs they have in common."""
  if resident_bytes() > CLEAR_CACHES_ABOVE_BYTES:
    jax.clear_caches()
  yield
