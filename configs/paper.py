"""Paper-scale sizes on the synthetic world: CLIP ViT-L/14 width, L_C=25 in 5 categories, L=4, M=4, H=5.

Command:  python -m pasta_jax.main --config=configs/paper.py --workdir=runs/paper
Runtime:  not measured on this project's 2-core CPU machines (hours there); meant for one accelerator
          or a pod slice (launch/). The EM sweep is 4 values of K x 4 restarts x 50 epochs.
Result:   report.json as for the quickstart, with K swept over the paper's {1, 8, 32, 64}; on the
          8-type planted world the sweep is expected to select K=8 (an expectation, not yet measured).
"""

from configs import common


def get_config(arg: str | None = None):
  """The default variant only (no `:variant` in --config)."""
  common.variant(arg)
  c = common.base_config()
  c.world.num_types = 8
  c.world.num_users = 2000
  c.world.sessions_per_user = 4
  c.world.feature_dim = 768  # CLIP ViT-L/14 projection width.
  c.world.values_per_attribute = 8

  c.user_model.num_types = 8
  c.user_model.hidden = (256,)
  c.user_model.activation = "gelu"

  c.em.epochs = 50
  c.em.batch_users = 256
  c.em.m_steps = 5
  c.em.learning_rate = 3e-3
  c.em.restarts = 4
  c.em.checkpoint_every_epochs = 5

  c.select_k.ks = (1, 8, 32, 64)
  return c
