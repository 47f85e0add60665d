"""Writes the hand-written example of a lab's own choice logs: records.jsonl and features.npz.

Five raters, two 2-turn sessions each (20 records). Each turn showed a slate of up to 3 prompts
(categories of the paper), each rendered into up to 2 images, and the rater chose one; turn 1 starts
from the prompt chosen at turn 0. One turn had an option unavailable (2 options) and one option
rendered a single image: both are valid records (the padding is masked).

The features stand in for CLIP embeddings (width 8): each prompt's text row is a fixed random vector
of its words, each image row its prompt's vector plus a little noise, so raters who favour a style
choose consistently. A real lab writes its own CLIP rows with `pasta_jax.data.schema.save_features`.

Command:  .venv/bin/python examples/records/make_example.py            (writes beside this file)
          .venv/bin/python -m pasta_jax.main --config=configs/records.py --workdir=runs/records \\
            --config.data.records=examples/records/records.jsonl \\
            --config.data.features=examples/records/features.npz
"""

import argparse
import os
import zlib

import numpy as np

from pasta_jax import types
from pasta_jax.data import schema

DIM = 8
NOISE = 0.1

# (user, [(start prompt, [turn: ([(option text, category, images), ...], chosen index)])]).
RATERS = [
  (
    "ana",
    [
      (
        "a cat on a windowsill",
        [
          (
            [
              ("a watercolor cat on a sunny windowsill", "style", 2),
              ("a photo of a tabby cat by a window", "rephrase", 2),
              ("a cat on a windowsill at night above city lights", "expansion", 2),
            ],
            0,
          ),
          (
            [
              ("a watercolor cat asleep in soft pastel light", "expansion", 2),
              ("a watercolor fox on a sunny windowsill", "subject_change", 2),
              ("a cat made of clouds drifting past a window", "creative", 2),
            ],
            0,
          ),
        ],
      ),
      (
        "a lighthouse in a storm",
        [
          (
            [
              ("a watercolor lighthouse in a storm", "style", 2),
              ("a photo of a lighthouse hit by waves", "rephrase", 2),
            ],
            0,
          ),
          (
            [
              ("a watercolor lighthouse at dawn after the storm", "expansion", 2),
              ("a watercolor windmill in a storm", "subject_change", 1),
              ("a lighthouse whose beam paints the clouds", "creative", 2),
            ],
            0,
          ),
        ],
      ),
    ],
  ),
  (
    "ben",
    [
      (
        "a cat on a windowsill",
        [
          (
            [
              ("a watercolor cat on a sunny windowsill", "style", 2),
              ("a photo of a tabby cat by a window", "rephrase", 2),
              ("a cat on a windowsill at night above city lights", "expansion", 2),
            ],
            1,
          ),
          (
            [
              ("a sharp photo of a tabby cat, shallow depth of field", "expansion", 2),
              ("a photo of a beagle by a window", "subject_change", 2),
              ("a photo of a cat reflected in the window glass", "creative", 2),
            ],
            0,
          ),
        ],
      ),
      (
        "a mountain lake",
        [
          (
            [
              ("a photo of a mountain lake at sunrise", "rephrase", 2),
              ("an oil painting of a mountain lake", "style", 2),
              ("a mountain lake with a red canoe", "expansion", 2),
            ],
            0,
          ),
          (
            [
              ("a sharp photo of a mountain lake, mist on the water", "expansion", 2),
              ("a photo of a desert oasis at sunrise", "subject_change", 2),
              ("a mountain lake that mirrors a second sky", "creative", 2),
            ],
            0,
          ),
        ],
      ),
    ],
  ),
  (
    "chen",
    [
      (
        "a lighthouse in a storm",
        [
          (
            [
              ("a watercolor lighthouse in a storm", "style", 2),
              ("a photo of a lighthouse hit by waves", "rephrase", 2),
              ("a lighthouse keeper watching a storm roll in", "expansion", 2),
            ],
            0,
          ),
          (
            [
              ("a watercolor lighthouse at dawn after the storm", "expansion", 2),
              ("a watercolor windmill in a storm", "subject_change", 2),
              ("a lighthouse whose beam paints the clouds", "creative", 2),
            ],
            0,
          ),
        ],
      ),
      (
        "a mountain lake",
        [
          (
            [
              ("a photo of a mountain lake at sunrise", "rephrase", 2),
              ("a watercolor mountain lake", "style", 2),
              ("a mountain lake with a red canoe", "expansion", 2),
            ],
            1,
          ),
          (
            [
              ("a watercolor mountain lake in autumn colours", "expansion", 2),
              ("a watercolor glacier", "subject_change", 2),
              ("a mountain lake that mirrors a second sky", "creative", 2),
            ],
            0,
          ),
        ],
      ),
    ],
  ),
  (
    "dara",
    [
      (
        "a robot in a garden",
        [
          (
            [
              ("a photo of a small robot watering tomatoes", "rephrase", 2),
              ("a watercolor robot in a garden", "style", 2),
              ("a robot in a garden full of sunflowers", "expansion", 2),
            ],
            0,
          ),
          (
            [
              ("a sharp photo of a robot watering tomatoes at dusk", "expansion", 2),
              ("a photo of a gardener watering tomatoes", "subject_change", 2),
              ("a robot growing flowers out of its shoulders", "creative", 2),
            ],
            0,
          ),
        ],
      ),
      (
        "a cat on a windowsill",
        [
          (
            [
              ("a watercolor cat on a sunny windowsill", "style", 2),
              ("a photo of a tabby cat by a window", "rephrase", 2),
              ("a cat on a windowsill at night above city lights", "expansion", 2),
            ],
            1,
          ),
          (
            [
              ("a sharp photo of a tabby cat, shallow depth of field", "expansion", 2),
              ("a photo of a beagle by a window", "subject_change", 2),
              ("a photo of a cat reflected in the window glass", "creative", 2),
            ],
            2,
          ),
        ],
      ),
    ],
  ),
  (
    "eli",
    [
      (
        "a robot in a garden",
        [
          (
            [
              ("a photo of a small robot watering tomatoes", "rephrase", 2),
              ("a watercolor robot in a garden", "style", 2),
              ("a robot in a garden full of sunflowers", "expansion", 2),
            ],
            1,
          ),
          (
            [
              ("a watercolor robot among sunflowers", "expansion", 2),
              ("a watercolor scarecrow in a garden", "subject_change", 2),
              ("a robot growing flowers out of its shoulders", "creative", 2),
            ],
            0,
          ),
        ],
      ),
      (
        "a mountain lake",
        [
          (
            [
              ("a photo of a mountain lake at sunrise", "rephrase", 2),
              ("a watercolor mountain lake", "style", 2),
              ("a mountain lake with a red canoe", "expansion", 2),
            ],
            1,
          ),
          (
            [
              ("a watercolor mountain lake in autumn colours", "expansion", 2),
              ("a watercolor glacier", "subject_change", 2),
              ("a mountain lake that mirrors a second sky", "creative", 2),
            ],
            1,
          ),
        ],
      ),
    ],
  ),
]


