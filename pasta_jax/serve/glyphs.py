"""Thumbnails of the synthetic world's images, which have features but no pixels: an SVG glyph drawn
from the prompt's attributes (setting: background colour; subject: shape; style: fill colour; mood:
rotation; detail: an overlay pattern) and jittered by the image seed, so the M images of one prompt
look alike and differ a little, as renders of one prompt do."""

import base64
import math

SIZE = 64
BACKGROUNDS = (
  "#dfe9f3",
  "#1e2a44",
  "#f6e7c1",
  "#eef3f7",
  "#0b0c1e",
  "#fff2cc",
  "#e9b87d",
  "#2a6f7f",
  "#cfe8c4",
  "#d8cbb8",
)
FILLS = (
  "#4e79a7",
  "#f28e2b",
  "#e15759",
  "#76b7b2",
  "#59a14f",
  "#edc948",
  "#b07aa1",
  "#ff9da7",
  "#9c755f",
  "#bab0ac",
)


def _polygon(sides: int, radius: float, rotation: float, star: bool) -> str:
  """Points of a regular polygon (or star) centred in the glyph."""
  count = 2 * sides if star else sides
  points = []
  for i in range(count):
    r = radius * (0.45 if star and i % 2 else 1.0)
    angle = rotation + 2 * math.pi * i / count
    points.append(f"{SIZE / 2 + r * math.sin(angle):.1f},{SIZE / 2 - r * math.cos(angle):.1f}")
  return " ".join(points)


def _shape(subject: int, fill: str, rotation: float, radius: float) -> str:
  if subject == 0:
    return f'<circle cx="{SIZE / 2}" cy="{SIZE / 2}" r="{radius:.1f}" fill="{fill}"/>'
  star = subject >= 6
  sides = subject - 1 if star else subject + 2
  return f'<polygon points="{_polygon(sides, radius, rotation, star)}" fill="{fill}"/>'


def _overlay(detail: int) -> str:
  """A light pattern over the glyph, one per detail value."""
  stroke = 'stroke="#ffffff" stroke-opacity="0.55" fill="none"'
  if detail % 3 == 0:
    return "".join(
      f'<line x1="0" y1="{y}" x2="{SIZE}" y2="{y}" {stroke}/>' for y in range(8, SIZE, 12 + detail)
    )
  if detail % 3 == 1:
    return "".join(
      f'<circle cx="{x}" cy="{x // 2 + 8}" r="2" fill="#ffffff" fill-opacity="0.6"/>'
      for x in range(6, SIZE, 10 + detail)
    )
  return f'<rect x="4" y="4" width="{SIZE - 8}" height="{SIZE - 8}" {stroke} stroke-width="{1 + detail % 4}"/>'


def svg(attributes: list[int], seed: int) -> str:
  """The glyph of one image: attributes (subject, style, setting, mood, detail) and its seed."""
  subject, style, setting, mood, detail = (int(a) for a in attributes)
  jitter = (seed % 997) / 997.0
  rotation = math.radians(36 * mood + 20 * jitter)
  radius = SIZE * (0.3 + 0.08 * jitter)
  body = (
    f'<rect width="{SIZE}" height="{SIZE}" fill="{BACKGROUNDS[setting % len(BACKGROUNDS)]}"/>'
    + _shape(subject % 10, FILLS[style % len(FILLS)], rotation, radius)
    + _overlay(detail)
  )
  return (
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{SIZE}" height="{SIZE}" '
    f'viewBox="0 0 {SIZE} {SIZE}">{body}</svg>'
  )


def data_url(attributes: list[int], seed: int) -> str:
  """The glyph as a data: URL for an <img> tag."""
  return "data:image/svg+xml;base64," + base64.b64encode(svg(attributes, seed).encode()).decode()


def seed_of(ref: str) -> int:
  """The image seed of a synthetic://<prompt id>/<seed> reference."""
  return int(ref.rsplit("/", 1)[-1])
