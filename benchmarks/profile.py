"""Where the benchmarked programs spend their time: a `jax.profiler` trace of warm calls of each program
of `benchmarks.run`, its time by XLA op category, and the compiled program's FLOPs and bytes against a
measured roofline.

  python -m benchmarks.profile --output=runs/bench/profile.json [--quick] [--calls=3] [--only=gemm,sim]

Per program (built by the bench modules' `program` functions): the untraced median seconds per call
(`common.measure`), then `--calls` warm calls traced, each inside a `TraceAnnotation`, and the trace's
`*.trace.json.gz` (Chrome trace events) read back. Each XLA op of the trace (a thunk event with an
`hlo_op`) is put in a category by its instruction in the compiled program's HLO (the fused computation's
opcodes and the op_name metadata of its instructions):

  gemm            dot or convolution (also fused, or a oneDNN/YNNPACK matmul custom call)
  rng             mostly work of jax.random (threefry rounds, bits to floats)
  gather_scatter  gather or scatter (also fused with elementwise work)
  reduce_sort     reduce, reduce-window or sort
  copy_transpose  data movement only (copy, transpose, slice, concatenate, dynamic-update-slice, ...)
  elementwise     any other fusion or elementwise op
  control         while/conditional/call thunks' own time (loop bookkeeping)
  other           custom calls that are not matmuls, and ops of other device programs
  host_gaps       wall time of the calls in which no XLA op ran (dispatch, host work, copies to NumPy)

Attribution: on each trace thread the innermost op owns the time; where k threads run ops at once each
gets 1/k of that wall time, so the categories and host_gaps add up to the traced wall time. An op that
runs asynchronously (an Eigen dot: a short launch event, then an `end: <op>` marker when it completes)
owns the time up to its marker as if on a thread of its own (`async_tails`).
`mean_busy_threads` is the thread time of ops over the time any op ran.

The GEMM ceiling is measured again just before each program (the machine may be shared), and each
row's percentages of the ceiling use that measurement (`gemm_flops_per_s`).

Roofline: the machine balance is the measured GEMM FLOP/s over the measured streaming bandwidth
(`x * 2 + 1` on a large f32 array); a program whose arithmetic intensity (XLA's FLOPs over its bytes
accessed; loop bodies are counted once in both) is below it is memory-bound.
"""

import argparse
import bisect
import dataclasses
import gzip
import json
import os
import re
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from benchmarks import common, em_bench, iql_bench, simulator_bench

CATEGORIES = (
  "gemm",
  "rng",
  "gather_scatter",
  "reduce_sort",
  "copy_transpose",
  "elementwise",
  "control",
  "other",
)
GAPS = "host_gaps"
CALL_ANNOTATION = "benchmarks.profile.call"
END_MARKER = "end: "
CONTROL = frozenset({"while", "conditional", "call"})
TRIVIAL = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "reshape"})
MOVEMENT = frozenset(
  {
    "copy",
    "transpose",
    "concatenate",
    "pad",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "broadcast",
    "reverse",
    "iota",
  }
)
REDUCTIONS = frozenset({"reduce", "reduce-window", "sort", "select-and-scatter"})
GEMM_TARGET = re.compile(r"onednn|ynn|matmul|gemm|xnn", re.IGNORECASE)
RNG_OP_NAME = re.compile(
  r"threefry|random_bits|random_split|random_fold_in|random_wrap|random_seed|"
  r"jit\((_uniform|_randint|_gumbel|_normal|_bernoulli|_categorical|_choice|_split|_fold_in|"
  r"_random_bits|_truncated_normal|_exponential|permutation|_shuffle)\)"
)


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction: its opcode, the computations it calls, its op_name and custom-call target."""

  name: str
  opcode: str
  called: tuple[str, ...]
  op_name: str
  target: str


def _shape_end(rhs: str) -> int:
  """Index just past the result shape at the start of an instruction's right-hand side."""
  if not rhs.startswith("("):
    return rhs.index(" ")
  depth = 0
  for i, char in enumerate(rhs):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return i + 1
  raise ValueError(f"benchmarks.profile: unbalanced tuple shape in HLO line {rhs[:200]!r}")


