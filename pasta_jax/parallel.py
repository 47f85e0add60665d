"""Mesh, shardings and multi-host start-up. Users/trajectories are the "data" axis; params are
replicated.

In a job of several processes every process runs the same program: `is_leader` (process 0) alone
writes shared files, `sync` waits until every process reaches the same point, `agree` hands process
0's decision to all, `global_users` assembles one array from each process's block of users and
`host_array` brings a sharded array back to every host.

A sum over users that XLA partitions itself ends in an all-reduce whose order of additions depends on
where the devices live (in one process, or over gloo between processes), so its float32 result
differs in the last bits between a 1 x 8 and a 2 x 4 job. `per_device` and `ordered_sum` add instead
each device's partial sum in the mesh's device order, identically for any split of the devices
into processes; `device_sums` computes a sum over users that way and `summed_objective` an objective
and its gradient."""

import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def maybe_initialize_distributed() -> None:
  """Joins JAX's distributed runtime when launched as one process of a multi-host job.

  The launch scripts set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; on TPU pods
  `jax.distributed.initialize()` finds them itself (PASTA_MULTIHOST=1). CPU processes run their
  collectives over gloo (TCP), the only CPU implementation that spans processes.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("PASTA_MULTIHOST") == "1":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
      coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
  elif os.environ.get("PASTA_MULTIHOST") == "1":
    jax.distributed.initialize()


def multiprocess() -> bool:
  """Whether this process is one of several joined by `jax.distributed` (without starting a
  backend)."""
  return jax.distributed.is_initialized() and jax.process_count() > 1


def is_leader() -> bool:
  """Process 0 of the job (or the only process): the one that writes shared files."""
  return not multiprocess() or jax.process_index() == 0


def sync(name: str) -> None:
  """Returns once every process has called `sync(name)` (the same name on all); at once alone."""
  if multiprocess():
    multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
  """Process 0's `flag`, on every process."""
  if not multiprocess():
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.bool_)))


def make_mesh(mesh_config: ml_collections.ConfigDict | None = None) -> Mesh:
  """A 1-D ("data",) mesh over `mesh_config.data` devices of the job (-1: all devices)."""
  size = -1 if mesh_config is None else mesh_config.data
  devices = jax.devices()
  if size == -1:
    size = len(devices)
  if not 1 <= size <= len(devices):
    raise ValueError(f"config.mesh.data={size}: this job sees {len(devices)} devices")
  return jax.make_mesh(
    (size,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:size]
  )


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


