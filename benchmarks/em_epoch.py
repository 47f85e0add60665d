"""Benchmark of the EM hot path: the E-step (per-user log-likelihood of every type) and one mini-batch
EM epoch (its M-steps and the end-of-epoch log-likelihood of all users it records), on the quickstart
world. Ratio against a NumPy E-step measured in the same process.

  python benchmarks/em_epoch.py --out=runs/bench/em_epoch.json [--users=1000 --feature_dim=32]

Method: compile time measured apart (AOT lower+compile); 2 warm-up calls excluded; median of
--repeats timed calls, each ended by block_until_ready.
"""

import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import quickstart  # noqa: E402
from pasta_jax import parallel, synthetic_env  # noqa: E402
from pasta_jax.data import schema  # noqa: E402
from pasta_jax.user_model import em, utility  # noqa: E402

flags.DEFINE_string("out", "runs/bench/em_epoch.json", "Where to write the JSON result.")
flags.DEFINE_integer("users", 1000, "Synthetic users.")
flags.DEFINE_integer("feature_dim", 32, "Feature width D.")
flags.DEFINE_integer("repeats", 7, "Timed repeats (median reported).")
FLAGS = flags.FLAGS


def _time(fn, repeats: int) -> float:
  for _ in range(2):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def numpy_user_loglik(kernel, tau, image, text, choices) -> np.ndarray:
  """Linear heads, mean aggregation: the NumPy reference of em.user_loglik, f64[U, K]."""
  features = np.concatenate(
    [
      image[choices.image_rows],
      np.broadcast_to(
        text[choices.text_rows][..., None, :], choices.image_rows.shape + (text.shape[-1],)
      ),
    ],
    -1,
  )
  utilities = (features @ kernel).mean(-2)  # [U, T, L, K]
  logits = np.where(choices.option_mask[..., None], tau * utilities, -np.inf)
  log_prob = logits - np.logaddexp.reduce(logits, axis=-2, keepdims=True)
  chosen = np.take_along_axis(log_prob, choices.choice[..., None, None], axis=-2)[..., 0, :]
  return np.where(choices.turn_mask[..., None], chosen, 0.0).sum(1)


def main(_):
  config = quickstart.get_config()
  config.world.num_users = FLAGS.users
  config.world.feature_dim = FLAGS.feature_dim
  log = synthetic_env.generate_rater_log(jax.random.key(0), config)
  spec = schema.RecordSpec.from_config(config)
  choices, _ = schema.to_choices(log.records, spec)
  mesh = parallel.make_mesh(config.mesh)
  settings = em.EMSettings.from_config(config.em)
  model = utility.from_config(config)
  table, placed = em.place(log.table, choices, settings, mesh)
  state = em.init_state(
    jax.random.key(1), model, settings, em.example_options(table, placed), placed.num_users
  )
  state = jax.device_put(state, parallel.replicated(mesh))
  params = em.unbatch(state, 0).params

  e_step = jax.jit(em.user_loglik, static_argnums=1)
  start = time.perf_counter()
  e_step.lower(params, model, table, placed).compile()
  e_step_compile = time.perf_counter() - start
  e_step_s = _time(lambda: e_step(params, model, table, placed), FLAGS.repeats)

  kernel = np.asarray(params["params"]["heads"]["kernel"], np.float64)
  tau = float(np.exp(params["params"]["log_inverse_temperature"]))
  image, text = np.asarray(log.table.image, np.float64), np.asarray(log.table.text, np.float64)
  numpy_s = _time(lambda: numpy_user_loglik(kernel, tau, image, text, choices), FLAGS.repeats)
  max_abs_diff = float(
    np.max(
      np.abs(
        numpy_user_loglik(kernel, tau, image, text, choices)
        - np.asarray(e_step(params, model, table, placed))[: choices.num_users]
      )
    )
  )

  start = time.perf_counter()
  em.run_epoch.lower(state, table, placed, model, settings, mesh).compile()
  epoch_compile = time.perf_counter() - start
  epoch_s = _time(
    lambda: em.run_epoch(jax.tree.map(jnp.copy, state), table, placed, model, settings, mesh),
    FLAGS.repeats,
  )

  result = {
    "benchmark": "em_epoch",
    "device": str(jax.devices()[0]),
    "device_count": jax.device_count(),
    "platform": platform.platform(),
    "jax": jax.__version__,
    "dtype": "float32",
    "sizes": {
      "users": int(choices.num_users),
      "turns": int(choices.choice.shape[1]),
      "slate": int(choices.option_mask.shape[2]),
      "images": int(choices.image_rows.shape[-1]),
      "feature_dim": FLAGS.feature_dim,
      "types": model.num_types,
      "restarts": settings.restarts,
      "batch_users": settings.batch_users,
      "m_steps": settings.m_steps,
    },
    "e_step": {
      "compile_s": e_step_compile,
      "median_s": e_step_s,
      "numpy_median_s": numpy_s,
      "speedup_vs_numpy": numpy_s / e_step_s,
      "max_abs_diff_vs_numpy": max_abs_diff,
    },
    "minibatch_epoch": {
      "compile_s": epoch_compile,
      "median_s": epoch_s,
      "users_per_s": settings.restarts * placed.num_users / epoch_s,
    },
    "repeats": FLAGS.repeats,
  }
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
