"""The simulator's candidate pool on real data: an LMM's cached expansions (`candidates.ReplayCache`), every
prompt of their vocabulary embedded by CLIP and rendered by SDXL into `candidates.pool_size` images, which
CLIP embeds too. The ledger and the feature cache make a re-run render and embed only what is new.

Image m of a prompt's pool is rendered with seed m; its reference is its PNG's path relative to the render
directory (`images/<sha256>.png`).
"""

import dataclasses
import os
from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from pasta_jax import candidates, simulator, types
from pasta_jax.data import schema
from pasta_jax.embed import cache, clip, render


@dataclasses.dataclass(frozen=True)
class Pool:
  """generator: the ReplayGenerator; vocabulary: its prompts (index = prompt id); image_refs: str[N_img];
  summary: sizes, and how many prompts borrow another prompt's expansions with what text similarity."""

  generator: candidates.ReplayGenerator
  vocabulary: tuple[str, ...]
  image_refs: np.ndarray
  summary: dict


def borrowing_summary(
  replay: candidates.ReplayCache, source: np.ndarray, cosine: np.ndarray
) -> dict:
  """How much of the vocabulary is expanded like its nearest cached prompt (source, cosine of
  `candidates.nearest_expanded`): a cache written for other prompts shows up as many borrowed start prompts
  of low similarity."""
  borrowed = source != np.arange(len(replay.vocabulary))
  index = {text: i for i, text in enumerate(replay.vocabulary)}
  starts = np.asarray([index[p] for p in replay.start_prompts])
  return {
    "cached_prompts": len(replay.entries),
    "borrowing_prompts": int(borrowed.sum()),
    "borrowing_start_prompts": int(borrowed[starts].sum()),
    "borrowing_cosine_min": float(cosine[borrowed].min()) if borrowed.any() else None,
    "borrowing_cosine_median": float(np.median(cosine[borrowed])) if borrowed.any() else None,
  }


def load_renderer(config: ml_collections.ConfigDict, mesh: Mesh) -> render.SdxlRenderer:
  e = config.embed
  size = e.render_size or None
  return render.load_sdxl(
    e.sdxl_checkpoint,
    mesh,
    num_inference_steps=e.render_steps,
    guidance_scale=e.guidance_scale,
    height=size,
    width=size,
    batch_size=e.render_batch_size,
  )


def build(
  config: ml_collections.ConfigDict,
  start_prompts: Sequence[str],
  tower: clip.ClipTower,
  renderer: render.SdxlRenderer,
  show_progress: bool = True,
) -> Pool:
  """Reads `config.candidates.replay_cache`, embeds the vocabulary's texts and renders and embeds its pools."""
  it, c, e = config.interaction, config.candidates, config.embed
  replay = candidates.read_replay_cache(
    c.replay_cache, start_prompts, it.categories, it.num_candidates, it.turns, c.unexpanded
  )
  prompts = list(replay.vocabulary)
  with cache.FeatureStore(e.cache_dir) as store, render.RenderLedger(e.render_dir) as ledger:
    text = cache.embed_texts(tower, store, prompts, e.batch_size, show_progress).features
    rendered = render.render_and_embed(
      renderer,
      tower,
      ledger,
      store,
      prompts,
      c.pool_size,
      seed=0,
      batch_size=e.batch_size,
      show_progress=show_progress,
    )
  image = rendered.image_features.reshape(-1, tower.dim)
  refs = np.asarray(
    [os.path.relpath(path, e.render_dir) for row in rendered.paths for path in row], np.str_
  )
  rows = np.arange(image.shape[0]).reshape(len(prompts), c.pool_size)
  text = np.asarray(text)
  source, cosine = candidates.nearest_expanded(replay, text)
  summary = {
    "prompts": len(prompts),
    "start_prompts": len(replay.start_prompts),
    "images": int(image.shape[0]),
    "pool_size": c.pool_size,
    **borrowing_summary(replay, source, cosine),
  }
  return Pool(
    generator=candidates.build_generator(replay, text, rows, image, source),
    vocabulary=replay.vocabulary,
    image_refs=refs,
    summary=summary,
  )


def to_records(
  pool: Pool, categories: Sequence[str], trajectories: simulator.Trajectories
) -> tuple[list[schema.ChoiceRecord], types.FeatureTable]:
  """Canonical records of trajectories on the pool: prompts by text, images by their rendered PNG."""
  generator = pool.generator
  rows = np.asarray(
    generator.pool_rows(jnp.asarray(trajectories.shown), jnp.asarray(trajectories.seeds))
  )
  return simulator.to_records(
    trajectories,
    trajectories.shown,
    trajectories.start,
    pool.vocabulary.__getitem__,
    rows,
    np.asarray(generator.image),
    pool.image_refs,
    categories,
    user_prefix="sim",
  )
