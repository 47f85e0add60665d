"""The policies a run trains and compares: the trained ones (learner x data mix), the baselines, the
logging policy of the simulated data, and where the agent stage saves each trained policy."""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from pasta_jax import checkpoint, simulator
from pasta_jax.agent import baselines, bc, iql, planning, ppo, value
from pasta_jax.agent import data as agent_data
from pasta_jax.config_checks import check, check_positive_int, check_real, check_widths
from pasta_jax.evaluation import agents as agent_eval

PPO_POLICY = "ppo/sim"
PLANNING = "planning"
_LOOPS = {
  "iql": ("batch_size", "steps", "steps_per_dispatch", "checkpoint_every_steps"),
  "bc": ("batch_size", "steps", "steps_per_dispatch", "checkpoint_every_steps"),
  "ppo": ("num_envs", "iterations", "iterations_per_dispatch", "checkpoint_every_iterations"),
}


def _check_loop(config: ml_collections.ConfigDict, learner: str) -> None:
  """Positive sizes; totals and checkpoint intervals multiples of the units per dispatch."""
  block, fields = config.agent[learner], _LOOPS[learner]
  for field in fields:
    check_positive_int(config, f"agent.{learner}.{field}")
  per_dispatch = block[fields[2]]
  for field in (fields[1], fields[3]):
    check(
      block[field] % per_dispatch == 0,
      f"agent.{learner}.{field}",
      block[field],
      f"must be a multiple of agent.{learner}.{fields[2]}={per_dispatch}",
    )


def _check_ppo(config: ml_collections.ConfigDict) -> None:
  p = config.agent.ppo
  try:
    value.parse_inputs(p.inputs)
  except (ValueError, AttributeError) as e:
    check(False, "agent.ppo.inputs", p.inputs, str(e))
  check_widths(p.hidden, "agent.ppo.hidden")
  _check_loop(config, "ppo")
  for field in ("epochs", "minibatches"):
    check_positive_int(config, f"agent.ppo.{field}")
  check(
    p.num_envs * config.interaction.turns % p.minibatches == 0,
    "agent.ppo.minibatches",
    p.minibatches,
    f"must divide agent.ppo.num_envs x interaction.turns = {p.num_envs * config.interaction.turns}",
  )
  check_real(config, "agent.ppo.learning_rate", above=0)
  for field in ("discount", "gae_lambda"):
    check_real(config, f"agent.ppo.{field}", at_least=0, at_most=1)
  check_real(config, "agent.ppo.clip", above=0)
  for field in ("entropy_coef", "value_coef"):
    check_real(config, f"agent.ppo.{field}", at_least=0)
  check_real(config, "agent.ppo.max_grad_norm", above=0)