def parse_hlo(text: str) -> dict[str, tuple[Instruction, ...]]:
  """The computations of an HLO module's text (`compiled.as_text()`): name -> its instructions."""
  raw: dict[str, list[tuple[str, str, str]]] = {}
  current = None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.endswith("{") and " -> " in line:
      current = line.removeprefix("ENTRY ").split(" ", 1)[0].lstrip("%")
      raw[current] = []
    elif current is not None and (match := re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (.*)$", line)):
      name, rhs = match.groups()
      rest = rhs[_shape_end(rhs) :].lstrip()
      raw[current].append((name, rest.split("(", 1)[0], rest))
  computations = {}
  for comp, lines in raw.items():
    instructions = []
    for name, opcode, rest in lines:
      op_name = re.search(r'op_name="([^"]*)"', rest)
      target = re.search(r'custom_call_target="([^"]*)"', rest)
      called = tuple(c for c in re.findall(r"%([\w.\-]+)", rest) if c in raw and c != comp)
      instructions.append(
        Instruction(
          name,
          opcode,
          called,
          op_name.group(1) if op_name else "",
          target.group(1) if target else "",
        )
      )
    computations[comp] = tuple(instructions)
  return computations


def _fused(instruction: Instruction, computations) -> list[Instruction]:
  """The instruction and, unless it is control flow, every instruction of the computations it calls."""
  out, stack, seen = (
    [instruction],
    [] if instruction.opcode in CONTROL else list(instruction.called),
    set(),
  )
  while stack:
    comp = stack.pop()
    if comp in seen:
      continue
    seen.add(comp)
    for inner in computations[comp]:
      out.append(inner)
      stack.extend(inner.called)
  return out


def categorize(instruction: Instruction, computations) -> str:
  """The category (one of CATEGORIES) of one top-level HLO instruction; see the module docstring."""
  if instruction.opcode in CONTROL:
    return "control"
  ops = _fused(instruction, computations)
  opcodes = {op.opcode for op in ops}
  if opcodes & {"dot", "convolution"} or any(
    GEMM_TARGET.search(op.target) for op in ops if op.target
  ):
    return "gemm"
  work = [op for op in ops if op.opcode not in TRIVIAL and op.opcode != "fusion"]
  if work and 2 * sum(bool(RNG_OP_NAME.search(op.op_name)) for op in work) >= len(work):
    return "rng"
  if opcodes & {"rng", "rng-bit-generator"}:
    return "rng"
  if opcodes & {"gather", "scatter"}:
    return "gather_scatter"
  if opcodes & REDUCTIONS:
    return "reduce_sort"
  if all(op.opcode in MOVEMENT | TRIVIAL or op.opcode == "fusion" for op in ops):
    return "copy_transpose"
  if instruction.opcode == "custom-call":
    return "other"
  return "elementwise"


def op_categories(hlo_text: str) -> tuple[str, dict[str, str]]:
  """(module name, instruction name -> category) of every instruction of a compiled module."""
  module = re.match(r"HloModule ([\w.\-]+)", hlo_text)
  if module is None:
    raise ValueError(
      "benchmarks.profile: compiled.as_text() does not start with 'HloModule <name>'"
    )
  computations = parse_hlo(hlo_text)
  return module.group(1), {
    ins.name: categorize(ins, computations) for comp in computations.values() for ins in comp
  }


def load_trace(log_dir: str) -> list[dict]:
  """The Chrome trace events of the one profile under `log_dir` (plugins/profile/<run>/*.trace.json.gz)."""
  root = os.path.join(log_dir, "plugins", "profile")
  paths = [
    os.path.join(root, run, f)
    for run in sorted(os.listdir(root))
    for f in os.listdir(os.path.join(root, run))
    if f.endswith(".trace.json.gz")
  ]
  if len(paths) != 1:
    raise ValueError(
      f"benchmarks.profile: expected one *.trace.json.gz under {root}, found {paths}; "
      "pass an empty --trace_dir"
    )
  with gzip.open(paths[0], "rt") as f:
    return json.load(f)["traceEvents"]


Segment = tuple[float, float, tuple[str, str]]


def innermost_segments(events: Iterable[dict]) -> list[Segment]:
  """Properly nested complete events of one thread -> (start µs, end µs, (module, op)) pieces, each
  owned by the innermost event open over it."""
  points = []
  for e in events:
    if e["dur"] > 0:
      label = (e["args"].get("hlo_module", ""), e["args"]["hlo_op"])
      points.append((e["ts"], 1, -e["dur"], label))
      points.append((e["ts"] + e["dur"], 0, 0.0, label))
  points.sort(key=lambda p: p[:3])
  segments, stack, last = [], [], None
  for t, is_start, _, label in points:
    if stack and t > last:
      segments.append((last, t, stack[-1]))
    if is_start:
      stack.append(label)
    elif stack:
      stack.pop()
    last = t
  return segments


def _clip(segments: list[Segment], windows: list[tuple[float, float]]) -> list[Segment]:
  return [
    (max(s, lo), min(e, hi), label)
    for s, e, label in segments
    for lo, hi in windows
    if min(e, hi) > max(s, lo)
  ]


def _is_op(event: dict) -> bool:
  """Whether a trace event is an XLA op's thunk (a complete event naming its `hlo_op`)."""
  return event.get("ph") == "X" and "hlo_op" in event.get("args", {})


def async_tails(events: list[dict], loops: frozenset[str] = frozenset()) -> list[dict]:
  """The unseen ends of asynchronous ops, as op events each on a thread of its own.

  An XLA:CPU op that runs asynchronously (an Eigen dot, for one) has a short thunk event where it is
  launched and an `end: <op>` marker where it completes; it runs in between on pool threads the
  trace does not show. Each marker belongs to the latest event of its op that started before it (not
  every event has a marker), and a marker later than that event's end gives a tail event from the
  end to the marker. The ops named in `loops` (while/conditional/call, whose bodies' ops have events
  of their own) get no tail.
  """
  starts = defaultdict(list)
  for e in sorted(filter(_is_op, events), key=lambda e: e["ts"]):
    if e["args"]["hlo_op"] not in loops:
      starts[e["args"]["hlo_op"]].append(e)
  times = {op: [e["ts"] for e in launches] for op, launches in starts.items()}
  tails, paired = [], set()
  for marker in events:
    name = marker.get("name", "")
    op = name.removeprefix(END_MARKER)
    if marker.get("ph") != "X" or not name.startswith(END_MARKER) or op not in starts:
      continue
    index = bisect.bisect_right(times[op], marker["ts"]) - 1
    if index < 0 or (op, index) in paired:
      continue
    paired.add((op, index))
    launch = starts[op][index]
    end = launch["ts"] + launch["dur"]
    if marker["ts"] > end:
      tid = f"async:{op}:{len(tails)}"
      tails.append({**launch, "tid": tid, "ts": end, "dur": marker["ts"] - end})
  return tails


def attribute(
  events: list[dict], windows: list[tuple[float, float]], loops: frozenset[str] = frozenset()
) -> tuple[dict[tuple[str, str], float], float, float]:
  """(op -> µs of wall time, µs in which any op ran, µs of op thread time) inside the windows, the
  tails of asynchronous ops (`async_tails`, none for the `loops`) included; where k threads run ops
  at once each op gets 1/k of that time (see the module docstring)."""
  by_thread = defaultdict(list)
  for e in [*events, *async_tails(events, loops)]:
    if _is_op(e):
      by_thread[(e["pid"], e["tid"])].append(e)
  segments = [
    s for thread in by_thread.values() for s in _clip(innermost_segments(thread), windows)
  ]
  points = sorted(
    [(s, 1, label) for s, _, label in segments] + [(e, -1, label) for _, e, label in segments]
  )
  owned, active, busy, last = defaultdict(float), Counter(), 0.0, None
  for t, step, label in points:
    running = sum(active.values())
    if running and t > last:
      busy += t - last
      for op, count in active.items():
        if count:
          owned[op] += (t - last) * count / running
    active[label] += step
    last = t
  return dict(owned), busy, sum(e - s for s, e, _ in segments)


def trace_calls(program: common.Program, calls: int, log_dir: str) -> list[dict]:
  """Events of `calls` warm calls of the program, each inside a TraceAnnotation (python tracer off)."""
  jax.block_until_ready(program.call())
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  with jax.profiler.trace(log_dir, profiler_options=options):
    for _ in range(calls):
      with jax.profiler.TraceAnnotation(CALL_ANNOTATION):
        jax.block_until_ready(program.call())
  return load_trace(log_dir)


def call_windows(events: list[dict]) -> list[tuple[float, float]]:
  return sorted(
    (e["ts"], e["ts"] + e["dur"])
    for e in events
    if e.get("ph") == "X" and e.get("name") == CALL_ANNOTATION
  )


def summarize(
  owned: dict[tuple[str, str], float],
  busy_us: float,
  thread_us: float,
  wall_us: float,
  calls: int,
  module: str,
  categories: dict[str, str],
  top: int = 8,
) -> dict:
  """Shares (% of the traced wall time) and ms per call by category and the `top` ops."""
  per_category = dict.fromkeys(CATEGORIES, 0.0)
  unmatched = 0.0
  labelled = []
  for (op_module, op), us in owned.items():
    category = categories.get(op, "other") if op_module == module else "other"
    unmatched += us if op_module == module and op not in categories else 0.0
    per_category[category] += us
    labelled.append((us, op if op_module == module else f"{op_module}/{op}", category))
  per_category[GAPS] = max(wall_us - busy_us, 0.0)
  labelled.sort(reverse=True)
  return {
    "share_pct": {k: 100 * v / wall_us for k, v in per_category.items()},
    "ms_per_call": {k: v / calls / 1e3 for k, v in per_category.items()},
    "mean_busy_threads": thread_us / busy_us if busy_us else 0.0,
    "unmatched_op_pct": 100 * unmatched / wall_us,
    "top_ops": [
      {"op": op, "category": c, "ms_per_call": us / calls / 1e3, "pct": 100 * us / wall_us}
      for us, op, c in labelled[:top]
    ],
  }


def roofline(
  flops: float, bytes_accessed: float, ceiling_flops: float, bandwidth: float
) -> dict[str, float | str]:
  """Arithmetic intensity (FLOP/byte) against the machine balance; attainable % of the GEMM ceiling."""
  intensity = flops / bytes_accessed if bytes_accessed else float("inf")
  balance = ceiling_flops / bandwidth
  return {
    "intensity_flop_per_byte": intensity,
    "machine_balance_flop_per_byte": balance,
    "bound": "memory" if intensity < balance else "compute",
    "attainable_pct_of_ceiling": 100 * min(1.0, intensity / balance),
  }


def profile_program(
  program: common.Program,
  calls: int,
  repeats: int,
  ceiling_flops: float,
  bandwidth: float,
  trace_dir: str,
) -> dict:
  """The profile of one program: untraced timing, category shares, cost analysis and roofline."""
  timing = common.measure(program.call, repeats, warmup=1)
  compiled = program.lower().compile()
  module, categories = op_categories(compiled.as_text())
  cost = common.cost_analysis(compiled)
  events = trace_calls(program, calls, trace_dir)
  windows = call_windows(events)
  if len(windows) != calls:
    raise ValueError(
      f"benchmarks.profile: {program.name}: {len(windows)} '{CALL_ANNOTATION}' events in the trace "
      f"under {trace_dir}, expected {calls}"
    )
  loops = frozenset(op for op, category in categories.items() if category == "control")
  owned, busy, thread_time = attribute(events, windows, loops)
  wall = sum(hi - lo for lo, hi in windows)
  summary = summarize(owned, busy, thread_time, wall, calls, module, categories)
  seconds = timing.median_s
  gemm_s = summary["ms_per_call"]["gemm"] / 1e3
  flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  return {
    "name": program.name,
    "module": module,
    "calls_traced": calls,
    "dispatches_per_call": program.dispatches,
    "seconds_per_call": seconds,
    "traced_seconds_per_call": wall / calls / 1e6,
    **summary,
    "bench_flops_per_call": program.flops,
    "pct_of_ceiling": None
    if program.flops is None
    else 100 * program.flops / seconds / ceiling_flops,
    "gemm_ops_pct_of_ceiling": None
    if program.flops is None or not gemm_s
    else 100 * program.flops / gemm_s / ceiling_flops,
    "cost_analysis": {
      "flops_per_dispatch": flops,
      "bytes_accessed_per_dispatch": bytes_accessed,
      "loop_bodies_counted_once": True,
    },
    "roofline": roofline(flops, bytes_accessed, ceiling_flops, bandwidth),
    "largest": max(summary["share_pct"], key=summary["share_pct"].get),
  }


def stream_bandwidth(elements: int, repeats: int) -> float:
  """Bytes/s of `x * 2 + 1` on f32[elements] (one read and one write of each element)."""
  x = jnp.ones((elements,), jnp.float32)
  axpy = jax.jit(lambda v: v * 2.0 + 1.0)
  timing = common.measure(lambda: axpy(x), repeats, warmup=2)
  return 2 * 4 * elements / timing.median_s


def programs(
  quick: bool, only: set[str], em_users: int | None = None
) -> list[Callable[[], common.Program]]:
  """Builders of the programs of `benchmarks.run` besides the GEMM, those in `only` (quick: tiny sizes;
  em_users: the EM epoch's users instead of its benchmark's)."""
  builders = []
  if "sim" in only:
    sizes = simulator_bench.QUICK if quick else simulator_bench.Sizes()
    generator, users = simulator_bench.make_generator(sizes), simulator_bench.make_users(sizes)
    mesh = simulator_bench.mesh()
    runs = (
      [(False, 32), (True, 32), (True, 256)]
      if quick
      else [(False, 2048), (True, 2048), (True, 65536)]
    )
    builders += [
      lambda t=t, n=n: simulator_bench.program(sizes, generator, users, n, t, mesh) for t, n in runs
    ]
  if "em" in only:
    em_sizes = em_bench.QUICK if quick else em_bench.Sizes()
    em_sizes = dataclasses.replace(em_sizes, users=em_users or em_sizes.users)
    builders.append(lambda: em_bench.program(em_sizes)[0])
  if "iql" in only:
    builders.append(lambda: iql_bench.program(iql_bench.QUICK if quick else iql_bench.Sizes())[0])
  return builders


def print_table(report: dict) -> None:
  columns = (*CATEGORIES, GAPS)
  short = {
    "gather_scatter": "gather",
    "reduce_sort": "reduce",
    "copy_transpose": "copy",
    "elementwise": "elemwise",
  }
  print(
    f"{'program':<18}{'ms/call':>9}{'%ceil':>7}"
    + "".join(f"{short.get(c, c)[:8]:>9}" for c in columns)
    + f"{'FLOP/B':>8}{'bound':>8}"
  )
  for p in report["programs"]:
    pct = "-" if p["pct_of_ceiling"] is None else f"{p['pct_of_ceiling']:.1f}"
    print(
      f"{p['name']:<18}{1e3 * p['seconds_per_call']:9.2f}{pct:>7}"
      + "".join(f"{p['share_pct'][c]:9.1f}" for c in columns)
      + f"{p['roofline']['intensity_flop_per_byte']:8.2f}{p['roofline']['bound']:>8}"
    )
  print(
    f"shares: % of traced wall time; GEMM {report['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s, stream "
    f"{report['stream_bytes_per_s'] / 1e9:.1f} GB/s, balance {report['machine_balance_flop_per_byte']:.1f} "
    f"FLOP/B; load average {report['load_average'][0]:.1f} on {os.cpu_count()} CPUs"
  )


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default="runs/bench/profile.json")
  parser.add_argument("--quick", action="store_true", help="tiny sizes (schema check)")
  parser.add_argument(
    "--calls", type=int, default=None, help="traced calls per program (default 3)"
  )
  parser.add_argument("--repeats", type=int, default=None, help="untraced timed calls (default 5)")
  parser.add_argument(
    "--only", default="", help="comma-separated subset of gemm,sim,em,iql (the GEMM always runs)"
  )
  parser.add_argument(
    "--em_users", type=int, default=None, help="EM epoch users (default: em_bench.Sizes().users)"
  )
  parser.add_argument(
    "--trace_dir", default=None, help="keep the traces here (default: a temp dir)"
  )
  args = parser.parse_args(argv)
  calls, repeats = args.calls or (2 if args.quick else 3), args.repeats or (2 if args.quick else 5)
  only = set(args.only.split(",")) if args.only else {"sim", "em", "iql"}
  gemm = common.gemm_program(1024 if args.quick else 2048)
  ceiling = gemm.flops / common.measure(gemm.call, repeats, warmup=2).median_s
  bandwidth = stream_bandwidth(1 << (20 if args.quick else 24), repeats)
  report = {
    "device": common.device(),
    "versions": common.versions(),
    "quick": args.quick,
    "em_users": args.em_users,
    "gemm_flops_per_s": ceiling,
    "stream_bytes_per_s": bandwidth,
    "machine_balance_flop_per_byte": ceiling / bandwidth,
    "categories": [*CATEGORIES, GAPS],
    "programs": [],
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="pasta_profile_") as scratch:
    root = args.trace_dir or scratch
    for build in [lambda: gemm, *programs(args.quick, only, args.em_users)]:
      program = build()
      trace_dir = os.path.join(root, program.name)
      ceiling = gemm.flops / common.measure(gemm.call, repeats, warmup=1).median_s
      row = profile_program(program, calls, repeats, ceiling, bandwidth, trace_dir)
      row["gemm_flops_per_s"] = ceiling
      report["programs"].append(row)
      report["load_average"] = list(os.getloadavg())
      with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
      print(f"{program.name}: largest {row['largest']}", file=sys.stderr, flush=True)
  print_table(report)
  print(f"wrote {args.output}", file=sys.stderr)
  return report


if __name__ == "__main__":
  main()
