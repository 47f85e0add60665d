"""Bad input at the tools that write records, the LMM replay cache, and corrupted intermediate files
(Orbax checkpoints, the feature cache's sqlite index): each gets an error naming the file, the entry
and the field (or what to delete and re-run), and nothing is deleted or overwritten."""

import dataclasses
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasta_jax import candidates, checkpoint, errors, provenance, train_loop
from pasta_jax.data import schema
from pasta_jax.embed import cache
from pasta_jax.embed import records as embed_records
from tests import test_clip, test_embed_cache

CATEGORIES = ("style", "creative")


def _snapshot(root: str) -> dict[str, bytes]:
  """relative path -> bytes of every file under `root`."""
  found = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, root)] = f.read()
  return found


# The embedding CLI validates the records it was given before computing or writing anything.


def _option(text, category, first, images=2):
  refs = tuple(schema.Image(ref=f"images/{first + m}.png", row=-1) for m in range(images))
  return schema.Option(text=text, category=category, text_row=-1, images=refs)


def _turns():
  """Two turns of one session over images/0..5.png (rows -1, as loaders write them)."""
  first = schema.ChoiceRecord(
    kind=schema.SESSION_TURN,
    user_id="r1",
    session_id="r1-0",
    turn=0,
    start_prompt="a cat",
    options=(_option("a cat, watercolor", "style", 0), _option("a cat astronaut", "creative", 2)),
    choice=1,
  )
  second = dataclasses.replace(
    first,
    turn=1,
    start_prompt="a cat astronaut",
    options=(_option("a cat astronaut, oil", "style", 4), _option("a cat, ink", "style", 0)),
    choice=0,
  )
  return [first, second]


@pytest.fixture
def release(tmp_path):
  """(folder with images/0..5.png, path of its records file)."""
  root = tmp_path / "release"
  (root / "images").mkdir(parents=True)
  for i, array in enumerate(test_clip.random_images(6, seed=7)):
    (root / "images" / f"{i}.png").write_bytes(test_embed_cache.png_bytes(array))
  path = str(root / "turns.jsonl")
  schema.write_records(path, _turns())
  return str(root), path


BROKEN_RECORDS = [
  (
    lambda turns: [turns[0], dataclasses.replace(turns[1], choice=2)],
    r"record 1 \(user 'r1', session 'r1-0', turn 1\): field 'choice': 2 is out of range",
  ),
  (
    lambda turns: [turns[0], dataclasses.replace(turns[1], turn=2)],
    r"record 1 \(session 'r1-0'\): field 'turn': turn 2 where turn 1 was expected",
  ),
  (
    lambda turns: [
      turns[0],
      dataclasses.replace(turns[1], options=turns[1].options + (turns[0].options[0],)),
    ],
    r"record 1 \(user 'r1', session 'r1-0', turn 1\): field 'options': slate has 3 options; "
    "expected 2",
  ),
  (
    lambda turns: [turns[0], dataclasses.replace(turns[1], user_id="r2")],
    r"record 1 .*: field 'session_id': session also belongs to user 'r1'",
  ),
  (
    lambda turns: [turns[0], dataclasses.replace(turns[1], kind=schema.PREFERENCE)],
    r"record 1 .*: field 'options\[0\]\.category': unknown category 'style'; expected one of "
    r"\['none'\]",
  ),
]


@pytest.mark.parametrize("edit, message", BROKEN_RECORDS)
def test_the_embedding_tool_refuses_invalid_records_before_loading_or_writing(
  release, tmp_path, edit, message
):
  root, path = release
  schema.write_records(path, edit(_turns()))
  out, cache_dir = tmp_path / "out", tmp_path / "cache"
  with pytest.raises(schema.RecordError, match=f"^{re.escape(path)}: {message}"):
    embed_records.embed_record_file(
      str(tmp_path / "no_checkpoint"), path, root, str(cache_dir), str(out)
    )
  assert not out.exists() and not cache_dir.exists()


def test_the_embedding_tool_refuses_to_overwrite_its_input(release, tmp_path):
  root, _ = release
  path = os.path.join(root, "records.jsonl")
  schema.write_records(path, _turns())
  before = _snapshot(root)
  with pytest.raises(schema.RecordError, match="would overwrite the input; choose another"):
    embed_records.embed_record_file(
      str(tmp_path / "no_checkpoint"), path, root, str(tmp_path / "cache"), root
    )
  assert _snapshot(root) == before