def per_device(x, mesh: Mesh):
  """x [N, ...] (N a multiple of the data axis D, users split over "data") -> [D, N / D, ...]: row d
  holds the users of the d-th device of the "data" axis, and stays on that device."""
  size = data_size(mesh)
  if x.shape[0] % size:
    raise ValueError(f"per_device: {x.shape[0]} rows do not split over {size} devices")
  grouped = x.reshape((size, x.shape[0] // size) + x.shape[1:])
  return jax.lax.with_sharding_constraint(grouped, data_sharding(mesh))


def ordered_sum(partials, mesh: Mesh):
  """Σ_d partials[d] for partials [D, ...] split over "data" (one partial per device, e.g. of
  `per_device` rows), replicated, added in device order: the partials are gathered (exact) and
  summed on every device alike, so the result is bitwise the same however the devices are split
  into processes (for the same devices on the axis). Traceable inside `jit`."""
  if partials.shape[0] != data_size(mesh):
    raise ValueError(
      f"ordered_sum: {partials.shape[0]} partials for {data_size(mesh)} devices; pass one per "
      "device (parallel.per_device)"
    )
  gather = jax.shard_map(
    lambda part: jax.lax.all_gather(part[0], DATA),
    mesh=mesh,
    in_specs=P(DATA),
    out_specs=P(),
    check_vma=False,
  )
  gathered = gather(partials)
  total = gathered[0]
  for d in range(1, gathered.shape[0]):
    total = total + gathered[d]
  return total


def device_sums(fn, rows, mesh: Mesh | None):
  """`fn(rows)`, a pytree of sums over the users of `rows` (a pytree of [N, ...] leaves, users split
  over "data"), added over devices in device order: each device computes `fn` of its own users
  (`per_device`) and the results are added by `ordered_sum`, bitwise alike for any split of the
  devices into processes. Without a mesh or with one device on its "data" axis: `fn(rows)`."""
  if mesh is None or data_size(mesh) == 1:
    return fn(rows)
  partials = jax.vmap(fn)(jax.tree.map(lambda x: per_device(x, mesh), rows))
  return jax.tree.map(lambda x: ordered_sum(x, mesh), partials)


def summed_objective(local, mesh: Mesh | None):
  """(params, rows) -> Σ_d local(params, rows_d) (`device_sums`) for `local(params, rows)` a scalar
  sum over the users of `rows`, with the gradient with respect to `params` likewise the per-device
  gradients added in device order (a `jax.custom_vjp`: the gradient of a sum that ends in
  `ordered_sum` would be all-reduced by XLA). Without a mesh or with one device on its "data" axis:
  `local` itself."""
  if mesh is None or data_size(mesh) == 1:
    return local

  @jax.custom_vjp
  def objective(params, rows):
    return device_sums(lambda group: local(params, group), rows, mesh)

  def forward(params, rows):
    return device_sums(lambda group: jax.value_and_grad(local)(params, group), rows, mesh)

  def backward(grad, cotangent):
    return jax.tree.map(lambda g: cotangent * g, grad), None

  objective.defvjp(forward, backward)
  return objective


def process_rows(num_rows: int, mesh: Mesh) -> slice:
  """The rows of a leading axis of `num_rows` (a multiple of the data axis) that this process's
  devices hold under `data_sharding(mesh)`: one contiguous block when each process's devices are
  contiguous on the mesh."""
  indices = data_sharding(mesh).addressable_devices_indices_map((num_rows,))
  starts = sorted({index[0].start or 0 for index in indices.values()})
  stops = sorted(
    {num_rows if index[0].stop is None else index[0].stop for index in indices.values()}
  )
  if any(a != b for a, b in zip(starts[1:], stops[:-1])):
    raise ValueError(f"this process's devices hold rows {list(zip(starts, stops))}, not one block")
  return slice(starts[0], stops[-1])


def global_users(local, num_rows: int, mesh: Mesh):
  """One global array per leaf of `local` (this process's `process_rows(num_rows, mesh)` rows,
  leading axis users) with users split over "data": every process passes only its own users."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (num_rows,) + x.shape[1:]
    ),
    local,
  )


def process_block(num_items: int) -> slice:
  """This process's contiguous share of `num_items` items: process p of P holds
  [p·n // P, (p + 1)·n // P); the only process of a job holds them all. ValueError (on every
  process alike) when some process would hold none."""
  if not multiprocess():
    return slice(0, num_items)
  p, count = jax.process_index(), jax.process_count()
  if num_items < count:
    raise ValueError(f"{num_items} users cannot be shared by the job's {count} processes")
  return slice(p * num_items // count, (p + 1) * num_items // count)


def together(fn, *args):
  """`fn(*args)`, a process's own work before a collective: when it raises on some process every
  process raises (the others a RuntimeError naming the processes that failed), so that none waits
  forever in the collective that follows. Without other processes: `fn(*args)`."""
  if not multiprocess():
    return fn(*args)
  try:
    result, error = fn(*args), None
  except Exception as e:  # Re-raised below, on this process and, by the flag, on the others.
    result, error = None, e
  failed = np.asarray(multihost_utils.process_allgather(np.asarray(error is not None))).reshape(-1)
  if error is not None:
    raise error
  if failed.any():
    raise RuntimeError(
      f"process(es) {np.flatnonzero(failed).tolist()} of the job failed in "
      f"{getattr(fn, '__name__', fn)}; their logs say why"
    )
  return result


def concat_processes(local):
  """The leaves of `local` (NumPy, leading axis this process's items; the same tree and trailing
  shapes on every process) concatenated over the processes in process order, on every process:
  what one process computing every block in turn would have. Without other processes: `local`."""
  if not multiprocess():
    return local
  sizes = jax.tree.leaves(local)[0].shape[0]
  counts = np.asarray(multihost_utils.process_allgather(np.asarray(sizes, np.int64))).reshape(-1)
  longest = int(counts.max())

  def padded(x):
    x = np.asarray(x)
    return np.concatenate([x, np.zeros((longest - x.shape[0],) + x.shape[1:], x.dtype)])

  gathered = multihost_utils.process_allgather(jax.tree.map(padded, local), tiled=False)
  return jax.tree.map(
    lambda x: np.concatenate([np.asarray(x)[p, :n] for p, n in enumerate(counts)]), gathered
  )


def on_host(tree):
  """`tree` with every array leaf a NumPy array on this host (`host_array`): values a process can
  compute with on its own devices, whatever the devices of the job that hold them."""
  return jax.tree.map(host_array, tree)


def host_array(x) -> np.ndarray:
  """`x` as a NumPy array on every process; an array sharded over several processes is gathered."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def put(tree, sharding: jax.sharding.Sharding):
  """`jax.device_put(tree, sharding)` that also places on devices of other processes. There a leaf
  held by this process (a NumPy array, a local jax.Array, a typed PRNG key) must have the same value
  on every process; each process copies in the parts its own devices hold, unchecked."""
  if not multiprocess():
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree)
