"""The PASTA release (Kaggle googleai/pasta-data, CC BY-SA 4.0) embedded with a local CLIP, then the user
model with EM over user types.

Needs the extras (`pip install -r requirements-extras.txt`) and, on disk, the downloaded release and a
Hugging Face CLIP checkpoint directory (e.g. openai/clip-vit-large-patch14 saved with save_pretrained):

Command:  .venv/bin/python -m pasta_jax.main --config=configs/pasta_real.py --workdir=runs/pasta_real \\
            --config.data.kaggle_dir=/data/pasta-data --config.embed.clip_checkpoint=/models/clip-vit-large-patch14 \\
            --config.embed.cache_dir=/data/pasta_features
Runtime:  not measured here (no release or weights can be downloaded on the development machine); CLIP
          embedding of the release's images dominates and is cached for re-runs.
Result:   runs/pasta_real/report.json with the K sweep over the real raters (held-out log-likelihood per
          choice, BIC, restart agreement). The loader's assumed file layout is `pasta_kaggle.KAGGLE_LAYOUT`;
          an error names any column the real files have or lack.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.stages = ("data", "user_model", "evaluate")
  c.data.source = "pasta_kaggle"
  c.world.feature_dim = 768  # CLIP ViT-L/14 projection width; set to the checkpoint's projection_dim.
  c.user_model.num_types = 8
  c.user_model.hidden = (256,)
  c.em.epochs = 30
  c.em.batch_users = 64
  c.select_k.ks = (1, 2, 4, 8, 16)
  return c
