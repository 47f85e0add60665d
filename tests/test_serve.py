"""The interactive session: a 5-turn click-through in headless Chromium (selenium), the HTTP API, the
terminal mode, and the messages a person gets for bad input."""

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from pasta_jax.data import schema
from pasta_jax.serve import server, tui
from pasta_jax.serve import session as session_lib
from pasta_jax.serve import workspace as workspace_lib
from tests import conftest

CHROMIUM = ("chromium", "chromedriver")
APT_INSTALL = ["apt-get", "install", "-y", "chromium", "chromium-driver"]


def _install_chromium() -> str | None:
  """Installs chromium and chromium-driver with apt-get (sudo when not root); None or why it failed."""
  prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
  if prefix and shutil.which("sudo") is None:
    return "chromium is missing, and installing it needs root: not root and no sudo"
  env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
  for command in (prefix + ["apt-get", "update"], prefix + APT_INSTALL):
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode:
      return f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-400:]}"
  return None


@pytest.fixture(scope="session")
def browser():
  """Headless Chromium driven by selenium; installs the Debian packages when they are missing, and fails
  (does not skip) naming the reason when that is impossible."""
  if not all(shutil.which(name) for name in CHROMIUM):
    problem = _install_chromium()
    if problem or not all(shutil.which(name) for name in CHROMIUM):
      pytest.fail(
        f"headless Chromium is needed for the browser tests: {problem or 'not on PATH after install'}"
      )
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  for argument in (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
  ):
    options.add_argument(argument)
  options.binary_location = shutil.which("chromium")
  driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
  driver.set_page_load_timeout(60)
  yield driver
  driver.quit()


def _serve(workdir: str):
  httpd = server.make_server(server.App(workdir), port=0)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  return httpd, f"http://127.0.0.1:{httpd.server_port}"


@pytest.fixture(scope="module")
def served(tiny_workdir):
  """The base URL of a server on the tiny run."""
  httpd, url = _serve(tiny_workdir)
  yield url
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture(scope="module")
def workspace(tiny_workdir):
  return workspace_lib.load(tiny_workdir)


def _request(
  url: str, method: str = "GET", body=None, raw: bytes | None = None
) -> tuple[int, dict]:
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  request = urllib.request.Request(
    url, data=data, method=method, headers={"Content-Type": "application/json"}
  )
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _saved_records(session_dir: str) -> list[schema.ChoiceRecord]:
  """A saved session's records, validated against its features."""
  config = conftest.tiny_config()
  it = config.interaction
  spec = schema.RecordSpec(tuple(it.categories), it.slate_size, it.images_per_prompt)
  return session_lib.load_records(session_dir, config.world.feature_dim, spec)


def _wait(driver, condition, timeout: float = 120):
  from selenium.webdriver.support.ui import WebDriverWait

  return WebDriverWait(driver, timeout).until(condition)


def test_serve_browser_five_turn_click_through(browser, served, tiny_workdir):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select

  url = served
  browser.get(url)
  _wait(browser, lambda d: len(Select(d.find_element(By.ID, "policy")).options) > 0)
  Select(browser.find_element(By.ID, "start")).select_by_index(1)
  browser.find_element(By.ID, "start-button").click()
  _wait(browser, lambda d: d.find_element(By.ID, "posterior").get_attribute("data-posterior"))
  assert len(browser.find_elements(By.CSS_SELECTOR, "#slate .column")) == 4
  assert len(browser.find_elements(By.CSS_SELECTOR, "#slate .column img")) == 16
  posteriors = [
    json.loads(browser.find_element(By.ID, "posterior").get_attribute("data-posterior"))
  ]
  for turn in range(5):
    browser.find_elements(By.CSS_SELECTOR, "button.choose")[turn % 4].click()
    _wait(
      browser,
      lambda d, t=turn: d.find_element(By.ID, "status").get_attribute("data-turn") == str(t + 1),
    )
    posteriors.append(
      json.loads(browser.find_element(By.ID, "posterior").get_attribute("data-posterior"))
    )
    assert posteriors[-1] != posteriors[-2], (
      f"the posterior chart did not change after click {turn + 1}"
    )
    assert np.isclose(sum(posteriors[-1]), 1.0, atol=1e-4)
    if turn == 2:
      assert browser.save_screenshot(os.path.join(tiny_workdir, "serve", "screenshot_turn3.png"))
  saved = browser.find_element(By.ID, "saved").text
  records = _saved_records(os.path.dirname(saved))
  assert [r.turn for r in records] == list(range(5))
  assert [r.choice for r in records] == [t % 4 for t in range(5)]
  browser.find_element(By.ID, "export").click()
  _wait(browser, lambda d: "Exported to" in d.find_element(By.ID, "exported").text)
  exported = browser.find_element(By.ID, "exported").text.removeprefix("Exported to ")
  assert os.path.isfile(os.path.join(exported, "pasta_rater_data.csv"))
  screenshot = os.path.join(tiny_workdir, "serve", "screenshot.png")
  assert browser.save_screenshot(screenshot) and os.path.getsize(screenshot) > 0


def test_serve_browser_empty_prompt_and_stale_session_are_messages(browser, served):
  from selenium.webdriver.common.by import By

  url = served
  browser.get(url)
  _wait(
    browser, lambda d: d.find_element(By.ID, "policy").get_attribute("length") not in (None, "0")
  )
  browser.find_element(By.ID, "start-button").click()
  _wait(browser, lambda d: "prompt is empty" in d.find_element(By.ID, "message").text)
  assert "Traceback" not in browser.page_source
  browser.find_element(By.ID, "prompt").send_keys("a watercolor fox in a misty forest")
  browser.find_element(By.ID, "start-button").click()
  _wait(browser, lambda d: "nearest start prompt" in d.find_element(By.ID, "matched").text)
  browser.execute_script("session.session_id = 'stale0000';")
  browser.find_elements(By.CSS_SELECTOR, "button.choose")[0].click()
  _wait(browser, lambda d: "no session 'stale0000'" in d.find_element(By.ID, "message").text)


