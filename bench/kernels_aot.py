"""Print the AOT GPU table of every slimfx Triton kernel config: registers, spills, shared memory and
the tensor-core instruction, for sm_90a and sm_80, compiled on this machine (no GPU needed).

    python bench/kernels_aot.py            # text table
    python bench/kernels_aot.py --json     # machine-readable rows
    python bench/kernels_aot.py --check    # also exit 1 if any rule is broken (see slimfx.kernels.aot)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimfx.kernels import aot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    parser.add_argument("--check", action="store_true", help="exit 1 on any violation")
    parser.add_argument("--quick", action="store_true", help="only the representative subset")
    parser.add_argument("--workers", type=int, default=None, help="parallel compile processes")
    args = parser.parse_args(argv)
    rows = aot.run_aot(quick=args.quick, workers=args.workers)
    problems = aot.violations(rows)
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows], "violations": problems}, indent=1))
    else:
        print(aot.format_table(rows))
        print(f"\n{len(rows)} compiles, {len(problems)} violations")
        for p in problems:
            print(f"  VIOLATION {p}")
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