def _word_vector(word: str) -> np.ndarray:
  """A fixed random f32[DIM] per word (seeded by its CRC32)."""
  return np.random.default_rng(zlib.crc32(word.encode())).normal(size=DIM)


def _text_vector(text: str) -> np.ndarray:
  """The mean of a prompt's word vectors: f32[DIM]."""
  return np.mean([_word_vector(w) for w in text.replace(",", "").split()], axis=0)


class _Rows:
  """Assigns feature rows: one text row per distinct prompt, one image row per rendered image."""

  def __init__(self):
    self.text_rows: dict[str, int] = {}
    self.image: list[np.ndarray] = []
    self.rng = np.random.default_rng(0)

  def text(self, prompt: str) -> int:
    return self.text_rows.setdefault(prompt, len(self.text_rows))

  def option(self, text: str, category: str, num_images: int) -> schema.Option:
    images = []
    for _ in range(num_images):
      images.append(schema.Image(ref=f"images/{len(self.image):03d}.png", row=len(self.image)))
      self.image.append(_text_vector(text) + NOISE * self.rng.normal(size=DIM))
    return schema.Option(
      text=text, category=category, text_row=self.text(text), images=tuple(images)
    )

  def table(self) -> types.FeatureTable:
    text = np.stack([_text_vector(t) for t in self.text_rows]).astype(np.float32)
    return types.FeatureTable(image=np.stack(self.image).astype(np.float32), text=text)


def build() -> tuple[list[schema.ChoiceRecord], types.FeatureTable]:
  """The example's records (in RATERS order) and their feature table."""
  rows, records = _Rows(), []
  for user, sessions in RATERS:
    for s, (start, turns) in enumerate(sessions):
      for t, (options, chosen) in enumerate(turns):
        records.append(
          schema.ChoiceRecord(
            kind=schema.SESSION_TURN,
            user_id=user,
            session_id=f"{user}-{s}",
            turn=t,
            start_prompt=start,
            options=tuple(rows.option(*option) for option in options),
            choice=chosen,
            start_text_row=rows.text(start),
          )
        )
        start = options[chosen][0]
  return records, rows.table()


def write(directory: str) -> tuple[str, str]:
  """Writes records.jsonl and features.npz into `directory`; returns their paths."""
  records, table = build()
  paths = os.path.join(directory, "records.jsonl"), os.path.join(directory, "features.npz")
  schema.write_records(paths[0], records)
  schema.save_features(paths[1], table)
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  for path in write(parser.parse_args().out):
    print(path)


if __name__ == "__main__":
  main()
