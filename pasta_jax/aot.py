"""Ahead-of-time compile checks of the three hot programs on a TPU topology this machine does not hold.

Command:  python -m pasta_jax.aot --config=configs/paper.py --topology=v5e:4x4 --output=aot.json
          (or python launch/aot_check.py with the same flags)

libtpu's compile-only devices (`jax.experimental.topologies`) stand in for the pod; every program is
compiled on a ("data",) mesh over all of the topology's devices with the shardings the pipeline uses:

  em_epoch      `em.run_epoch`: one EM epoch of every restart (vmapped) at the largest K of
                `select_k.ks`; choices in the pipeline's rows of `data.turns_per_row` turns, sharded
                over rows, the feature table and the state replicated.
  rollout       `simulator.rollout` of `evaluate.num_users` users (one `simulator.run` call: users padded
                to the data axis and sharded) of the fitted simulator under the greedy baseline, images
                dropped as in evaluation.
  iql_dispatch  `iql.run_dispatch`: `agent.iql.steps_per_dispatch` IQL updates on the largest data mix;
                datasets and state replicated, each batch sharded.

Inputs are abstract (`jax.ShapeDtypeStruct` with shardings; params and states by `jax.eval_shape`), so
nothing is allocated. Per program the table and the JSON give per-device memory (`memory_analysis()`) and
XLA's cost analysis (FLOPs, bytes accessed, the compiler's estimated seconds). XLA's cost analysis counts a
while loop's body once, so these are the cost of one trip through each `lax.scan` (trip counts are among
the sizes), not of the whole call; libtpu returns a negative `optimal_seconds` for some programs with
loops, shown as n/a (the JSON keeps the raw value). The command exits non-zero, naming the program and its sizes, when a
program's per-device memory exceeds the device's HBM.
"""

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from ml_collections import config_flags
from rich.console import Console
from rich.table import Table

from pasta_jax import config as config_lib
from pasta_jax import parallel, simulator, types
from pasta_jax.agent import baselines, iql
from pasta_jax.agent import data as agent_data
from pasta_jax.config_checks import row_layout
from pasta_jax.data import synthetic
from pasta_jax.user_model import em, utility

CHIP_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
GIB = 2**30
MEMORY_FIELDS = {
  "arguments": "argument_size_in_bytes",
  "outputs": "output_size_in_bytes",
  "aliased": "alias_size_in_bytes",
  "temporaries": "temp_size_in_bytes",
  "generated_code": "generated_code_size_in_bytes",
}
COST_FIELDS = {
  "flops": "flops",
  "transcendentals": "transcendentals",
  "bytes_accessed": "bytes accessed",
  "optimal_seconds": "optimal_seconds",
}


class AOTError(Exception):
  """A config the programs cannot be built for (the message names the config field), or a program that
  does not fit the device's HBM (the message names the program and its sizes)."""


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function, its abstract positional and static keyword arguments, and the sizes it is
  compiled at (for the report)."""

  name: str
  fn: Callable
  args: tuple
  static: dict
  sizes: dict


def chip_name(topology: str) -> str:
  """'v5e:4x4' -> 'v5e'."""
  return topology.split(":")[0]


def num_chips(topology: str, num_slices: int) -> int:
  """Chips in `num_slices` slices of `topology` ('v5e:4x4' -> 16 per slice)."""
  dims = topology.split(":")[-1]
  try:
    return num_slices * math.prod(int(d) for d in dims.split("x"))
  except ValueError:
    raise AOTError(f"--topology={topology!r}: expected CHIP:AxB[xC], e.g. v5e:4x4") from None


def topology_devices(
  topology: str, chips_per_host_bounds: tuple[int, ...], num_slices: int
) -> list:
  """The compile-only TPU devices of the topology; AOTError with libtpu's reason when it has none."""
  try:
    desc = topologies.get_topology_desc(
      platform="tpu",
      topology_name=topology,
      chip_config_name="default",
      chips_per_host_bounds=tuple(chips_per_host_bounds),
      num_slices=num_slices,
    )
  except jax.errors.JaxRuntimeError as e:
    raise AOTError(
      f"--topology={topology} --chips_per_host_bounds={','.join(map(str, chips_per_host_bounds))} "
      f"--num_slices={num_slices}: libtpu: {e}"
    ) from None
  return list(desc.devices)


