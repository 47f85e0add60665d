"""The session in a terminal, for machines without a browser: numbered menus read with `input()`, the
slate as numbered columns and the posterior as text bars. Bad input is answered and asked again."""

from collections.abc import Callable

from pasta_jax.serve import session as session_lib
from pasta_jax.serve import workspace as workspace_lib

BAR_WIDTH = 30


def posterior_lines(view: dict) -> list[str]:
  """One text bar per user type."""
  width = max(len(label) for label in view["type_labels"])
  return [
    f"  {label:<{width}} {'#' * round(p * BAR_WIDTH):<{BAR_WIDTH}} {p:.2f}"
    for label, p in zip(view["type_labels"], view["posterior"])
  ]


def slate_lines(view: dict) -> list[str]:
  lines = [
    f"Turn {view['turn'] + 1} of {view['turns']} (agent {view['policy']}), now: {view['current_prompt']}"
  ]
  for option in view["slate"]:
    lines.append(f"  [{option['column'] + 1}] ({option['category']}) {option['text']}")
    lines.append(f"      images: {', '.join(option['images'])}")
  return lines


def _ask(
  read: Callable[[str], str],
  write: Callable[[str], None],
  question: str,
  parse: Callable[[str], object],
):
  """Asks until `parse` accepts the answer (it raises ValueError with the message to show otherwise)."""
  while True:
    answer = read(question)
    try:
      return parse(answer.strip())
    except ValueError as e:
      write(f"  {e}")


def _pick_policy(ws: workspace_lib.Workspace, answer: str) -> str:
  names = list(ws.policies)
  if not answer:
    return names[0]
  if answer.isdigit() and 1 <= int(answer) <= len(names):
    return names[int(answer) - 1]
  if answer in ws.policies:
    return answer
  raise ValueError(f"{answer!r} is not an agent; type a number 1..{len(names)} or a name")


def _start(ws: workspace_lib.Workspace, policy: str, answer: str) -> session_lib.Session:
  if answer.isdigit():
    return session_lib.start_session(ws, policy, start_index=int(answer) - 1)
  return session_lib.start_session(ws, policy, prompt=answer)


def _column(slate_size: int, answer: str) -> int:
  if answer.isdigit() and 1 <= int(answer) <= slate_size:
    return int(answer) - 1
  raise ValueError(f"{answer!r} is not a column; type a number 1..{slate_size}")


def run(
  ws: workspace_lib.Workspace,
  read: Callable[[str], str] = input,
  write: Callable[[str], None] = print,
) -> session_lib.Session:
  """One session; returns it finished (saved, and exported when the layout can hold it)."""
  if ws.notice:
    write(f"Note: {ws.notice}")
  write("Agents:")
  for i, name in enumerate(ws.policies, start=1):
    write(f"  {i}. {name}")
  policy = _ask(read, write, "Agent number [1]: ", lambda a: _pick_policy(ws, a))
  write("Start prompts:")
  for i, start in enumerate(ws.starts, start=1):
    write(f"  {i}. {start.text}")
  write(
    "Type a number, or a prompt of your own (it starts from the nearest start prompt by text features)."
  )

  def start(answer: str) -> session_lib.Session:
    try:
      return _start(ws, policy, answer)
    except session_lib.SessionError as e:
      raise ValueError(str(e)) from None

  session = _ask(read, write, "Start prompt: ", start)
  view = session.view()
  if view["typed_prompt"]:
    write(
      f"Starting from the nearest start prompt {view['start_prompt']!r} (similarity {view['similarity']:.2f})."
    )
  while not session.done:
    for line in slate_lines(view) + ["Agent's belief over user types:"] + posterior_lines(view):
      write(line)
    session.choose(
      _ask(
        read,
        write,
        f"Your choice 1..{session.slate_size}: ",
        lambda a: _column(session.slate_size, a),
      )
    )
    view = session.view()
  write("Agent's final belief over user types:")
  for line in posterior_lines(view):
    write(line)
  write(f"Session saved: {view['saved']}")
  try:
    write(f"Exported in the PASTA release layout: {session.export()}")
  except session_lib.SessionError as e:
    write(f"Not exported: {e}")
  return session
