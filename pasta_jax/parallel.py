"""Mesh, shardings and multi-host start-up. Users/trajectories are the "data" axis; params are replicated."""

import os

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def maybe_initialize_distributed() -> None:
  """Joins JAX's distributed runtime when launched as one process of a multi-host job.

  The launch scripts set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; on TPU pods
  `jax.distributed.initialize()` finds them itself (PASTA_MULTIHOST=1).
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("PASTA_MULTIHOST") == "1":
    jax.distributed.initialize()


def make_mesh(mesh_config: ml_collections.ConfigDict | None = None) -> Mesh:
  """A 1-D ("data",) mesh over `mesh_config.data` devices (-1: all devices)."""
  size = -1 if mesh_config is None else mesh_config.data
  devices = jax.devices()
  if size == -1:
    size = len(devices)
  if not 1 <= size <= len(devices):
    raise ValueError(f"config.mesh.data={size}: this job sees {len(devices)} devices")
  return jax.make_mesh((size,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:size])


def data_size(mesh: Mesh) -> int:
  return mesh.shape[DATA]


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis (users) split over "data"."""
  return NamedSharding(mesh, P(DATA))


def batched_data_sharding(mesh: Mesh) -> NamedSharding:
  """[batches, users, ...]: the users axis split over "data"."""
  return NamedSharding(mesh, P(None, DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