def hbm_bytes_per_device(
  topology: str, hbm_gib: float | None, num_devices: int, num_slices: int
) -> int:
  """HBM of one device: `hbm_gib` (default: the chip's, `CHIP_HBM_GIB`) per chip, split over the
  chip's devices (two on v4's default chip config)."""
  chip = chip_name(topology)
  if hbm_gib is None:
    if chip not in CHIP_HBM_GIB:
      raise AOTError(
        f"--topology={topology!r}: HBM of chip {chip!r} unknown (known: "
        f"{sorted(CHIP_HBM_GIB)}); give --hbm_gib"
      )
    hbm_gib = CHIP_HBM_GIB[chip]
  return int(hbm_gib * GIB * num_chips(topology, num_slices) / num_devices)


def data_mesh(devices: list) -> Mesh:
  """The 1-D ("data",) mesh over all `devices`."""
  return jax.make_mesh(
    (len(devices),), (parallel.DATA,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def abstract(tree: Any, sharding: NamedSharding) -> Any:
  """Every leaf of `tree` (arrays or ShapeDtypeStructs) as a ShapeDtypeStruct placed by `sharding`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def spec(shape: tuple[int, ...], dtype, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def require_multiple(value: int, devices: int, field: str) -> None:
  """AOTError naming `config.<field>` unless `value` splits evenly over the data axis."""
  if value % devices:
    raise AOTError(
      f"config.{field}={value} must be a multiple of the data axis size {devices} (the "
      "topology's device count)"
    )


def round_up(value: int, multiple: int) -> int:
  return multiple * max(1, -(-value // multiple))


def train_users(config: ml_collections.ConfigDict) -> int:
  """Users of the training split (pipeline.split_users)."""
  w = config.world
  return w.num_users - int(round(w.heldout_fraction * w.num_users))


def largest_k(config: ml_collections.ConfigDict) -> int:
  return max(set(config.select_k.ks) | {config.user_model.num_types})


def example_options(config: ml_collections.ConfigDict) -> types.OptionFeatures:
  """Abstract features of one slate, to initialise a utility model: image f32[L, M, D], text f32[L, D]."""
  it, dim = config.interaction, config.world.feature_dim
  return types.OptionFeatures(
    image=jax.ShapeDtypeStruct((it.slate_size, it.images_per_prompt, dim), jnp.float32),
    text=jax.ShapeDtypeStruct((it.slate_size, dim), jnp.float32),
  )


def em_layout(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(n, T, R) of the training users' `types.Choices` as the pipeline lays them out: every user's n =
  sessions_per_user x turns choices in ceil(n / T) consecutive rows of T turns (`schema.row_length`
  of `data.turns_per_row`), R rows in all (before padding)."""
  n = config.world.sessions_per_user * config.interaction.turns
  return (n, *row_layout(train_users(config), n, config.data.get("turns_per_row", 0)))


def em_program(config: ml_collections.ConfigDict, mesh: Mesh) -> Program:
  """One EM epoch of every restart at the largest K, rows padded as `em.place` pads them.

  Choices [R, T, L(, M)] in the pipeline's layout (`em_layout`: R rows of T turns, ceil(n / T) per
  user of n choices), sharded over rows; the feature table f32[N_img | N_txt, D] of every user's
  shown images and prompts (no row shared), replicated; in mini-batch EM on users spanning several
  rows, the state's row table `row_loglik` f32[restarts, R, K] (`em.with_row_table`), replicated.
  Sizes: "users" the training users, "turns" n, "turns_per_row" T, "rows" R, "padded_rows" (and
  "padded_users", the same) R padded.
  """
  devices = parallel.data_size(mesh)
  settings = em.EMSettings.from_config(config.em)
  users = train_users(config)
  turns, turns_per_row, rows = em_layout(config)
  if settings.mode == "minibatch":
    require_multiple(settings.batch_users, devices, "em.batch_users")
    if settings.batch_users > rows:
      raise AOTError(
        f"config.em.batch_users={settings.batch_users} exceeds the {rows} rows of the {users} "
        "training users"
      )
    padded = round_up(rows, math.lcm(settings.batch_users, devices))
    trips = f"{padded // settings.batch_users} batches x {settings.m_steps} m_steps"
  else:
    padded = round_up(rows, devices)
    trips = f"{settings.m_steps} L-BFGS steps"
  w, it = config.world, config.interaction
  dim = w.feature_dim
  shown = w.num_users * turns * it.slate_size
  image_rows, text_rows = shown * it.images_per_prompt, shown + w.num_users * w.sessions_per_user
  model = utility.from_config(config, num_types=largest_k(config))
  state = jax.eval_shape(
    lambda options: em.init_state(jax.random.key(0), model, settings, options, padded),
    example_options(config),
  )
  if settings.mode == "minibatch" and rows > users:
    fits, num_types = state.log_priors.shape
    state = state.replace(row_loglik=jax.ShapeDtypeStruct((fits, padded, num_types), jnp.float32))
  replicated = parallel.replicated(mesh)
  table = types.FeatureTable(
    image=spec((image_rows, dim), jnp.float32, replicated),
    text=spec((text_rows, dim), jnp.float32, replicated),
  )
  choices = abstract_choices(
    padded, turns_per_row, it.slate_size, it.images_per_prompt, parallel.data_sharding(mesh)
  )
  sizes = {
    "users": users,
    "turns": turns,
    "turns_per_row": turns_per_row,
    "rows": rows,
    "padded_rows": padded,
    "padded_users": padded,
    "slate": it.slate_size,
    "images": it.images_per_prompt,
    "feature_dim": dim,
    "num_types": model.num_types,
    "restarts": settings.restarts,
    "mode": settings.mode,
    "batch_users": settings.batch_users,
    "image_rows": image_rows,
    "text_rows": text_rows,
    "scan_trips": trips,
  }
  return Program(
    "em_epoch",
    em.run_epoch,
    (abstract(state, replicated), table, choices),
    {"model": model, "settings": settings, "mesh": mesh},
    sizes,
  )


def abstract_choices(
  rows: int, turns: int, slate: int, images: int, sharding: NamedSharding
) -> types.Choices:
  """Abstract `types.Choices` of `rows` rows of `turns` turns, every field sharded over rows."""
  return types.Choices(
    image_rows=spec((rows, turns, slate, images), jnp.int32, sharding),
    text_rows=spec((rows, turns, slate), jnp.int32, sharding),
    category=spec((rows, turns, slate), jnp.int32, sharding),
    choice=spec((rows, turns), jnp.int32, sharding),
    option_mask=spec((rows, turns, slate), jnp.bool_, sharding),
    turn_mask=spec((rows, turns), jnp.bool_, sharding),
    user_index=spec((rows,), jnp.int32, sharding),
  )


def _rollout(key, user_ids, user_types, params, policy_params, *, policy):
  """`simulator.rollout` without the images, as evaluation runs it."""
  trajectories = simulator.rollout(key, user_ids, user_types, params, policy, policy_params)
  return trajectories.replace(images=None)


def rollout_program(config: ml_collections.ConfigDict, mesh: Mesh) -> Program:
  """The fitted simulator (synthetic world's generator, fitted users at the largest K as responders and
  belief) under the greedy baseline for `evaluate.num_users` users, padded and sharded as `simulator.run`
  does for one call."""
  if config.data.source != "synthetic":
    raise AOTError(
      f"config.data.source={config.data.source!r}: the rollout check builds the synthetic "
      "world's generator only"
    )
  devices = parallel.data_size(mesh)
  it, dim = config.interaction, config.world.feature_dim
  users = config.evaluate.num_users
  padded = round_up(min(simulator.USERS_PER_CALL, users), devices)
  model = utility.from_config(config, num_types=largest_k(config))

  def env(example):
    world = synthetic.make_world(jax.random.key(0), config)
    fitted = utility.FittedUsers(
      model=model,
      params=model.init(jax.random.key(1), example),
      log_priors=jnp.zeros((model.num_types,)),
    )
    return (
      simulator.make_params(
        it, synthetic.SyntheticExpander(world), fitted, fitted, config.simulate.reward
      ),
      fitted,
    )

  replicated, sharded = parallel.replicated(mesh), parallel.data_sharding(mesh)
  params, fitted = abstract(jax.eval_shape(env, example_options(config)), replicated)
  key = abstract(jax.eval_shape(lambda: jax.random.key(0)), replicated)
  ids = spec((padded,), jnp.int32, sharded)
  policy = baselines.Greedy(num_categories=len(it.categories), slate_size=it.slate_size)
  sizes = {
    "users": users,
    "padded_users": padded,
    "turns": it.turns,
    "candidates": it.num_candidates,
    "slate": it.slate_size,
    "images": it.images_per_prompt,
    "feature_dim": dim,
    "num_types": model.num_types,
    "policy": "greedy",
    "scan_trips": f"{it.turns} turns",
  }
  fn = jax.jit(_rollout, static_argnames="policy")
  return Program("rollout", fn, (key, ids, ids, params, fitted), {"policy": policy}, sizes)


def iql_program(config: ml_collections.ConfigDict, mesh: Mesh) -> Program:
  """One dispatch of IQL on the real+sim mix when configured (else the first mix): real transitions of
  every training session, simulated ones of `simulate.num_users` users, both replicated."""
  settings = iql.IQLSettings.from_config(config.agent.iql)
  require_multiple(settings.batch_size, parallel.data_size(mesh), "agent.iql.batch_size")
  mixes = tuple(config.agent.data_mixes)
  mix = "real+sim" if "real+sim" in mixes else mixes[0]
  counts = agent_data.mix_counts(mix, config.agent.sim_fraction, settings.batch_size)
  w, it = config.world, config.interaction
  sources = {
    "real": train_users(config) * w.sessions_per_user * it.turns,
    "sim": config.simulate.num_users * it.turns,
  }
  used = {name: size for (name, size), count in zip(sources.items(), counts) if count}
  replicated = parallel.replicated(mesh)
  datasets = tuple(
    abstract_transitions(size, it.turns, it.slate_size, w.feature_dim, replicated)
    for size in used.values()
  )
  learner = iql.IQL(iql.IQLPolicy.from_config(config), settings)
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype), datasets[0])
  state = jax.eval_shape(lambda ex: learner.init(jax.random.key(0), ex), example)
  sizes = {
    "data_mix": mix,
    "transitions": used,
    "batch_size": settings.batch_size,
    "turns": it.turns,
    "slate": it.slate_size,
    "feature_dim": w.feature_dim,
    "hidden": list(config.agent.hidden),
    "scan_trips": f"{settings.steps_per_dispatch} updates",
  }
  return Program(
    "iql_dispatch",
    iql.run_dispatch,
    (abstract(state, replicated), datasets),
    {"learner": learner, "counts": tuple(c for c in counts if c), "mesh": mesh},
    sizes,
  )


