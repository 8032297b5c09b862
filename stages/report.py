"""DVC stage `report`: one table of every configured model -> metrics/summary.{json,md,csv}."""
from __future__ import annotations

import json

from stages.common import PipelineError, atomic_path, load_params, param, run_main, write_csv, write_json
from stages.paths import METRICS_ROOT, SUMMARY_ROOT as OUTPUT

COLUMNS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "threshold_precision",
    "threshold_recall",
    "threshold_f1",
)


def summary_rows(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        path = METRICS_ROOT / f"{name}.json"
        if not path.is_file():
            raise PipelineError(f"{path}: metrics missing (run evaluate@{name})")
        result = json.loads(path.read_text())
        row = {"model": name, "method": result["method"], "backbone": result["backbone"]}
        row.update({column: result.get(column) for column in COLUMNS})
        row.update({f"auroc_{k}": v for k, v in sorted(result.get("per_defect_auroc", {}).items())})
        rows.append(row)
    return rows


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    params = load_params()
    names = list(param(params, "models"))
    if not names:
        raise PipelineError("models: no models configured")
    rows = summary_rows(names)
    columns = list(dict.fromkeys(key for row in rows for key in row))

    write_json(OUTPUT / "summary.json", {row["model"]: {c: row.get(c) for c in columns[3:]} for row in rows})
    with atomic_path(OUTPUT / "summary.md") as tmp:
        tmp.write_text(markdown_table(rows, columns))
    write_csv(OUTPUT / "summary.csv", rows, columns)
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    run_main(main)
