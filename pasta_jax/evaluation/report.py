"""report.json, report.md and the console summary."""

import os

from rich.console import Console
from rich.table import Table

from pasta_jax import files


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
  loglik = report["sim_vs_real"]["loglik"]
  lines += [
    "",
    "## Sim vs real (held-out users)",
    "",
    f"Prequential log-likelihood per choice {_fmt(loglik['per_choice']['mean'])} "
    f"{_ci(loglik['per_choice']['ci95'])} (uniform choice: {_fmt(loglik['uniform']['mean'])}); "
    f"expected calibration error {_fmt(report['sim_vs_real']['calibration']['overall']['ece']['mean'])}.",
    "",
    "![utility per turn](evaluate/utility_per_turn.png)",
    "![type-posterior accuracy](evaluate/type_accuracy_per_turn.png)",
    "![calibration](evaluate/calibration.png)",
    "",
  ]
  return lines


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
