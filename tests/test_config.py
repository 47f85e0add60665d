"""Config validation, the config hash, and the command line's refusal of bad configs before any work."""

import json
import os
import subprocess
import sys
import time
import tracemalloc

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import paper, pasta_real, pretrain, quickstart
from pasta_jax import config as config_lib
from pasta_jax import config_checks, simulator
from pasta_jax.user_model import select_k, utility
from tests import conftest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _override(config, field: str, value) -> ml_collections.ConfigDict:
  """A copy of `config` with `field` (dotted) set to `value`, of any type (as a config read from JSON
  or built in code may hold: ConfigDict's own assignment would refuse a float in an int field)."""
  content = config.to_dict()
  *parents, leaf = field.split(".")
  node = content
  for part in parents:
    node = node[part]
  node[leaf] = value
  return ml_collections.ConfigDict(content)


def _real_config(layout: str = "", stages=("data", "user_model")) -> ml_collections.ConfigDict:
  """configs/pasta_real.py with every path it needs filled in."""
  config = pasta_real.get_config()
  for block, field in (
    ("data", "kaggle_dir"),
    ("embed", "clip_checkpoint"),
    ("embed", "cache_dir"),
    ("embed", "sdxl_checkpoint"),
    ("embed", "render_dir"),
    ("candidates", "replay_cache"),
  ):
    config[block][field] = "/somewhere"
  config.stages = stages
  config.data.kaggle_layout = layout
  return config


def test_quickstart_config_is_valid():
  config_lib.validate(quickstart.get_config())


def test_tiny_test_config_is_valid():
  config_lib.validate(conftest.tiny_config())


def test_paper_pretrain_and_pasta_real_configs_are_valid():
  config_lib.validate(paper.get_config())
  config_lib.validate(pretrain.get_config())
  config_lib.validate(_real_config(stages=config_lib.STAGES))


def test_a_subset_of_stages_in_order_is_valid():
  config = conftest.tiny_config()
  config.stages = ("user_model", "evaluate")
  config_lib.validate(config)


NAN, INF = float("nan"), float("inf")
# The tiny config: 64 users, 13 held out, so 51 training users; K up to 3; 5 categories.
BAD_VALUES = [
  ("stages", ("data", "train")),
  ("stages", ("user_model", "data")),
  ("seed", -1),
  ("seed", 1.5),
  ("seed", True),
  ("seed", 2**63),
  ("mesh.data", True),
  ("interaction.slate_size", 6),
  ("interaction.num_candidates", 24),
  ("interaction.turns", 5.0),
  ("world.num_users", 1e3),
  ("world.num_users", True),
  ("world.sessions_per_user", 2.0),
  ("world.feature_dim", 14),
  ("world.heldout_fraction", NAN),
  ("world.heldout_fraction", "0.2"),
  ("world.choice_inverse_temperature", INF),
  ("world.image_noise", NAN),
  ("world.text_noise", -INF),
  ("world.type_weight_scale", INF),
  ("user_model.num_types", 3.0),
  ("user_model.num_types", 52),
  ("user_model.aggregation", "median"),
  ("user_model.init_inverse_temperature", NAN),
  ("user_model.init_inverse_temperature", INF),
  ("user_model.use_text_features", 1),
  ("user_model.init_from", "/nowhere/fitted/k8"),
  ("select_k.criterion", "aic"),
  ("select_k.ks", (1, 3.0)),
  ("select_k.ks", (1, 3, 52)),
  ("select_k.heldout_tolerance", NAN),
  ("em.mode", "foo"),
  ("em.epochs", True),
  ("em.batch_users", 0),
  ("em.batch_users", 16.0),
  ("em.batch_users", 64),
  ("em.learning_rate", -1e-3),
  ("em.learning_rate", NAN),
  ("em.decay_from_epoch", NAN),
  ("em.decay_rate", NAN),
  ("em.learning_rate", INF),
  ("em.prior_step", NAN),
  ("em.prior_floor", 0.4),
  ("em.prior_floor", NAN),
  ("em.collapse_mass", INF),
  ("simulate.reward", "sometimes"),
  ("simulate.num_users", 1e3),
  ("agent.data_mixes", ("real", "web")),
  ("agent.sim_fraction", 1.0),
  ("agent.sim_fraction", NAN),
  ("agent.iql.expectile", 0.3),
  ("agent.iql.expectile", INF),
  ("agent.iql.discount", 1.0),
  ("agent.iql.discount", NAN),
  ("agent.iql.polyak", INF),
  ("agent.iql.learning_rate", INF),
  ("agent.bc.learning_rate", NAN),
  ("agent.iql.steps", 150),
  ("agent.iql.steps", 200.0),
  ("agent.bc.checkpoint_every_steps", 50),
  ("evaluate.num_users", 0),
  ("evaluate.num_users", 1),
  ("evaluate.bootstrap_samples", 50),
  ("evaluate.bootstrap_samples", True),
]


