"""All benchmarks in one process: results as a JSON list and a printed table.

  python -m benchmarks.run --output=runs/bench/results.json [--quick]

Rows: gemm_ceiling (fp32 2048² matmul; reference NumPy's), sim_mlp_n2048 (simulator.run scoring slates
with the utility MLP; reference a vectorised NumPy simulator, with a minimal JAX one alongside),
sim_table_n2048 and sim_table_n65536 (simulator.run on the (image × type) table; reference a minimal JAX
simulator), em_epoch (em.run_epoch), iql_update (iql.run_dispatch; reference PyTorch). pct_of_ceiling is
the achieved FLOP/s over the measured GEMM FLOP/s. `--quick`: tiny sizes and 2 repeats, to check the
schema. Method: see `benchmarks.common`.
"""

import argparse
import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, em_bench, iql_bench, simulator_bench

FIELDS = (
  "name",
  "value",
  "unit",
  "reference_value",
  "ratio_vs_reference",
  "pct_of_ceiling",
  "sizes",
  "device",
  "versions",
)


def gemm(size: int, repeats: int) -> dict:
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  compile_s = common.aot_compile_s(matmul, a, a)
  timing = dataclasses.replace(
    common.measure(lambda: matmul(a, a), repeats, warmup=2), compile_s=compile_s
  )
  host = np.asarray(a)
  reference = common.measure(lambda: host @ host, repeats, warmup=1)
  flops = 2.0 * size**3
  return common.result(
    "gemm_ceiling",
    flops / timing.median_s / 1e9,
    "GFLOP/s",
    flops / reference.median_s / 1e9,
    "NumPy matmul",
    flops,
    timing.median_s,
    flops / timing.median_s,
    {"m": size, "n": size, "k": size, "dtype": "float32"},
    timing,
  )


def simulator_rows(
  sizes: simulator_bench.Sizes,
  mlp_users: int,
  table_users: tuple[int, ...],
  repeats: int,
  ceiling: float,
) -> list[dict]:
  generator, users = simulator_bench.make_generator(sizes), simulator_bench.make_users(sizes)
  mesh = simulator_bench.mesh()
  model = simulator_bench.plain_model(users, generator)
  arrays = simulator_bench.model_arrays(model)
  rows = []
  for use_table, num_users in [(False, mlp_users)] + [(True, n) for n in table_users]:
    steps = num_users * sizes.turns
    timing = common.measure_first_call(
      simulator_bench.run_fn(sizes, generator, users, num_users, use_table, mesh), repeats
    )
    minimal_call = functools.partial(
      simulator_bench.minimal_jax_simulator,
      jax.random.key(0),
      sizes,
      generator,
      arrays,
      num_users,
      use_table,
    )
    minimal = common.measure_first_call(minimal_call, repeats)
    numpy_users = num_users if not use_table else min(num_users, 8192)
    numpy_call = functools.partial(
      simulator_bench.numpy_simulator, sizes, generator, model, numpy_users, use_table
    )
    numpy_ref = common.measure(numpy_call, repeats, warmup=1)
    numpy_rate = numpy_users * sizes.turns / numpy_ref.median_s
    minimal_rate = steps / minimal.median_s
    flops = steps * (0.0 if use_table else sizes.mlp_flops_per_user_step())
    if use_table:
      flops = steps * float(sizes.slate_size * sizes.images_per_prompt * sizes.num_types)
    name = f"sim_table_n{num_users}" if use_table else f"sim_mlp_n{num_users}"
    reference = (
      (minimal_rate, "minimal JAX simulator") if use_table else (numpy_rate, "NumPy simulator")
    )
    rows.append(
      common.result(
        name,
        steps / timing.median_s,
        "user-steps/s",
        reference[0],
        reference[1],
        flops,
        timing.median_s,
        ceiling,
        {
          **sizes.as_dict(),
          "users": num_users,
          "path": "table" if use_table else "mlp",
          "through": "simulator.run (evaluation outputs)",
          "policy": "RandomSlate",
        },
        timing,
        numpy_user_steps_per_s=numpy_rate,
        numpy_users=numpy_users,
        minimal_jax_user_steps_per_s=minimal_rate,
        minimal_jax_compile_s=minimal.compile_s,
        ratio_vs_numpy=steps / timing.median_s / numpy_rate,
        ratio_vs_minimal_jax=steps / timing.median_s / minimal_rate,
      )
    )
  return rows