def agent_inputs(config: ml_collections.ConfigDict) -> str:
  """config.agent.inputs; "text" in a config written before the field existed."""
  return config.agent.get("inputs", "text")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field of the `agent` block."""
  a = config.agent
  try:
    value.parse_inputs(agent_inputs(config), value.OFFLINE_INPUTS)
  except (ValueError, AttributeError) as e:
    check(False, "agent.inputs", agent_inputs(config), str(e))
  mixes = tuple(a.data_mixes)
  check(
    len(mixes) >= 1
    and len(set(mixes)) == len(mixes)
    and all(m in agent_data.DATA_MIXES for m in mixes),
    "agent.data_mixes",
    mixes,
    f"distinct values from {agent_data.DATA_MIXES}",
  )
  check_real(config, "agent.sim_fraction", above=0, below=1)
  check_widths(a.hidden, "agent.hidden")
  for learner in ("iql", "bc"):
    _check_loop(config, learner)
    check_real(config, f"agent.{learner}.learning_rate", above=0)
  check_real(config, "agent.iql.expectile", at_least=0.5, below=1)
  check_real(config, "agent.iql.discount", at_least=0, below=1)
  check_real(config, "agent.iql.polyak", above=0, at_most=1)
  check(
    isinstance(a.planning.enabled, bool), "agent.planning.enabled", a.planning.enabled, "a bool"
  )
  check_real(config, "agent.planning.discount", at_least=0)
  check(isinstance(a.ppo.enabled, bool), "agent.ppo.enabled", a.ppo.enabled, "a bool")
  if a.ppo.enabled:
    _check_ppo(config)


class Trained(NamedTuple):
  """A trained policy: its learner ("iql", "myopic", "bc", "ppo"), data mix and, for IQL, myopic IQL
  and BC, what it reads (a spec of `value.OFFLINE_INPUTS`)."""

  learner: str
  mix: str
  inputs: str = "text"


def trained_policies(config: ml_collections.ConfigDict) -> dict[str, Trained]:
  """name -> Trained: text-only IQL on every configured mix, myopic IQL (γ = 0) and behaviour cloning
  of the logged choices; with agent.inputs other than "text", IQL on the main mix reading them
  ("iql/real+sim/text+belief"); with agent.ppo.enabled, PPO in the fitted simulator."""
  mixes = tuple(config.agent.data_mixes)
  main_mix = "real+sim" if "real+sim" in mixes else mixes[0]
  policies = {f"iql/{mix}": Trained("iql", mix) for mix in mixes}
  inputs = agent_inputs(config)
  if inputs != "text":
    policies[f"iql/{main_mix}/{inputs}"] = Trained("iql", main_mix, inputs)
  policies[f"myopic/{main_mix}"] = Trained("myopic", main_mix)
  policies["bc/real"] = Trained("bc", "real")
  if config.agent.ppo.enabled:
    policies[PPO_POLICY] = Trained("ppo", "sim")
  return policies


def offline_inputs(config: ml_collections.ConfigDict) -> frozenset[str]:
  """Everything the IQL, myopic IQL and BC policies of `trained_policies` read together."""
  return frozenset().union(
    *(
      value.parse_inputs(t.inputs, value.OFFLINE_INPUTS)
      for t in trained_policies(config).values()
      if t.learner != "ppo"
    )
  )


def ppo_policy(config: ml_collections.ConfigDict) -> ppo.PPOPolicy:
  """The PPO policy of config.agent.ppo (inputs, widths) and config.interaction."""
  return ppo.PPOPolicy(
    hidden=tuple(config.agent.ppo.hidden),
    num_categories=len(config.interaction.categories),
    slate_size=config.interaction.slate_size,
    inputs=value.parse_inputs(config.agent.ppo.inputs),
  )


def train_ppo(
  config: ml_collections.ConfigDict,
  env: simulator.EnvParams,
  key: jax.Array,
  checkpoint_dir: str,
  writer=None,
) -> tuple[ppo.PPOPolicy, dict, dict]:
  """(policy, params, training history) of PPO in `env` (the fitted simulator)."""
  policy = ppo_policy(config)
  settings = ppo.PPOSettings.from_config(config.agent.ppo)
  state, history = ppo.train(settings, policy, env, key, checkpoint_dir, writer=writer)
  return policy, state.params, history


def policy_dirname(name: str) -> str:
  """A trained policy's folder name: 'iql/real+sim' -> 'iql_real_sim', 'iql/real+sim/text+belief' ->
  'iql_real_sim_text_belief'."""
  return name.replace("/", "_").replace("+", "_")


def policy_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "agent", "policies", policy_dirname(name))


def _network_policy(config: ml_collections.ConfigDict, learner: str, inputs: str):
  policy = bc.BCPolicy if learner == "bc" else iql.IQLPolicy
  return policy.from_config(config, inputs)


def _read_by(
  policy: value.ScorePolicy, transitions: agent_data.Transitions | None
) -> agent_data.Transitions | None:
  return None if transitions is None else agent_data.select_inputs(transitions, policy.inputs)


def train_policy(
  config: ml_collections.ConfigDict,
  learner: str,
  mix: str,
  real: agent_data.Transitions,
  sim: agent_data.Transitions,
  key: jax.Array,
  mesh: jax.sharding.Mesh,
  checkpoint_dir: str,
  writer=None,
  inputs: str = "text",
) -> tuple[object, object, dict]:
  """(policy, params, training history) of one learner on one data mix, reading `inputs` (the
  transitions must carry them: `stage.real_transitions`, `stage.sim_transitions`); `writer` (a clu
  MetricWriter) receives its training curves."""
  policy = _network_policy(config, learner, inputs)
  real, sim = _read_by(policy, real), _read_by(policy, sim)
  data = (real, sim, mix, config.agent.sim_fraction, key, mesh, checkpoint_dir)
  if learner == "bc":
    state, history = iql.train(
      bc.BC(policy, bc.BCSettings.from_config(config.agent.bc)), *data, writer=writer
    )
    return policy, state.params, history
  settings = iql.IQLSettings.from_config(config.agent.iql)
  settings = settings.myopic() if learner == "myopic" else settings
  state, history = iql.train(iql.IQL(policy, settings), *data, writer=writer)
  return policy, state.critic, history


def load_policy(
  config: ml_collections.ConfigDict, workdir: str, name: str, feature_dim: int, fitted=None
):
  """(policy, params) of a trained policy saved by the agent stage; a PPO policy's params also
  hold `fitted`, its belief model, whose number of types a policy reading the belief needs."""
  learner, _, inputs = trained_policies(config)[name]
  it = config.interaction
  reads_belief = learner == "ppo" or "belief" in value.parse_inputs(inputs)
  if reads_belief and fitted is None:
    raise ValueError(f"policy {name!r} reads the fitted user model's belief: pass `fitted`")
  if learner == "ppo":
    policy = ppo_policy(config)
    example = ppo.example_features(
      it.turns, it.num_candidates, feature_dim, fitted.log_priors.shape[-1], policy.inputs
    )
    like = jax.eval_shape(lambda: policy.network().init(jax.random.key(0), example))
    return policy, {
      "network": checkpoint.restore_tree(policy_dir(workdir, name), like),
      "users": fitted,
    }
  policy = _network_policy(config, learner, inputs)
  num_types = fitted.log_priors.shape[-1] if reads_belief else 0
  example = (
    jnp.zeros((it.turns + 1, feature_dim)),
    jnp.ones((it.turns + 1,), bool),
    jnp.zeros((), jnp.int32),
    jnp.zeros((it.slate_size, feature_dim)),
    jnp.zeros((it.slate_size,), jnp.int32),
    *policy.prompt_inputs(
      jnp.zeros((num_types,)),
      jnp.zeros((it.turns, feature_dim)),
      jnp.zeros((it.slate_size, feature_dim)),
    ),
  )
  like = jax.eval_shape(lambda: policy.network().init(jax.random.key(0), *example))
  return policy, checkpoint.restore_tree(policy_dir(workdir, name), like)


def _slate_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
  it = config.interaction
  return dict(num_categories=len(it.categories), slate_size=it.slate_size)


def logging_policy(config: ml_collections.ConfigDict) -> baselines.RandomSlate:
  """The policy behind the simulated data: a random slate, at most one prompt per category."""
  return baselines.RandomSlate(**_slate_sizes(config))


def baseline_policies(config: ml_collections.ConfigDict, fitted, responders) -> dict[str, tuple]:
  """name -> (policy, params) of the baselines; greedy and the planner (agent.planning.enabled)
  plan on `fitted`, the oracle knows `responders`."""
  sizes = _slate_sizes(config)
  policies = {
    "random": (baselines.RandomSlate(**sizes), None),
    agent_eval.BASELINE: (baselines.GeneratorOrder(**sizes), None),
    "greedy": (baselines.Greedy(**sizes), fitted),
    "oracle": (baselines.Oracle(**sizes), responders),
  }
  if config.agent.planning.enabled:
    planner = planning.Planner(
      **sizes,
      discount=config.agent.planning.discount,
      final_turn_reward=config.simulate.reward == "final_turn",
    )
    policies[PLANNING] = (planner, fitted)
  return policies
