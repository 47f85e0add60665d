"""report.json, report.md and the console summary; `regenerate` rebuilds every table and figure from the
saved artefacts into WORKDIR/report/ (report.md, PNGs, a self-contained report.html)."""

import base64
import dataclasses
import glob
import html
import io
import os
import re

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from pasta_jax import files, metrics_log, provenance
from pasta_jax.evaluation import figures


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def user_model_table(section: dict) -> Table:
  table = Table(title="User model: K sweep")
  for column in ("K", "held-out LL / choice", "BIC", "restart ARI", "selected"):
    table.add_column(column, justify="right")
  for row in section["k_sweep"]:
    table.add_row(
      str(row["k"]),
      _fmt(row["heldout_loglik_per_choice"]),
      f"{row['bic']:.1f}",
      _fmt(row["restart_ari"]),
      "◀" if row["k"] == section["selected_k"] else "",
    )
  return table


def summary_table(section: dict) -> Table:
  table = Table(title=f"User model (K={section['num_types']})")
  table.add_column("metric")
  table.add_column("value", justify="right")
  for key in (
    "num_types",
    "planted_num_types",
    "selected_k",
    "heldout_loglik_per_choice",
    "true_model_heldout_loglik_per_choice",
    "ari_vs_planted",
    "restart_ari",
  ):
    if key in section:
      table.add_row(key, _fmt(section[key]))
  return table


def _ci(ci) -> str:
  return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _with_ci(mean, ci) -> str:
  return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


ENVIRONMENT_TITLES = {
  "planted_users": "the planted true users",
  "simulator": "the fitted simulator",
}


def agent_table(section: dict, environment: str) -> Table:
  table = Table(title=f"Policies on {ENVIRONMENT_TITLES[environment]}, 95% CIs")
  on_simulator = environment != "simulator"
  columns = ("policy", "final-turn utility", "win rate vs generator order") + (
    ("utility on simulator",) if on_simulator else ()
  )
  for column in columns:
    table.add_column(column, justify="left" if column == "policy" else "right")
  for name, row in section.items():
    table.add_row(
      name,
      _with_ci(row["mean_final_utility"], row["ci95"]),
      _with_ci(row["win_rate_vs_generator_order"], row["win_rate_ci95"]),
      *([f"{row['on_simulator']['mean_final_utility']:.3f}"] if on_simulator else []),
    )
  return table


def comparisons_table(rows: list[dict], environment: str) -> Table:
  table = Table(
    title=f"{rows[0]['policy']} minus each policy: final-turn utility on {ENVIRONMENT_TITLES[environment]}"
  )
  for column in ("baseline", "difference [95% CI]", "CI above 0"):
    table.add_column(column, justify="left" if column == "baseline" else "right")
  for row in rows:
    table.add_row(
      row["baseline"],
      _with_ci(row["diff_mean"], row["diff_ci95"]),
      "yes" if row["diff_ci95"][0] > 0 else "no",
    )
  return table


def _agent_markdown(report: dict) -> list[str]:
  environment = report["agent_environment"]
  on_simulator = environment != "simulator"
  extra_column = " final utility on the simulator |" if on_simulator else ""
  lines = [
    "",
    f"## Agent ({ENVIRONMENT_TITLES[environment]})",
    "",
    f"| policy | final utility | 95% CI | win rate vs generator order | 95% CI |{extra_column}",
    "| --- | --- | --- | --- | --- |" + (" --- |" if on_simulator else ""),
  ]
  lines += [
    f"| {n} | {_fmt(r['mean_final_utility'])} | {_ci(r['ci95'])} | {_fmt(r['win_rate_vs_generator_order'])} "
    f"| {_ci(r['win_rate_ci95'])} |"
    + (f" {_fmt(r['on_simulator']['mean_final_utility'])} |" if on_simulator else "")
    for n, r in report["agent"].items()
  ]
  rows = report["agent_comparisons"]
  lines += [
    "",
    f"### {rows[0]['policy']} against each policy",
    "",
    "| baseline | difference | 95% CI |",
    "| --- | --- | --- |",
  ]
  lines += [f"| {r['baseline']} | {_fmt(r['diff_mean'])} | {_ci(r['diff_ci95'])} |" for r in rows]
  lines += [
    "",
    "![utility per turn](evaluate/utility_per_turn.png)",
    "![type-posterior accuracy](evaluate/type_accuracy_per_turn.png)",
    "",
  ]
  return lines


def _sim_vs_real_markdown(checks: dict) -> list[str]:
  loglik = checks["loglik"]
  return [
    "",
    "## Sim vs real (held-out users)",
    "",
    f"Prequential log-likelihood per choice {_fmt(loglik['per_choice']['mean'])} "
    f"{_ci(loglik['per_choice']['ci95'])} (uniform choice: {_fmt(loglik['uniform']['mean'])}); "
    f"expected calibration error {_fmt(checks['calibration']['overall']['ece']['mean'])}.",
    "",
    "![calibration](evaluate/calibration.png)",
    "",
  ]


