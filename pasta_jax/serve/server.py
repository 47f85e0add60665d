"""The local web page and its JSON API (stdlib `http.server`).

  GET  /                          the page (static/index.html, static/app.js)
  GET  /api/info                  agents, start prompts, sizes, and what the workdir lacks
  POST /api/sessions              {"policy", "prompt" | "start"} -> a new session's view
  GET  /api/sessions/<id>         the session's view
  POST /api/sessions/<id>/choose  {"column"} -> the view after the person's choice
  POST /api/sessions/<id>/export  -> {"path"} of the session in the PASTA release layout
  GET  /image?ref=<ref>           a rendered PNG of the replay pool (real data), from embed.render_dir

Every error is a JSON {"error": message} with a 4xx status (5xx for a bug, its stack trace on the
server's console only), which the page shows in its message bar.
"""

import http.server
import importlib.resources
import json
import os
import sys
import threading
import traceback
import urllib.parse

from pasta_jax import files
from pasta_jax.serve import glyphs
from pasta_jax.serve import session as session_lib
from pasta_jax.serve import workspace as workspace_lib

STATIC = {
  "/": ("index.html", "text/html; charset=utf-8"),
  "/app.js": ("app.js", "text/javascript; charset=utf-8"),
}
MAPPING_NOTE = (
  "This world cannot draw a free-text prompt: a typed prompt starts the session from the nearest start prompt "
  "by text features (character trigrams); the page shows which one and how similar it is."
)
SYNTHETIC_NOTE = (
  "The synthetic world has no pixels: each image is a glyph drawn from the prompt's attributes (setting: "
  "background, subject: shape, style: colour, mood: rotation, detail: pattern) and the image's seed."
)


class ApiError(Exception):
  """A request error with its HTTP status."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class App:
  """The workspace (or why there is none) and the live sessions, by id."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.sessions: dict[str, session_lib.Session] = {}
    self.lock = threading.Lock()
    try:
      self.ws, self.error = workspace_lib.load(workdir), None
    except workspace_lib.WorkspaceError as e:
      self.ws, self.error = None, str(e)

  def info(self) -> dict:
    if self.ws is None:
      return {"ok": False, "error": self.error, "policies": [], "starts": []}
    it = self.ws.config.interaction
    return {
      "ok": True,
      "error": None,
      "notice": self.ws.notice,
      "workdir": self.workdir,
      "policies": list(self.ws.policies),
      "starts": [s.text for s in self.ws.starts],
      "turns": it.turns,
      "slate_size": it.slate_size,
      "synthetic": self.ws.synthetic,
      "mapping_note": MAPPING_NOTE,
      "image_note": SYNTHETIC_NOTE if self.ws.synthetic else "Images are the pool's SDXL renders.",
    }

  def _workspace(self) -> workspace_lib.Workspace:
    if self.ws is None:
      raise ApiError(409, self.error)
    return self.ws

  def _session(self, session_id: str) -> session_lib.Session:
    if session_id not in self.sessions:
      raise ApiError(
        404,
        f"no session {session_id!r} on this server: it ended when the server restarted, or the "
        "link is stale. Start a new session.",
      )
    return self.sessions[session_id]

  def view(self, session: session_lib.Session) -> dict:
    """The session's view with a displayable `src` for every image."""
    view = session.view()
    for option in view["slate"]:
      option["srcs"] = [self._src(option["attributes"], ref) for ref in option["images"]]
    return view

  def _src(self, attributes, ref: str) -> str:
    if attributes is not None:
      return glyphs.data_url(attributes, glyphs.seed_of(ref))
    return "/image?" + urllib.parse.urlencode({"ref": ref})

  def start(self, body: dict) -> dict:
    ws = self._workspace()
    start = body.get("start")
    session = session_lib.start_session(
      ws,
      body.get("policy") or next(iter(ws.policies)),
      body.get("prompt"),
      None if start in (None, "") else start,
    )
    with self.lock:
      self.sessions[session.session_id] = session
    return self.view(session)

  def choose(self, session_id: str, body: dict) -> dict:
    session = self._session(session_id)
    with self.lock:
      session.choose(body.get("column"))
    return self.view(session)

  def export(self, session_id: str) -> dict:
    return {"path": self._session(session_id).export()}

  def image(self, ref: str) -> bytes:
    ws = self._workspace()
    if ws.synthetic or not ws.render_dir:
      raise ApiError(
        404, "this workdir has no rendered images (synthetic world: images are glyphs)"
      )
    try:
      path = files.resolve_inside(ws.render_dir, ref, "image")
    except files.OutsideRoot as e:
      raise ApiError(400, str(e)) from None
    if not os.path.isfile(path):
      raise ApiError(404, f"image {ref!r} is not in the render folder {ws.render_dir}")
    with open(path, "rb") as f:
      return f.read()

  def route(self, method: str, path: str, body: dict) -> dict:
    """The JSON answer of an API request; ApiError for a bad one."""
    parts = [p for p in path.split("/") if p][1:]
    if method == "GET" and parts == ["info"]:
      return self.info()
    if method == "POST" and parts == ["sessions"]:
      return self.start(body)
    if len(parts) >= 2 and parts[0] == "sessions":
      if method == "GET" and len(parts) == 2:
        return self.view(self._session(parts[1]))
      if method == "POST" and parts[2:] == ["choose"]:
        return self.choose(parts[1], body)
      if method == "POST" and parts[2:] == ["export"]:
        return self.export(parts[1])
    raise ApiError(404, f"no such API endpoint: {method} {path}")


def make_handler(app: App):
  """The request handler class bound to `app`."""

  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
      del format, args

    def _send(self, status: int, content: bytes, content_type: str) -> None:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(content)))
      self.send_header("Cache-Control", "no-store")
      self.end_headers()
      self.wfile.write(content)

    def _json(self, status: int, obj) -> None:
      self._send(status, files.dumps_json(obj).encode(), "application/json")

    def _body(self) -> dict:
      length = int(self.headers.get("Content-Length") or 0)
      if not length:
        return {}
      try:
        body = json.loads(self.rfile.read(length))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not JSON: {e}") from None
      if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
      return body

    def _handle(self, method: str) -> None:
      url = urllib.parse.urlsplit(self.path)
      try:
        if method == "GET" and url.path in STATIC:
          name, content_type = STATIC[url.path]
          self._send(
            200,
            importlib.resources.files(__package__).joinpath("static", name).read_bytes(),
            content_type,
          )
        elif method == "GET" and url.path == "/image":
          ref = urllib.parse.parse_qs(url.query).get("ref", [""])[0]
          self._send(200, app.image(ref), "image/png")
        elif url.path.startswith("/api/"):
          self._json(200, app.route(method, url.path, self._body() if method == "POST" else {}))
        else:
          raise ApiError(404, f"no such page: {url.path}")
      except ApiError as e:
        self._json(e.status, {"error": str(e)})
      except (session_lib.SessionError, workspace_lib.WorkspaceError) as e:
        self._json(400, {"error": str(e)})
      except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        self._json(
          500,
          {"error": f"internal error ({type(e).__name__}): {e}; details on the server's console"},
        )

    def do_GET(self):  # noqa: N802
      self._handle("GET")

    def do_POST(self):  # noqa: N802
      self._handle("POST")

  return Handler


def make_server(
  app: App, host: str = "127.0.0.1", port: int = 8000
) -> http.server.ThreadingHTTPServer:
  """The HTTP server of `app` (port 0: any free port, read it from `server.server_port`)."""
  return http.server.ThreadingHTTPServer((host, port), make_handler(app))
