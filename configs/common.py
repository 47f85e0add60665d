"""Defaults shared by every config; each config file starts from `base_config()` and resolves its variant
(the text after `:` in `--config=configs/<file>.py:<variant>`) with `variant()`."""

from collections.abc import Sequence

import ml_collections

PAPER_CATEGORIES = ("rephrase", "expansion", "style", "subject_change", "creative")


ALIASES = {"runlocal": "tiny"}  # big_vision's name for a variant small enough to run locally.


def variant(arg: str | None, accepted: Sequence[str] = ()) -> str:
  """The variant named by a config's `get_config(arg)`: "" (the default) or one of `accepted`; big_vision's
  "runlocal" means "tiny". ValueError naming the accepted variants otherwise."""
  name = ALIASES.get(arg or "", arg or "")
  if name and name not in accepted:
    names = [repr(v) for v in accepted] + [
      f"{a!r} (= {t!r})" for a, t in ALIASES.items() if t in accepted
    ]
    raise ValueError(
      f"unknown config variant {arg!r}; accepted: the default (no variant)"
      + "".join(f", {n}" for n in names)
    )
  return name


def base_config() -> ml_collections.ConfigDict:
  """Every field the pipeline reads, with the paper's interaction sizes."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ("data", "user_model", "simulate", "agent", "evaluate", "report")

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the "data" axis; -1 = all.

  c.interaction = ml_collections.ConfigDict()
  c.interaction.num_candidates = 25  # L_C
  c.interaction.categories = PAPER_CATEGORIES
  c.interaction.slate_size = 4  # L
  c.interaction.images_per_prompt = 4  # M
  c.interaction.turns = 5  # H

  c.data = ml_collections.ConfigDict()
  # "synthetic", "pasta_kaggle" (the release in data.kaggle_dir, embedded with CLIP) or "records"
  # (a lab's own logs: data.records and data.features).
  c.data.source = "synthetic"
  c.data.kaggle_dir = ""  # The downloaded googleai/pasta-data folder (CSV files and images/).
  # A layout mapping JSON (`python -m pasta_jax.data.pasta_kaggle inspect DIR --suggest=FILE`);
  # "" = pasta_kaggle.KAGGLE_LAYOUT.
  c.data.kaggle_layout = ""
  # data.source="records": canonical JSON Lines records (pasta_jax/data/schema.py) and the features.npz
  # their rows index (schema.save_features: image f32[N_img, D], text f32[N_txt, D]).
  c.data.records = ""
  c.data.features = ""
  # Turns per row of the user-model arrays: a longer history fills several rows, so it costs memory in
  # proportion to its length (pasta_jax/types.py Choices). 0 = the 95th percentile of the history
  # lengths (19 users in 20 fill one row).
  c.data.turns_per_row = 0
  # array_record files per split under data/shards/ (at most one per user); each process reads the
  # records of its own users from them (pasta_jax/data/layout.py).
  c.data.shards = 8

  c.embed = ml_collections.ConfigDict()
  c.embed.clip_checkpoint = ""  # A local Hugging Face CLIP checkpoint directory.
  c.embed.cache_dir = ""  # The content-addressed feature store (reused across runs).
  c.embed.batch_size = 64
  c.embed.sdxl_checkpoint = (
    ""  # A local Flax SDXL pipeline directory (renders the simulator's image pool).
  )
  c.embed.render_dir = ""  # The render ledger and its PNGs (reused across runs).
  c.embed.render_steps = 30
  c.embed.guidance_scale = 5.0
  c.embed.render_size = (
    0  # Image side in pixels; 0 = the checkpoint's default (1024 for SDXL base).
  )
  c.embed.render_batch_size = 8

  c.candidates = ml_collections.ConfigDict()
  c.candidates.replay_cache = (
    ""  # JSON Lines of an LMM's expansions (candidates.py): the generator on real data.
  )
  c.candidates.unexpanded = (
    "nearest"  # A prompt without a cached expansion: "nearest" prompt's, or "error".
  )
  c.candidates.pool_size = (
    4  # Images rendered per prompt (>= M); a column with first seed s shows pool images
  )
  #                             (s + m) % pool_size, m < M (candidates.ReplayGenerator.pool_rows).

  c.world = ml_collections.ConfigDict()
  c.world.num_types = 4  # K*, planted user types.
  c.world.num_users = 500
  c.world.sessions_per_user = 3
  c.world.heldout_fraction = 0.2
  c.world.feature_dim = 768
  c.world.values_per_attribute = 6
  c.world.type_weight_scale = 1.0
  c.world.image_noise = 0.3
  c.world.text_noise = 0.05
  c.world.choice_inverse_temperature = 4.0

  c.user_model = ml_collections.ConfigDict()
  c.user_model.num_types = 4  # K
  c.user_model.hidden = (256,)
  c.user_model.activation = "gelu"
  c.user_model.aggregation = "mean"
  c.user_model.use_text_features = True
  c.user_model.init_inverse_temperature = 1.0
  # A fitted model to start EM from (the directory of a saved {"params", "log_priors"} tree: pretraining's
  # WORKDIR/fitted/k<K>, or a user_model stage's user_model/fitted); "" starts from a random initialisation.
  c.user_model.init_from = ""
  # Standardise the features by the training users' statistics (kept with the fitted model).
  c.user_model.standardize = True

  c.em = ml_collections.ConfigDict()
  c.em.mode = "minibatch"  # "minibatch" (Algorithm 1) or "exact".
  c.em.epochs = 30
  c.em.batch_users = 64
  c.em.m_steps = 5
  c.em.learning_rate = 3e-3
  c.em.prior_step = 0.1  # Mini-batch prior update: pi <- (1 - rho) pi + rho mean(gamma).
  # Mini-batch step sizes: learning_rate and prior_step for decay_from_epoch epochs, then both times
  # decay_rate per epoch (1 = constant steps, whose jitter keeps the log-likelihood from settling
  # to em.tolerance, so no restart converges).
  c.em.decay_from_epoch = 5.0
  c.em.decay_rate = 0.7
  c.em.prior_floor = 1e-6
  # Enough for a stable best on the quickstart (README, "Restarts"); the user_model stage warns when only
  # one restart reached the best of the selected K.
  c.em.restarts = 3
  c.em.collapse_mass = 0.02  # A type whose prior falls below collapse_mass / K raises the alarm.
  c.em.on_collapse = "warn"  # "warn" or "raise".
  c.em.checkpoint_every_epochs = 5
  # em.epochs is the most epochs: EM stops once every restart has converged, i.e. its training
  # log-likelihood per choice changed by <= tolerance * |LL| in each of the last `patience` epochs
  # (and, in exact EM, the norm of its gradient is <= gradient_tolerance).
  c.em.tolerance = 1e-6
  c.em.patience = 3
  c.em.gradient_tolerance = 1e-4

  c.select_k = ml_collections.ConfigDict()
  c.select_k.ks = (1, 2, 4, 8)
  c.select_k.criterion = "bic"  # "bic" or "heldout".
  c.select_k.heldout_tolerance = 0.002  # nats per choice, for the "heldout" criterion.
  c.select_k.compile_once = (
    False  # True: the whole K sweep as one compiled EM program (select_k.sweep).
  )
  c.select_k.replicas = (
    1  # Devices on the sweep's "replica" mesh axis (-1: as many as divide devices and pairs).
  )

  c.simulate = ml_collections.ConfigDict()
  c.simulate.num_users = 2000  # Simulated users, one H-turn session each, under the logging policy.
  c.simulate.reward = "every_turn"  # "every_turn" or "final_turn".

  c.agent = ml_collections.ConfigDict()
  c.agent.data_mixes = ("real", "sim", "real+sim")
  c.agent.sim_fraction = 0.5  # Share of simulated transitions in each real+sim batch.
  c.agent.hidden = (256, 256)
  # What a further IQL policy reads ("+"-joined from agent/value.OFFLINE_INPUTS: text, images, belief,
  # chosen_images); "text" (the paper's agent) trains none beyond the text-only ones.
  c.agent.inputs = "text"
  c.agent.iql = ml_collections.ConfigDict()
  c.agent.iql.expectile = 0.7
  c.agent.iql.discount = 0.9
  c.agent.iql.learning_rate = 3e-4
  c.agent.iql.polyak = 0.005
  c.agent.iql.batch_size = 256
  c.agent.iql.steps = 20_000
  c.agent.iql.steps_per_dispatch = 1000
  c.agent.iql.checkpoint_every_steps = 5000
  c.agent.bc = ml_collections.ConfigDict()
  c.agent.bc.learning_rate = 3e-4
  c.agent.bc.batch_size = 256
  c.agent.bc.steps = 5000
  c.agent.bc.steps_per_dispatch = 500
  c.agent.bc.checkpoint_every_steps = 1000
  # The lookahead planning baseline (agent/planning.py): expected utility + value of information.
  c.agent.planning = ml_collections.ConfigDict()
  c.agent.planning.enabled = True
  c.agent.planning.discount = 0.9  # Weight of the one-step lookahead term.
  # PPO in the fitted simulator (agent/ppo.py), trained for `simulate.reward`.
  c.agent.ppo = ml_collections.ConfigDict()
  c.agent.ppo.enabled = True
  # What the policy reads ("+"-joined from agent/value.INPUTS): text, images, belief, chosen_images,
  # utilities.
  c.agent.ppo.inputs = "text+images+belief+utilities"
  c.agent.ppo.hidden = (128, 128)
  c.agent.ppo.learning_rate = 3e-4
  c.agent.ppo.num_envs = 256  # Simulated users per iteration.
  c.agent.ppo.iterations = 200
  c.agent.ppo.epochs = 4
  c.agent.ppo.minibatches = 4
  c.agent.ppo.discount = 0.9
  c.agent.ppo.gae_lambda = 0.95
  c.agent.ppo.clip = 0.2
  c.agent.ppo.entropy_coef = 0.003
  c.agent.ppo.value_coef = 0.5
  c.agent.ppo.max_grad_norm = 1.0
  c.agent.ppo.iterations_per_dispatch = 20
  c.agent.ppo.checkpoint_every_iterations = 100

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.num_users = (
    1000  # Fresh users per policy, on the fitted simulator and on the planted users.
  )
  c.evaluate.bootstrap_samples = 1000
  return c