@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_validate_names_the_bad_field(field, value):
  config = conftest.tiny_config()
  assert len(config.interaction.categories) == 5
  assert 5 * config.world.values_per_attribute == 15
  assert config_checks.num_training_users(config) == 51
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(_override(config, field, value))
  assert str(info.value).startswith(f"config.{field}="), str(info.value)


@pytest.mark.parametrize(
  "field, value",
  [
    ("embed.guidance_scale", NAN),
    ("embed.guidance_scale", INF),
    ("embed.render_steps", 30.0),
    ("candidates.pool_size", 4.0),
  ],
)
def test_validate_names_the_bad_field_on_the_release(field, value):
  config = _real_config(stages=config_lib.STAGES)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(_override(config, field, value))
  assert str(info.value).startswith(f"config.{field}="), str(info.value)


def test_limits_from_the_training_users_apply_to_the_synthetic_world_only():
  config = conftest.tiny_config()
  with pytest.raises(config_lib.ConfigError, match="exceeds the 51 training users"):
    config_lib.validate(_override(config, "select_k.ks", (1, 52)))
  config_lib.validate(_override(config, "select_k.ks", (1, 51)))
  config_lib.validate(_override(_real_config(), "select_k.ks", (1, 2048)))
  config_lib.validate(_override(pretrain.get_config(), "em.batch_users", 4096))


def test_a_mini_batch_is_checked_against_the_rows_the_histories_fill():
  config = _override(conftest.tiny_config(), "em.batch_users", 64)  # 51 users of 10 choices.
  with pytest.raises(config_lib.ConfigError, match="must not exceed the 51 rows"):
    config_lib.validate(config)
  config_lib.validate(_override(config, "data.turns_per_row", 5))  # 102 rows.
  with pytest.raises(config_lib.ConfigError, match="must not exceed the 102 rows"):
    config_lib.validate(
      _override(_override(config, "data.turns_per_row", 5), "em.batch_users", 128)
    )
  assert config_checks.row_layout(51, 10, 0) == (10, 51)
  assert config_checks.row_layout(51, 10, 3) == (3, 204)


def test_prior_floor_is_checked_against_the_largest_k():
  config = paper.get_config()
  assert max(config.select_k.ks) == 64
  config_lib.validate(_override(config, "em.prior_floor", 0.015))
  with pytest.raises(config_lib.ConfigError, match=r"^config\.em\.prior_floor=0\.016: .*K=64"):
    config_lib.validate(_override(config, "em.prior_floor", 0.016))


def test_init_from_must_be_a_fitted_model(tmp_path):
  from pasta_jax import checkpoint

  tree = {"weights": np.ones(3, np.float32)}
  checkpoint.save_tree(str(tmp_path / "fitted"), {"params": tree, "log_priors": np.zeros(2)})
  checkpoint.save_tree(str(tmp_path / "other"), tree)
  (tmp_path / "empty").mkdir()
  config = conftest.tiny_config()
  config_lib.validate(_override(config, "user_model.init_from", str(tmp_path / "fitted")))
  for name, problem in (("other", "not a fitted model"), ("empty", "no Orbax checkpoint")):
    bad = _override(config, "user_model.init_from", str(tmp_path / name))
    with pytest.raises(config_lib.ConfigError, match=r"^config\.user_model\.init_from=") as info:
      config_lib.validate(bad)
    assert problem in str(info.value), info.value


def test_the_memory_estimate_follows_the_array_shapes():
  config = paper.get_config()
  w, it = config.world, config.interaction
  images = (
    w.num_users
    * w.sessions_per_user
    * it.turns
    * it.slate_size
    * it.images_per_prompt
    * w.feature_dim
    * 4
  )
  data = config_lib.memory_estimate(config)["data"]
  assert data[0].nbytes == 2 * images  # The rollouts' host arrays and the feature table's copy.
  assert data[0].fields[:2] == ("world.num_users", "world.sessions_per_user")
  config.stages = ("simulate", "evaluate")
  assert set(config_lib.memory_estimate(config)) == {"simulate", "evaluate"}
  assert config_lib.memory_estimate(pretrain.get_config()) == {}


