"""bench.ceiling's worker-shaped pass-through: the worker's records, without its work."""

from __future__ import annotations

from bench.ceiling import WorkerShaped
from tests.fakes import FakeSink
from worker.events import Record
from worker.processor import Routes

T0 = 1_704_067_200_000


def call(group: str, n: int) -> bytes:
    return b'{"type":"group","groupId":"%s","userId":"u%d","traits":{}}' % (group.encode(), n)


def shaped(repartition: str | None, expect: int) -> tuple[WorkerShaped, FakeSink]:
    sink = FakeSink(transactional=False)
    routes = Routes("in", "out", "out", "out.state", "out.members", repartition, "out.dedupe")
    return WorkerShaped(routes, sink, expect), sink


def test_two_stages_write_what_the_worker_writes_for_each_call() -> None:
    """Stage one re-keys by groupId, keeping the arrival; the last stage writes an
    enriched record, then at the commit a state record per group and a membership and a
    dedupe id per call, on its partition, a report for each topic partition's last."""
    processor, sink = shaped("out.repartition", expect=3)
    groups = ["g1", "g1", "g2"]
    processor.process(
        [Record("in", 0, i, call(g, i), b"u%d" % i, T0 + i) for i, g in enumerate(groups)]
    )
    forwarded = sink.open[:]
    assert [(p.topic, p.key, p.timestamp, p.headers) for p in forwarded] == [
        ("out.repartition", b"g1", 0, [("arrival", b"%d" % T0), ("input-key", b"u0")]),
        ("out.repartition", b"g1", 0, [("arrival", b"%d" % (T0 + 1)), ("input-key", b"u1")]),
        ("out.repartition", b"g2", 0, [("arrival", b"%d" % (T0 + 2)), ("input-key", b"u2")]),
    ]
    assert processor.finished is None  # stage one's records are not counted
    sink.open.clear()
    processor.process(
        [
            Record("out.repartition", 4, i, p.value, p.key, p.timestamp, list(p.headers or []))
            for i, p in enumerate(forwarded)
        ]
    )
    assert processor.finished is not None
    assert processor.write_changelog() == 2 + 3 + 3
    by_topic: dict[str, list[tuple[bytes | None, int | None, bool]]] = {}
    for p in sink.open:
        by_topic.setdefault(p.topic, []).append((p.key, p.partition, p.report))
    assert by_topic["out"] == [(b"g1", None, False)] * 2 + [(b"g2", None, False)]
    assert by_topic["out.state"] == [(b"g1", 4, False), (b"g2", 4, True)]
    assert [report for _, _, report in by_topic["out.members"]] == [False, False, True]
    dedupe = [(p.value, p.timestamp) for p in sink.open if p.topic == "out.dedupe"]
    assert dedupe == [(b"%d" % (T0 + i), 0) for i in range(3)]
    processor.store.commit()  # as the runner, once the transaction committed
    assert processor.write_changelog() == 0  # the change set went with the commit


def test_keyed_input_goes_straight_to_the_last_stage() -> None:
    processor, sink = shaped(None, expect=2)
    processor.process([Record("in", 1, i, call("g", i), b"g", T0) for i in range(2)])
    assert [p.topic for p in sink.open] == ["out", "out"]
    assert processor.finished is not None
    assert processor.write_changelog() == 1 + 2 + 2


def test_an_aborted_batch_leaves_no_changes_behind() -> None:
    """The runner rolls the store back after an abort, then reads the batch again."""
    processor, _ = shaped(None, expect=10)
    processor.process([Record("in", 0, 0, call("g", 0), b"g", T0)])
    processor.store.rollback()
    assert processor.write_changelog() == 0
