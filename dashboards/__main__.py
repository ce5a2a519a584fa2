"""Regenerate dashboards/*.json from dashboards/*.dashboard.py: `python -m dashboards [--check]`."""

from __future__ import annotations

import io
import runpy
import sys
from pathlib import Path

from grafanalib._gen import write_dashboard

HERE = Path(__file__).resolve().parent


def sources() -> list[Path]:
    return sorted(HERE.glob("*.dashboard.py"))


def json_path(source: Path) -> Path:
    return source.with_name(source.name.removesuffix(".dashboard.py") + ".json")


def render(source: Path) -> str:
    """The JSON text a *.dashboard.py generates."""
    dashboard = runpy.run_path(str(source))["dashboard"]
    out = io.StringIO()
    write_dashboard(dashboard, out)
    return out.getvalue()


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for source in sources():
        text, target = render(source), json_path(source)
        if check:
            if not target.exists() or target.read_text() != text:
                stale.append(target.name)
        else:
            target.write_text(text)
            print(f"wrote {target.relative_to(HERE.parent)}")
    if stale:
        print("out of date (run `python -m dashboards`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