def abstract_transitions(
  size: int, turns: int, slate: int, dim: int, sharding: NamedSharding
) -> agent_data.Transitions:
  """Abstract `agent_data.Transitions` of `size` transitions."""
  return agent_data.Transitions(
    history=spec((size, turns + 1, dim), jnp.float32, sharding),
    history_mask=spec((size, turns + 1), jnp.bool_, sharding),
    turn=spec((size,), jnp.int32, sharding),
    slate_text=spec((size, slate, dim), jnp.float32, sharding),
    slate_category=spec((size, slate), jnp.int32, sharding),
    choice=spec((size,), jnp.int32, sharding),
    reward=spec((size,), jnp.float32, sharding),
    next_history_mask=spec((size, turns + 1), jnp.bool_, sharding),
    next_turn=spec((size,), jnp.int32, sharding),
    not_done=spec((size,), jnp.float32, sharding),
  )


PROGRAMS = {"em_epoch": em_program, "rollout": rollout_program, "iql_dispatch": iql_program}


def analyse(compiled) -> dict:
  """Per-device memory in bytes (total = arguments + outputs - aliased + temporaries + generated code)
  and the cost analysis fields libtpu returns (`COST_FIELDS`, absent ones omitted)."""
  stats = compiled.memory_analysis()
  memory = {name: int(getattr(stats, field)) for name, field in MEMORY_FIELDS.items()}
  memory["total"] = (
    memory["arguments"]
    + memory["outputs"]
    - memory["aliased"]
    + memory["temporaries"]
    + memory["generated_code"]
  )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
    "memory": memory,
    "cost": {name: float(cost[field]) for name, field in COST_FIELDS.items() if field in cost},
  }


