"""Timing and reporting shared by the benchmarks.

Method: compile time measured apart (AOT `lower().compile()`, or the first call minus the median where
the program is compiled inside a library call); warm-up calls excluded; the median of repeated calls,
each ended by `jax.block_until_ready`.
"""

import dataclasses
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
  """median_s: median seconds per call; times_s: every timed call; compile_s: compilation (None: none)."""

  median_s: float
  times_s: tuple[float, ...]
  compile_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Program:
  """One benchmarked program, built once by its bench module.

  call(): one timed call (its result is what `block_until_ready` waits on); lower(): the device program a
  call dispatches, lowered for the arguments the next call will get; dispatches: device programs one call
  runs; flops: dense FLOPs of one call (None: not counted).
  """

  name: str
  call: Callable[[], Any]
  lower: Callable[[], Any]
  dispatches: int
  flops: float | None


def gemm_program(size: int) -> Program:
  """The fp32 GEMM ceiling: a [size, size] @ [size, size] matmul, 2 size³ FLOPs."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  return Program("gemm_ceiling", lambda: matmul(a, a), lambda: matmul.lower(a, a), 1, 2.0 * size**3)


def compile_s(program: Program) -> float:
  """Seconds to lower and compile the device program of `program`."""
  start = time.perf_counter()
  program.lower().compile()
  return time.perf_counter() - start


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
  """Median wall time of `repeats` calls of `fn` after `warmup` untimed calls; each call is ended by
  block_until_ready on its result."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return Timing(median_s=statistics.median(times), times_s=tuple(times))


def measure_first_call(fn: Callable[[], Any], repeats: int) -> Timing:
  """`measure` of a function that compiles on its first call: compile_s = first call - median."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  timing = measure(fn, repeats, warmup=0)
  return dataclasses.replace(timing, compile_s=max(first - timing.median_s, 0.0))


def aot_compile_s(jitted, *args, **kwargs) -> float:
  """Seconds to lower and compile `jitted` for these arguments."""
  start = time.perf_counter()
  jitted.lower(*args, **kwargs).compile()
  return time.perf_counter() - start


def cost_analysis(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled program (loop bodies counted once): "flops", "bytes accessed", ..."""
  analysis = compiled.cost_analysis()
  return analysis[0] if isinstance(analysis, list) else analysis


def cost_flops(jitted, *args, **kwargs) -> float:
  """XLA's FLOP count of the compiled program (loop bodies counted once)."""
  return float(cost_analysis(jitted.lower(*args, **kwargs).compile())["flops"])


def device() -> str:
  devices = jax.devices()
  return (
    f"{devices[0].platform}:{devices[0].device_kind} x{len(devices)} "
    f"({platform.processor() or platform.machine()})"
  )


def versions() -> dict[str, str]:
  out = {"python": sys.version.split()[0], "jax": jax.__version__, "numpy": np.__version__}
  for name in ("jaxlib", "flax", "optax", "torch"):
    module = sys.modules.get(name)
    if module is not None:
      out[name] = module.__version__
  return out


def result(
  name: str,
  value: float,
  unit: str,
  reference_value: float | None,
  reference: str,
  flops_per_call: float | None,
  seconds: float,
  ceiling_flops: float | None,
  sizes: dict,
  timing: Timing,
  **extra,
) -> dict:
  """One row of results.json. pct_of_ceiling: achieved FLOP/s over the measured GEMM FLOP/s."""
  achieved = None if flops_per_call is None else flops_per_call / seconds
  return {
    "name": name,
    "value": value,
    "unit": unit,
    "reference_value": reference_value,
    "reference": reference,
    "ratio_vs_reference": None if not reference_value else value / reference_value,
    "pct_of_ceiling": None
    if achieved is None or not ceiling_flops
    else 100 * achieved / ceiling_flops,
    "flops_per_call": flops_per_call,
    "seconds_per_call": seconds,
    "compile_s": timing.compile_s,
    "times_s": list(timing.times_s),
    "sizes": sizes,
    "device": device(),
    "versions": versions(),
    **extra,
  }
