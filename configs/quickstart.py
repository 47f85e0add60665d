"""Quickstart on the embedded synthetic world (CPU, 2 cores): the whole loop, data -> user model ->
simulate -> agent -> evaluate -> report.

Variants (`get_config(arg)`, the text after `:` in --config):
  default   the quickstart below.
  tiny      (alias big_vision's `runlocal`) a world and models small enough for unit tests (seconds per
            stage): 3 planted types, 64 users, feature width 16, a few EM epochs and 200 agent steps;
            `tests/conftest.tiny_config()` is this variant.

Command:  make quickstart
  (= python -m pasta_jax.main --config=configs/quickstart.py --workdir=runs/quickstart)
          python -m pasta_jax.main --config=configs/quickstart.py:tiny --workdir=runs/tiny
Runtime:  9 min 03 s wall (14 min 45 s of CPU) on the 2 idle cores with the venv installed: data 12 s,
          user_model 77 s, simulate 12 s, agent 272 s, evaluate 157 s, report 5 s (an earlier run of the
          same stages took 12.6 min; this machine's speed varies).
Result:   runs/quickstart/report.json: 4 planted user types recovered (ari_vs_planted 0.997, held-out
          log-likelihood per choice -0.8123 against the planted model's -0.8025, selected_k == 4; every
          restart of every K converged, after 27-33 of the 40 mini-batch epochs); on 2000 planted users,
          IQL on real + simulated data beats random, generator order, myopic IQL, behaviour cloning and
          IQL on real data only in final-turn utility with 95% CIs of the difference above 0; PPO
          trained in the fitted simulator (agent_best) beats greedy under the fitted posterior (+0.125
          [0.077, 0.173]); the planner and the oracle stay above it; PNGs under user_model/, evaluate/
          and report/ (docs/example_report/ is one such report).
"""

from configs import common

VARIANTS = ("tiny",)
TINY = {
  "world.num_types": 3,
  "world.num_users": 64,
  "world.sessions_per_user": 2,
  "world.feature_dim": 16,
  "world.values_per_attribute": 3,
  "world.choice_inverse_temperature": 2.0,
  "user_model.num_types": 3,
  "user_model.hidden": (8,),
  "em.epochs": 4,
  "em.batch_users": 16,
  "em.m_steps": 2,
  "em.learning_rate": 1e-2,
  "em.restarts": 2,
  "em.checkpoint_every_epochs": 1,
  "select_k.ks": (1, 3),
  "simulate.num_users": 48,
  "agent.hidden": (16,),
  **{
    f"agent.{learner}.{field}": value
    for learner in ("iql", "bc")
    for field, value in (
      ("batch_size", 32),
      ("steps", 200),
      ("steps_per_dispatch", 100),
      ("checkpoint_every_steps", 100),
    )
  },
  "agent.ppo.hidden": (16,),
  "agent.ppo.num_envs": 32,
  "agent.ppo.iterations": 4,
  "agent.ppo.iterations_per_dispatch": 2,
  "agent.ppo.checkpoint_every_iterations": 2,
  "evaluate.num_users": 64,
  "evaluate.bootstrap_samples": 200,
}


def get_config(arg: str | None = None):
  """The quickstart config, or its `tiny` variant (alias `runlocal`)."""
  name = common.variant(arg, VARIANTS)
  c = common.base_config()
  c.world.num_types = 4
  c.world.num_users = 1000
  c.world.sessions_per_user = 3
  c.world.feature_dim = 32
  c.world.values_per_attribute = 5
  c.world.choice_inverse_temperature = 2.0

  c.user_model.num_types = 4
  c.user_model.hidden = ()  # The planted utilities are linear in the features: linear heads suffice.

  c.em.epochs = 40  # The most; every K's restarts meet the stopping rule after 27-33 epochs.
  c.em.batch_users = 32
  c.em.learning_rate = 1e-2
  c.em.decay_from_epoch = 8.0  # Steps held 8 epochs, then x0.7 per epoch (common.py's em block).
  c.em.decay_rate = 0.7
  c.em.restarts = 3
  c.em.checkpoint_every_epochs = 10

  c.select_k.ks = (1, 2, 3, 4, 5, 6)

  c.simulate.num_users = 3000
  c.agent.hidden = (128, 128)
  c.agent.iql.steps = 10_000
  c.agent.iql.steps_per_dispatch = 1000
  c.agent.iql.checkpoint_every_steps = 2000
  c.agent.bc.steps = 3000
  c.evaluate.num_users = 2000
  if name == "tiny":
    c.update_from_flattened_dict(TINY)
  return c
