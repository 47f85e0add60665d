"""Config validation, the config hash, and the command line's refusal of bad configs before any work."""

import json
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import paper, pasta_real, pretrain, quickstart
from pasta_jax import config as config_lib
from pasta_jax import simulator
from pasta_jax.user_model import select_k, utility
from tests import conftest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _set(config, field: str, value) -> None:
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def test_quickstart_config_is_valid():
  config_lib.validate(quickstart.get_config())


def test_tiny_test_config_is_valid():
  config_lib.validate(conftest.tiny_config())


def test_a_subset_of_stages_in_order_is_valid():
  config = conftest.tiny_config()
  config.stages = ("user_model", "evaluate")
  config_lib.validate(config)


@pytest.mark.parametrize(
  "field, value, named",
  [
    ("stages", ("data", "train"), "config.stages"),
    ("stages", ("user_model", "data"), "config.stages"),
    ("em.mode", "foo", "config.em.mode"),
    ("em.batch_users", 0, "config.em.batch_users"),
    ("user_model.aggregation", "median", "config.user_model.aggregation"),
    ("user_model.init_from", "/nowhere/fitted/k8", "config.user_model.init_from"),
    ("interaction.slate_size", 6, "config.interaction.slate_size"),
    ("interaction.num_candidates", 24, "config.interaction.num_candidates"),
    ("world.feature_dim", 14, "config.world.feature_dim"),
    ("select_k.criterion", "aic", "config.select_k.criterion"),
    ("em.learning_rate", -1e-3, "config.em.learning_rate"),
    ("simulate.reward", "sometimes", "config.simulate.reward"),
    ("agent.data_mixes", ("real", "web"), "config.agent.data_mixes"),
    ("agent.sim_fraction", 1.0, "config.agent.sim_fraction"),
    ("agent.iql.expectile", 0.3, "config.agent.iql.expectile"),
    ("agent.iql.discount", 1.0, "config.agent.iql.discount"),
    ("agent.iql.steps", 150, "config.agent.iql.steps"),
    ("agent.bc.checkpoint_every_steps", 50, "config.agent.bc.checkpoint_every_steps"),
    ("evaluate.num_users", 0, "config.evaluate.num_users"),
  ],
)
def test_validate_names_the_bad_field(field, value, named):
  config = conftest.tiny_config()
  assert len(config.interaction.categories) == 5
  assert 5 * config.world.values_per_attribute == 15
  _set(config, field, value)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  assert str(info.value).startswith(named), str(info.value)


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


def _real_config(layout: str):
  config = pasta_real.get_config()
  config.data.kaggle_dir = config.embed.clip_checkpoint = config.embed.cache_dir = "/somewhere"
  config.stages = ("data", "user_model")
  config.data.kaggle_layout = layout
  return config


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
