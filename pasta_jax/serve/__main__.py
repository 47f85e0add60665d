"""python -m pasta_jax.serve --workdir=runs/quickstart [--port=8000] [--tui]"""

import sys

from absl import app, flags

from pasta_jax.serve import server, tui
from pasta_jax.serve import workspace as workspace_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/quickstart", "A workdir the pipeline has trained.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
flags.DEFINE_bool("tui", False, "Run the session in this terminal instead of serving a page.")


def _terminal(workdir: str) -> int:
  try:
    ws = workspace_lib.load(workdir)
  except workspace_lib.WorkspaceError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    tui.run(ws)
  except (EOFError, KeyboardInterrupt):
    print(
      "\ninput ended before the session finished; the turns so far are saved under "
      f"{workdir}/serve/sessions/",
      file=sys.stderr,
    )
    return 1
  return 0


def main(argv):
  del argv
  if FLAGS.tui:
    return _terminal(FLAGS.workdir)
  httpd = server.make_server(server.App(FLAGS.workdir), FLAGS.host, FLAGS.port)
  print(
    f"serving {FLAGS.workdir} on http://{FLAGS.host}:{httpd.server_port}/ (Ctrl-C stops)",
    flush=True,
  )
  try:
    httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    httpd.server_close()
  return 0


if __name__ == "__main__":
  app.run(main)
