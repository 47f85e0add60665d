"""Batch rendering of prompts with diffusers' FlaxStableDiffusionXLPipeline from a local checkpoint.

The pipeline's own non-pmap path (`__call__(jit=False)`) runs under `jax.jit` with the batch split over the
mesh's "data" axis and params replicated. Each image's initial latents come from its own seed, so an image
depends on (prompt, seed, model id) only, never on the batch it was rendered in. A ledger maps
(prompt, seed, model id) to a PNG named by the sha256 of its bytes (the same key as the feature cache), so
nothing is rendered twice; `render_and_embed` then embeds the images through CLIP into the cache.

Layout of a render directory: `ledger.sqlite` and `images/<sha256>.png`. Single host; Flax weights only.
"""

import dataclasses
import fnmatch
import functools
import io
import os
from collections.abc import Sequence
from typing import Any

import diffusers
import jax
import numpy as np
from jax.sharding import Mesh

from pasta_jax import files, parallel, progress
from pasta_jax.embed import cache, clip

PIPELINE_INDEX = "model_index.json"
UNET_CONFIG = os.path.join("unet", "config.json")
VAE_CONFIG = os.path.join("vae", "config.json")
FLAX_WEIGHTS = {  # What each component's Flax from_pretrained reads (diffusers' models: one file only).
  "unet": ("diffusion_flax_model.msgpack",),
  "vae": ("diffusion_flax_model.msgpack",),
  "text_encoder": ("flax_model.msgpack", "flax_model.msgpack.index.json"),
  "text_encoder_2": ("flax_model.msgpack", "flax_model.msgpack.index.json"),
}
IGNORED_FILES = ("*.bin", "*.safetensors", "*.onnx", "*.onnx_data", "*.xml", "*.pb", ".*")
LEDGER_FILE = "ledger.sqlite"
IMAGES_DIR = "images"
LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS renders (prompt TEXT NOT NULL, seed INTEGER NOT NULL, model_id TEXT NOT NULL,
                                    image TEXT NOT NULL, PRIMARY KEY (prompt, seed, model_id));
