"""Rewrite the settings tables of docs/settings.md from the schema (train.py, evaluate.py, sample.py, report.py, in
that order), which tests/test_schema.py checks: .venv/bin/python scripts/settings_tables.py"""

from pathlib import Path

from ddpm_lightning import schema
from ddpm_lightning.files import write_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
ENTRIES = ["config", "evaluate", "sample", "report"]


def main() -> None:
    lines = DOC.read_text().split("\n")
    tables, i = [], 0
    while i < len(lines):  # the runs of lines that start with "|"
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        if j > i:
            tables.append((i, j))
        i = j + 1 if j == i else j
    if len(tables) != len(ENTRIES):
        raise SystemExit(f"error: {DOC} has {len(tables)} tables, not one per entry point ({len(ENTRIES)})")
    for (i, j), entry in reversed(list(zip(tables, ENTRIES, strict=True))):
        lines[i:j] = schema.settings_table(entry).rstrip("\n").split("\n")
    write_text(DOC, "\n".join(lines), "the settings page")


if __name__ == "__main__":
    main()
