"""Sums over rows split across every device of a job, by XLA's all-reduce and by
`parallel.ordered_sum`; rows moved from a ("replica", "data") mesh to the "data" mesh; and what
`parallel.together` raises on a process whose own work went well when another's failed. For
tests/test_multihost.py: `python -m tests.multihost_sums OUT.npz` runs them as one process of a job
(imports no conftest, so the job's device count stands)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from pasta_jax import parallel
from pasta_jax.user_model import em


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
  out["moved"] = moved(x, mesh)
  return out


def moved(x: np.ndarray, mesh: jax.sharding.Mesh) -> np.ndarray:
  """`x` split by rows over the "replica" axis of a (2, D / 2) ("replica", "data") mesh, then
  replicated on the 1-D "data" mesh, as `select_k.sweep` moves its fits to score them; on the host."""
  on_pairs = parallel.put(x, em.pair_sharding(em.replica_mesh(mesh, 2)))
  return parallel.host_array(parallel.put(on_pairs, parallel.replicated(mesh)))


def failure_elsewhere() -> str:
  """What `parallel.together` raises on this process when the job's last process fails."""

  def fail_on_the_last_process():
    if jax.process_index() == jax.process_count() - 1:
      raise ValueError("this process's block is bad")

  try:
    parallel.together(fail_on_the_last_process)
  except (RuntimeError, ValueError) as e:
    return f"{type(e).__name__}: {e}"
  return "nothing"


if __name__ == "__main__":
  parallel.maybe_initialize_distributed()
  result = {**sums(*summands()), "failure": np.asarray(failure_elsewhere())}
  if parallel.is_leader():
    np.savez(sys.argv[1], **result)
  parallel.sync("sums written")
