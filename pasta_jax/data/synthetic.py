"""The embedded synthetic world: a stand-in for Gemini + SDXL + human raters, with ground truth.

A prompt is five attributes (subject, style, setting, mood, detail), each one of V values, plus a
phrasing template; its text is readable. Features are fixed random projections of the attributes'
one-hot code (dimension A = 5·V) plus noise: an image's noise is seeded by (prompt, image seed). The
five candidate categories are attribute edits of the current prompt. K* planted user types have
preference weights over attributes; a type's utility of an image is linear in the image's features,
u_k(x) = v_k·x with v_k = P⁺ w_k, so it lies inside the user model's class. Users choose a slate
column with softmax(τ* · mean_m u_k(x_m)).

The world is pure JAX (`expand`, `render`, `planted_utility`); `SyntheticExpander` (a
`simulator.CandidateGenerator`) and `PlantedUsers` (a `simulator.UserModel`) plug it into the simulator,
which this module does not import; `synthetic_env.generate_rater_log` writes the canonical records of
planted users under the logging policy.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from pasta_jax import files, parallel, types
from pasta_jax.config_checks import check, check_positive_int, check_real
from pasta_jax.user_model import choice

SLOTS = ("subject", "style", "setting", "mood", "detail")
SUBJECT, STYLE, SETTING, MOOD, DETAIL = range(len(SLOTS))
VOCABULARY = {
  "subject": (
    "a red fox",
    "a lighthouse",
    "a bowl of ramen",
    "an old sailor",
    "a mountain lake",
    "a tin robot",
    "a sunflower field",
    "a jazz trio",
    "a paper boat",
    "a dragon",
  ),
  "style": (
    "watercolor",
    "oil painting",
    "35mm photograph",
    "pixel art",
    "charcoal sketch",
    "anime illustration",
    "art deco poster",
    "3d render",
    "ukiyo-e print",
    "stained glass",
  ),
  "setting": (
    "a misty forest",
    "a neon city",
    "a quiet beach",
    "a snowy village",
    "deep space",
    "a sunlit kitchen",
    "a desert canyon",
    "an underwater cave",
    "a rooftop garden",
    "a library",
  ),
  "mood": (
    "serene",
    "melancholic",
    "joyful",
    "eerie",
    "dramatic",
    "whimsical",
    "nostalgic",
    "tense",
    "dreamy",
    "triumphant",
  ),
  "detail": (
    "golden hour light",
    "soft bokeh",
    "intricate linework",
    "high contrast",
    "pastel palette",
    "volumetric fog",
    "long shadows",
    "film grain",
    "symmetrical composition",
    "vivid colors",
  ),
}
TEMPLATES = (
  "{subject} in {setting}, {style}, {mood}, {detail}",
  "a {style} of {subject} in {setting}, {mood} mood, {detail}",
  "{style}: {subject}, {setting}, {detail}, feeling {mood}",
)
CATEGORY_EDITS = {  # Category -> slots it changes (rephrase changes the template only).
  "rephrase": (),
  "expansion": (DETAIL,),
  "style": (STYLE,),
  "subject_change": (SUBJECT,),
  "creative": (SETTING, MOOD),
}


@struct.dataclass
class Prompt:
  """attributes: i32[..., 5] value index per slot; template: i32[...] phrasing template."""

  attributes: chex.Array
  template: chex.Array


@struct.dataclass
class World:
  """Planted parameters.

  image_projection, text_projection: f32[A, D]; template_offsets: f32[num_templates, D].
  type_weights: f32[K*, A] preferences over attributes; type_feature_weights: f32[K*, D] = v_k.
  type_log_priors: f32[K*]; inverse_temperature: τ*; noise_key: key of per-image noise.
  """

  image_projection: chex.Array
  text_projection: chex.Array
  template_offsets: chex.Array
  type_weights: chex.Array
  type_feature_weights: chex.Array
  type_log_priors: chex.Array
  inverse_temperature: chex.Array
  noise_key: chex.Array
  image_noise: float = struct.field(pytree_node=False)
  values_per_attribute: int = struct.field(pytree_node=False)
  categories: tuple[str, ...] = struct.field(pytree_node=False)
  num_candidates: int = struct.field(pytree_node=False)

  @property
  def num_types(self) -> int:
    return self.type_weights.shape[0]


def validate_world_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError unless the planted world can be drawn: an edit for every category, enough
  vocabulary, and features at least as wide as the attribute code."""
  w, it = config.world, config.interaction
  unknown = sorted(set(it.categories) - set(CATEGORY_EDITS))
  check(
    not unknown,
    "interaction.categories",
    tuple(it.categories),
    f"the synthetic world has no edit for {unknown}; it knows {sorted(CATEGORY_EDITS)}",
  )
  most = min(len(v) for v in VOCABULARY.values())
  check(
    2 <= w.values_per_attribute <= most,
    "world.values_per_attribute",
    w.values_per_attribute,
    f"must be in [2, {most}]",
  )
  width = len(SLOTS) * w.values_per_attribute
  check(
    w.feature_dim >= width,
    "world.feature_dim",
    w.feature_dim,
    f"must be at least the attribute code width {width} so that planted utilities are linear in "
    "features",
  )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid `world` field; the planted world's own limits
  (`validate_world_config`) apply when `config.data.source` is "synthetic"."""
  w = config.world
  for field in (
    "num_types",
    "num_users",
    "sessions_per_user",
    "feature_dim",
    "values_per_attribute",
  ):
    check_positive_int(config, f"world.{field}")
  check_real(config, "world.heldout_fraction", above=0, below=1)
  check_real(config, "world.choice_inverse_temperature", above=0)
  for field in ("image_noise", "text_noise", "type_weight_scale"):
    check_real(config, f"world.{field}", at_least=0)
  num_heldout = round(w.heldout_fraction * w.num_users)
  check(
    1 <= num_heldout < w.num_users,
    "world.heldout_fraction",
    w.heldout_fraction,
    f"must leave at least one held-out and one training user of {w.num_users}",
  )
  if config.data.source == "synthetic":
    validate_world_config(config)


def make_world(key: chex.PRNGKey, config: ml_collections.ConfigDict) -> World:
  """Draws the planted world from `config.world` and `config.interaction`."""
  validate_world_config(config)
  w, it = config.world, config.interaction
  num_attributes = len(SLOTS) * w.values_per_attribute
  k_img, k_txt, k_tpl, k_types, k_noise = jax.random.split(key, 5)
  scale = 1.0 / np.sqrt(len(SLOTS))
  image_projection = scale * jax.random.normal(k_img, (num_attributes, w.feature_dim))
  text_projection = scale * jax.random.normal(k_txt, (num_attributes, w.feature_dim))
  template_offsets = w.text_noise * jax.random.normal(k_tpl, (len(TEMPLATES), w.feature_dim))
  type_weights = w.type_weight_scale * jax.random.normal(k_types, (w.num_types, num_attributes))
  # v_k solves P v_k = w_k (minimum norm), so v_k . (onehot @ P) = w_k . onehot.
  type_feature_weights = jnp.linalg.lstsq(image_projection, type_weights.T)[0].T
  return World(
    image_projection=image_projection,
    text_projection=text_projection,
    template_offsets=template_offsets,
    type_weights=type_weights,
    type_feature_weights=type_feature_weights,
    type_log_priors=jnp.full((w.num_types,), -np.log(w.num_types)),
    inverse_temperature=jnp.asarray(w.choice_inverse_temperature, jnp.float32),
    noise_key=k_noise,
    image_noise=float(w.image_noise),
    values_per_attribute=int(w.values_per_attribute),
    categories=tuple(it.categories),
    num_candidates=int(it.num_candidates),
  )


def attribute_code(world: World, prompt: Prompt) -> chex.Array:
  """f32[..., A]: concatenated one-hot codes of the five attributes."""
  onehot = jax.nn.one_hot(prompt.attributes, world.values_per_attribute)
  return onehot.reshape(onehot.shape[:-2] + (-1,))


def prompt_id(world: World, prompt: Prompt) -> chex.Array:
  """i32[...]: a unique integer per (attributes, template)."""
  radix = world.values_per_attribute ** jnp.arange(len(SLOTS))
  return jnp.sum(
    prompt.attributes * radix, -1
  ) + prompt.template * world.values_per_attribute ** len(SLOTS)


def text_features(world: World, prompt: Prompt) -> chex.Array:
  """f32[..., D]: the prompt's text embedding."""
  return (
    attribute_code(world, prompt) @ world.text_projection + world.template_offsets[prompt.template]
  )


