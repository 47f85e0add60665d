"""Embeds with CLIP through the content-addressed feature cache; prints a JSON summary.

python -m pasta_jax.embed --checkpoint=CLIP_DIR --cache=DIR --images=DIR
    every image of a folder (`cache.embed_folder`);
python -m pasta_jax.embed --checkpoint=CLIP_DIR --cache=DIR --records=FILE.jsonl --output=DIR
    the images and texts of canonical records, written with their feature rows as DIR/records.jsonl and
    DIR/features.npz (`records.embed_record_file`). The records are validated first: an invalid one
    is refused with its file, record and field before anything is embedded or written.
"""

import json
import os

from absl import app, flags

from pasta_jax import errors
from pasta_jax.data import schema
from pasta_jax.embed import cache, clip, records

FLAGS = flags.FLAGS
USAGE = "give either --images=DIR, or --records=FILE.jsonl with --output=DIR"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.images) == bool(FLAGS.records) or bool(FLAGS.records) != bool(FLAGS.output):
    raise app.UsageError(USAGE)
  try:
    if FLAGS.images:
      summary = cache.embed_folder(FLAGS.checkpoint, FLAGS.images, FLAGS.cache, FLAGS.batch_size)
    else:
      image_root = FLAGS.image_root or os.path.dirname(FLAGS.records)
      summary = records.embed_record_file(
        FLAGS.checkpoint, FLAGS.records, image_root, FLAGS.cache, FLAGS.output, FLAGS.batch_size
      )
  except (
    clip.CheckpointError,
    errors.CorruptFileError,
    cache.ImageError,
    schema.RecordError,
  ) as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  flags.DEFINE_string(
    "checkpoint", None, "Hugging Face CLIP checkpoint directory (config.json + weights)."
  )
  flags.DEFINE_string("images", "", "Directory of images to embed.")
  flags.DEFINE_string(
    "records", "", "JSON Lines file of canonical records (schema.write_records) to embed."
  )
  flags.DEFINE_string(
    "image_root",
    "",
    "With --records: the directory relative image refs are under (default: the records file's).",
  )
  flags.DEFINE_string(
    "output", "", "With --records: directory for records.jsonl (rows filled) and features.npz."
  )
  flags.DEFINE_string("cache", None, "Feature cache directory (created if absent).")
  flags.DEFINE_integer("batch_size", 64, "Images or texts per forward pass.")
  flags.mark_flags_as_required(["checkpoint", "cache"])
  app.run(main)
