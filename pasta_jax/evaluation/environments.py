"""The environments policies are evaluated in, built from a workdir's artefacts: the candidate generator
of the simulator, the planted users of the synthetic world and the fitted simulator."""

import os

import ml_collections

from pasta_jax import artefacts, candidates, simulator
from pasta_jax.data import synthetic
from pasta_jax.evaluation import agents as agent_eval
from pasta_jax.user_model import utility


def candidate_generator(config: ml_collections.ConfigDict, workdir: str):
  """The synthetic world's expander, or the replay pool saved by the simulate stage."""
  if config.data.source == "synthetic":
    return synthetic.SyntheticExpander(artefacts.load_world(config, workdir))
  return candidates.load_generator(
    os.path.join(workdir, artefacts.POOL),
    "run the simulate stage (config.stages) on this workdir first",
  )[0]


def environments(
  config: ml_collections.ConfigDict, workdir: str, fitted: utility.FittedUsers
) -> dict[str, tuple[agent_eval.Environment, object]]:
  """name -> (Environment, responders), the headline one first: the planted true users of the synthetic
  world (standing in for raters), then the fitted simulator; on real data the fitted simulator alone."""
  generator = candidate_generator(config, workdir)
  out = {}
  if config.data.source == "synthetic":
    planted = synthetic.PlantedUsers(artefacts.load_world(config, workdir))
    out["planted_users"] = (
      agent_eval.Environment(
        simulator.make_params(config.interaction, generator, planted, fitted),
        artefacts.load_alignment(workdir),
      ),
      planted,
    )
  out["simulator"] = (
    agent_eval.Environment(simulator.make_params(config.interaction, generator, fitted, fitted)),
    fitted,
  )
  return out