def compile_program(program: Program) -> dict:
  """The program's sizes and `analyse` of its compilation; AOTError naming it when libtpu fails."""
  try:
    compiled = program.fn.lower(*program.args, **program.static).compile()
  except Exception as e:  # noqa: BLE001 - libtpu's errors carry no common type.
    raise AOTError(
      f"{program.name}: compilation failed at sizes {program.sizes}: {type(e).__name__}: {e}"
    ) from e
  return {"sizes": program.sizes, **analyse(compiled)}


def check(
  config: ml_collections.ConfigDict,
  topology: str,
  chips_per_host_bounds: tuple[int, ...] = (2, 2, 1),
  num_slices: int = 1,
  hbm_gib: float | None = None,
) -> dict:
  """Compiles every program of `PROGRAMS` for the topology; the report that `main` prints and writes.

  Returns {"topology", "num_slices", "devices", "device_kind", "hbm_bytes_per_device",
  "programs": {name: {"sizes", "memory", "cost"}}}.
  """
  devices = topology_devices(topology, chips_per_host_bounds, num_slices)
  hbm = hbm_bytes_per_device(topology, hbm_gib, len(devices), num_slices)
  mesh = data_mesh(devices)
  programs = {name: compile_program(build(config, mesh)) for name, build in PROGRAMS.items()}
  return {
    "topology": topology,
    "num_slices": num_slices,
    "devices": len(devices),
    "device_kind": devices[0].device_kind,
    "hbm_bytes_per_device": hbm,
    "programs": programs,
  }