def em_row(sizes: em_bench.Sizes, repeats: int, ceiling: float) -> dict:
  epoch, flops, compile_s, padded = em_bench.setup(sizes)
  timing = dataclasses.replace(common.measure(epoch, repeats, warmup=1), compile_s=compile_s)
  return common.result(
    "em_epoch",
    timing.median_s,
    "s/epoch",
    None,
    "none",
    flops,
    timing.median_s,
    ceiling,
    em_bench.sizes_dict(sizes, padded),
    timing,
    users_per_s=sizes.restarts * padded / timing.median_s,
  )


def iql_row(sizes: iql_bench.Sizes, repeats: int, ceiling: float) -> dict:
  dispatch, flops, compile_s = iql_bench.setup(sizes)
  timing = dataclasses.replace(common.measure(dispatch, repeats, warmup=1), compile_s=compile_s)
  torch_dispatch, _ = iql_bench.torch_setup(sizes)
  torch_timing = common.measure(torch_dispatch, repeats, warmup=1)
  steps = sizes.steps_per_dispatch
  return common.result(
    "iql_update",
    steps / timing.median_s,
    "updates/s",
    steps / torch_timing.median_s,
    "PyTorch (2 threads)",
    flops * steps,
    timing.median_s,
    ceiling,
    dataclasses.asdict(sizes),
    timing,
    flops_per_update=flops,
  )


def progress(rows: list[dict]) -> list[dict]:
  """Prints each finished row to stderr; returns `rows`."""
  for row in rows:
    print(f"{row['name']}: {row['value']:.4g} {row['unit']}", file=sys.stderr, flush=True)
  return rows


def print_table(rows: list[dict]) -> None:
  header = f"{'name':<18}{'value':>14} {'unit':<14}{'reference':>14}{'ratio':>8}{'%ceiling':>10}{'compile_s':>11}"
  print(header)
  for r in rows:
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    print(
      f"{r['name']:<18}{fmt(r['value'], '14.4g')} {r['unit']:<14}{fmt(r['reference_value'], '14.4g')}"
      f"{fmt(r['ratio_vs_reference'], '8.2f')}{fmt(r['pct_of_ceiling'], '10.1f')}"
      f"{fmt(r['compile_s'], '11.2f')}"
    )


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="runs/bench/results.json")
  parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (schema check)")
  parser.add_argument(
    "--repeats", type=int, default=None, help="timed calls per figure (default 5)"
  )
  parser.add_argument("--only", default="", help="comma-separated subset: gemm,sim,em,iql")
  args = parser.parse_args(argv)
  repeats = args.repeats or (2 if args.quick else 5)
  only = set(args.only.split(",")) if args.only else {"gemm", "sim", "em", "iql"}
  gemm_row = gemm(256 if args.quick else 2048, repeats)
  ceiling = gemm_row["flops_per_call"] / gemm_row["seconds_per_call"]
  rows = progress([gemm_row])
  if "sim" in only:
    sizes = simulator_bench.QUICK if args.quick else simulator_bench.Sizes()
    rows += progress(
      simulator_rows(
        sizes,
        32 if args.quick else 2048,
        (32, 256) if args.quick else (2048, 65536),
        repeats,
        ceiling,
      )
    )
  if "em" in only:
    rows += progress([em_row(em_bench.QUICK if args.quick else em_bench.Sizes(), repeats, ceiling)])
  if "iql" in only:
    rows += progress(
      [iql_row(iql_bench.QUICK if args.quick else iql_bench.Sizes(), repeats, ceiling)]
    )
  if args.quick:
    for row in rows:
      row["name"] = row["name"].replace("_n32", "_n2048").replace("_n256", "_n65536")
      row["sizes"]["quick"] = True
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(rows, f, indent=2)
  print_table(rows)
  print(f"wrote {args.output}", file=sys.stderr)
  return rows


if __name__ == "__main__":
  main()
