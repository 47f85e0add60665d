"""data.source="records": a lab's own records and features through the data and user_model stages."""

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest

from configs import records as records_config
from pasta_jax import config as config_lib
from pasta_jax import files, pipeline
from pasta_jax.data import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "records")


def _make_example():
  spec = importlib.util.spec_from_file_location(
    "make_example", os.path.join(EXAMPLE, "make_example.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(records_path: str, features_path: str):
  config = records_config.get_config()
  config.data.records, config.data.features = records_path, features_path
  config.select_k.ks, config.user_model.num_types = (2,), 2
  config.em.epochs, config.em.restarts = 3, 1
  return config


@pytest.fixture()
def example(tmp_path):
  """(records path, features path) of the example written by examples/records/make_example.py."""
  return _make_example().write(str(tmp_path))


def test_the_committed_example_is_what_make_example_writes(example):
  written, table = schema.read_records(example[0]), schema.load_features(example[1], 8)
  committed = schema.read_records(os.path.join(EXAMPLE, "records.jsonl"))
  saved = schema.load_features(os.path.join(EXAMPLE, "features.npz"), 8)
  assert written == committed
  np.testing.assert_array_equal(table.image, saved.image)
  np.testing.assert_array_equal(table.text, saved.text)


def test_user_records_run_through_data_and_user_model(example, tmp_path):
  config = _config(*example)
  workdir = str(tmp_path / "run")
  results = pipeline.run(config, workdir)

  records = schema.read_records(example[0])
  assert schema.read_records(os.path.join(workdir, "data", "records.jsonl")) == records
  copied = schema.load_features(os.path.join(workdir, "data", "features.npz"), 8)
  np.testing.assert_array_equal(copied.image, schema.load_features(example[1], 8).image)
  split = files.read_json(os.path.join(workdir, "data", "split.json"))
  users = sorted({r.user_id for r in records})
  assert sorted(split["train"] + split["heldout"]) == users and len(split["heldout"]) == 1
  manifest = results["data"]
  assert manifest["source"] == "records" and manifest["records"] == len(records) == 20
  assert "planted_num_types" not in manifest
  with open(os.path.join(workdir, "user_model", "user_model.json")) as f:
    summary = json.load(f)
  assert summary["num_types"] == 2 and "ari_vs_planted" not in summary
  assert np.isclose(sum(summary["priors"]), 1.0)
  assert summary["heldout_loglik_per_choice"] < 0
  assert os.path.isdir(os.path.join(workdir, "user_model", "fitted"))


def test_missing_files_and_a_missing_generator_are_config_errors(example, tmp_path):
  config = _config(str(tmp_path / "absent.jsonl"), example[1])
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.records=.*absent\.jsonl"):
    config_lib.validate(config)
  config = _config(example[0], "")
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.features=''"):
    config_lib.validate(config)
  config = _config(*example)
  config.stages = ("data", "user_model", "simulate", "agent")
  with pytest.raises(
    config_lib.ConfigError, match=r"config\.candidates\.replay_cache=''.*\('simulate', 'agent'\)"
  ):
    config_lib.validate(config)
  config.stages = ("data", "user_model", "evaluate", "report")
  config_lib.validate(config)


def test_invalid_user_records_name_the_file_record_and_field(example, tmp_path):
  records = schema.read_records(example[0])
  records[3] = dataclasses.replace(records[3], choice=7)
  bad = str(tmp_path / "bad.jsonl")
  schema.write_records(bad, records)
  config = _config(bad, example[1])
  with pytest.raises(schema.RecordError, match=rf"{bad}: record 3 .*field 'choice'"):
    pipeline.run_data(config, str(tmp_path / "run"), "")
  config = _config(*example)
  config.world.feature_dim = 4
  with pytest.raises(schema.RecordError, match=r"features\.npz.*'image'.*width"):
    pipeline.run_data(config, str(tmp_path / "run"), "")
