"""The PASTA release (Kaggle googleai/pasta-data, CC BY-SA 4.0) through the whole pipeline: CLIP features, the
user model with EM over user types, a simulator of the fitted users over an LMM's cached expansions rendered
by SDXL, IQL agents and baselines, and the report.

Needs the extras (`pip install -r requirements-extras.txt`) and, on disk:
  data.kaggle_dir            the downloaded release (layout: `pasta_kaggle.KAGGLE_LAYOUT`);
  data.kaggle_layout         optional: a layout mapping JSON where the release differs from that layout
                             (`python -m pasta_jax.data.pasta_kaggle inspect DIR --suggest=FILE`);
  embed.clip_checkpoint      a Hugging Face CLIP directory (e.g. openai/clip-vit-large-patch14, save_pretrained);
  embed.sdxl_checkpoint      a diffusers Flax SDXL directory (e.g. stabilityai/stable-diffusion-xl-base-1.0 with
                             its Flax weights);
  candidates.replay_cache    JSON Lines of an LMM's expansions (Gemini or any; format in `pasta_jax/candidates.py`),
                             one line per expansion of the release's initial prompts (and of any later prompt the
                             LMM was asked about); a prompt without a line borrows its nearest prompt's
                             (`candidates.unexpanded`);
  embed.cache_dir, embed.render_dir   where CLIP features and rendered PNGs are kept across runs.
  user_model.init_from       optional: start EM from the model pretrained on the open preference sets
                             (configs/pretrain.py writes runs/pretrain/fitted/k8).

Command:  .venv/bin/python -m pasta_jax.main --config=configs/pasta_real.py --workdir=runs/pasta_real \\
            --config.data.kaggle_dir=/data/pasta-data \\
            --config.embed.clip_checkpoint=/models/clip-vit-large-patch14 \\
            --config.embed.sdxl_checkpoint=/models/sdxl-base-1.0 \\
            --config.candidates.replay_cache=/data/expansions.jsonl \\
            --config.embed.cache_dir=/data/pasta_features --config.embed.render_dir=/data/pasta_renders
Runtime:  not measured here (no release or weights can be downloaded on the development machine). SDXL
          renders candidates.pool_size images per prompt of the cache's vocabulary (about 25 x its lines), once:
          the ledger keeps them.
Result:   runs/pasta_real/report.json: the K sweep over the real raters (held-out log-likelihood per choice,
          BIC, restart agreement), sim-vs-real on held-out raters, and every policy on the fitted simulator
          (section "agent", "agent_environment": "simulator") with CIs and IQL (real + sim) against each
          baseline. The paper's human evaluation (85% preference over the LMM baseline) needs raters.
"""

from configs import common


def get_config(arg: str | None = None):
  """The default variant only (no `:variant` in --config)."""
  common.variant(arg)
  c = common.base_config()
  c.data.source = "pasta_kaggle"
  c.world.feature_dim = (
    768  # CLIP ViT-L/14 projection width; set to the checkpoint's projection_dim.
  )
  c.user_model.num_types = 8
  c.user_model.hidden = (256,)
  c.em.epochs = 30
  c.em.batch_users = 64
  c.select_k.ks = (1, 2, 4, 8, 16)
  c.simulate.num_users = 30_000
  return c
