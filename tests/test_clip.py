"""Flax CLIP tower: parity with PyTorch CLIPModel on a tiny random checkpoint, preprocessing, loud errors."""

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"

import chex  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from pasta_jax import parallel  # noqa: E402
from pasta_jax.embed import clip  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = (
  list(LETTERS)
  + [c + "</w>" for c in LETTERS]
  + ["th", "the</w>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
)
CONTEXT = 16
IMAGE_SIZE = 32


def write_tiny_tokenizer(directory: str) -> transformers.CLIPTokenizer:
  """A CLIP BPE tokenizer over single letters (start/end tokens last, as in CLIP), saved in `directory`."""
  os.makedirs(directory, exist_ok=True)
  vocab_file, merges_file = (
    os.path.join(directory, "vocab.json"),
    os.path.join(directory, "merges.txt"),
  )
  with open(vocab_file, "w") as f:
    json.dump({token: i for i, token in enumerate(VOCAB)}, f)
  with open(merges_file, "w") as f:
    f.write("#version: 0.2\nt h\nth e</w>\n")
  tokenizer = transformers.CLIPTokenizer(
    vocab_file, merges_file, pad_token="<|endoftext|>", model_max_length=CONTEXT
  )
  tokenizer.save_pretrained(directory)
  return tokenizer


def tiny_text_config(**overrides) -> dict:
  return dict(
    vocab_size=len(VOCAB),
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=CONTEXT,
    bos_token_id=len(VOCAB) - 2,
    eos_token_id=len(VOCAB) - 1,
    pad_token_id=len(VOCAB) - 1,
    **overrides,
  )


def write_tiny_clip(directory: str, seed: int = 0) -> transformers.CLIPModel:
  """A random PyTorch CLIPModel (width 32, 2 layers, 32x32 images, patch 8, projection 16) saved as
  safetensors with its tokenizer."""
  config = transformers.CLIPConfig(
    text_config=tiny_text_config(),
    vision_config=dict(
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=IMAGE_SIZE,
      patch_size=8,
    ),
    projection_dim=16,
  )
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(directory, safe_serialization=True)
  write_tiny_tokenizer(directory)
  return model


def random_images(count: int, seed: int = 0) -> list[np.ndarray]:
  """u8[H, W, 3] images of assorted sizes."""
  rng = np.random.default_rng(seed)
  return [
    rng.integers(0, 256, (rng.integers(24, 64), rng.integers(24, 64), 3), dtype=np.uint8)
    for _ in range(count)
  ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("clip"))
  return directory, write_tiny_clip(directory)


@pytest.fixture(scope="module")
def towers(checkpoint):
  directory, _ = checkpoint
  mesh = parallel.make_mesh()
  return clip.load_clip(directory, mesh), clip.load_clip(directory, mesh, normalize=False)


def test_image_and_text_features_match_pytorch_on_8_devices(checkpoint, towers):
  _, torch_model = checkpoint
  tower, raw_tower = towers
  pixels = tower.preprocess_images(random_images(5))
  ids, mask = tower.tokenize(
    ["the cat", "a photo of the sea", "", "zzz zzz zzz zzz zzz zzz zzz zzz"]
  )
  assert pixels.shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE) and ids.shape == mask.shape == (4, CONTEXT)
  with torch.no_grad():
    out = torch_model(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask),
      pixel_values=torch.tensor(pixels),
    )
    raw_image = torch_model.get_image_features(pixel_values=torch.tensor(pixels)).numpy()
    raw_text = torch_model.get_text_features(
      input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
    ).numpy()
  with jax.default_matmul_precision("highest"):
    image, text = tower.embed_images(pixels), tower.embed_texts(ids, mask)
    raw = raw_tower.embed_images(pixels), raw_tower.embed_texts(ids, mask)
  assert image.shape == (5, tower.dim) and text.shape == (4, tower.dim) and tower.dim == 16
  np.testing.assert_allclose(image, out.image_embeds.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(text, out.text_embeds.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(raw[0], raw_image, rtol=0, atol=1e-5)
  np.testing.assert_allclose(raw[1], raw_text, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, rtol=1e-6)
  assert (
    tower._image_fn._cache_size() == 1 and tower.params["logit_scale"].sharding.is_fully_replicated
  )
  assert tower.mesh.devices.size == 8 and len(jax.devices()) == 8


def test_tokenize_matches_the_saved_slow_tokenizer_and_pads_with_end_tokens(checkpoint, towers):
  directory, _ = checkpoint
  tower, _ = towers
  texts = ["the cat", "a " * 40]
  slow = transformers.CLIPTokenizer.from_pretrained(directory)(
    texts, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="np"
  )
  ids, mask = tower.tokenize(texts)
  np.testing.assert_array_equal(ids, slow["input_ids"])
  np.testing.assert_array_equal(mask, slow["attention_mask"])
  assert ids[0, 0] == len(VOCAB) - 2 and ids[0, -1] == len(VOCAB) - 1 and mask[1].all()


def test_preprocessing_resizes_the_short_side_center_crops_and_normalises(towers):
  tower, _ = towers
  stripes = np.zeros((IMAGE_SIZE, 2 * IMAGE_SIZE, 3), np.uint8)
  stripes[:, : IMAGE_SIZE // 2] = (255, 0, 0)
  stripes[:, IMAGE_SIZE // 2 : -IMAGE_SIZE // 2] = (0, 0, 255)
  stripes[:, -IMAGE_SIZE // 2 :] = (0, 255, 0)
  small = PIL.Image.new("RGB", (8, 12), (0, 0, 255))
  pixels = tower.preprocess_images([PIL.Image.fromarray(stripes), small])
  blue = (np.array([0.0, 0.0, 1.0]) - np.array(tower.processor.image_mean)) / np.array(
    tower.processor.image_std
  )
  assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
  np.testing.assert_allclose(
    pixels, np.broadcast_to(blue[None, :, None, None], pixels.shape), atol=1e-5
  )
  np.testing.assert_allclose(tower.processor.image_mean, [0.48145466, 0.4578275, 0.40821073])


def test_model_id_names_weights_and_normalisation(checkpoint, towers, tmp_path):
  tower, raw_tower = towers
  assert tower.model_id.startswith("clip-") and tower.model_id != raw_tower.model_id
  other = str(tmp_path / "other")
  write_tiny_clip(other, seed=1)
  assert clip.load_clip(other, tower.mesh).model_id != tower.model_id
  assert clip.load_clip(checkpoint[0], tower.mesh).model_id == tower.model_id


def test_flax_msgpack_and_pytorch_bin_checkpoints_load_the_same_weights(
  checkpoint, towers, tmp_path
):
  _, torch_model = checkpoint
  tower, _ = towers
  flax_dir, bin_dir = str(tmp_path / "flax"), str(tmp_path / "bin")
  tower.model.save_pretrained(flax_dir, params=tower.params)
  torch_model.save_pretrained(bin_dir, safe_serialization=False)
  for directory in (flax_dir, bin_dir):
    write_tiny_tokenizer(directory)
  assert clip.weights_files(flax_dir)[0][0].endswith("flax_model.msgpack")
  assert clip.weights_files(bin_dir)[0][0].endswith("pytorch_model.bin")
  for directory in (flax_dir, bin_dir):
    chex.assert_trees_all_equal(clip.load_clip(directory, tower.mesh).params, tower.params)


@pytest.mark.parametrize("weights", ["safetensors", "bin", "flax"])
def test_sharded_checkpoints_load_the_same_weights(checkpoint, towers, tmp_path, weights):
  _, torch_model = checkpoint
  tower, _ = towers
  directory = str(tmp_path / "sharded")
  if weights == "flax":
    tower.model.save_pretrained(directory, params=tower.params, max_shard_size="20KB")
  else:
    torch_model.save_pretrained(
      directory, safe_serialization=weights == "safetensors", max_shard_size="20KB"
    )
  write_tiny_tokenizer(directory)
  shards, named = clip.weights_files(directory)
  assert len(shards) > 2 and named[0].endswith(".index.json") and named[1:] == shards
  sharded = clip.load_clip(directory, tower.mesh)
  chex.assert_trees_all_equal(sharded.params, tower.params)
  assert sharded.model_id != tower.model_id
  os.remove(shards[-1])
  missing = re.escape(f"index.json: missing shard files ['{os.path.basename(shards[-1])}']")
  with pytest.raises(clip.CheckpointError, match=missing):
    clip.load_clip(directory, tower.mesh)
  with open(named[0], "w") as f:
    f.write("{}")
  with pytest.raises(clip.CheckpointError, match="index.json: not a weight index .*'weight_map'"):
    clip.load_clip(directory, tower.mesh)


def test_missing_directory_config_or_weights_fail_naming_the_path(checkpoint, tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(clip.CheckpointError, match=f"{missing} does not exist"):
    clip.load_clip(missing)
  no_config = tmp_path / "no_config"
  no_config.mkdir()
  write_tiny_tokenizer(str(no_config))
  with pytest.raises(
    clip.CheckpointError, match=f"no config.json \\(expected {no_config}/config.json\\)"
  ):
    clip.load_clip(str(no_config))
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  with (
    open(os.path.join(checkpoint[0], "config.json")) as src,
    open(no_weights / "config.json", "w") as dst,
  ):
    dst.write(src.read())
  with pytest.raises(
    clip.CheckpointError, match=f"{no_weights} has no weights: expected one of flax_model"
  ):
    clip.load_clip(str(no_weights))
