"""An interactive PASTA session for a person, in a browser or a terminal.

`python -m pasta_jax.serve --workdir=runs/quickstart` serves a local page: the person picks a start
prompt (or types one), the agent chosen on the page shows a slate of L prompts with their images for H
turns, the person clicks a column, and the agent's posterior over user types is drawn after each choice.
`--tui` runs the same session in a terminal. Sessions are saved as canonical records under
WORKDIR/serve/sessions/<id>/ and can be exported in the PASTA release layout.

Modules: `workspace` (the workdir's artefacts), `session` (one person's session), `glyphs` (thumbnails of
the synthetic world's images), `server` (HTTP API and page), `tui` (terminal mode).
"""
