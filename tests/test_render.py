"""Flax SDXL rendering end to end on a tiny random pipeline: ledger, content-hashed PNGs, CLIP features."""

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import diffusers  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402

from pasta_jax import parallel  # noqa: E402
from pasta_jax.embed import cache, clip, render  # noqa: E402
from tests import test_clip  # noqa: E402

TIME_EMBED = 8
POOLED = 16


def random_params(shapes, rng: np.random.Generator, scale: float = 0.2):
  """Host-side random values for a tree of shapes (no XLA compilation)."""
  return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def write_tiny_sdxl(directory: str) -> None:
  """A random SDXL pipeline (UNet with the text_time added condition, 2-level VAE, the two CLIP text
  encoders, DDIM) rendering 32x32 images, saved with Flax weights."""
  rng = np.random.default_rng(0)
  unet = diffusers.FlaxUNet2DConditionModel(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED,
    projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED,
    cross_attention_dim=64,
  )
  vae = diffusers.FlaxAutoencoderKL(
    block_out_channels=(32, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    sample_size=32,
  )
  text_encoder = transformers.FlaxCLIPTextModel(
    transformers.CLIPTextConfig(**test_clip.tiny_text_config()), _do_init=False
  )
  text_encoder_2 = transformers.FlaxCLIPTextModelWithProjection(
    transformers.CLIPTextConfig(**test_clip.tiny_text_config(projection_dim=POOLED)), _do_init=False
  )
  tokenizer = test_clip.write_tiny_tokenizer(os.path.join(directory, "vocab"))
  scheduler = diffusers.FlaxDDIMScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
  )
  pipeline = diffusers.FlaxStableDiffusionXLPipeline(
    text_encoder=text_encoder,
    text_encoder_2=text_encoder_2,
    vae=vae,
    tokenizer=tokenizer,
    tokenizer_2=tokenizer,
    unet=unet,
    scheduler=scheduler,
  )
  params = {
    "unet": random_params(jax.eval_shape(unet.init_weights, jax.random.key(0)), rng),
    "vae": random_params(jax.eval_shape(vae.init_weights, jax.random.key(0)), rng),
    "text_encoder": random_params(text_encoder.params_shape_tree, rng),
    "text_encoder_2": random_params(text_encoder_2.params_shape_tree, rng),
  }
  pipeline.save_pretrained(directory, params=params)


class CountingRenderer:
  """An SdxlRenderer that counts the images it renders."""

  def __init__(self, renderer):
    self.renderer = renderer
    self.images = 0

  def __getattr__(self, name):
    return getattr(self.renderer, name)

  def render(self, prompts, seeds):
    self.images += len(prompts)
    return self.renderer.render(prompts, seeds)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("sdxl"))
  write_tiny_sdxl(directory)
  return directory


@pytest.fixture(scope="module")
def renderer(sdxl_dir):
  return render.load_sdxl(sdxl_dir, parallel.make_mesh(), num_inference_steps=2, batch_size=8)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("clip"))
  test_clip.write_tiny_clip(directory)
  return clip.load_clip(directory, parallel.make_mesh())


def _png_keys(rendered: render.Rendered) -> list[list[str]]:
  return [[os.path.basename(p)[: -len(".png")] for p in row] for row in rendered.paths]


