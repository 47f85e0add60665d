"""One IQL update (twin critics f(h, p) on slates, expectile V(h), Adam, Polyak target) through
`iql.run_dispatch`, against a PyTorch update of the same architecture and losses.

Networks (value.MLP): the first layer is one Dense per input part (state features [mean, latest, one-hot
turn] f32[2D + H + 1], prompt text f32[D], one-hot category f32[C]), then ReLU layers of `hidden` widths
and a scalar output.
"""

import dataclasses

import jax
import numpy as np

from benchmarks import common
from pasta_jax import parallel
from pasta_jax.agent import data, iql


@dataclasses.dataclass(frozen=True)
class Sizes:
  dim: int = 768
  hidden: tuple[int, ...] = (256, 256)
  batch: int = 256
  turns: int = 5
  slate_size: int = 4
  num_categories: int = 5
  transitions: int = 4096
  steps_per_dispatch: int = 20


QUICK = Sizes(dim=32, hidden=(16, 16), batch=16, transitions=128, steps_per_dispatch=4)


def transitions(sizes: Sizes, seed: int = 0) -> data.Transitions:
  """Random transitions of session data (history, slate text, categories, choices, rewards)."""
  rng = np.random.default_rng(seed)
  n, h = sizes.transitions, sizes.turns
  turn = rng.integers(0, h, n).astype(np.int32)
  rows = np.arange(h + 1)
  return data.Transitions(
    history=rng.standard_normal((n, h + 1, sizes.dim)).astype(np.float32),
    history_mask=rows[None] <= turn[:, None],
    turn=turn,
    slate_text=rng.standard_normal((n, sizes.slate_size, sizes.dim)).astype(np.float32),
    slate_category=rng.integers(0, sizes.num_categories, (n, sizes.slate_size)).astype(np.int32),
    choice=rng.integers(0, sizes.slate_size, n).astype(np.int32),
    reward=rng.standard_normal(n).astype(np.float32),
    next_history_mask=rows[None] <= turn[:, None] + 1,
    next_turn=turn + 1,
    not_done=(turn + 1 < h).astype(np.float32),
  )


def learner(sizes: Sizes) -> iql.IQL:
  settings = iql.IQLSettings(
    expectile=0.7,
    discount=0.9,
    learning_rate=3e-4,
    polyak=0.005,
    batch_size=sizes.batch,
    steps=sizes.steps_per_dispatch,
    steps_per_dispatch=sizes.steps_per_dispatch,
    checkpoint_every_steps=sizes.steps_per_dispatch,
  )
  return iql.IQL(
    policy=iql.IQLPolicy(
      hidden=sizes.hidden, num_categories=sizes.num_categories, slate_size=sizes.slate_size
    ),
    settings=settings,
  )


def program(sizes: Sizes) -> tuple[common.Program, float]:
  """(iql_update: `steps_per_dispatch` updates per call, the state carried from call to call; FLOPs of
  one update)."""
  mesh = parallel.make_mesh()
  learn = learner(sizes)
  dataset = jax.device_put(transitions(sizes), parallel.replicated(mesh))
  state = jax.device_put(
    learn.init(jax.random.key(0), jax.tree.map(lambda x: x[:1], dataset)), parallel.replicated(mesh)
  )
  batch = jax.tree.map(lambda x: x[: sizes.batch], dataset)
  flops = _update_flops(learn, state, batch)
  kwargs = {"learner": learn, "counts": (sizes.batch,), "mesh": mesh}
  holder = {"state": state}

  def dispatch():
    holder["state"], metrics = iql.run_dispatch(holder["state"], (dataset,), **kwargs)
    return metrics

  def lower():
    return iql.run_dispatch.lower(holder["state"], (dataset,), **kwargs)

  steps = sizes.steps_per_dispatch
  return common.Program("iql_update", dispatch, lower, 1, flops * steps), flops


def setup(sizes: Sizes):
  """(dispatch() -> metrics, flops per update, compile seconds): `steps_per_dispatch` updates per call,
  the state carried from call to call."""
  update, flops = program(sizes)
  return update.call, flops, common.compile_s(update)


def _update_flops(learn: iql.IQL, state, batch) -> float:
  """XLA's FLOP count of one update on one batch (no loop)."""
  return common.cost_flops(jax.jit(learn.update), state, batch)


def torch_setup(sizes: Sizes):
  """The same update in PyTorch (float32, 2 threads): dispatch() runs `steps_per_dispatch` updates."""
  import torch

  torch.set_num_threads(2)
  torch.manual_seed(0)
  dataset = {
    k: torch.from_numpy(np.asarray(v))
    for k, v in dataclasses.asdict(transitions(sizes)).items()
    if v is not None
  }
  state_dim = 2 * sizes.dim + sizes.turns + 1

  class MLP(torch.nn.Module):
    def __init__(self, parts):
      super().__init__()
      self.inputs = torch.nn.ModuleList(
        torch.nn.Linear(p, sizes.hidden[0], bias=i == 0) for i, p in enumerate(parts)
      )
      widths = (*sizes.hidden, 1)
      self.layers = torch.nn.ModuleList(
        torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])
      )

    def forward(self, *parts):
      x = sum(layer(p) for layer, p in zip(self.inputs, parts))
      for layer in self.layers:
        x = layer(torch.relu(x))
      return x[..., 0]

  def features(history, mask, turn):
    valid = mask[..., None].float()
    mean = (history * valid).sum(1) / valid.sum(1).clamp(min=1)
    latest = history[torch.arange(history.shape[0]), turn]
    return torch.cat(
      [mean, latest, torch.nn.functional.one_hot(turn.long(), sizes.turns + 1).float()], -1
    )

  critics = torch.nn.ModuleList(MLP((state_dim, sizes.dim, sizes.num_categories)) for _ in range(2))
  target = torch.nn.ModuleList(MLP((state_dim, sizes.dim, sizes.num_categories)) for _ in range(2))
  target.load_state_dict(critics.state_dict())
  value = MLP((state_dim,))
  q_opt = torch.optim.Adam(critics.parameters(), lr=3e-4)
  v_opt = torch.optim.Adam(value.parameters(), lr=3e-4)

  def slate_q(nets, s, text, category):
    return torch.stack([net(s[:, None, :], text, category).mean(-1) for net in nets])

  def update():
    index = torch.randint(0, sizes.transitions, (sizes.batch,))
    b = {k: v[index] for k, v in dataset.items()}
    s = features(b["history"], b["history_mask"], b["turn"])
    category = torch.nn.functional.one_hot(b["slate_category"].long(), sizes.num_categories).float()
    with torch.no_grad():
      target_q = slate_q(target, s, b["slate_text"], category).min(0).values
    v = value(s)
    diff = target_q - v
    v_loss = (torch.where(diff > 0, 0.7, 0.3) * diff**2).mean()
    v_opt.zero_grad()
    v_loss.backward()
    v_opt.step()
    with torch.no_grad():
      next_v = value(features(b["history"], b["next_history_mask"], b["next_turn"]))
      td = b["reward"] + 0.9 * b["not_done"] * next_v
    q = slate_q(critics, s, b["slate_text"], category)
    q_loss = ((q - td) ** 2).sum(0).mean()
    q_opt.zero_grad()
    q_loss.backward()
    q_opt.step()
    with torch.no_grad():
      for p_target, p in zip(target.parameters(), critics.parameters()):
        p_target.mul_(0.995).add_(p, alpha=0.005)
    return q_loss

  def dispatch():
    for _ in range(sizes.steps_per_dispatch):
      loss = update()
    return float(loss.detach())

  return dispatch, torch.__version__
