"""Write the packaged defaults (daemon/config.yaml, train/recipe.yaml) and docs/configuration.md from
the definitions in core/config.py. Run after changing a key; tests/test_config.py fails while they differ.

    python scripts/write_config_docs.py
"""
from __future__ import annotations

from pathlib import Path

from xr.core.config import RECIPE_PATH, SETTINGS_PATH, Recipe, Settings, render_markdown, render_yaml

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def generated() -> dict[Path, str]:
    return {SETTINGS_PATH: render_yaml(Settings), RECIPE_PATH: render_yaml(Recipe), DOCS: render_markdown()}


if __name__ == "__main__":
    for path, text in generated().items():
        path.write_text(text)
        print(f"wrote {path}")
