"""The notebooks run top to bottom on the tiny run (nbclient, parameters injected after the cell tagged
"parameters", as papermill does), are committed without outputs, and define no logic of their own."""

import ast
import os

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart", "user_types", "agent")


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)


def _with_parameters(nb: nbformat.NotebookNode, workdir: str) -> nbformat.NotebookNode:
  """The notebook with a cell setting the tiny config and workdir inserted after its parameters cell."""
  (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  cell = nbformat.v4.new_code_cell(
    f'CONFIG = "configs/quickstart.py:tiny"\nOVERRIDES = {{}}\nWORKDIR = {workdir!r}'
  )
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)
  return nb


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_the_tiny_run(name, tiny_workdir):
  from nbclient import NotebookClient

  nb = _with_parameters(_read(name), tiny_workdir)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
  ).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no figure shown"
  assert any("text/markdown" in o.get("data", {}) for o in outputs), "no table shown"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_and_defines_no_logic(name):
  nb = _read(name)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "outputs are not stripped"
  assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
  for cell in code:
    defined = [
      n
      for n in ast.walk(ast.parse(cell.source))
      if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))
    ]
    assert not defined, f"{name}: a cell defines {type(defined[0]).__name__}; put it in pasta_jax"
  assert 'find_spec("pasta_jax")' in code[0].source, (
    "the first code cell installs pasta_jax when it is missing"
  )