def markdown(report: dict) -> str:
  um = report["user_model"]
  lines = ["# pasta_jax report", "", "## User model", "", "| metric | value |", "| --- | --- |"]
  lines += [f"| {k} | {_fmt(v)} |" for k, v in um.items() if not isinstance(v, (list, dict))]
  lines += [
    "",
    "### K sweep",
    "",
    "| K | held-out LL / choice | BIC | restart ARI |",
    "| --- | --- | --- | --- |",
  ]
  lines += [
    f"| {r['k']} | {_fmt(r['heldout_loglik_per_choice'])} | {r['bic']:.1f} | {_fmt(r['restart_ari'])} |"
    for r in um["k_sweep"]
  ]
  lines += ["", "![K sweep](user_model/k_sweep.png)", ""]
  if "agent" in report:
    lines += _agent_markdown(report)
  if "sim_vs_real" in report:
    lines += _sim_vs_real_markdown(report["sim_vs_real"])
  return "\n".join(lines)


def write(workdir: str, report: dict, console: Console | None = None) -> dict:
  """Writes report.json and report.md under `workdir` and prints the summary tables."""
  files.write_json(os.path.join(workdir, "report.json"), report)
  files.write_text(os.path.join(workdir, "report.md"), markdown(report))
  console = console or Console()
  console.print(summary_table(report["user_model"]))
  console.print(user_model_table(report["user_model"]))
  if "agent" in report:
    console.print(agent_table(report["agent"], report["agent_environment"]))
    console.print(comparisons_table(report["agent_comparisons"], report["agent_environment"]))
  return report


REPORT_DIR = "report"
STAGE_ORDER = ("data", "user_model", "simulate", "agent", "evaluate")


@dataclasses.dataclass(frozen=True)
class Saved:
  """Everything the regenerated report reads, as saved by the stages (nothing is recomputed).

  report: report.json (None before the evaluate stage); user_model: user_model/user_model.json;
  agent: agent/agent.json (None before the agent stage); seconds: each finished stage's wall-clock time
  from its done-marker; curves: run name -> metric curves of the current fits (`_current_curve_files`).
  """

  report: dict | None
  user_model: dict
  agent: dict | None
  seconds: dict[str, float]
  curves: dict[str, dict[str, np.ndarray]]


def _optional_json(path: str) -> dict | None:
  return files.read_json(path) if os.path.isfile(path) else None


def _current_curve_files(workdir: str, markers: dict) -> dict[str, str]:
  """'<stage>/<fit>' -> the metrics.jsonl of each fit behind a finished stage (under its result's
  "metrics_dir"), not those of earlier runs with other inputs."""
  out = {}
  for stage, marker in markers.items():
    if not marker or "metrics_dir" not in marker["result"]:
      continue
    root = os.path.join(workdir, marker["result"]["metrics_dir"])
    for path in sorted(glob.glob(os.path.join(root, "**", metrics_log.JSONL_NAME), recursive=True)):
      out[f"{stage}/{os.path.relpath(os.path.dirname(path), root)}"] = path
  return out


def load_saved(workdir: str) -> Saved:
  """The saved artefacts of a workdir; FileNotFoundError naming the stage when user_model.json is missing."""
  user_model = _optional_json(os.path.join(workdir, "user_model", "user_model.json"))
  if user_model is None:
    raise FileNotFoundError(
      f"{workdir}/user_model/user_model.json is missing: run the user_model stage first"
    )
  markers = {stage: provenance.read_marker(workdir, stage) for stage in STAGE_ORDER}
  curves = {
    run: metrics_log.read_jsonl_metrics(path)
    for run, path in _current_curve_files(workdir, markers).items()
  }
  return Saved(
    report=_optional_json(os.path.join(workdir, "report.json")),
    user_model=user_model,
    agent=_optional_json(os.path.join(workdir, "agent", "agent.json")),
    seconds={stage: float(m["seconds"]) for stage, m in markers.items() if m and "seconds" in m},
    curves={run: c for run, c in curves.items() if len(c["step"]) and len(c) > 1},
  )


def build_figures(saved: Saved) -> dict[str, tuple[Figure, str]]:
  """name -> (figure, caption) of every figure the saved artefacts allow."""
  out = {"k_sweep": (figures.k_sweep(saved.user_model), "Model selection over K.")}
  report = saved.report
  if report and "agent" in report:
    where = ENVIRONMENT_TITLES[report["agent_environment"]]
    out["final_utility"] = (
      figures.final_utility(report["agent"]),
      f"Final-turn utility and win rate on {where}.",
    )
    out["utility_per_turn"] = (
      figures.per_turn(report["agent"], "utility_per_turn", figures.UTILITY, "turn"),
      f"Utility of the chosen prompt at each turn on {where}.",
    )
    out["type_accuracy_per_turn"] = (
      figures.per_turn(
        report["agent"],
        "type_accuracy_per_turn",
        "type-posterior accuracy (fraction of users)",
        "choices observed",
      ),
      f"How often the type posterior's most probable type is the user's type, on {where}.",
    )
    out["comparisons"] = (
      figures.comparisons(report["agent_comparisons"]),
      "Paired differences on the same users.",
    )
  if report and "sim_vs_real" in report:
    out["sim_vs_real"] = (
      figures.sim_vs_real(report["sim_vs_real"]),
      "The fitted simulator on held-out users.",
    )
  if saved.seconds:
    out["stage_seconds"] = (
      figures.stage_seconds(saved.seconds),
      "Stage run times from the done-markers.",
    )
  for run, curves in saved.curves.items():
    name = "training_" + re.sub(r"[^A-Za-z0-9]+", "_", run).strip("_")
    out[name] = (figures.training_curves(run, curves), f"Training curves of {run}.")
  return out


