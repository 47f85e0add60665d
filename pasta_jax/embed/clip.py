"""CLIP image and text features in Flax from a local Hugging Face CLIP checkpoint directory.

`load_clip(dir)` wraps transformers' `FlaxCLIPModel` behind the `ClipTower` protocol, which is all the
rest of the package sees, so the tower can be replaced. Features are the projected embeddings that
`CLIPModel` returns as `image_embeds` / `text_embeds`: L2-normalised by default, the raw projections
(`get_image_features` / `get_text_features`) with `normalize=False`. Batches are split over the mesh's
"data" axis and params are replicated; single host.
"""

import dataclasses
import functools
import hashlib
import json
import os
import types
from collections.abc import Sequence
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import safetensors
import transformers
from flax import traverse_util
from jax.sharding import Mesh
from transformers import modeling_flax_pytorch_utils
from transformers import utils as hf_utils

from pasta_jax import parallel

WEIGHTS = (hf_utils.FLAX_WEIGHTS_NAME, hf_utils.SAFE_WEIGHTS_NAME, hf_utils.WEIGHTS_NAME)
WEIGHT_INDEXES = (
  hf_utils.FLAX_WEIGHTS_INDEX_NAME,
  hf_utils.SAFE_WEIGHTS_INDEX_NAME,
  hf_utils.WEIGHTS_INDEX_NAME,
)
TOKENIZER_FILES = (
  "tokenizer.json",
  "vocab.json",
  "merges.txt",
  "tokenizer_config.json",
  "special_tokens_map.json",
)


class CheckpointError(FileNotFoundError):
  """A checkpoint directory that cannot be loaded; the message names the path."""


class ClipTower(Protocol):
  """What the cache and the renderer need from a CLIP-like tower.

  model_id: names the weights, tokenizer, preprocessing and normalisation; part of every cache key.
  dim: feature width D.
  """

  model_id: str
  dim: int

  def preprocess_images(self, images: Sequence[PIL.Image.Image | np.ndarray]) -> np.ndarray:
    """RGB images (PIL, or u8[H, W, 3]) -> model pixels f32[N, 3, S, S]."""

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (token ids i32[N, T], attention mask i32[N, T])."""

  def embed_images(self, pixels: np.ndarray) -> np.ndarray:
    """f32[N, 3, S, S] pixels -> f32[N, D] image features."""

  def embed_texts(self, token_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """i32[N, T] ids and mask -> f32[N, D] text features."""


def fingerprint(root: str, names: Sequence[str], extra: str = "") -> str:
  """sha256 hex of `extra` and of the files' paths relative to `root` and bytes, in the given order."""
  digest = hashlib.sha256(extra.encode())
  for name in names:
    digest.update(name.encode() + b"\0")
    with open(os.path.join(root, name), "rb") as f:
      digest.update(hashlib.file_digest(f, "sha256").digest())
  return digest.hexdigest()


