"""Feature rows for canonical records: every image reference and prompt text of the records is embedded
through the content-addressed cache, and the records get the rows of the resulting `FeatureTable`.

Loaders of real data (`data.pasta_kaggle`, `data.preferences`) write records whose rows are -1; this is the
step that makes them usable by the user model and the agent (as a command: `python -m pasta_jax.embed
--records=FILE --output=DIR`).
"""

import collections
import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from pasta_jax import files, types
from pasta_jax.data import schema
from pasta_jax.embed import cache, clip


def image_file(ref: str, image_root: str, where: str) -> str:
  """The local file of an image reference (relative to `image_root`, or absolute inside it).

  ValueError starting with `where` for a URI (`gs://...`), a reference that resolves outside
  `image_root` (symlinks resolved) or a missing file.
  """
  if "://" in ref:
    raise ValueError(f"{where}: {ref!r} is a URI; download it under the image root first")
  path = files.resolve_inside(image_root, ref, where)
  if not os.path.isfile(path):
    raise ValueError(f"{where}: {ref!r} no file {path}")
  return path


def image_files(
  records: Sequence[schema.ChoiceRecord], image_root: str, source: str
) -> dict[str, str]:
  """ref -> local path for every image of the records; a URI, a reference outside `image_root` or a
  missing file is a RecordError naming the first record and field that uses it."""
  paths, errors = {}, []
  for i, r in enumerate(records):
    for j, option in enumerate(r.options):
      for m, image in enumerate(option.images):
        if image.ref in paths:
          continue
        where = (
          f"{source}: record {i} (user {r.user_id!r}, session {r.session_id!r}, turn {r.turn}): "
          f"field 'options[{j}].images[{m}].ref'"
        )
        try:
          paths[image.ref] = image_file(image.ref, image_root, where)
        except ValueError as e:
          errors.append(str(e))
          paths[image.ref] = ""
  schema.raise_if_any(errors)
  return paths


def _texts(records: Sequence[schema.ChoiceRecord]) -> list[str]:
  """Every option text and start prompt, each once, in order of first use."""
  return list(
    dict.fromkeys(t for r in records for t in [r.start_prompt] + [o.text for o in r.options])
  )


def embed_records(
  records: Sequence[schema.ChoiceRecord],
  tower: clip.ClipTower,
  store: cache.FeatureStore,
  image_root: str,
  source: str,
  batch_size: int = 64,
  show_progress: bool = True,
) -> tuple[list[schema.ChoiceRecord], types.FeatureTable]:
  """(records with image, text and start-prompt rows, FeatureTable f32[N_img, D] / f32[N_txt, D]).

  Images and texts already in `store` under the tower's model id are not embedded again.
  """
  paths = image_files(records, image_root, source)
  refs = list(paths)
  texts = _texts(records)
  images = cache.embed_images(tower, store, [paths[ref] for ref in refs], batch_size, show_progress)
  text_features = cache.embed_texts(tower, store, texts, batch_size, show_progress)
  image_row = {ref: i for i, ref in enumerate(refs)}
  text_row = {text: i for i, text in enumerate(texts)}

  def with_rows(record: schema.ChoiceRecord) -> schema.ChoiceRecord:
    options = tuple(
      dataclasses.replace(
        o,
        text_row=text_row[o.text],
        images=tuple(dataclasses.replace(im, row=image_row[im.ref]) for im in o.images),
      )
      for o in record.options
    )
    return dataclasses.replace(
      record, options=options, start_text_row=text_row[record.start_prompt]
    )

  table = types.FeatureTable(
    image=np.asarray(images.features, np.float32),
    text=np.asarray(text_features.features, np.float32),
  )
  return [with_rows(r) for r in records], table


def spec_of(records: Sequence[schema.ChoiceRecord]) -> schema.RecordSpec:
  """The shape the records share: the categories of their session turns and the most common slate
  size and images per option among those turns; a preference spec (no categories, slates of at
  least 2) when there is no session turn. User types: any non-negative type."""
  turns = [r for r in records if r.kind == schema.SESSION_TURN]
  if not turns:
    return schema.RecordSpec(categories=(), slate_size=2, images_per_option=1)

  def most_common(values):
    return collections.Counter(values).most_common(1)[0][0]

  return schema.RecordSpec(
    categories=tuple(dict.fromkeys(o.category for r in turns for o in r.options)),
    slate_size=most_common(len(r.options) for r in turns),
    images_per_option=most_common(len(o.images) for r in turns for o in r.options),
  )


def output_paths(records_path: str, output_dir: str) -> tuple[str, str]:
  """(records.jsonl, features.npz) under `output_dir`; RecordError when the first is the input
  file itself, which the output must not overwrite."""
  paths = tuple(os.path.join(output_dir, name) for name in ("records.jsonl", "features.npz"))
  if os.path.realpath(paths[0]) == os.path.realpath(records_path):
    raise schema.RecordError(
      f"{records_path}: the output {paths[0]} would overwrite the input; choose another --output"
    )
  return paths


def embed_record_file(
  checkpoint_dir: str,
  records_path: str,
  image_root: str,
  cache_dir: str,
  output_dir: str,
  batch_size: int = 64,
) -> dict:
  """Embeds the images and texts of a JSON Lines file of records; writes `output_dir`/records.jsonl (rows
  filled) and features.npz; returns a summary (counts, model id, width).

  The records are validated (`schema.read_records`, `schema.validate_records` against `spec_of`
  them, sessions and preferences both allowed, every image file inside `image_root`) before
  anything is loaded, embedded or written: a RecordError names the file, the record and the field.
  Both outputs are written to temporary files and renamed over their targets only once both are
  complete, so an error leaves `output_dir` as it was.
  """
  records = schema.read_records(records_path)
  spec = spec_of(records)
  schema.validate_records(records, spec, records_path, allow_preferences=True)
  records_out, features_out = output_paths(records_path, output_dir)
  image_files(records, image_root, records_path)
  tower = clip.load_clip(checkpoint_dir)
  with cache.FeatureStore(cache_dir) as store:
    embedded, table = embed_records(records, tower, store, image_root, records_path, batch_size)
  schema.validate_features(table, tower.dim, f"{records_path} embedded by {checkpoint_dir}")
  schema.validate_records(embedded, spec, records_out, table, allow_preferences=True)
  os.makedirs(output_dir, exist_ok=True)
  with (
    files.replacing(records_out) as records_tmp,
    files.replacing(features_out, ".npz") as features_tmp,
  ):
    schema.write_records(records_tmp, embedded)
    schema.save_features(features_tmp, table)
  return {
    "records": len(embedded),
    "images": int(table.image.shape[0]),
    "texts": int(table.text.shape[0]),
    "model_id": tower.model_id,
    "dim": tower.dim,
    "output": os.path.abspath(output_dir),
  }
