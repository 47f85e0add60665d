"""report.regenerate: every table and figure rebuilt from the saved artefacts alone, with labelled axes and
CIs, into report.md, PNGs and a self-contained report.html."""

import os
import re
import shutil

import numpy as np
import pytest
from matplotlib import collections as mcollections
from matplotlib import container

from pasta_jax import files, metrics_log
from pasta_jax.evaluation import figures, report

SAVED = ("config.json", "report.json", "user_model/user_model.json", "agent/agent.json") + tuple(
  f"{stage}.done.json" for stage in report.STAGE_ORDER
)


@pytest.fixture
def json_only(tiny_workdir, tmp_path):
  """A copy of the run's JSON artefacts alone (no features, checkpoints or trajectories), plus one
  training-curve file, so the report cannot recompute anything."""
  out = tmp_path / "json_only"
  for name in SAVED:
    os.makedirs(out / os.path.dirname(name), exist_ok=True)
    shutil.copy(os.path.join(tiny_workdir, name), out / name)
  metrics_dir = files.read_json(os.path.join(tiny_workdir, "agent.done.json"))["result"][
    "metrics_dir"
  ]
  curves = out / metrics_dir / "iql_real_sim" / metrics_log.JSONL_NAME
  os.makedirs(curves.parent)
  steps = np.arange(0, 200, 10)
  files.write_text(
    str(curves), "".join(f'{{"step": {s}, "loss": {1 / (1 + s):.5f}}}\n' for s in steps)
  )
  return str(out)


def _has_ci(ax) -> bool:
  """A CI band (fill_between) or error bars on the axes."""
  return any(isinstance(c, mcollections.PolyCollection) for c in ax.collections) or any(
    isinstance(c, container.ErrorbarContainer) for c in ax.containers
  )


def test_report_regenerate_from_json_artefacts_only(json_only):
  out = report.regenerate(json_only)
  assert set(out["figures"]) == {
    "k_sweep",
    "final_utility",
    "utility_per_turn",
    "type_accuracy_per_turn",
    "comparisons",
    "sim_vs_real",
    "stage_seconds",
    "training_agent_iql_real_sim",
  }
  for path in out["figures"].values():
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  markdown = open(out["markdown"]).read()
  for heading in (
    "## User model",
    "### K sweep",
    "## Agent",
    "## Sim vs real",
    "## Agent training",
    "## Stage run",
  ):
    assert heading in markdown
  assert "iql/real+sim" in markdown and "95% CI" in markdown


def test_report_html_is_self_contained(json_only):
  page = open(report.regenerate(json_only)["html"]).read()
  sources = re.findall(r'src="([^"]*)"', page)
  assert len(sources) == 8 and all(s.startswith("data:image/png;base64,") for s in sources)
  assert "<table>" in page and "http" not in page.replace("http://www.w3.org", "")


def test_report_figures_have_labels_units_and_cis(json_only):
  built = report.build_figures(report.load_saved(json_only))
  for name, (fig, caption) in built.items():
    assert caption
    for ax in fig.axes:
      assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: unlabelled axes"
    with_ci = [ax for ax in fig.axes if _has_ci(ax)]
    if name == "stage_seconds":
      assert "no CI" in fig.axes[0].get_xlabel()
    else:
      assert with_ci, f"{name}: no confidence intervals drawn"


def test_report_regenerate_is_deterministic(json_only, tmp_path):
  first = report.regenerate(json_only, str(tmp_path / "a"))
  second = report.regenerate(json_only, str(tmp_path / "b"))
  for key in ("markdown", "html"):
    assert open(first[key]).read() == open(second[key]).read()


def test_report_regenerate_before_the_agent_stage(json_only):
  for name in ("report.json", "agent/agent.json", "agent.done.json", "evaluate.done.json"):
    os.remove(os.path.join(json_only, name))
  out = report.regenerate(json_only)
  assert {"k_sweep", "stage_seconds"} <= set(out["figures"]) and "final_utility" not in out[
    "figures"
  ]
  os.remove(os.path.join(json_only, "user_model", "user_model.json"))
  with pytest.raises(FileNotFoundError, match="run the user_model stage"):
    report.regenerate(json_only)


def test_report_rolling_band_is_the_trailing_mean_with_a_normal_ci():
  values = np.array([1.0, 3.0, 5.0, np.nan, 7.0])
  mean, lo, hi = figures.rolling_band(values, window=2)
  np.testing.assert_allclose(mean, [1.0, 2.0, 4.0, 5.0, 7.0])
  half = 1.96 * np.std([1.0, 3.0], ddof=1) / np.sqrt(2)
  np.testing.assert_allclose([lo[1], hi[1]], [2.0 - half, 2.0 + half])
  assert lo[0] == hi[0] == 1.0
