"""EM fits of the tiny world on every device of a job (mini-batch, exact, and a mini-batch K sweep
on a ("replica", "data") mesh), for tests/test_em_ordered.py; `python -m tests.multihost_em IN.npz
OUT.npz` runs them as one process of a job on the users saved by `save_users`."""

import sys

import jax
import numpy as np

from pasta_jax import parallel, types
from pasta_jax.user_model import em, utility
from tests import conftest

EPOCHS = 2
SWEEP_KS = (1, 3)
SWEEP_REPLICAS = 2


def save_users(path, table: types.FeatureTable, choices: types.Choices) -> None:
  """Writes the feature table and the choices (every field but None ones) to `path` (.npz)."""
  fields = {f"table.{name}": value for name, value in vars(table).items()}
  fields |= {f"choices.{name}": value for name, value in vars(choices).items() if value is not None}
  np.savez(path, **fields)


def load_users(path) -> tuple[types.FeatureTable, types.Choices]:
  """The (table, choices) written by `save_users`."""
  with np.load(path) as z:
    parts = {"table": {}, "choices": {}}
    for name in z.files:
      part, field = name.split(".")
      parts[part][field] = z[name]
  return types.FeatureTable(**parts["table"]), types.Choices(**parts["choices"])


def fits(table: types.FeatureTable, choices: types.Choices) -> dict[str, np.ndarray]:
  """{"<fit>/<leaf path>": the leaf} of the final `em.fit` state of each fit, over all devices."""
  config = conftest.tiny_config()
  mesh = parallel.make_mesh()
  model = utility.from_config(config)
  out = {}
  for name, mode, ks in (
    ("minibatch", "minibatch", None),
    ("exact", "exact", None),
    ("sweep", "minibatch", SWEEP_KS),
  ):
    config.em.update(mode=mode, epochs=EPOCHS)
    settings = em.EMSettings.from_config(config.em)
    fit_mesh = mesh if ks is None else em.replica_mesh(mesh, SWEEP_REPLICAS)
    fit_model = model if ks is None else model.clone(num_types=max(ks))
    key = jax.random.key(3)
    state = em.fit(settings, fit_model, table, choices, key, fit_mesh, show_progress=False, ks=ks)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
      out[f"{name}{jax.tree_util.keystr(path)}"] = parallel.host_array(leaf)
  return out


if __name__ == "__main__":
  parallel.maybe_initialize_distributed()
  result = fits(*load_users(sys.argv[1]))
  if parallel.is_leader():
    np.savez(sys.argv[2], **result)
  parallel.sync("fits written")