def test_the_records_spec_is_the_shape_most_records_share():
  turns = _turns()
  spec = embed_records.spec_of(
    turns + [dataclasses.replace(turns[1], options=turns[1].options[:1])]
  )
  assert spec == schema.RecordSpec(CATEGORIES, slate_size=2, images_per_option=2)
  preference = dataclasses.replace(
    turns[0],
    kind=schema.PREFERENCE,
    options=tuple(dataclasses.replace(o, category="none") for o in turns[0].options),
  )
  assert embed_records.spec_of([preference]).categories == ()
  schema.validate_records(
    [preference], embed_records.spec_of([preference]), "fixture", allow_preferences=True
  )


def test_the_embedding_cli_names_the_record_and_writes_nothing(release, tmp_path):
  root, path = release
  schema.write_records(path, [_turns()[0], dataclasses.replace(_turns()[1], choice=-1)])
  out = tmp_path / "out"
  command = [
    sys.executable,
    "-m",
    "pasta_jax.embed",
    f"--checkpoint={tmp_path / 'no_checkpoint'}",
    f"--records={path}",
    f"--cache={tmp_path / 'cache'}",
    f"--output={out}",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  assert result.returncode != 0
  assert f"{path}: record 1 (user 'r1', session 'r1-0', turn 1): field 'choice'" in result.stderr
  assert not out.exists() and not (tmp_path / "cache").exists()


def test_an_error_while_embedding_leaves_the_outputs_and_the_cache_as_they_were(release, tmp_path):
  root, path = release
  clip_dir = str(tmp_path / "clip")
  test_clip.write_tiny_clip(clip_dir)
  out, cache_dir = tmp_path / "out", tmp_path / "cache"
  out.mkdir()
  (out / "records.jsonl").write_text("earlier records\n")
  (out / "features.npz").write_bytes(b"earlier features")
  cache_dir.mkdir()
  (cache_dir / cache.INDEX_FILE).write_bytes(b"not a sqlite database" * 10)
  before = {"out": _snapshot(str(out)), "cache": _snapshot(str(cache_dir))}
  index = str(cache_dir / cache.INDEX_FILE)
  with pytest.raises(cache.CacheCorruption, match=f"^{re.escape(index)}: the sqlite index"):
    embed_records.embed_record_file(clip_dir, path, root, str(cache_dir), str(out))
  assert {"out": _snapshot(str(out)), "cache": _snapshot(str(cache_dir))} == before


# The LMM replay cache: each malformed entry is named by file, line and field.


def _entry(prompt="a cat"):
  return {
    "prompt": prompt,
    "candidates": [
      {"text": "a cat, ink", "category": "style"},
      {"text": "a cat astronaut", "category": "creative"},
    ],
  }


def _with_candidate(**fields):
  entry = _entry()
  entry["candidates"][1] = dict(entry["candidates"][1], **fields)
  return json.dumps(entry)


MALFORMED_ENTRIES = [
  (json.dumps(_entry("")), "field 'prompt': empty text ''"),
  (json.dumps(_entry("  \t")), "field 'prompt': empty text"),
  (json.dumps(_entry(["a cat"])), "field 'prompt': expected a string, got list"),
  (json.dumps(_entry(None)), "field 'prompt': expected a string, got NoneType"),
  (json.dumps({"candidates": []}), "field 'prompt' is missing"),
  (
    json.dumps({"prompt": "a cat", "candidates": []}),
    "field 'candidates': expected a list of 2, got 0",
  ),
  (json.dumps({"prompt": "a cat"}), "field 'candidates' is missing"),
  (
    json.dumps({"prompt": "a cat", "candidates": "a cat, ink"}),
    "field 'candidates': expected a list of 2, got str",
  ),
  (
    json.dumps({"prompt": "a cat", "candidates": ["a cat, ink", "a dog"]}),
    "field 'candidates[0]': expected an object",
  ),
  (_with_candidate(text=""), "field 'candidates[1].text': empty text ''"),
  (_with_candidate(text=7), "field 'candidates[1].text': expected a string, got int 7"),
  (_with_candidate(category=3), "field 'candidates[1].category': unknown category 3"),
  (
    _with_candidate(category=["creative"]),
    "field 'candidates[1].category': unknown category ['creative']",
  ),
  (_with_candidate(category=None), "field 'candidates[1].category': unknown category None"),
  (
    _with_candidate(category="poem"),
    "field 'candidates[1].category': unknown category 'poem'; expected one of ['style', 'creative']",
  ),
  (
    _with_candidate(category="style"),
    "field 'candidates': expected 1 per category, got {'style': 2, 'creative': 0}",
  ),
  ('["a cat", []]', "expected a JSON object with 'prompt' and 'candidates', got list"),
  ('"a cat"', "expected a JSON object with 'prompt' and 'candidates', got str"),
  ("3", "expected a JSON object with 'prompt' and 'candidates', got int"),
  ('{"prompt": "a cat", "prompt": "a dog", "candidates": []}', "duplicated keys ['prompt']"),
  ('{"prompt": "a cat", ', "not JSON"),
  ("[" * 100_000 + "]" * 100_000, "not JSON (nested too deeply)"),
]


@pytest.mark.parametrize("line, message", MALFORMED_ENTRIES)
def test_a_malformed_replay_cache_entry_names_the_file_line_and_field(tmp_path, line, message):
  path = tmp_path / "expansions.jsonl"
  path.write_text(f"{json.dumps(_entry())}\n\n{line}\n")
  with pytest.raises(candidates.ReplayCacheError) as info:
    candidates.read_cache(str(path), CATEGORIES, 2)
  assert str(info.value).startswith(f"{path}: line 3: {message}"), str(info.value)


def test_every_malformed_replay_cache_line_is_reported(tmp_path):
  path = tmp_path / "expansions.jsonl"
  path.write_bytes(
    b"\xff\xfe\n" + json.dumps(_entry("")).encode() + b"\n" + json.dumps(_entry()).encode() + b"\n"
  )
  with pytest.raises(candidates.ReplayCacheError) as info:
    candidates.read_cache(str(path), CATEGORIES, 2)
  assert str(info.value).splitlines() == [
    f"{path}: line 1: invalid UTF-8 at byte 0 of the line",
    f"{path}: line 2: field 'prompt': empty text ''; expected a prompt",
  ]


@pytest.mark.parametrize(
  "content, message",
  [
    (None, r"cannot be read \(.*No such file.*\); check candidates.replay_cache"),
    ("", "no expansions; the file is empty"),
    ("\n  \n", r"no expansions; the file holds only blank lines \(lines 1..2\)"),
  ],
)
def test_a_missing_or_empty_replay_cache_is_named(tmp_path, content, message):
  path = tmp_path / "expansions.jsonl"
  if content is not None:
    path.write_text(content)
  with pytest.raises(candidates.ReplayCacheError, match=f"^{re.escape(str(path))}: {message}"):
    candidates.read_replay_cache(str(path), ["a cat"], CATEGORIES, 2, 1)


def test_a_valid_replay_cache_is_read_as_written(tmp_path):
  path = tmp_path / "expansions.jsonl"
  path.write_text(f"{json.dumps(_entry())}\n{json.dumps(_entry('a cat, ink'))}\n")
  entries = candidates.read_cache(str(path), CATEGORIES, 2)
  assert entries == {
    "a cat": [(["a cat, ink", "a cat astronaut"], [0, 1], 1)],
    "a cat, ink": [(["a cat, ink", "a cat astronaut"], [0, 1], 2)],
  }


# Corrupted Orbax checkpoints: the fitted model (save_tree) and training states (the manager).


def _tree(offset: float = 0.0):
  return {
    "params": {"w": jnp.arange(12.0).reshape(3, 4) + offset},
    "log_priors": jnp.full((3,), offset),
  }


def _damage(directory: str, name: str, how: str) -> None:
  """Truncates `name` (a file, or the first file of a folder) under `directory` to half its size,
  or overwrites 16 bytes in its middle."""
  path = os.path.join(directory, name)
  if os.path.isdir(path):
    path = os.path.join(path, sorted(os.listdir(path))[0])
  size = os.path.getsize(path)
  if how == "truncate":
    os.truncate(path, size // 2)
  else:
    with open(path, "r+b") as f:
      f.seek(size // 2)
      f.write(b"\xff\x00\xaa\x55" * 4)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  """A saved model at <workdir>/user_model/fitted beside user_model.done.json: (workdir, path)."""
  workdir = str(tmp_path_factory.mktemp("workdir"))
  path = os.path.join(workdir, "user_model", "fitted")
  checkpoint.save_tree(path, _tree())
  with open(provenance.marker_path(workdir, "user_model"), "w") as f:
    f.write("{}")
  return workdir, path


@pytest.mark.parametrize(
  "name, how",
  [
    ("d", "truncate"),
    ("d", "overwrite"),
    ("_METADATA", "truncate"),
    ("_METADATA", "overwrite"),
    ("manifest.ocdbt", "truncate"),
    ("array_metadatas", "truncate"),
  ],
)
@pytest.mark.parametrize("with_like", [True, False])
def test_a_corrupted_fitted_model_names_the_directory_and_the_stage(
  fitted, tmp_path, name, how, with_like
):
  workdir, saved = fitted
  copy = shutil.copytree(workdir, tmp_path / "workdir")
  path = os.path.join(copy, "user_model", "fitted")
  _damage(path, name, how)
  before = _snapshot(str(copy))
  like = jax.eval_shape(_tree) if with_like else None
  with pytest.raises(errors.CorruptFileError) as info:
    checkpoint.restore_tree(path, like)
  message = str(info.value)
  assert message.startswith(f"{path}: the checkpoint cannot be read back ("), message
  assert message.endswith(f"; delete {path} and re-run the user_model stage"), message
  assert len(message.splitlines()) == 1 and isinstance(info.value.__cause__, Exception)
  assert _snapshot(str(copy)) == before
  np.testing.assert_array_equal(
    checkpoint.restore_tree(saved)["params"]["w"], _tree()["params"]["w"]
  )


def test_a_checkpoint_outside_a_workdir_says_to_re_run_the_stage_that_wrote_it(tmp_path):
  path = str(tmp_path / "pretrained")
  checkpoint.save_tree(path, _tree())
  _damage(path, "d", "truncate")
  with pytest.raises(
    errors.CorruptFileError, match=f"; delete {re.escape(path)} and re-run the stage that wrote it$"
  ):
    checkpoint.restore_tree(path)


def test_a_corrupted_training_checkpoint_names_its_step_and_resumes_from_the_one_before(tmp_path):
  directory = str(tmp_path / "checkpoints")
  with checkpoint.manager(directory, save_every=1) as mngr:
    for step in (1, 2):
      checkpoint.save(mngr, step, _tree(float(step)))
  step_dir = os.path.join(directory, "2")
  _damage(os.path.join(step_dir, "default"), "d", "truncate")
  before = _snapshot(directory)
  like = _tree()
  expected = (
    f"^{re.escape(step_dir)}: the checkpoint cannot be read back .*; delete {re.escape(step_dir)} "
    "and re-run: training resumes from the checkpoint before it"
  )
  with checkpoint.manager(directory, save_every=1) as mngr:
    with pytest.raises(errors.CorruptFileError, match=expected):
      checkpoint.restore_latest(mngr, like)
  with pytest.raises(errors.CorruptFileError, match=f"^{re.escape(step_dir)}: .*delete"):
    checkpoint.restore(directory, like)
  assert _snapshot(directory) == before
  shutil.rmtree(step_dir)
  with checkpoint.manager(directory, save_every=1) as mngr:
    resumed = checkpoint.restore_latest(mngr, like)
  np.testing.assert_array_equal(resumed["params"]["w"], _tree(1.0)["params"]["w"])


# A corrupted sqlite index of the feature cache.


@pytest.fixture
def filled_cache(tmp_path):
  """A cache directory holding 2000 text rows of model "m": (directory, keys, rows f32[2000, 4])."""
  directory = str(tmp_path / "cache")
  keys = [cache.content_key(str(i).encode()) for i in range(2000)]
  rows = np.random.default_rng(0).normal(size=(2000, 4)).astype(np.float32)
  with cache.FeatureStore(directory) as store:
    store.put("m", cache.TEXT, keys, rows)
  return directory, keys, rows


def _truncate_half(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _overwrite(offset):
  def damage(path):
    with open(path, "r+b") as f:
      f.seek(offset)
      f.write(bytes(range(64)))

  return damage


@pytest.mark.parametrize(
  "damage, cause",
  [
    (_truncate_half, "database disk image is malformed"),
    (_overwrite(0), "file is not a database"),
    (_overwrite(100), "database disk image is malformed"),
    (_overwrite(4096), "database disk image is malformed"),
  ],
)
def test_a_corrupted_cache_index_names_the_file_and_what_to_delete(filled_cache, damage, cause):
  directory, keys, rows = filled_cache
  index = os.path.join(directory, cache.INDEX_FILE)
  damage(index)
  before = _snapshot(directory)
  with pytest.raises(cache.CacheCorruption) as info:
    with cache.FeatureStore(directory) as store:
      store.get("m", cache.TEXT, keys)
  assert str(info.value) == (
    f"{index}: the sqlite index is truncated or corrupted ({cause}); delete {index} and re-run: "
    "what it indexed is computed again"
  )
  assert isinstance(info.value, errors.CorruptFileError)
  assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
  assert _snapshot(directory) == before
  os.remove(index)
  with cache.FeatureStore(directory) as store:
    assert store.missing("m", cache.TEXT, keys[:3]) == keys[:3]
    store.put("m", cache.TEXT, keys[:3], rows[:3])
    np.testing.assert_array_equal(store.get("m", cache.TEXT, keys[:3]), rows[:3])


def test_a_cache_index_corrupted_while_open_is_named_at_the_query(filled_cache):
  directory, keys, _ = filled_cache
  index = os.path.join(directory, cache.INDEX_FILE)
  with cache.FeatureStore(directory) as store:
    _truncate_half(index)
    features = _snapshot(directory)["m.f32"]
    with pytest.raises(cache.CacheCorruption, match=f"^{re.escape(index)}: the sqlite index"):
      store.put("m", cache.TEXT, ["0" * 64], np.zeros((1, 4), np.float32))
  assert _snapshot(directory)["m.f32"] == features


def test_sqlite_errors_other_than_corruption_pass_unchanged():
  with pytest.raises(sqlite3.OperationalError, match="database is locked"):
    with cache.corrupt_index("index.sqlite"):
      raise sqlite3.OperationalError("database is locked")


def test_a_training_run_stops_at_its_corrupted_checkpoint_and_keeps_it(tmp_path):
  """train_loop.run (EM's, IQL's and BC's loop) resuming from a truncated latest step."""
  schedule = train_loop.Schedule("tiny", "step", total=4, per_chunk=1, save_every=1)

  def advance(state):
    return {"x": state["x"] + 1.0, "step": state["step"] + 1}, {"loss": state["x"][:1]}

  def fit(stop_after=None):
    state = {"x": jnp.zeros((4,), jnp.float32), "step": jnp.int32(0)}
    return train_loop.run(
      state,
      jax.jit(advance),
      schedule,
      lambda state: state["step"],
      checkpoint_dir=directory,
      stop_after=stop_after,
      show_progress=False,
    )[0]

  directory = str(tmp_path / "ckpt")
  assert int(fit(stop_after=2)["step"]) == 2
  step_dir = os.path.join(directory, "2")
  _damage(os.path.join(step_dir, "default"), "d", "truncate")
  before = _snapshot(directory)
  with pytest.raises(errors.CorruptFileError, match=f"^{re.escape(step_dir)}: .*delete"):
    fit()
  assert _snapshot(directory) == before
  shutil.rmtree(step_dir)
  np.testing.assert_array_equal(fit()["x"], np.full(4, 4.0, np.float32))


def test_the_command_line_names_a_bad_record_without_a_traceback(tmp_path):
  """`python -m pasta_jax.main` on a lab's records with a choice out of range: exit 1, one error line
  naming the file, the record and the field, and nothing written under data/."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  example = os.path.join(root, "examples", "records")
  lines = open(os.path.join(example, "records.jsonl")).read().splitlines()
  broken = json.loads(lines[2])
  broken["choice"] = 9
  lines[2] = json.dumps(broken)
  records = tmp_path / "records.jsonl"
  records.write_text("\n".join(lines) + "\n")
  workdir = tmp_path / "run"
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "pasta_jax.main",
      "--config=configs/records.py",
      f"--workdir={workdir}",
      f"--config.data.records={records}",
      f"--config.data.features={os.path.join(example, 'features.npz')}",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert done.returncode == 1, done.stderr
  assert "Traceback" not in done.stderr, done.stderr
  assert str(records) in done.stderr and "record 2 " in done.stderr and "choice" in done.stderr
  assert not os.path.exists(workdir / "data" / "records.jsonl")


def test_a_render_ledger_corrupted_while_open_is_named_at_the_lookup(tmp_path):
  from pasta_jax.embed import render

  directory = str(tmp_path / "renders")
  with render.RenderLedger(directory) as ledger:
    ledger.record("a red fox", 0, "sdxl", b"\x89PNG fake bytes")
  index = os.path.join(directory, render.LEDGER_FILE)
  with render.RenderLedger(directory) as ledger:
    _truncate_half(index)
    with pytest.raises(cache.CacheCorruption, match=f"^{re.escape(index)}: the sqlite index"):
      ledger.lookup("a red fox", 0, "sdxl")
