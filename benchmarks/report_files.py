"""Where a benchmark's results go: `<name>.json` holds every number, `<name>.md` the table people read.

The benchmark scripts import it as a sibling (`python benchmarks/<script>.py` puts this folder on the path).
"""

from __future__ import annotations

import json
import os
from typing import IO, Any, Callable


def write_whole(path: str, write: Callable[[IO[str]], Any]) -> None:
    """Run `write` on a file beside `path`, then move it there: a run that fails or is stopped while writing leaves
    the old file whole and no partial file behind."""
    partial = path + ".partial"
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            write(handle)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON at `path`, written whole."""
    write_whole(path, lambda handle: json.dump(value, handle, indent=2))


def write_report(folder: str, name: str, report: Any, table: str) -> str:
    """Write `report` to `folder/<name>.json` and `table` to `folder/<name>.md` (the folder made if needed); return
    `table`."""
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, f"{name}.json"), report)
    write_whole(os.path.join(folder, f"{name}.md"), lambda handle: handle.write(table))
    return table
