"""The bulk client at corpus scale: documents per second against an instant engine, and the
start-up of a resumed run over an output of 1,000,000 rows.

    python -m bench.bulk_scale [--documents 20000] [--rows 1000000] [--repeat 3]

Throughput: `genstruct generate` sends --documents documents to a server whose engine
answers at once (tests/client/fake_server.py, its own process), so the client, the gRPC
layer, the output journal and the curation (near-duplicate questions marked: the default)
are all that is timed. The engine echoes each document (its title is the question, its
content the answer), so the questions differ and every answer is grounded. Each round
writes a fresh output; the table gives documents per wall second, median of --repeat rounds.

Resume: a real run's rows are the template of an output journal of --rows rows (each a
document of its own, with its title, content and pair, as a run writes them) and of its
run record, each row with a question of its own. `genstruct generate` is then run again
over the matching input: every document is written already, so it reads the journal, puts
every question back into the index of near duplicates, skips every input row and exits. The table
gives its wall time and peak RSS (the client process, from wait4), median of --repeat runs.
Run it on an otherwise idle machine. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENSTRUCT = str(Path(sys.executable).with_name("genstruct"))
CONTENT = (
    "Lighthouse keepers on the northern coast logged the weather every four hours: wind "
    "direction and force, the state of the sea, visibility, and whether the lamp had been "
    "lit on time. The logs of one station, kept without a gap for sixty years, now let "
    "climatologists compare storms of the last century with those of this one. "
)


class FakeServer:
    """tests/client/fake_server.py in a process of its own: an engine that answers at once."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.client.fake_server", "--port", "0", "--n-parallel",
             "64", "--max-batch-in-flight", "256", "--echo"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the fake server exited before it served")
        self.target = f"127.0.0.1:{json.loads(line)['port']}"

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def write_documents(path: Path, count: int, *, start: int = 0) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(start, start + count):
            out.write(json.dumps({"id": f"doc-{i:08d}", "title": f"Station log {i}",
                                  "content": CONTENT + f"Entry {i}."}) + "\n")  # fmt: skip


def timed(command: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MiB, and exit code of `command`, from wait4."""
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    if process.stderr is not None:
        error = process.stderr.read().decode(errors="replace")
        process.stderr.close()
        if os.waitstatus_to_exitcode(status) != 0:
            print(error, file=sys.stderr)
    process.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, process.returncode


DEDUP = ["--dedup", "mark"]  # main() sets it from --dedup


def generate(source: Path, output: Path, target: str) -> list[str]:
    return [GENSTRUCT, "generate", str(source), "-o", str(output), "--target", target,
            "--no-progress", *DEDUP]  # fmt: skip


def throughput(server: FakeServer, work: Path, documents: int, repeat: int) -> list[float]:
    source = work / "throughput.jsonl"
    write_documents(source, documents)
    rates = []
    for round_ in range(repeat):
        output = work / f"throughput-{round_}.out.jsonl"
        wall, rss, code = timed(generate(source, output, server.target))
        if code != 0:
            raise RuntimeError(f"genstruct generate exited {code}")
        rows = sum(1 for _ in output.open("rb"))
        assert rows == documents, (rows, documents)
        rates.append(documents / wall)
        print(f"  round {round_ + 1}: {documents} documents in {wall:.2f} s = "
              f"{documents / wall:,.0f}/s, client peak RSS {rss:.0f} MiB", flush=True)
    return rates


def build_resumable(server: FakeServer, work: Path, rows: int) -> tuple[Path, Path]:
    """An input of `rows` documents and an output with every one of them written."""
    seed_input, seed_output = work / "seed.jsonl", work / "seed.out.jsonl"
    write_documents(seed_input, 1)
    _, _, code = timed(generate(seed_input, seed_output, server.target))
    if code != 0:
        raise RuntimeError(f"genstruct generate exited {code}")
    template = json.loads(seed_output.read_text().splitlines()[0])
    source, output = work / "resume.jsonl", work / "resume.out.jsonl"
    write_documents(source, rows)
    with output.open("w", encoding="utf-8") as out:
        for i in range(rows):
            row = dict(template, id=f"doc-{i:08d}", title=f"Station log {i}",
                       content=CONTENT + f"Entry {i}.", user=f"Station log {i}?",
                       assistant=CONTENT + f"Entry {i}.")  # fmt: skip
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    record = seed_output.with_name(seed_output.name + ".run.json")
    shutil.copy(record, output.with_name(output.name + ".run.json"))
    return source, output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, help="folder for the files (default: a temporary)")
    parser.add_argument("--dedup", choices=("mark", "drop", "off"), default="mark",
                        help="the runs' --dedup (default mark, as a run's)")
    args = parser.parse_args(argv)
    DEDUP[1] = args.dedup
    work = args.work or Path(tempfile.mkdtemp(prefix="genstruct-bulk-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; files in {work}", flush=True)
    server = FakeServer()
    try:
        print(f"throughput, instant engine, {args.documents:,} documents:", flush=True)
        rates = throughput(server, work, args.documents, args.repeat)
        source, output = build_resumable(server, work, args.rows)
        size = output.stat().st_size
        print(f"resume over {args.rows:,} rows ({size / 2**20:,.0f} MiB of journal):", flush=True)
        walls, peaks = [], []
        for round_ in range(args.repeat):
            wall, rss, code = timed(generate(source, output, server.target))
            if code != 0:
                raise RuntimeError(f"genstruct generate exited {code}")
            lines = sum(1 for _ in output.open("rb"))
            assert lines == args.rows, (lines, args.rows)  # nothing sent again
            walls.append(wall)
            peaks.append(rss)
            print(f"  round {round_ + 1}: {wall:.2f} s, peak RSS {rss:.0f} MiB", flush=True)
    finally:
        server.close()
    print(f"\n--dedup {args.dedup}")
    print(f"client + server, instant engine: median {statistics.median(rates):,.0f} documents/s")
    print(f"resume of {args.rows:,} rows, nothing left to do: median "
          f"{statistics.median(walls):.2f} s, peak RSS {statistics.median(peaks):.0f} MiB")
    print(f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
