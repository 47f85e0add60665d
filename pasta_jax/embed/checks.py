"""Checks of the `embed` config block (CLIP features and SDXL renders); imports nothing heavy."""

import ml_collections

from pasta_jax.config_checks import check, check_positive_int, check_real, is_int


def validate_config(config: ml_collections.ConfigDict, render: bool) -> None:
  """Raises ConfigError naming the first invalid `embed` field: CLIP and its cache are always needed,
  the SDXL checkpoint and the render ledger when `render` (the simulate stage on real data)."""
  e = config.embed
  paths = ["clip_checkpoint", "cache_dir"] + (["sdxl_checkpoint", "render_dir"] if render else [])
  for name in paths:
    check(bool(e[name]), f"embed.{name}", e[name], "must name a file or directory")
  for name in ("batch_size", "render_steps", "render_batch_size"):
    check_positive_int(config, f"embed.{name}")
  check(
    is_int(e.render_size) and e.render_size >= 0,
    "embed.render_size",
    e.render_size,
    "must be 0 (the checkpoint's size) or a side in pixels",
  )
  check_real(config, "embed.guidance_scale", at_least=0)