def test_prompts_are_rendered_once_then_embedded_into_the_cache(renderer, tower, tmp_path):
  counting = CountingRenderer(renderer)
  with (
    render.RenderLedger(str(tmp_path / "renders")) as ledger,
    cache.FeatureStore(str(tmp_path / "cache")) as store,
  ):
    first = render.render_and_embed(
      counting, tower, ledger, store, ["the cat", "a sea"], 2, show_progress=False
    )
    assert counting.images == 4
    more = render.render_and_embed(
      counting, tower, ledger, store, ["a sea", "the cat", "the dog"], 3, show_progress=False
    )
    assert counting.images == 4 + 5
  assert first.image_features.shape == (2, 2, tower.dim) and more.image_features.shape == (
    3,
    3,
    tower.dim,
  )
  assert len({k for row in first.keys for k in row}) == 4 and _png_keys(first) == first.keys
  assert [row[:2] for row in more.keys[:2]] == first.keys[::-1]
  np.testing.assert_array_equal(more.image_features[1, :2], first.image_features[0])
  for path, key in zip(first.paths[0], first.keys[0]):
    with open(path, "rb") as f:
      assert cache.content_key(f.read()) == key
  images = [PIL.Image.open(p).convert("RGB") for row in first.paths for p in row]
  assert images[0].size == (32, 32)
  expected = tower.embed_images(tower.preprocess_images(images)).reshape(2, 2, tower.dim)
  np.testing.assert_allclose(first.image_features, expected, atol=1e-6)


def test_an_image_depends_on_prompt_seed_and_model_only(renderer, tmp_path):
  with render.RenderLedger(str(tmp_path / "a")) as a, render.RenderLedger(str(tmp_path / "b")) as b:
    together = render.render_prompts(
      renderer, a, ["the cat", "a sea"], 2, seed=5, show_progress=False
    )
    alone = render.render_prompts(renderer, b, ["a sea"], 2, seed=5, show_progress=False)
  assert [os.path.basename(p) for p in alone[0]] == [os.path.basename(p) for p in together[1]]
  images = renderer.render(["a sea", "a sea"], [5, 7])
  assert (
    images.shape == (2, 32, 32, 3)
    and images.dtype == np.float32
    and 0 <= images.min() < images.max() <= 1
  )
  assert renderer._render_fn._cache_size() == 1
  with open(alone[0][0], "rb") as f:
    assert render.to_png(images[0]) == f.read()


def test_a_ledger_entry_without_its_png_is_reported(renderer, tmp_path):
  with render.RenderLedger(str(tmp_path)) as ledger:
    ((path,),) = render.render_prompts(renderer, ledger, ["the cat"], 1, show_progress=False)
    os.remove(path)
    with pytest.raises(render.LedgerError, match=f"{path}: missing image of \\('the cat', seed 0"):
      render.render_prompts(renderer, ledger, ["the cat"], 1, show_progress=False)


def test_the_model_id_covers_settings_and_missing_checkpoints_are_named(
  sdxl_dir, renderer, tmp_path
):
  other = render.load_sdxl(sdxl_dir, renderer.mesh, num_inference_steps=3)
  assert other.model_id != renderer.model_id and other.batch_size == 8 and other.height == 32
  missing = str(tmp_path / "nowhere")
  with pytest.raises(clip.CheckpointError, match=f"{missing} does not exist"):
    render.load_sdxl(missing)
  with pytest.raises(clip.CheckpointError, match=f"expected {tmp_path}/model_index.json"):
    render.load_sdxl(str(tmp_path))
  no_flax = tmp_path / "no_flax"
  shutil.copytree(sdxl_dir, no_flax)
  os.remove(no_flax / "vae" / "diffusion_flax_model.msgpack")
  with pytest.raises(
    clip.CheckpointError, match=f"no Flax weights for vae \\(expected {no_flax}/vae/diffusion_flax"
  ):
    render.load_sdxl(str(no_flax))


def test_the_weights_load_only_when_something_is_rendered(sdxl_dir, renderer, tmp_path):
  with render.RenderLedger(str(tmp_path)) as ledger:
    rendered = render.render_prompts(renderer, ledger, ["the cat", "a sea"], 2, show_progress=False)
    fresh = render.load_sdxl(sdxl_dir, renderer.mesh, num_inference_steps=2, batch_size=8)
    assert fresh.model_id == renderer.model_id
    assert (
      render.render_prompts(fresh, ledger, ["a sea", "the cat"], 2, show_progress=False)
      == rendered[::-1]
    )
    assert "pipeline_and_params" not in vars(fresh)
    render.render_prompts(fresh, ledger, ["the dog"], 1, show_progress=False)
    assert "pipeline_and_params" in vars(fresh)