def test_serve_browser_workdir_without_agent_or_run(browser, tiny_workdir, tmp_path):
  from selenium.webdriver.common.by import By

  no_agent = str(tmp_path / "no_agent")
  shutil.copytree(tiny_workdir, no_agent, ignore=shutil.ignore_patterns("serve", "checkpoints"))
  os.remove(os.path.join(no_agent, "agent.done.json"))
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  for workdir, element, expected in (
    (no_agent, "notice", "no trained agent"),
    (empty, "message", "no config.json"),
  ):
    httpd, url = _serve(workdir)
    try:
      browser.get(url)
      _wait(browser, lambda d, e=element, x=expected: x in d.find_element(By.ID, e).text)
    finally:
      httpd.shutdown()
      httpd.server_close()


def test_serve_http_api(served):
  url = served
  status, info = _request(f"{url}/api/info")
  assert status == 200 and info["ok"] and info["policies"][0] == "iql/real+sim"
  assert {"greedy", "random"} <= set(info["policies"]) and "oracle" not in info["policies"]
  status, view = _request(
    f"{url}/api/sessions", "POST", {"policy": "greedy", "prompt": "pixel art robot"}
  )
  assert status == 200 and view["typed_prompt"] == "pixel art robot" and view["turn"] == 0
  assert all(
    src.startswith("data:image/svg+xml") for option in view["slate"] for src in option["srcs"]
  )
  sid = view["session_id"]
  assert _request(f"{url}/api/sessions/{sid}/export", "POST")[0] == 400
  for turn in range(5):
    before = view["posterior"]
    status, view = _request(f"{url}/api/sessions/{sid}/choose", "POST", {"column": 3 - turn % 4})
    assert status == 200 and view["turn"] == turn + 1 and view["posterior"] != before
  assert view["done"] and view["slate"] == [] and len(view["posterior_history"]) == 6
  assert _request(f"{url}/api/sessions/{sid}")[1]["choices"] == [3, 2, 1, 0, 3]
  status, error = _request(f"{url}/api/sessions/{sid}/choose", "POST", {"column": 0})
  assert status == 400 and "finished" in error["error"]
  status, exported = _request(f"{url}/api/sessions/{sid}/export", "POST")
  assert status == 200 and os.path.isfile(os.path.join(exported["path"], "pasta_rater_data.csv"))


@pytest.mark.parametrize(
  "path, method, body, status, message",
  [
    ("/api/sessions", "POST", {"prompt": "   "}, 400, "prompt is empty"),
    ("/api/sessions", "POST", {"policy": "oracle", "start": 0}, 400, "unknown agent"),
    ("/api/sessions", "POST", {"start": 999}, 400, "does not exist"),
    ("/api/sessions/feedbeef", "GET", None, 404, "no session 'feedbeef'"),
    ("/api/sessions/feedbeef/choose", "POST", {"column": 0}, 404, "Start a new session"),
    ("/api/nothing", "GET", None, 404, "no such API endpoint"),
    ("/image?ref=x.png", "GET", None, 404, "glyphs"),
  ],
)
def test_serve_http_api_errors(served, path, method, body, status, message):
  url = served
  got, answer = _request(url + path, method, body)
  assert got == status and message in answer["error"]


def test_serve_http_api_bad_column_and_body(served):
  url = served
  _, view = _request(f"{url}/api/sessions", "POST", {"start": 0})
  choose = f"{url}/api/sessions/{view['session_id']}/choose"
  for column in (4, -1, "1", True, None):
    status, error = _request(choose, "POST", {"column": column})
    assert status == 400 and "not a column" in error["error"]
  status, error = _request(choose, "POST", raw=b"{not json")
  assert status == 400 and "not JSON" in error["error"]


def test_serve_tui_in_process(workspace):
  answers = iter(["99", "greedy", "", "a 3d render of a dragon", "0", "x", "1", "2", "3", "4", "2"])
  lines = []
  finished = tui.run(workspace, read=lambda prompt: next(answers), write=lines.append)
  text = "\n".join(lines)
  assert (
    "'99' is not an agent" in text and "prompt is empty" in text and "'0' is not a column" in text
  )
  assert "'x' is not a column" in text and "nearest start prompt" in text and "Exported" in text
  assert finished.choices == [0, 1, 2, 3, 1] and finished.policy_name == "greedy"
  records = _saved_records(finished.directory)
  assert [r.options[r.choice].text for r in records] == finished.view()["history"]


def _run_cli(workdir: str, stdin: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "pasta_jax.serve", f"--workdir={workdir}", "--tui"]
  return subprocess.run(
    command,
    input=stdin,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )


def test_serve_tui_command_line(tiny_workdir, tmp_path):
  done = _run_cli(tiny_workdir, "1\n1\n1\n1\n1\n1\n1\n")
  assert done.returncode == 0, done.stderr
  assert "Session saved" in done.stdout and "type 0" in done.stdout
  ended = _run_cli(tiny_workdir, "1\n1\n2\n")
  assert ended.returncode == 1 and "input ended" in ended.stderr
  missing = _run_cli(str(tmp_path), "")
  assert missing.returncode == 2 and "no config.json" in missing.stderr