def render(world: World, prompt: Prompt, seeds: chex.Array) -> chex.Array:
  """Image features of one prompt under image seeds i32[M]: f32[M, D]."""
  base = attribute_code(world, prompt) @ world.image_projection
  prompt_key = jax.random.fold_in(world.noise_key, prompt_id(world, prompt))
  noise = jax.vmap(lambda s: jax.random.normal(jax.random.fold_in(prompt_key, s), base.shape))(
    seeds
  )
  return base + world.image_noise * noise


def planted_utility(world: World, image_features: chex.Array) -> chex.Array:
  """Per-type utility of each option, mean over its images: f32[..., M, D] -> f32[..., K*]."""
  return jnp.mean(image_features @ world.type_feature_weights.T, axis=-2)


def expand(key: chex.PRNGKey, world: World, prompt: Prompt) -> tuple[Prompt, chex.Array]:
  """The synthetic candidate generator: L_C edits of `prompt`, L_C / C per category, grouped by category.

  Returns candidates (attributes i32[L_C, 5], template i32[L_C]) and category i32[L_C].
  """
  num_categories = len(world.categories)
  per_category = world.num_candidates // num_categories
  category = np.repeat(np.arange(num_categories), per_category)
  edit_mask = np.zeros((num_categories, len(SLOTS)), bool)
  for c, name in enumerate(world.categories):
    edit_mask[c, list(CATEGORY_EDITS[name])] = True
  rephrase = np.array([name == "rephrase" for name in world.categories])
  k_attr, k_tpl = jax.random.split(key)
  v = world.values_per_attribute
  shift = 1 + jax.random.randint(k_attr, (world.num_candidates, len(SLOTS)), 0, v - 1)
  edited = jnp.where(edit_mask[category], (prompt.attributes + shift) % v, prompt.attributes)
  tpl_shift = 1 + jax.random.randint(k_tpl, (world.num_candidates,), 0, len(TEMPLATES) - 1)
  template = jnp.where(
    rephrase[category], (prompt.template + tpl_shift) % len(TEMPLATES), prompt.template
  )
  return Prompt(attributes=edited, template=template), jnp.asarray(category)


