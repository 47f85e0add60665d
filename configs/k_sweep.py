"""K ablation at paper sizes: K in {1, 2, 4, 8, 16, 32, 64} x 4 restarts (seeds), all 28 (K, restart)
fits as one compiled EM program (`select_k.compile_once`), on the paper's synthetic world (8 planted
types, feature width 768, 2000 users). Every fit has 64 heads; a fit of K types masks the others out
of its posterior and priors (pasta_jax/user_model/em.py). Its pairs are split over a "replica" mesh
axis of as many devices as divide both the devices and the 28 pairs (`select_k.replicas=-1`; on 8
devices: 4 replicas x 2 on "data"), the users over "data".

Variants (`get_config(arg)`, the text after `:` in --config):
  default   the sweep above; stages data and user_model.
  small     a CPU-sized sweep: 400 users, feature width 32, linear heads, K in {1, 2, 4, 8} x 2
            restarts, at most 10 EM epochs.

Command:  python -m pasta_jax.main --config=configs/k_sweep.py --workdir=runs/k_sweep
          python -m pasta_jax.main --config=configs/k_sweep.py:small --workdir=runs/k_sweep_small
  or make any size small with overrides, e.g.
          python -m pasta_jax.main --config=configs/k_sweep.py --workdir=runs/k_sweep_small \
            --config.world.num_users=400 --config.world.feature_dim=32 --config.user_model.hidden='()' \
            --config.select_k.ks='(1,2,4,8)' --config.em.restarts=2 --config.em.epochs=10 \
            --config.em.batch_users=64
  (`--config.select_k.compile_once=False` fits the same sweep one K at a time, one compilation each.)
Runtime:  not measured at paper sizes (meant for an accelerator or a pod slice, launch/); the EM sweep
          is at most 50 epochs of 28 fits over 1600 training users.
Result:   WORKDIR/user_model/user_model.json: per K the held-out log-likelihood per choice with its 95%
          CI (bootstrap over held-out users), BIC, restart agreement (mean pairwise ARI) and each
          restart's convergence; user_model/k_sweep.png draws them against K. On the 8-type planted
          world the held-out log-likelihood is expected to stop improving beyond K = 8 (an
          expectation, not yet measured).
"""

from configs import common, paper

VARIANTS = ("small",)
SMALL = {
  "world.num_users": 400,
  "world.feature_dim": 32,
  "world.values_per_attribute": 5,
  "user_model.hidden": (),
  "select_k.ks": (1, 2, 4, 8),
  "em.restarts": 2,
  "em.epochs": 10,
  "em.batch_users": 64,
}


def get_config(arg: str | None = None):
  """The K sweep, or its `small` variant."""
  name = common.variant(arg, VARIANTS)
  c = paper.get_config()
  c.stages = ("data", "user_model")
  c.select_k.ks = (1, 2, 4, 8, 16, 32, 64)
  c.select_k.compile_once = True
  c.select_k.replicas = -1
  if name == "small":
    for field, value in SMALL.items():
      block, key = field.split(".")
      c[block][key] = value
  return c
