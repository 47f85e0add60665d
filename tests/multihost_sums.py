"""Sums over rows split across every device of a job, by XLA's all-reduce and by
`parallel.ordered_sum`, for tests/test_multihost.py; `python -m tests.multihost_sums OUT.npz` runs
them as one process of a job (imports no conftest, so the job's device count stands)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from pasta_jax import parallel


def summands() -> tuple[np.ndarray, np.ndarray]:
  """(x f32[64, 300] rows to sum, w f32[300]) from a fixed seed."""
  rng = np.random.default_rng(0)
  return rng.normal(size=(64, 300)).astype(np.float32), rng.normal(size=300).astype(np.float32)


def _loss(w, x):
  return jnp.sum(jnp.tanh(x @ w))


def sums(x: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
  """Σ_n x[n] and ∇_w Σ_n tanh(x[n] · w), rows split over all devices: "ordered_*" by
  `parallel.per_device` and `parallel.ordered_sum`, "xla_*" by XLA's own all-reduce."""
  mesh = parallel.make_mesh()
  rows, w = (
    parallel.put(x, parallel.data_sharding(mesh)),
    parallel.put(w, parallel.replicated(mesh)),
  )

  def ordered(w, x):
    grouped = parallel.per_device(x, mesh)
    grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(w, grouped)
    return parallel.ordered_sum(grouped.sum(axis=1), mesh), parallel.ordered_sum(grads, mesh)

  def xla(w, x):
    return x.sum(axis=0), jax.grad(_loss)(w, x)

  out = {}
  for name, fn in (("ordered", ordered), ("xla", xla)):
    total, grad = jax.jit(fn, out_shardings=parallel.replicated(mesh))(w, rows)
    out[f"{name}_sum"], out[f"{name}_grad"] = parallel.host_array(total), parallel.host_array(grad)
  return out


if __name__ == "__main__":
  parallel.maybe_initialize_distributed()
  result = sums(*summands())
  if parallel.is_leader():
    np.savez(sys.argv[1], **result)
  parallel.sync("sums written")
