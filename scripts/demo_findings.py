"""Regenerate the README's findings block from demo output folders (one command, after `make demo`):

    .venv/bin/python scripts/demo_findings.py demo-out [demo-out-seed1 demo-out-seed2 ...] --write

The first folder gives the findings; all folders together give the spread across seeds (make them with
`misbench demo --seed N`). Without --write the block is printed. With --write, README.md's text between
the findings markers and docs/demo_findings.json (the numbers behind it) are replaced;
tests/test_readme.py regenerates the text from that JSON and compares. After a change to the sentences,
`--from-json --write` rewrites the block from docs/demo_findings.json's numbers (no demo folders needed).
"""

import argparse
import textwrap
import json
import re
from pathlib import Path

from misbench.studies.findings import demo_facts, findings_text, spread_text

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- findings:start (scripts/demo_findings.py) -->", "<!-- findings:end -->"


def block(data: dict) -> str:
    paragraphs = [findings_text(data["findings"])]
    if len(data["seeds"]) > 1:
        paragraphs.append(spread_text({int(k): v for k, v in data["seeds"].items()}))
    return "\n\n".join(textwrap.fill(p, 105, break_on_hyphens=False) for p in paragraphs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--write", action="store_true", help="Replace README.md's block and docs/demo_findings.json.")
    parser.add_argument("--from-json", action="store_true", help="The numbers of docs/demo_findings.json, not folders.")
    args = parser.parse_args()
    if args.from_json == bool(args.folders):
        parser.error("give demo output folders or --from-json")
    if args.from_json:
        data = json.loads((ROOT / "docs" / "demo_findings.json").read_text())
    else:
        seeds = {}
        for folder in args.folders:
            seed = json.loads((folder / "manifest.json").read_text())["config"]["study"]["seed"]
            seeds[str(seed)] = demo_facts(folder)
        data = {"findings": seeds[next(iter(seeds))], "seeds": seeds}
    text = block(data)
    if not args.write:
        print(text)
        return
    readme = ROOT / "README.md"
    body = readme.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(body):
        raise SystemExit(f"README.md has no findings markers ({START} ... {END})")
    readme.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", body))
    if not args.from_json:
        (ROOT / "docs" / "demo_findings.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote README.md's findings and docs/demo_findings.json from "
          f"{', '.join(map(str, args.folders)) or 'docs/demo_findings.json'}")


if __name__ == "__main__":
    main()
