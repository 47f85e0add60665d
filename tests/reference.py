"""Plain NumPy (float64) reference of the user model and one exact EM step; no JAX.

Mirrors pasta_jax.user_model.utility.UtilityModel (read from its Flax params dict), the softmax choice
model, the E-step, exact EM's prior update and the M-step objective, with its gradient by central
finite differences, so the tests can check the JAX code against an independent implementation.
"""

import math

import numpy as np


def gelu(x):
  """flax.linen.gelu with its default approximate=True (the tanh form)."""
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {
  "gelu": gelu,
  "relu": lambda x: np.maximum(x, 0.0),
  "tanh": np.tanh,
  "linear": lambda x: x,
}


def _f64(tree):
  if isinstance(tree, dict):
    return {k: _f64(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def logsumexp(x, axis):
  top = np.max(x, axis=axis, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  with np.errstate(divide="ignore"):
    out = np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True)) + top
  return np.squeeze(out, axis=axis)


def log_softmax(x, axis):
  with np.errstate(invalid="ignore"):  # An all-padding slice gives NaN, as in JAX; callers mask it.
    return x - np.expand_dims(logsumexp(x, axis), axis)


def aggregate(scores, how, axis, mask=None):
  """Aggregates over `axis`; with `mask` (broadcastable to `scores`) over the real images alone, one
  option at a time, and 0 where an option has none."""
  scores = np.asarray(scores, np.float64)
  if mask is None or np.all(mask):
    if how == "mean":
      return np.mean(scores, axis=axis)
    if how == "max":
      return np.max(scores, axis=axis)
    if how == "logsumexp":
      return logsumexp(scores, axis) - np.log(scores.shape[axis])
    raise ValueError(how)
  real = np.moveaxis(np.broadcast_to(mask, scores.shape), axis, -1)
  scores = np.moveaxis(scores, axis, -1)
  out = np.zeros(scores.shape[:-1])
  for index in np.ndindex(out.shape):
    values = scores[index][real[index]]
    if values.size:
      out[index] = aggregate(values, how, 0)
  return out


def utilities(
  params,
  image,
  text,
  *,
  activation="gelu",
  aggregation="mean",
  use_text_features=True,
  image_mask=None,
):
  """Forward pass: image f[..., L, M, D], text f[..., L, D], image_mask bool[..., L, M] (None: all
  real) -> (utilities f64[..., L, K], τ f64[])."""
  p = _f64(params)["params"]
  x = np.asarray(image, np.float64)
  if use_text_features:
    text = np.asarray(text, np.float64)
    x = np.concatenate(
      [x, np.broadcast_to(text[..., None, :], x.shape[:-1] + text.shape[-1:])], axis=-1
    )
  layer = 0
  while f"trunk_{layer}" in p:
    dense = p[f"trunk_{layer}"]
    x = ACTIVATIONS[activation](x @ dense["kernel"] + dense["bias"])
    layer += 1
  scores = x @ p["heads"]["kernel"]  # [..., L, M, K]
  mask = None if image_mask is None else np.asarray(image_mask)[..., None]
  return aggregate(scores, aggregation, -2, mask), np.exp(p["log_inverse_temperature"])


def log_prob(utils, inverse_temperature, option_mask):
  """log P(i | slate, k) = log softmax_i(τ u_ik) over the real options: f64[..., L, K] (-inf on padding)."""
  logits = np.where(
    np.asarray(option_mask)[..., None], inverse_temperature * np.asarray(utils, np.float64), -np.inf
  )
  return log_softmax(logits, axis=-2)


def trajectory_loglik(utils, inverse_temperature, option_mask, choice, turn_mask):
  """Σ_t log P(c_t | slate_t, k) over real turns: utilities f64[U, T, L, K] -> f64[U, K]."""
  table = log_prob(utils, inverse_temperature, option_mask)  # [U, T, L, K]
  chosen = np.take_along_axis(table, np.asarray(choice)[..., None, None], axis=-2)[
    ..., 0, :
  ]  # [U, T, K]
  return np.sum(np.where(np.asarray(turn_mask)[..., None], chosen, 0.0), axis=1)


def gather(table, choices):
  """Option features in float64: image f64[U, T, L, M, D], text f64[U, T, L, D]."""
  image = np.asarray(table.image, np.float64)[np.asarray(choices.image_rows)]
  text = np.asarray(table.text, np.float64)[np.asarray(choices.text_rows)]
  return image, text


def user_loglik(params, table, choices, features=None, **model):
  """log p(data_u | k): f64[U, K]. `model` holds activation, aggregation and use_text_features;
  `features` = gather(table, choices) when precomputed."""
  image, text = gather(table, choices) if features is None else features
  utils, tau = utilities(params, image, text, image_mask=choices.image_mask, **model)
  return trajectory_loglik(utils, tau, choices.option_mask, choices.choice, choices.turn_mask)


def prequential_log_probs(params, log_priors, table, choices, **model):
  """log Σ_k b_t(k) P(i | slate_t, k) of every option, b_t the Bayes belief before turn t (padded
  turns leave it unchanged): f64[U, T, L], -inf on padded options and turns."""
  image, text = gather(table, choices)
  utils, tau = utilities(params, image, text, image_mask=choices.image_mask, **model)
  table_ = log_prob(utils, tau, choices.option_mask)  # [U, T, L, K]
  out = np.full(table_.shape[:-1], -np.inf)
  for u in range(out.shape[0]):
    belief = log_softmax(np.asarray(log_priors, np.float64), axis=-1)
    for t in range(out.shape[1]):
      if not choices.turn_mask[u, t]:
        continue
      real = np.asarray(choices.option_mask[u, t], bool)
      out[u, t, real] = logsumexp(table_[u, t, real] + belief, axis=-1)
      belief = log_softmax(belief + table_[u, t, choices.choice[u, t]], axis=-1)
  return out


def posteriors(log_priors, loglik, user_mask):
  """E-step: γ_uk ∝ π_k p(data_u | k), zero rows for padded users: f64[U, K]."""
  gamma = np.exp(log_softmax(np.asarray(log_priors, np.float64) + loglik, axis=-1))
  return gamma * np.asarray(user_mask)[:, None]


def marginal_loglik(log_priors, loglik, user_mask):
  """Σ_u log Σ_k π_k p(data_u | k) over real users."""
  per_user = logsumexp(np.asarray(log_priors, np.float64) + loglik, axis=-1)
  return float(np.sum(np.where(user_mask, per_user, 0.0)))


def prior_update(gamma, user_mask, floor):
  """Exact EM: π = mean of γ over real users, floored at `floor` and renormalised; returns log π."""
  priors = np.sum(gamma, axis=0) / max(int(np.sum(user_mask)), 1)
  priors = np.maximum(priors, floor)
  return np.log(priors / np.sum(priors))


def weighted_nll(params, table, choices, weights, features=None, **model):
  """The M-step objective -Σ_u Σ_k γ_uk log p(data_u | k) / number of choices."""
  loglik = user_loglik(params, table, choices, features, **model)
  return -float(np.sum(np.asarray(weights, np.float64) * loglik)) / max(
    int(np.sum(choices.turn_mask)), 1
  )


def finite_difference_grad(fn, params, eps=1e-6):
  """Central differences of fn(params) over every parameter entry; same nested-dict structure, f64."""
  params = _f64(params)

  def walk(node, path):
    if isinstance(node, dict):
      return {k: walk(v, path + (k,)) for k, v in node.items()}
    grad = np.zeros_like(node)
    for index in np.ndindex(node.shape):
      values = []
      for sign in (1.0, -1.0):
        shifted = node.copy()
        shifted[index] += sign * eps
        values.append(fn(_replace(params, path, shifted)))
      grad[index] = (values[0] - values[1]) / (2.0 * eps)
    return grad

  return walk(params, ())


def _replace(tree, path, leaf):
  if not path:
    return leaf
  out = dict(tree)
  out[path[0]] = _replace(tree[path[0]], path[1:], leaf)
  return out


# The agent's losses over ragged slates (pasta_jax/agent/value.py, iql.py, bc.py).


def slate_mean(values, slate_mask):
  """Mean over each slate's real options, one slate at a time: values f[..., L], slate_mask bool
  broadcastable to them -> f64[...]."""
  values = np.asarray(values, np.float64)
  real = np.broadcast_to(slate_mask, values.shape)
  out = np.zeros(values.shape[:-1])
  for index in np.ndindex(out.shape):
    out[index] = np.mean(values[index][real[index]])
  return out


def iql_value_loss(v, target_q, expectile):
  """mean_B |τ - 1(u < 0)| u², u = target_q - v."""
  diff = np.asarray(target_q, np.float64) - np.asarray(v, np.float64)
  return float(np.mean(np.where(diff > 0, expectile, 1 - expectile) * diff**2))


def iql_critic_loss(q, reward, not_done, next_v, discount):
  """mean_B Σ_i (q_i - (r + γ·not_done·V(s')))²: q f[2, B]."""
  target = np.asarray(reward, np.float64) + discount * np.asarray(not_done) * np.asarray(next_v)
  return float(np.mean(np.sum((np.asarray(q, np.float64) - target) ** 2, axis=0)))


def choice_loss(logits, choice, slate_mask):
  """mean_B -log softmax(logits over the real options)[choice]: logits f[B, L]."""
  losses = []
  for row, chosen, real in zip(np.asarray(logits, np.float64), choice, np.asarray(slate_mask)):
    columns = np.flatnonzero(real)
    log_p = log_softmax(row[columns], axis=0)
    losses.append(-log_p[list(columns).index(chosen)])
  return float(np.mean(losses))


def session_beliefs(log_priors, utils, inverse_temperature, option_mask, choice):
  """The Bayes belief before each turn of a session and after its last, from the prior and the
  session's own choices: utilities f[S, H, L, K], option_mask bool[S, H, L], choice i[S, H] ->
  f64[S, H + 1, K]."""
  table = log_prob(utils, inverse_temperature, option_mask)  # [S, H, L, K]
  sessions, turns = np.shape(choice)
  out = np.zeros((sessions, turns + 1, table.shape[-1]))
  for s in range(sessions):
    belief = log_softmax(np.asarray(log_priors, np.float64), axis=-1)
    out[s, 0] = belief
    for t in range(turns):
      belief = log_softmax(belief + table[s, t, choice[s, t]], axis=-1)
      out[s, t + 1] = belief
  return out