def _table(header: list[str], rows: list[list]) -> list[str]:
  return [f"| {' | '.join(header)} |", f"|{' --- |' * len(header)}"] + [
    f"| {' | '.join(_fmt(v) for v in row)} |" for row in rows
  ]


def _section_lines(saved: Saved) -> list[str]:
  """The report's text and tables, as Markdown."""
  lines = [
    "# pasta_jax report",
    "",
    "Rebuilt from the saved artefacts (nothing recomputed).",
    "",
    "## User model",
    "",
  ]
  um = saved.user_model
  lines += _table(
    ["metric", "value"], [[k, v] for k, v in um.items() if not isinstance(v, (list, dict))]
  )
  lines += ["", "### K sweep", ""]
  lines += _table(
    ["K", "held-out LL / choice (nats)", "95% CI", "BIC", "restart ARI"],
    [
      [
        r["k"],
        r["heldout_loglik_per_choice"],
        _ci(r["heldout_loglik_per_choice_ci95"]) if r.get("heldout_loglik_per_choice_ci95") else "",
        round(r["bic"], 1),
        r["restart_ari"],
      ]
      for r in um["k_sweep"]
    ],
  )
  if saved.report and "agent" in saved.report:
    lines += [line for line in _agent_markdown(saved.report) if not line.startswith("![")]
  if saved.report and "sim_vs_real" in saved.report:
    lines += [
      line
      for line in _sim_vs_real_markdown(saved.report["sim_vs_real"])
      if not line.startswith("![")
    ]
  if saved.agent:
    lines += ["", "## Agent training (final metrics, mean of the last 100 logged steps)", ""]
    policies = saved.agent["policies"]
    names = sorted({m for p in policies.values() for m in p["final_metrics"]})
    lines += _table(
      ["policy", "learner", "data mix"] + names,
      [
        [n, p["learner"], p["data_mix"]] + [p["final_metrics"].get(m, "") for m in names]
        for n, p in policies.items()
      ],
    )
  if saved.seconds:
    lines += ["", "## Stage run times", ""] + _table(
      ["stage", "seconds"], [[s, round(t, 1)] for s, t in saved.seconds.items()]
    )
  return lines


def _save_png(fig: Figure, path: str) -> bytes:
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
  plt.close(fig)
  files.write_bytes(path, buffer.getvalue())
  return buffer.getvalue()


def _html(markdown_lines: list[str], images: dict[str, tuple[bytes, str]]) -> str:
  """A self-contained page: the Markdown's headings, paragraphs and tables, and every PNG inlined."""
  body, table = [], []

  def flush_table():
    if table:
      cells = [
        [html.escape(c.strip()) for c in row.strip("|").split("|")]
        for row in table
        if "---" not in row
      ]
      head = "".join(f"<th>{c}</th>" for c in cells[0])
      rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
      body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
      table.clear()

  for line in markdown_lines:
    if line.startswith("|"):
      table.append(line)
      continue
    flush_table()
    if line.startswith("#"):
      level = len(line) - len(line.lstrip("#"))
      body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
    elif line and not line.startswith("!["):
      body.append(f"<p>{html.escape(line)}</p>")
  flush_table()
  body.append("<h2>Figures</h2>")
  for name, (png, caption) in images.items():
    data = base64.b64encode(png).decode()
    body.append(
      f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
      f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )
  style = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
    "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:0.9em}img{max-width:100%}"
    "figcaption{color:#555;font-size:0.9em}"
  )
  return (
    f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>pasta_jax report</title>'
    f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
  )


def regenerate(workdir: str, out_dir: str | None = None) -> dict:
  """Rebuilds every table and figure of the report from the workdir's saved artefacts, recomputing nothing:
  `out_dir` (default WORKDIR/report/) gets report.md, one PNG per figure and a self-contained report.html
  (figures inlined as base64). Returns {"markdown", "html", "figures": {name: path}}."""
  out_dir = out_dir or os.path.join(workdir, REPORT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  saved = load_saved(workdir)
  lines = _section_lines(saved)
  images, paths = {}, {}
  for name, (fig, caption) in build_figures(saved).items():
    paths[name] = os.path.join(out_dir, f"{name}.png")
    images[name] = (_save_png(fig, paths[name]), caption)
    lines += ["", f"![{caption}]({name}.png)", "", f"*{caption}*"]
  markdown_path, html_path = (
    os.path.join(out_dir, "report.md"),
    os.path.join(out_dir, "report.html"),
  )
  files.write_text(markdown_path, "\n".join(lines) + "\n")
  files.write_text(html_path, _html(lines, images))
  return {"markdown": markdown_path, "html": html_path, "figures": paths}
