"""The test durations table from pytest's JUnit XML (setup + call + teardown of each test, in seconds).

    python -m pytest -q --junitxml=default.xml; python -m pytest -q -m slow --junitxml=slow.xml
    python .ci/durations.py default.xml slow.xml              # every test, slowest first, with its tier
    python .ci/durations.py default.xml --top 10 --by-file    # the 10 slowest files

Each row: seconds, tier (the XML file's stem), file, test. The footer gives the count and the
total per tier; a test that failed or errored is marked in the last column.
"""
from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read(path: str) -> list[dict]:
    """One dict per <testcase>: tier, file, test, seconds, outcome."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        rows.append({"tier": Path(path).stem, "file": case.get("classname", "").replace(".", "/") + ".py",
                     "test": case.get("name", ""), "seconds": float(case.get("time", 0.0)), "outcome": outcome})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xml", nargs="+", help="pytest --junitxml files, one per tier")
    parser.add_argument("--top", type=int, default=0, help="print only the N slowest rows (0: all)")
    parser.add_argument("--by-file", action="store_true", help="one row per test file (seconds summed)")
    args = parser.parse_args(argv)
    rows = [row for path in args.xml for row in read(path)]
    if args.by_file:
        files: dict[tuple[str, str], dict] = {}
        for row in rows:
            entry = files.setdefault((row["tier"], row["file"]), {**row, "test": "", "seconds": 0.0, "count": 0})
            entry["seconds"] += row["seconds"]
            entry["count"] += 1
            entry["test"] = f"{entry['count']} tests"
        table = list(files.values())
    else:
        table = rows
    table = sorted(table, key=lambda r: -r["seconds"])
    print(f"{'seconds':>9}  {'tier':<8} {'file':<40} test")
    for row in table[:args.top or None]:
        mark = "" if row["outcome"] in ("passed", "skipped") or args.by_file else f"  [{row['outcome']}]"
        print(f"{row['seconds']:9.2f}  {row['tier']:<8} {row['file']:<40} {row['test']}{mark}")
    for tier in dict.fromkeys(r["tier"] for r in rows):
        mine = [r for r in rows if r["tier"] == tier]
        skipped = sum(r["outcome"] == "skipped" for r in mine)
        print(f"{tier}: {len(mine)} tests ({skipped} skipped), {sum(r['seconds'] for r in mine):.1f} s in tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
