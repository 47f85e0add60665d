"""A lab's own choice logs (data.source="records"): canonical JSON Lines records and the features.npz their
rows index, through the data and user_model stages (EM over user types, the K sweep).

The record spec comes from this config: the option categories (interaction.categories), at most
interaction.slate_size options per slate (2..L; a smaller slate is masked), at most
interaction.images_per_prompt images per option (1..M, masked likewise), interaction.turns turns per
session (sim-vs-real and the agent read whole sessions), and feature rows of width world.feature_dim.
The defaults fit the hand-written example in examples/records/ (L = 3, M = 2, H = 2, D = 8); override
them for other data. Real data has no planted types: user_model.json reports the fitted model only.

The evaluate and report stages run as on any data, given two held-out raters (their CIs are over raters;
for the example, --config.world.heldout_fraction=0.4); simulate and agent need a candidate generator: the
replay pool of the PASTA release path (candidates.replay_cache, embed.clip_checkpoint,
embed.sdxl_checkpoint, embed.cache_dir, embed.render_dir, features from that CLIP checkpoint).

Command:  .venv/bin/python examples/records/make_example.py   (optional: rewrites the example files)
          .venv/bin/python -m pasta_jax.main --config=configs/records.py --workdir=runs/records \\
            --config.data.records=examples/records/records.jsonl \\
            --config.data.features=examples/records/features.npz
Runtime:  about 45 s on 2 shared CPU cores for the example (20 records; mostly compilation).
Result:   runs/records/data/ (the validated copy, the user split: 4 training raters, 1 held out),
          runs/records/user_model/user_model.json and k_sweep.png: K = 1 converges and is selected by
          BIC (50.2 against 55.5 for K = 2; held-out log-likelihood -1.29 per choice); 16 training
          choices are too few for two types (K = 2 fits them almost exactly and does not converge).
"""

from configs import common


def get_config(arg: str | None = None):
  """The default variant only (no `:variant` in --config)."""
  common.variant(arg)
  c = common.base_config()
  c.stages = ("data", "user_model")
  c.data.source = "records"
  c.interaction.slate_size = 3
  c.interaction.images_per_prompt = 2
  c.interaction.turns = 2
  c.world.feature_dim = 8
  c.world.heldout_fraction = 0.2
  c.user_model.num_types = 2
  # Linear heads on the image features: 8 parameters per type for the example's 16 training choices
  # (a trunk, or the text features, would fit them exactly and predict held-out choices badly).
  c.user_model.hidden = ()
  c.user_model.use_text_features = False
  c.select_k.ks = (1, 2)
  c.em.mode = "exact"
  c.em.epochs = 10
  c.em.restarts = 2
  c.em.batch_users = 8
  c.em.checkpoint_every_epochs = 5
  return c
