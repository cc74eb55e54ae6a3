"""Checkpoint runner for the release gate: run the GX checkpoint ``release_gate`` of this project on a dataset.

    python examples/data_ci/run_gate.py data/train.parquet --detector detector/

Exit status: 0 the gate passed, 1 the data failed an expectation, 2 the gate could not be evaluated.
Data Docs are written to gx/uncommitted/data_docs/local_site/ by the checkpoint's UpdateDataDocsAction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The line that wires SAFT into a GX project: importing the plugin registers its expectation types.
# Without it GX drops them from the suite and reports success for the rest -- verdict() refuses that.
import saft_gx.gx  # noqa: F401
from saft_gx.core.errors import SaftError
from saft_gx.gx import gate

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="parquet, jsonl or csv file with prompt/response columns")
    ap.add_argument("--detector", required=True, help="detector folder saved by `saft-gx fit` (suite parameter saft_detector)")
    ap.add_argument("--project", default=str(HERE), help="folder holding the gx/ project (default: this example)")
    ap.add_argument("--checkpoint", default="release_gate")
    args = ap.parse_args(argv)
    try:
        df = gate.read_frame(args.dataset)
        result, expected = gate.run_project_checkpoint(args.project, args.checkpoint, df,
                                                       expectation_parameters={"saft_detector": args.detector})
    except SaftError as e:
        print(f"Error: {e}", file=sys.stderr)
        return gate.ERROR
    v = gate.verdict(result, expected=expected)
    for o in v.outcomes:
        print(f"  {o.line()}")
    print(f"gate {'PASSED' if v.passed else 'FAILED'}: {v.reason}")
    return v.exit_code


if __name__ == "__main__":
    sys.exit(main())
