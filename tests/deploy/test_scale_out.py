"""Scale-out: three `genstruct-server` replicas, one bulk client balancing over them with
round_robin, one replica stopped gracefully mid-run, and nothing lost."""

from __future__ import annotations

import signal
from pathlib import Path

from genstruct_client.bulk import derive_id

from tests.client.helpers import (
    assert_exactly_once,
    finish,
    output_records,
    start_genstruct,
    wait_progress,
    write_documents,
)
from tests.hardening.harness import GenstructServer

DOCUMENTS = 300


def batch_items_ok(server: GenstructServer) -> float:
    return server.scrape().get('genstruct_batch_items_total{code="OK"}', 0.0)


def test_load_spreads_over_replicas_and_a_drained_one_loses_nothing(tmp_path: Path) -> None:
    replicas = [
        GenstructServer("--n-parallel", "4", "--drain-seconds", "20", token_delay=0.01)
        for _ in range(3)
    ]
    try:
        for replica in replicas:
            replica.start()
        source, output = tmp_path / "docs.jsonl", tmp_path / "pairs.jsonl"
        records = write_documents(source, DOCUMENTS)
        targets = [arg for r in replicas for arg in ("--target", r.target)]
        client = start_genstruct(
            "generate", str(source), "-o", str(output), "--concurrency", "12", *targets
        )
        wait_progress(client, DOCUMENTS // 3)

        # Every replica has served documents: round_robin spread the streams.
        served_before_stop = [batch_items_ok(r) for r in replicas]
        assert all(count > 0 for count in served_before_stop), served_before_stop

        # A graceful stop (what Kubernetes sends on scale-down): drain, then exit 0.
        stopping = replicas[0]
        stopping.signal(signal.SIGTERM)
        assert stopping.wait(60) == 0
        stopping.wait_log("stopped", 10)

        code, err = finish(client)
        errors = output.with_suffix(".errors.jsonl")
        assert code == 0, err + (errors.read_text() if errors.exists() else "")
        ids = {derive_id(r["title"], r["content"]) for r in records}
        assert_exactly_once(output_records(output), ids)

        # The rest of the run went to the two replicas still up.
        served_after = [batch_items_ok(r) for r in replicas[1:]]
        assert sum(served_after) > sum(served_before_stop[1:]), (served_before_stop, served_after)
    finally:
        for replica in replicas:
            replica.close()