"""


class LedgerError(RuntimeError):
  """A ledger entry whose image file is missing; names the file and the entry."""


def _read_files(checkpoint_dir: str) -> list[str]:
  """Paths (relative, sorted) of the files the Flax pipeline reads: not PyTorch/ONNX weights, not hidden."""
  names = []
  for root, dirs, filenames in os.walk(checkpoint_dir):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    names += [
      os.path.relpath(os.path.join(root, f), checkpoint_dir)
      for f in filenames
      if not any(fnmatch.fnmatch(f, pattern) for pattern in IGNORED_FILES)
    ]
  return sorted(names)


def _generate(
  pipeline,
  latent_shape: tuple[int, ...],
  steps: int,
  guidance_scale: float,
  height: int,
  width: int,
  params,
  prompt_ids: jax.Array,
  seeds: jax.Array,
) -> jax.Array:
  """i32[B, 2, T] prompt ids (both tokenizers), u32[B] seeds -> f32[B, H, W, 3] images in [0, 1]."""
  latents = jax.vmap(lambda seed: jax.random.normal(jax.random.key(seed), latent_shape))(seeds)
  return pipeline(
    prompt_ids,
    params,
    jax.random.key(0),
    num_inference_steps=steps,
    guidance_scale=guidance_scale,
    height=height,
    width=width,
    latents=latents,
    return_dict=False,
    jit=False,
  )[0]


@dataclasses.dataclass(frozen=True, eq=False)
class SdxlRenderer:
  """A Flax SDXL pipeline directory with fixed settings; build it with `load_sdxl`. The weights are read and
  put on the mesh at the first `render`, so a run whose ledger already holds every image never loads them.

  batch_size: images per forward pass (a multiple of the "data" axis); every pass is padded to it, so one
  compilation serves every call.
  """

  checkpoint_dir: str
  mesh: Mesh
  model_id: str
  num_inference_steps: int
  guidance_scale: float
  height: int
  width: int
  batch_size: int

  @functools.cached_property
  def pipeline_and_params(self) -> tuple[diffusers.FlaxStableDiffusionXLPipeline, Any]:
    """The pipeline and its params, replicated over the mesh (loaded once, on first use)."""
    pipeline, params = diffusers.FlaxStableDiffusionXLPipeline.from_pretrained(
      self.checkpoint_dir, local_files_only=True
    )
    return pipeline, jax.device_put(params, parallel.replicated(self.mesh))

  @functools.cached_property
  def _render_fn(self):
    pipeline, _ = self.pipeline_and_params
    scale = pipeline.vae_scale_factor
    latent_shape = (pipeline.unet.config.in_channels, self.height // scale, self.width // scale)
    return jax.jit(
      functools.partial(
        _generate,
        pipeline,
        latent_shape,
        self.num_inference_steps,
        self.guidance_scale,
        self.height,
        self.width,
      ),
      out_shardings=parallel.data_sharding(self.mesh),
    )

  def render(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    """One image per (prompt, seed): f32[N, H, W, 3] in [0, 1]."""
    sharding = parallel.data_sharding(self.mesh)
    out = []
    for start in range(0, len(prompts), self.batch_size):
      pipeline, params = self.pipeline_and_params
      chunk = list(prompts[start : start + self.batch_size])
      ids = np.asarray(pipeline.prepare_inputs(chunk), np.int32)
      chunk_seeds = np.asarray(seeds[start : start + self.batch_size], np.uint32)
      batch = [
        jax.device_put(clip.pad_to_multiple(x, self.batch_size), sharding)
        for x in (ids, chunk_seeds)
      ]
      images = self._render_fn(params, *batch)
      out.append(np.asarray(images)[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.height, self.width, 3), np.float32)


def load_sdxl(
  checkpoint_dir: str,
  mesh: Mesh | None = None,
  num_inference_steps: int = 30,
  guidance_scale: float = 5.0,
  height: int | None = None,
  width: int | None = None,
  batch_size: int | None = None,
) -> SdxlRenderer:
  """A renderer of a Flax SDXL pipeline directory (model_index.json + components with Flax weights) on `mesh`;
  its weights load at the first render (`SdxlRenderer`).

  height/width default to the UNet's sample size times the VAE scale factor (2^(VAE levels - 1), as diffusers
  computes it); batch_size to the "data" axis size (rounded up to a multiple of it). The model id hashes the
  pipeline's files and these settings.
  """
  clip.require_directory(checkpoint_dir, "SDXL checkpoint")
  clip.require_file(checkpoint_dir, PIPELINE_INDEX, "SDXL checkpoint")
  unet = files.read_json(clip.require_file(checkpoint_dir, UNET_CONFIG, "SDXL checkpoint"))
  vae = files.read_json(clip.require_file(checkpoint_dir, VAE_CONFIG, "SDXL checkpoint"))
  for component, names in FLAX_WEIGHTS.items():
    if not any(os.path.isfile(os.path.join(checkpoint_dir, component, name)) for name in names):
      raise clip.CheckpointError(
        f"SDXL checkpoint {checkpoint_dir} has no Flax weights for {component} (expected "
        f"{' or '.join(os.path.join(checkpoint_dir, component, n) for n in names)}; "
        "diffusers' Flax pipeline reads no PyTorch weights)"
      )
  mesh = mesh if mesh is not None else parallel.make_mesh()
  default_size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
  height, width = height or default_size, width or default_size
  devices = parallel.data_size(mesh)
  batch_size = -(-(batch_size or devices) // devices) * devices
  settings = f"steps={num_inference_steps},guidance={guidance_scale},size={height}x{width}"
  model_id = "sdxl-" + clip.fingerprint(checkpoint_dir, _read_files(checkpoint_dir), settings)[:16]
  return SdxlRenderer(
    checkpoint_dir=checkpoint_dir,
    mesh=mesh,
    model_id=model_id,
    num_inference_steps=num_inference_steps,
    guidance_scale=guidance_scale,
    height=height,
    width=width,
    batch_size=batch_size,
  )


def to_png(image: np.ndarray) -> bytes:
  """f32[H, W, 3] in [0, 1] -> PNG bytes (diffusers' rounding to u8)."""
  (pil,) = diffusers.FlaxDiffusionPipeline.numpy_to_pil(image)
  buffer = io.BytesIO()
  pil.save(buffer, format="PNG")
  return buffer.getvalue()


class RenderLedger(cache.SqliteDirectory):
  """(prompt, seed, model id) -> PNG under `directory`/images, named by the sha256 of its bytes."""

  def __init__(self, directory: str):
    super().__init__(directory, LEDGER_FILE, LEDGER_SCHEMA)
    os.makedirs(os.path.join(directory, IMAGES_DIR), exist_ok=True)

  def image_path(self, key: str) -> str:
    return os.path.join(self.directory, IMAGES_DIR, f"{key}.png")

  def lookup(self, prompt: str, seed: int, model_id: str) -> str | None:
    """The PNG path of a rendered (prompt, seed, model id), None if never rendered."""
    found = self.query(
      "SELECT image FROM renders WHERE prompt = ? AND seed = ? AND model_id = ?",
      (prompt, seed, model_id),
    )
    if not found:
      return None
    path = self.image_path(found[0][0])
    if not os.path.isfile(path):
      raise LedgerError(
        f"{path}: missing image of ({prompt!r}, seed {seed}, model {model_id}) in the ledger "
        f"{os.path.join(self.directory, LEDGER_FILE)}"
      )
    return path

  def record(self, prompt: str, seed: int, model_id: str, png: bytes) -> str:
    """Writes the PNG (atomically, once per content) and commits its ledger entry; returns its path."""
    key = cache.content_key(png)
    path = self.image_path(key)
    if not os.path.isfile(path):
      files.write_bytes(path, png)
    with cache.corrupt_index(self.index_path), self._db:
      self._db.execute("INSERT INTO renders VALUES (?, ?, ?, ?)", (prompt, seed, model_id, key))
    return path


def render_prompts(
  renderer: SdxlRenderer,
  ledger: RenderLedger,
  prompts: Sequence[str],
  images_per_prompt: int,
  seed: int = 0,
  show_progress: bool = True,
) -> list[list[str]]:
  """PNG paths [P][M]: image m of each prompt is rendered with seed `seed + m`, unless the ledger has it."""
  jobs = list(dict.fromkeys((p, seed + m) for p in prompts for m in range(images_per_prompt)))
  todo = [job for job in jobs if ledger.lookup(*job, renderer.model_id) is None]
  batches = [todo[i : i + renderer.batch_size] for i in range(0, len(todo), renderer.batch_size)]
  for batch in progress.progress(batches, "render", show_progress):
    images = renderer.render([p for p, _ in batch], [s for _, s in batch])
    for (prompt, image_seed), image in zip(batch, images):
      ledger.record(prompt, image_seed, renderer.model_id, to_png(image))
  return [
    [ledger.lookup(p, seed + m, renderer.model_id) for m in range(images_per_prompt)]
    for p in prompts
  ]


@dataclasses.dataclass(frozen=True)
class Rendered:
  """paths: [P][M] PNG paths; keys: [P][M] their sha256 (cache keys); image_features: f32[P, M, D]."""

  paths: list[list[str]]
  keys: list[list[str]]
  image_features: np.ndarray


def render_and_embed(
  renderer: SdxlRenderer,
  tower: clip.ClipTower,
  ledger: RenderLedger,
  store: cache.FeatureStore,
  prompts: Sequence[str],
  images_per_prompt: int,
  seed: int = 0,
  batch_size: int = 64,
  show_progress: bool = True,
) -> Rendered:
  """Renders what the ledger lacks, then embeds the images through `tower` into `store`, `batch_size` at a
  time."""
  paths = render_prompts(renderer, ledger, prompts, images_per_prompt, seed, show_progress)
  flat = [path for row in paths for path in row]
  embedded = cache.embed_images(tower, store, flat, batch_size, show_progress)
  shape = (len(prompts), images_per_prompt)
  keys = [
    embedded.keys[i * images_per_prompt : (i + 1) * images_per_prompt] for i in range(len(prompts))
  ]
  return Rendered(
    paths=paths, keys=keys, image_features=embedded.features.reshape(shape + (tower.dim,))
  )