def over_budget(report: dict) -> list[str]:
  """One message per program whose per-device memory exceeds the device's HBM."""
  hbm = report["hbm_bytes_per_device"]
  return [
    f"{name} needs {p['memory']['total'] / GIB:.2f} GiB per device, more than the "
    f"{hbm / GIB:.2f} GiB HBM of a {report['device_kind']} device of {report['topology']} "
    f"(sizes {p['sizes']})"
    for name, p in report["programs"].items()
    if p["memory"]["total"] > hbm
  ]


def layout(sizes: dict) -> str:
  """The rows and turns per row of the program's choices ("128 rows x 5 turns"), or ""."""
  if "rows" not in sizes:
    return ""
  return f"{sizes['padded_rows']} rows x {sizes['turns_per_row']} turns"


def table(report: dict):
  """A rich Table of the report: memory in MiB per device, GFLOPs, GB accessed, estimated ms."""
  title = (
    f"{report['topology']} x{report['num_slices']}: {report['devices']} x {report['device_kind']}, "
    f"{report['hbm_bytes_per_device'] / GIB:.1f} GiB HBM per device; cost of one trip per scan"
  )
  out = Table(title=title)
  for column in (
    "program",
    "args MiB",
    "out MiB",
    "alias MiB",
    "temp MiB",
    "code MiB",
    "total MiB",
    "GFLOP",
    "GB accessed",
    "est. ms",
    "scan trips",
    "layout",
  ):
    out.add_column(
      column, justify="left" if column in ("program", "scan trips", "layout") else "right"
    )
  for name, p in report["programs"].items():
    m, c = p["memory"], p["cost"]
    mib = [
      f"{m[k] / 2**20:,.1f}"
      for k in ("arguments", "outputs", "aliased", "temporaries", "generated_code", "total")
    ]
    cost = [
      f"{c[k] / s:,.3f}" if c.get(k, -1) >= 0 else "n/a"
      for k, s in (("flops", 1e9), ("bytes_accessed", 1e9), ("optimal_seconds", 1e-3))
    ]
    out.add_row(name, *mib, *cost, str(p["sizes"]["scan_trips"]), layout(p["sizes"]))
  return out


def libtpu_environment(topology: str, num_slices: int) -> None:
  """Environment for compile-only libtpu, set before it loads: several processes may load it at once
  (no device is opened, so its /tmp/libtpu_lockfile is not needed), and it does not warn about the TPU VM
  it is not on."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault(
    "TPU_ACCELERATOR_TYPE", f"{chip_name(topology)}-{num_chips(topology, num_slices)}"
  )
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
  os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")


def define_flags() -> None:
  """The command's flags (defined when it runs, so importing this module defines none)."""
  config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config().", lock_config=True
  )
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4, v5p:2x2x2.")
  flags.DEFINE_list("chips_per_host_bounds", ["2", "2", "1"], "Chips per host along each axis.")
  flags.DEFINE_integer("num_slices", 1, "Slices of the topology.")
  flags.DEFINE_float("hbm_gib", None, f"HBM per chip in GiB; default per chip {CHIP_HBM_GIB}.")
  flags.DEFINE_string("output", None, "Where to write the report as JSON.")
  flags.mark_flags_as_required(["config", "topology"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  libtpu_environment(args.topology, args.num_slices)
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")
  bounds = tuple(int(b) for b in args.chips_per_host_bounds)
  try:
    config_lib.validate(args.config)
    report = check(args.config, args.topology, bounds, args.num_slices, args.hbm_gib)
  except (AOTError, config_lib.ConfigError) as e:
    raise SystemExit(f"aot: {e}") from None
  Console(width=200).print(table(report))
  if args.output:
    with open(args.output, "w") as f:
      json.dump(report, f, indent=2)
  failures = over_budget(report)
  if failures:
    raise SystemExit("aot: " + "\naot: ".join(failures))


def run() -> None:
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
