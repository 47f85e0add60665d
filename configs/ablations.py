"""Ablations of text-only IQL on the quickstart's workdir (pasta_jax/evaluation/ablations.py): the share of
simulated data, the amount of real data and the K of the simulator, each row the mean of 3 training seeds.

Variants (`get_config(arg)`, the text after `:` in --config):
  default   the quickstart config plus the ablations below.
  tiny      (alias `runlocal`) the quickstart's tiny variant with 2 seeds, 2 levels of the data factors,
            K = 1 and one reference policy (tests/test_ablations.py).

Command:  python -m pasta_jax.main --config=configs/quickstart.py --workdir=runs/quickstart  (or any run
            of the data, user_model and simulate stages with this config), then
          python -m pasta_jax.evaluation.ablations --config=configs/ablations.py --workdir=runs/quickstart
Runtime:  11 distinct training data sets x 3 seeds of 10,000 IQL steps (~35 s each on 2 CPU cores) plus
          two EM fits and two simulations for the K ablation and the rollouts of 2000 users per policy.
Result:   runs/quickstart/ablations/ablations.json, ablations.md, sim_fraction.png, real_data.png and
          num_types.png.
"""

import ml_collections

from configs import common, quickstart

TINY = {
  "ablations.seeds": 2,
  "ablations.sim_fractions": (0.0, 0.5),
  "ablations.real_fractions": (0.5, 1.0),
  "ablations.real_sim_fractions": (0.0,),
  "ablations.num_types": (1,),
  "ablations.reference_policies": ("random",),
}


def get_config(arg: str | None = None):
  """The quickstart config (or its tiny variant) with the `ablations` block."""
  name = common.variant(arg, quickstart.VARIANTS)
  c = quickstart.get_config(name or None)
  c.stages = ("data", "user_model", "simulate")
  c.ablations = ml_collections.ConfigDict()
  c.ablations.factors = ("sim_fraction", "real_data", "num_types")
  c.ablations.seeds = 3  # Training seeds per row (>= 2: the CI includes their variation).
  # Shares of simulated transitions per IQL batch: 0 = real data only, 1 = simulated only.
  c.ablations.sim_fractions = (0.0, 0.25, 0.5, 0.75, 1.0)
  # Shares of the training users whose logged sessions are kept (users drawn by subsample_seed).
  c.ablations.real_fractions = (0.25, 0.5, 1.0)
  # The share of simulated transitions each real-data level is trained at (0 = real data only).
  c.ablations.real_sim_fractions = (0.0, 0.5)
  c.ablations.subsample_seed = 0
  # K of the user model behind the simulated data: ints, "selected" (the user_model stage's selected K)
  # or "2x_selected".
  c.ablations.num_types = (1, "selected", "2x_selected")
  # Baselines rolled out on the same users for the tables and plots (agent/registry.baseline_policies).
  c.ablations.reference_policies = ("random", "generator_order", "greedy", "oracle")
  if name == "tiny":
    c.update_from_flattened_dict(TINY)
  return c
