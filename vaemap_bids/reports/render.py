"""HTML rendering from the templates in ``vaemap_bids/data/reports/`` and atomic file writes."""
from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

import jinja2

TEMPLATE_PACKAGE = "vaemap_bids"
TEMPLATE_DIR = "data/reports"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader(TEMPLATE_PACKAGE, TEMPLATE_DIR),
                             autoescape=jinja2.select_autoescape(["html"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.globals["inline_css"] = (files(TEMPLATE_PACKAGE) / TEMPLATE_DIR / "style.css").read_text(
        encoding="utf-8")
    return env


def render(template: str, context: dict) -> str:
    """Render ``template`` (a file in ``vaemap_bids/data/reports/``) with ``context``."""
    return _environment().get_template(template).render(**context)