def random_prompt(key: chex.PRNGKey, world: World) -> Prompt:
  k_attr, k_tpl = jax.random.split(key)
  return Prompt(
    attributes=jax.random.randint(k_attr, (len(SLOTS),), 0, world.values_per_attribute),
    template=jax.random.randint(k_tpl, (), 0, len(TEMPLATES)),
  )


@struct.dataclass
class SyntheticExpander:
  """The world as the simulator's candidate generator and renderer (`simulator.CandidateGenerator`)."""

  world: World

  def start(self, key: chex.PRNGKey) -> Prompt:
    return random_prompt(key, self.world)

  def generate(self, key: chex.PRNGKey, prompt: Prompt) -> tuple[Prompt, chex.Array]:
    return expand(key, self.world, prompt)

  def text_features(self, prompts: Prompt) -> chex.Array:
    return text_features(self.world, prompts)

  def render(self, prompts: Prompt, seeds: chex.Array) -> chex.Array:
    """prompts [...], seeds i32[..., M] -> f32[..., M, D]."""
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[seeds.ndim - 1 :]), prompts)
    images = jax.vmap(render, in_axes=(None, 0, 0))(
      self.world, flat, seeds.reshape(-1, seeds.shape[-1])
    )
    return images.reshape(seeds.shape + images.shape[-1:])


@struct.dataclass
class PlantedUsers:
  """The planted (true) users as the simulator's responders (`simulator.UserModel`)."""

  world: World

  @property
  def log_priors(self) -> chex.Array:
    return self.world.type_log_priors

  def utilities(self, images: chex.Array, text: chex.Array) -> tuple[chex.Array, chex.Array]:
    del text
    return planted_utility(self.world, images), self.world.inverse_temperature


def prompt_of_id(world: World, pid: int) -> tuple[np.ndarray, int]:
  """(attributes i[len(SLOTS)], template) of a `prompt_id`."""
  template, code = divmod(int(pid), world.values_per_attribute ** len(SLOTS))
  return (
    code // world.values_per_attribute ** np.arange(len(SLOTS))
  ) % world.values_per_attribute, template


def prompt_text(attributes: np.ndarray, template: int) -> str:
  words = {slot: VOCABULARY[slot][int(a)] for slot, a in zip(SLOTS, attributes)}
  return TEMPLATES[int(template)].format(**words)


def save_world(path: str, world: World) -> None:
  """The planted parameters (arrays only; the static fields come from the config)."""
  arrays = {
    f.name: getattr(world, f.name)
    for f in dataclasses.fields(World)
    if f.metadata.get("pytree_node", True)
  }
  arrays["noise_key"] = jax.random.key_data(world.noise_key)
  files.save_npz(path, **{name: np.asarray(value) for name, value in arrays.items()})


def load_world(path: str, config: ml_collections.ConfigDict) -> World:
  with np.load(path) as z:
    arrays = {name: jnp.asarray(z[name]) for name in z.files}
  arrays["noise_key"] = jax.random.wrap_key_data(arrays["noise_key"])
  w, it = config.world, config.interaction
  return World(
    **arrays,
    image_noise=float(w.image_noise),
    values_per_attribute=int(w.values_per_attribute),
    categories=tuple(it.categories),
    num_candidates=int(it.num_candidates),
  )


def planted_user_loglik(
  world: World, table: types.FeatureTable, choices: types.Choices
) -> np.ndarray:
  """log p(data | planted type k) of each row's choices under the true choice model: f32[R, K*] on
  the host (`choices` may be global arrays; `schema.per_user_sum` adds a user's rows)."""
  utilities = planted_utility(world, jnp.asarray(table.image)[choices.image_rows])
  return parallel.host_array(
    choice.trajectory_loglik(utilities, world.inverse_temperature, choices)
  )
