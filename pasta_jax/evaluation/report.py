"""report.json, report.md and the console summary."""

import json
import os

from rich.console import Console
from rich.table import Table


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def user_model_table(section: dict) -> Table:
  table = Table(title="User model: K sweep")
  for column in ("K", "held-out LL / choice", "BIC", "restart ARI", "selected"):
    table.add_column(column, justify="right")
  for row in section["k_sweep"]:
    table.add_row(str(row["k"]), _fmt(row["heldout_loglik_per_choice"]), f"{row['bic']:.1f}",
                  _fmt(row["restart_ari"]), "◀" if row["k"] == section["selected_k"] else "")
  return table


def summary_table(section: dict) -> Table:
  table = Table(title=f"User model (K={section['num_types']})")
  table.add_column("metric")
  table.add_column("value", justify="right")
  for key in ("num_types", "planted_num_types", "selected_k", "heldout_loglik_per_choice",
              "true_model_heldout_loglik_per_choice", "ari_vs_planted", "restart_ari"):
    if key in section:
      table.add_row(key, _fmt(section[key]))
  return table


def markdown(report: dict) -> str:
  um = report["user_model"]
  lines = ["# pasta_jax report", "", "## User model", "", "| metric | value |", "| --- | --- |"]
  lines += [f"| {k} | {_fmt(v)} |" for k, v in um.items() if not isinstance(v, (list, dict))]
  lines += ["", "### K sweep", "", "| K | held-out LL / choice | BIC | restart ARI |", "| --- | --- | --- | --- |"]
  lines += [f"| {r['k']} | {_fmt(r['heldout_loglik_per_choice'])} | {r['bic']:.1f} | {_fmt(r['restart_ari'])} |"
            for r in um["k_sweep"]]
  lines += ["", "![K sweep](user_model/k_sweep.png)", ""]
  return "\n".join(lines)


def write(workdir: str, report: dict, console: Console | None = None) -> dict:
  """Writes report.json and report.md under `workdir` and prints the summary tables."""
  for name, text in (("report.json", json.dumps(report, indent=2, sort_keys=True)), ("report.md", markdown(report))):
    tmp = os.path.join(workdir, f"{name}.tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(workdir, name))
  console = console or Console()
  console.print(summary_table(report["user_model"]))
  console.print(user_model_table(report["user_model"]))
  return report