def require_directory(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise CheckpointError(f"{what} directory {path} does not exist")


def require_file(directory: str, name: str, what: str) -> str:
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise CheckpointError(f"{what} {directory} has no {name} (expected {path})")
  return path


def _index_shards(index_path: str) -> list[str]:
  """The shard files (sorted, as paths) that a Hugging Face weight index (`*.index.json`) maps weights to."""
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(
      f"{index_path}: not a weight index (expected a JSON object with a 'weight_map' of "
      f"parameter -> shard file; {type(e).__name__}: {e})"
    ) from None
  paths = [os.path.join(os.path.dirname(index_path), shard) for shard in shards]
  missing = [shard for shard, path in zip(shards, paths) if not os.path.isfile(path)]
  if not shards or missing:
    raise CheckpointError(
      f"{index_path}: {'no shards' if not shards else f'missing shard files {missing}'}"
    )
  return paths


def weights_files(checkpoint_dir: str) -> tuple[list[str], list[str]]:
  """(weight files, files that name the weights): one file, or the shards of an index (`*.index.json`) and the
  index; Flax msgpack first, then safetensors, then PyTorch, as `FlaxCLIPModel.from_pretrained` looks."""
  for name, index_name in zip(WEIGHTS, WEIGHT_INDEXES):
    path, index = os.path.join(checkpoint_dir, name), os.path.join(checkpoint_dir, index_name)
    if os.path.isfile(path):
      return [path], [path]
    if os.path.isfile(index):
      shards = _index_shards(index)
      return shards, [index] + shards
  raise CheckpointError(
    f"CLIP checkpoint {checkpoint_dir} has no weights: expected one of "
    f"{', '.join(WEIGHTS)}, or shards named by one of {', '.join(WEIGHT_INDEXES)}"
  )


def _holds_pytorch_weights(path: str) -> bool:
  if path.endswith(".safetensors"):
    with safetensors.safe_open(path, framework="numpy") as f:
      return (f.metadata() or {}).get("format") == "pt"
  return path.endswith(".bin")


def _pytorch_state_dict(paths: Sequence[str]) -> dict[str, Any]:
  """PyTorch parameter name -> tensor, over every file (one, or all shards)."""
  state = {}
  for path in paths:
    if path.endswith(".safetensors"):
      with safetensors.safe_open(path, framework="flax") as f:
        state.update({name: f.get_tensor(name) for name in f.keys()})
    else:
      import torch

      state.update(torch.load(path, map_location="cpu", weights_only=True))
  return state


def _load_model(
  checkpoint_dir: str, weights: Sequence[str]
) -> tuple[transformers.FlaxCLIPModel, Any]:
  """FlaxCLIPModel (uninitialised) and its params, without a random initialisation.

  `FlaxCLIPModel.from_pretrained(from_pt=True)` first initialises random weights op by op (hundreds of
  compilations) and reads no sharded safetensors; here PyTorch weights (one file or shards) go through
  transformers' converter against the params' shapes only.
  """
  if not _holds_pytorch_weights(weights[0]):
    if weights[0].endswith(".safetensors") and len(weights) > 1:
      raise CheckpointError(
        f"{checkpoint_dir}: sharded safetensors must hold PyTorch weights (metadata format "
        f"'pt'); convert Flax weights to {hf_utils.FLAX_WEIGHTS_NAME} shards"
      )
    return transformers.FlaxCLIPModel.from_pretrained(
      checkpoint_dir, _do_init=False, local_files_only=True
    )
  config = transformers.CLIPConfig.from_pretrained(checkpoint_dir, local_files_only=True)
  model = transformers.FlaxCLIPModel(config, _do_init=False)
  shapes = types.SimpleNamespace(
    params=model.params_shape_tree, base_model_prefix=model.base_model_prefix
  )
  converted = modeling_flax_pytorch_utils.convert_pytorch_state_dict_to_flax(
    _pytorch_state_dict(weights), shapes
  )
  expected = traverse_util.flatten_dict(flax.core.unfreeze(model.params_shape_tree), sep="/")
  found = traverse_util.flatten_dict(converted, sep="/")
  missing = sorted(set(expected) - set(found))
  if missing:
    raise CheckpointError(
      f"CLIP weights {', '.join(weights)} lack {len(missing)} parameters, e.g. {missing[:3]}"
    )
  return model, traverse_util.unflatten_dict({k: found[k] for k in expected}, sep="/")


def _image_processor(checkpoint_dir: str, image_size: int) -> transformers.CLIPImageProcessor:
  """The directory's preprocessor config, else CLIP's: shortest side to `image_size` (bicubic), center
  crop, CLIP mean/std."""
  if os.path.isfile(os.path.join(checkpoint_dir, hf_utils.IMAGE_PROCESSOR_NAME)):
    processor = transformers.CLIPImageProcessor.from_pretrained(
      checkpoint_dir, local_files_only=True
    )
  else:
    processor = transformers.CLIPImageProcessor(
      size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
  crop = (processor.crop_size["height"], processor.crop_size["width"])
  if crop != (image_size, image_size):
    raise CheckpointError(
      f"{checkpoint_dir}: {hf_utils.IMAGE_PROCESSOR_NAME} crops to {crop}, the model "
      f"expects {image_size}x{image_size}"
    )
  return processor


def _features(get_features, normalize: bool, params, *inputs) -> jax.Array:
  """Projected features f32[N, D], L2-normalised when `normalize`."""
  features = get_features(*inputs, params=params)
  return features / jnp.linalg.norm(features, axis=-1, keepdims=True) if normalize else features


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
  """Repeats the last row so that the leading axis is a multiple of `multiple`."""
  extra = -len(x) % multiple
  return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


@dataclasses.dataclass(frozen=True, eq=False)
class FlaxClipTower:
  """transformers' FlaxCLIPModel as a `ClipTower`; build it with `load_clip`."""

  model: transformers.FlaxCLIPModel
  params: Any
  processor: transformers.CLIPImageProcessor
  tokenizer: transformers.CLIPTokenizerFast
  mesh: Mesh
  model_id: str
  normalize: bool

  @property
  def dim(self) -> int:
    return self.model.config.projection_dim

  @property
  def max_text_length(self) -> int:
    return min(
      self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings
    )

  @functools.cached_property
  def _image_fn(self):
    return jax.jit(
      functools.partial(_features, self.model.get_image_features, self.normalize),
      out_shardings=parallel.data_sharding(self.mesh),
    )

  @functools.cached_property
  def _text_fn(self):
    return jax.jit(
      functools.partial(_features, self.model.get_text_features, self.normalize),
      out_shardings=parallel.data_sharding(self.mesh),
    )

  def preprocess_images(self, images: Sequence[PIL.Image.Image | np.ndarray]) -> np.ndarray:
    """RGB images (PIL, or u8[H, W, 3]) -> f32[N, 3, S, S] (resize, center crop, CLIP mean/std)."""
    return self.processor(images=list(images), return_tensors="np")["pixel_values"].astype(
      np.float32
    )

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (ids i32[N, T], mask i32[N, T]), padded and truncated to T = the model's context."""
    tokens = self.tokenizer(
      list(texts),
      padding="max_length",
      truncation=True,
      max_length=self.max_text_length,
      return_tensors="np",
    )
    return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)

  def _run(self, fn, *inputs: np.ndarray) -> np.ndarray:
    n = len(inputs[0])
    sharding = parallel.data_sharding(self.mesh)
    batch = [
      jax.device_put(pad_to_multiple(x, parallel.data_size(self.mesh)), sharding) for x in inputs
    ]
    return np.asarray(fn(self.params, *batch))[:n]

  def embed_images(self, pixels: np.ndarray) -> np.ndarray:
    """f32[N, 3, S, S] -> f32[N, D]; N padded to a multiple of the "data" axis inside."""
    return self._run(self._image_fn, np.asarray(pixels, np.float32))

  def embed_texts(self, token_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """i32[N, T] ids and mask -> f32[N, D]; N padded to a multiple of the "data" axis inside."""
    return self._run(self._text_fn, np.asarray(token_ids, np.int32), np.asarray(mask, np.int32))


def load_clip(
  checkpoint_dir: str, mesh: Mesh | None = None, normalize: bool = True
) -> FlaxClipTower:
  """Loads a CLIP checkpoint directory (config.json; flax_model.msgpack, model.safetensors or
  pytorch_model.bin, or the shards of their `*.index.json`; tokenizer files; optional preprocessor_config.json)
  onto `mesh` (default: all devices).

  Raises CheckpointError naming the path when the directory, config.json or the weights are missing.
  """
  require_directory(checkpoint_dir, "CLIP checkpoint")
  require_file(checkpoint_dir, hf_utils.CONFIG_NAME, "CLIP checkpoint")
  weights, weight_files = weights_files(checkpoint_dir)
  model, params = _load_model(checkpoint_dir, weights)
  processor = _image_processor(checkpoint_dir, model.config.vision_config.image_size)
  tokenizer = transformers.CLIPTokenizerFast.from_pretrained(checkpoint_dir, local_files_only=True)
  mesh = mesh if mesh is not None else parallel.make_mesh()
  hashed = (
    [hf_utils.CONFIG_NAME]
    + [os.path.relpath(path, checkpoint_dir) for path in weight_files]
    + [
      name
      for name in TOKENIZER_FILES + (hf_utils.IMAGE_PROCESSOR_NAME,)
      if os.path.isfile(os.path.join(checkpoint_dir, name))
    ]
  )
  model_id = "clip-" + fingerprint(checkpoint_dir, hashed, f"normalize={normalize}")[:16]
  return FlaxClipTower(
    model=model,
    params=jax.device_put(params, parallel.replicated(mesh)),
    processor=processor,
    tokenizer=tokenizer,
    mesh=mesh,
    model_id=model_id,
    normalize=normalize,
  )
