"""The policies a run trains and compares: the trained ones (learner x data mix), the baselines, the
logging policy of the simulated data, and where the agent stage saves each trained policy."""

import os

import jax
import jax.numpy as jnp
import ml_collections

from pasta_jax import checkpoint
from pasta_jax.agent import baselines, bc, iql
from pasta_jax.agent import data as agent_data
from pasta_jax.evaluation import agents as agent_eval


def trained_policies(config: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
  """name -> (learner, data mix): IQL on every configured mix, myopic IQL (γ = 0) and behaviour cloning
  of the logged choices."""
  mixes = tuple(config.agent.data_mixes)
  main_mix = "real+sim" if "real+sim" in mixes else mixes[0]
  policies = {f"iql/{mix}": ("iql", mix) for mix in mixes}
  policies[f"myopic/{main_mix}"] = ("myopic", main_mix)
  policies["bc/real"] = ("bc", "real")
  return policies


def policy_dirname(name: str) -> str:
  """A trained policy's folder name: 'iql/real+sim' -> 'iql_real_sim'."""
  return name.replace("/", "_").replace("+", "_")


def policy_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "agent", "policies", policy_dirname(name))


def _network_policy(config: ml_collections.ConfigDict, learner: str):
  return bc.BCPolicy.from_config(config) if learner == "bc" else iql.IQLPolicy.from_config(config)


def train_policy(config: ml_collections.ConfigDict, learner: str, mix: str, real: agent_data.Transitions,
                 sim: agent_data.Transitions, key: jax.Array, mesh: jax.sharding.Mesh,
                 checkpoint_dir: str, writer=None) -> tuple[object, object, dict]:
  """(policy, params, training history) of one learner on one data mix; `writer` (a clu MetricWriter)
  receives its training curves."""
  policy = _network_policy(config, learner)
  if learner == "bc":
    state, history = bc.train(bc.BCSettings.from_config(config.agent.bc), policy, real, sim, mix,
                              config.agent.sim_fraction, key, mesh, checkpoint_dir, writer=writer)
    return policy, state.params, history
  settings = iql.IQLSettings.from_config(config.agent.iql)
  state, history = iql.train(settings.myopic() if learner == "myopic" else settings, policy, real, sim, mix,
                             config.agent.sim_fraction, key, mesh, checkpoint_dir, writer=writer)
  return policy, state.critic, history


def load_policy(config: ml_collections.ConfigDict, workdir: str, name: str, feature_dim: int):
  """(policy, params) of a trained policy saved by the agent stage."""
  learner, _ = trained_policies(config)[name]
  policy = _network_policy(config, learner)
  it = config.interaction
  example = (jnp.zeros((it.turns + 1, feature_dim)), jnp.ones((it.turns + 1,), bool), jnp.zeros((), jnp.int32),
             jnp.zeros((it.slate_size, feature_dim)), jnp.zeros((it.slate_size,), jnp.int32))
  like = jax.eval_shape(lambda: policy.network().init(jax.random.key(0), *example))
  return policy, checkpoint.restore_tree(policy_dir(workdir, name), like)


def _slate_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
  it = config.interaction
  return dict(num_categories=len(it.categories), slate_size=it.slate_size)


def logging_policy(config: ml_collections.ConfigDict) -> baselines.RandomSlate:
  """The policy behind the simulated data: a random slate, at most one prompt per category."""
  return baselines.RandomSlate(**_slate_sizes(config))


def baseline_policies(config: ml_collections.ConfigDict, fitted, responders) -> dict[str, tuple]:
  """name -> (policy, params) of the baselines; greedy plans on `fitted`, the oracle knows `responders`."""
  sizes = _slate_sizes(config)
  return {"random": (baselines.RandomSlate(**sizes), None),
          agent_eval.BASELINE: (baselines.GeneratorOrder(**sizes), None),
          "greedy": (baselines.Greedy(**sizes), fitted), "oracle": (baselines.Oracle(**sizes), responders)}
