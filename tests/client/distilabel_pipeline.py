"""A distilabel Pipeline of LoadDataFromDicts and GenstructService, run in its own process.

    python -m tests.client.distilabel_pipeline ROWS.json OUT.json --cache-dir DIR \
        [--step '{"target": "127.0.0.1:50051", ...}'] [--runtime '{"max_tokens": 16}'] \
        [--batch-size N]

distilabel forks a worker process per step, so the pipeline runs here rather than inside
pytest (whose gRPC and asyncio state a fork would copy). Writes the rows of the pipeline's
dataset to OUT.json and prints one JSON line: {"rows": N, "seconds": S} (the time of
`pipeline.run`, the workers' start included).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts
from genstruct_client.distilabel_step import GenstructService


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rows", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--step", default="{}", help="GenstructService arguments, JSON")
    parser.add_argument("--runtime", default="{}", help="its runtime parameters, JSON")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    rows = json.loads(args.rows.read_text())
    with Pipeline(name="genstruct-service", cache_dir=args.cache_dir) as pipeline:
        load = LoadDataFromDicts(data=rows, batch_size=args.batch_size)
        step = GenstructService(
            name="genstruct", input_batch_size=args.batch_size, **json.loads(args.step)
        )
        load >> step
    started = time.perf_counter()
    distiset = pipeline.run(
        parameters={step.name: json.loads(args.runtime)}, use_cache=False
    )
    seconds = time.perf_counter() - started
    out = distiset["default"]["train"].to_list()
    args.out.write_text(json.dumps(out))
    print(json.dumps({"rows": len(out), "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