@pytest.mark.parametrize(
  "turns_per_row, mode, rows, turns",
  [(0, "minibatch", 1792, 20), (11, "minibatch", 3328, 11), (11, "exact", 3200, 11)],
)
def test_the_user_model_estimate_sizes_choices_by_rows_of_turns_per_row(
  turns_per_row, mode, rows, turns
):
  """The paper's 1600 training users of n = 4 x 5 = 20 choices fill one row of 20 turns each by
  default (1600 rows, 1792 padded to em.batch_users=256 in mini-batch EM); turns_per_row=11 puts
  each in 2 rows of 11 turns (3200 rows; 3328 padded). EM's arrays are [rows, T, L, ...]."""
  config = paper.get_config()
  config.data.turns_per_row = turns_per_row
  config.em.mode = mode
  w, it = config.world, config.interaction
  slots = rows * turns * it.slate_size
  images, text = config_lib.memory_estimate(config)["user_model"][2:]
  assert images.nbytes == slots * it.images_per_prompt * w.feature_dim * 4
  assert text.nbytes == slots * (w.feature_dim + it.images_per_prompt + 3) * 4
  assert f"[{rows}, {turns}, L, " in images.what and f"[{rows}, {turns}, L, " in text.what
  assert "data.turns_per_row" in images.fields and "data.turns_per_row" in text.fields


def test_the_paper_config_fits_in_16_gib_and_not_in_4():
  config = paper.get_config()
  config_lib.check_memory(config, memory_bytes=16 * 2**30)
  with pytest.raises(config_lib.ConfigError, match=r"^config\.world\.num_users=2000: ") as info:
    config_lib.check_memory(config, memory_bytes=4 * 2**30)
  assert "the data stage would hold about" in str(info.value)
  assert "make smaller: world.num_users, world.sessions_per_user" in str(info.value)


@pytest.mark.parametrize("field", ["world.num_users", "simulate.num_users", "evaluate.num_users"])
def test_a_billion_users_is_refused_by_the_estimate_without_allocating(field):
  config = _override(paper.get_config(), field, 10**9)
  tracemalloc.start()
  start = time.perf_counter()
  try:
    with pytest.raises(config_lib.ConfigError) as info:
      config_lib.validate(config)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert str(info.value).startswith(f"config.{field}=1000000000: the "), str(info.value)
  assert "GiB" in str(info.value) and "of this machine's" in str(info.value)
  assert elapsed < 1.0 and peak < 2**20, (elapsed, peak)


def test_config_error_is_a_value_error():
  assert issubclass(config_lib.ConfigError, ValueError)


def test_config_hash_is_stable():
  config = conftest.tiny_config()
  digest = config_lib.config_hash(config)
  assert len(digest) == 16 and all(c in "0123456789abcdef" for c in digest)
  assert config_lib.config_hash(config) == digest
  assert config_lib.config_hash(conftest.tiny_config()) == digest


def test_config_hash_changes_with_a_value():
  config = conftest.tiny_config()
  digest = config_lib.config_hash(config)
  config.em.epochs += 1
  assert config_lib.config_hash(config) != digest
  other = conftest.tiny_config()
  other.world.feature_dim += 1
  assert config_lib.config_hash(other) != digest


def test_config_hash_ignores_stages():
  config = conftest.tiny_config()
  digest = config_lib.config_hash(config)
  config.stages = ("data",)
  assert config_lib.config_hash(config) == digest


def test_to_json_keeps_every_section():
  saved = json.loads(config_lib.to_json(conftest.tiny_config()))
  assert {"interaction", "world", "user_model", "em", "select_k", "stages"} <= set(saved)
  assert saved["select_k"]["ks"] == [1, 3]


def _run_main(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "pasta_jax.main", "--config=configs/quickstart.py", *args],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_main_rejects_a_bad_config_value_before_any_stage(tmp_path):
  workdir = tmp_path / "run"
  result = _run_main(f"--workdir={workdir}", "--config.em.mode=foo")
  assert result.returncode != 0
  assert "config.em.mode" in result.stderr, result.stderr
  assert "stage " not in result.stdout, result.stdout
  assert not (workdir / "data").exists()
  assert not (workdir / "config.json").exists()


def test_main_rejects_an_override_of_the_wrong_type(tmp_path):
  workdir = tmp_path / "run"
  result = _run_main(f"--workdir={workdir}", "--config.user_model.num_types=abc")
  assert result.returncode != 0
  assert "config.user_model.num_types" in result.stderr, result.stderr
  assert "stage " not in result.stdout, result.stdout
  assert not (workdir / "data").exists()


