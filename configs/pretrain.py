"""Pretraining the user model on single-turn preference records embedded with CLIP ViT-L/14 (768-d).

Command:  python -m pasta_jax.data.preferences --source=pickapic --input=train-00000.parquet ... --output=DIR
          python -m pasta_jax.user_model.pretrain --config=configs/pretrain.py --workdir=runs/pretrain
            --config.pretrain.records_dir=DIR --config.embed.clip_checkpoint=/models/clip-vit-large-patch14
            --config.embed.cache_dir=/data/features
Runtime:  not measured. Pick-a-Pic v2 (about 1M training pairs) is meant for one accelerator; the CPU
          machines of this project can run a few thousand pairs in minutes.
Result:   runs/pretrain/report.json, section "pretrain": held-out pairwise accuracy and log-likelihood per
          choice for K=1 (Bradley-Terry) and K=8 types; the fitted models in runs/pretrain/fitted/k1 and k8, from
          which the PASTA user model can start (`--config.user_model.init_from=runs/pretrain/fitted/k8` with
          configs/pasta_real.py, whose user model has the same shape). On Pick-a-Pic the paper's notes
          give accuracy about 60% (K=1) and 64% (K=8) (docs/paper.md): an expectation, not yet measured
          here.

Fields of `pretrain`:
  records_dir       directory of `<split>.jsonl` preference records and their images (`preferences.write_splits`,
                    the `python -m pasta_jax.data.preferences` CLI).
  features          "" (default): embed the records' images and prompts with the CLIP checkpoint
                    `embed.clip_checkpoint` through the feature cache `embed.cache_dir`; or a `features.npz`
                    FeatureTable (`schema.save_features`) that the records' filled-in rows index.
  feature_dim       width of the features (768 for ViT-L/14).
  train_split       split fitted by EM.
  eval_split        split scored for the held-out metrics.
  eval_batch_users  users per batch when scoring the held-out split.
  max_choices_per_user  a user's comparisons beyond this many become further pseudo-users of this many
                    (`pretrain.cap_user_histories`); 0 = no cap. Keeps the padded arrays small on Pick-a-Pic.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  """The default variant only (no `:variant` in --config)."""
  common.variant(arg)
  c = common.base_config()
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.records_dir = "data/pickapic"
  c.pretrain.features = ""
  c.pretrain.feature_dim = 768
  c.pretrain.train_split = "train"
  c.pretrain.eval_split = "validation"
  c.pretrain.eval_batch_users = 256
  c.pretrain.max_choices_per_user = 64

  c.user_model.num_types = 8
  c.user_model.hidden = (256,)
  c.user_model.activation = "gelu"
  c.user_model.use_text_features = True

  c.em.mode = "minibatch"
  c.em.epochs = 20
  c.em.batch_users = 256
  c.em.m_steps = 5
  c.em.learning_rate = 1e-3
  c.em.restarts = 2
  c.em.checkpoint_every_epochs = 2
  return c