def test_main_refuses_a_size_that_cannot_fit_before_any_stage(tmp_path):
  workdir = tmp_path / "run"
  result = _run_main(f"--workdir={workdir}", "--config.world.num_users=1000000000")
  assert result.returncode != 0
  assert "config.world.num_users=1000000000: the data stage would hold" in result.stderr, (
    result.stderr
  )
  assert "stage " not in result.stdout, result.stdout
  assert not workdir.exists()


def test_validation_imports_nothing_heavy():
  code = (
    "import sys\n"
    "from configs import pasta_real, quickstart\n"
    "from pasta_jax import config\n"
    "config.validate(quickstart.get_config())\n"
    "real = pasta_real.get_config()\n"
    "real.data.kaggle_dir = real.embed.clip_checkpoint = real.embed.cache_dir = '/somewhere'\n"
    "real.stages = ('data', 'user_model')\n"
    "config.validate(real)\n"
    "print(sorted(m for m in ('matplotlib', 'sklearn', 'torch', 'tensorflow') if m in sys.modules))\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_the_tiny_variant_loads_through_config_flags():
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values)
  values(["test", f"--config={os.path.join(REPO_ROOT, 'configs', 'quickstart.py')}:tiny"])
  assert values.config.to_dict() == quickstart.get_config("tiny").to_dict()
  assert quickstart.get_config("runlocal").to_dict() == quickstart.get_config("tiny").to_dict()
  assert conftest.tiny_config().to_dict() == quickstart.get_config("tiny").to_dict()
  assert quickstart.get_config("tiny").world.num_users < quickstart.get_config().world.num_users


@pytest.mark.parametrize(
  "module, arg",
  [(quickstart, "huge"), (paper, "tiny"), (pasta_real, "tiny"), (pretrain, "runlocal")],
)
def test_an_unknown_variant_names_the_accepted_ones(module, arg):
  with pytest.raises(
    ValueError, match=f"unknown config variant '{arg}'; accepted: the default"
  ) as info:
    module.get_config(arg)
  if module is quickstart:
    assert "'tiny'" in str(info.value) and "'runlocal'" in str(info.value)


def test_fields_nothing_reads_are_gone():
  for module in (quickstart, paper, pasta_real, pretrain):
    config = module.get_config()
    assert "log_every_epochs" not in config.em and "logging_policy" not in config.world


def test_each_block_is_checked_by_its_module():
  config = conftest.tiny_config()
  config.simulate.reward = "sometimes"
  with pytest.raises(config_lib.ConfigError, match=r"^config\.simulate\.reward="):
    simulator.validate_config(config)
  config = conftest.tiny_config()
  config.select_k.ks = ()
  with pytest.raises(config_lib.ConfigError, match=r"^config\.select_k\.ks="):
    select_k.validate_config(config)
  config = conftest.tiny_config()
  config.user_model.hidden = (0,)
  with pytest.raises(config_lib.ConfigError, match=r"^config\.user_model\.hidden="):
    utility.validate_config(config)


@pytest.mark.parametrize(
  "mapping, named",
  [
    ({"human_file": "rater.csv"}, "field 'user_id': missing (required)"),
    ({"rater_column": "x"}, "field 'rater_column': unknown layout field"),
    ({"turns": 5.0}, "field 'turns': 5.0: float; expected a positive integer"),
    ({"slate_size": 3}, "field 'slate_size' is 3; config.interaction.slate_size is 4"),
    ({"categories": {"wild": "wild"}}, "field 'categories': ['wild'] are not in"),
  ],
)
def test_a_bad_kaggle_layout_mapping_is_a_config_error_naming_the_field(tmp_path, mapping, named):
  from pasta_jax.data import pasta_kaggle

  required = {f: getattr(pasta_kaggle.KAGGLE_LAYOUT, f) for f in pasta_kaggle.REQUIRED_FIELDS}
  required = mapping if "human_file" in mapping else {**required, **mapping}
  path = str(tmp_path / "layout.json")
  with open(path, "w") as f:
    json.dump(required, f)
  with pytest.raises(config_lib.ConfigError, match=r"^config\.data\.kaggle_layout=") as info:
    config_lib.validate(_real_config(path))
  assert named in str(info.value), info.value


def test_a_valid_or_absent_kaggle_layout_mapping_passes(tmp_path):
  from pasta_jax.data import pasta_kaggle

  path = str(tmp_path / "layout.json")
  with open(path, "w") as f:
    json.dump(pasta_kaggle.layout_to_json(pasta_kaggle.KAGGLE_LAYOUT), f)
  config_lib.validate(_real_config(path))
  config_lib.validate(_real_config(""))
  with pytest.raises(config_lib.ConfigError, match="nowhere.json"):
    config_lib.validate(_real_config(str(tmp_path / "nowhere.json")))
