"""Faults under load, then exactly once checked: ``python -m bench.chaos``.

Starts the local broker on ``--port`` (``deploy/local-kafka/kafka.sh up``, stopped at the
end if this started it) and ``--workers`` workers on a fresh 6-partition input, static
members named by ``worker.group_instance_id`` (``--dynamic``: none) with 6 s consumer
sessions, as in the integration tests; ``--two-deployments`` adds a second deployment (its
own group and outputs) on the same input. A thread produces ``--calls`` generated calls
(``bench.generator``: ``--seed``, ``--groups``) at ``--rate`` calls/s while the faults of
``--plan`` run one after another, each ``--gap`` seconds (0.5-1.5 times that) after the
last one recovered:

- ``kill``: SIGKILL a worker and restart it 0-4 s later;
- ``kill2``: the same to one worker of each deployment at once (0-3 s);
- ``stop``: SIGSTOP a worker for 10-25 s, then SIGCONT;
- ``broker``: the broker down for 5-60 s;
- ``join_leave``: one more worker joins, and is SIGTERMed 8-20 s later.

The seed draws every choice and duration, so it repeats its plan. After each fault, each
deployment's recovery: the seconds from the fault's end until its group consumed what the
input held then (stage 1), and then what the repartition topic held when stage 1 was done
(stage 2). A monitor notes, once a second, a worker exiting unasked (with its log's tail)
and a stall (a partition behind whose offset has not moved for 30 s); ``--py-spy`` (a
py-spy binary) dumps every worker's stacks then, and 12 s after the broker returns. The
rules are in ``bench.chaos_core``.

Once the calls are in and the lag drained, each deployment's outputs are verified: each
valid call enriched once (by messageId and by input position), each bad one dead-lettered
once, each group's last state record with the right eventCount and memberCount. Prints a
JSON summary line and a table of recoveries, writes ``summary.json`` and the workers' logs
in ``--out`` (``.cache/chaos/<name>``), deletes the topics, and exits 1 when a call was
lost or doubled, a state is wrong, or a worker exited unasked (or not with 0 on SIGTERM).
``--root`` runs the workers from another checkout (``git worktree add``), to compare two
versions under the same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from bench.chaos_core import (
    Expected,
    Fault,
    Offsets,
    Recovery,
    Stalls,
    draw_faults,
    format_table,
    verify,
)
from bench.generator import generate_calls
from bench.process import ROOT, Topics, WorkerProcess
from bench.runs import PARTITIONS, create_topic, delete_topics, fast_producer
from worker.kafka import produce_all

__all__ = ["main"]

_LIMIT = 300.0  # the longest wait for a recovery, or for the lag to drain at the end


def _kafka(action: str, port: int) -> subprocess.CompletedProcess[str]:
    """``kafka.sh ACTION`` for the broker on ``port``; blocks up to 3 minutes."""
    script = str(ROOT / "deploy" / "local-kafka" / "kafka.sh")
    environ = {**os.environ, "KAFKA_PORT": str(port)}
    return subprocess.run(
        ["bash", script, action], env=environ, capture_output=True, text=True, timeout=180
    )


def _consumer(bootstrap: str, group: str, isolation: str, **extra: Any) -> Consumer:
    """A consumer that never subscribes nor commits: it only reads."""
    settings: dict[str, Any] = {"bootstrap.servers": bootstrap, "group.id": group}
    settings |= {"isolation.level": isolation, "enable.auto.commit": False}
    return Consumer(settings | {"enable.partition.eof": True, "socket.timeout.ms": 3000} | extra)


class _Worker:
    """A worker slot: each start of it finds its state dir and instance id again."""

    def __init__(self, run: _Run, topics: Topics, name: str) -> None:
        self.run, self.topics, self.name = run, topics, name
        self.process: WorkerProcess | None = None
        self.starts = 0

    def start(self) -> None:
        settings = {"kafka_consumer_session_timeout_ms": "6000"}  # the broker's minimum
        if not self.run.args.dynamic:
            settings |= {"worker_group_instance_id": self.name, "worker_instance_id": self.name}
        self.starts += 1
        self.process = WorkerProcess(
            self.run.bootstrap,
            self.topics,
            self.run.input,
            self.run.out,
            state_dir=self.run.out / f"{self.name}.state",
            log_name=f"-{self.name}-{self.starts}",
            settings=settings,
            root=self.run.args.root,
        )
        self.run.note("worker_started", worker=self.name, pid=self.process.process.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.process.poll() is None

    def send(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.run.asked[self.process.process.pid] = sig  # before the monitor can see the exit
        self.process.process.send_signal(sig)
        self.run.note("signal", worker=self.name, signal=sig.name)

    def wait(self, timeout: float = 30) -> int | None:
        assert self.process is not None
        try:
            return self.process.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


class _Deployment:
    """A consumer group and its outputs, with its worker slots (the last one for joins)."""

    def __init__(self, run: _Run, label: str, workers: int) -> None:
        self.label, self.topics = label, Topics.fresh("chaos")
        self.repartition = self.topics.name("repartition")
        names = [f"{label.lower()}{i}" for i in range(workers + 1)]
        self.workers = [_Worker(run, self.topics, name) for name in names]


class _OffsetReader:
    """Consumer groups' ``Offsets`` (``bench.chaos_core``), read from outside the group."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._consumers: dict[str, Consumer] = {}

    def _consumer(self, group: str, isolation: str) -> Consumer:
        consumer = self._consumers.get(group) or _consumer(
            self.bootstrap, group, isolation, **{"fetch.wait.max.ms": 10, "log_level": 0}
        )
        self._consumers[group] = consumer
        return consumer

    def read(self, group: str, topics: Sequence[str]) -> Offsets | None:
        """Blocks up to a few seconds; ``None`` while the broker does not answer.

        A group commits only past records it consumed, so an offset short of its
        watermark is moved to the next record a read_committed consumer gets from there,
        or to where it found the end: past trailing transaction markers and aborted records.
        """
        consumer = self._consumer(group, "read_uncommitted")  # its watermarks: the ends
        probe = self._consumer("bench-chaos-probe", "read_committed")
        wanted = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        try:
            offsets: Offsets = {}
            for tp in consumer.committed(wanted, timeout=3):
                low, high = consumer.get_watermark_offsets(tp, timeout=3)
                offsets[(tp.topic, tp.partition)] = (tp.offset if tp.offset >= 0 else low, high)
            short = [
                TopicPartition(t, p, at) for (t, p), (at, high) in offsets.items() if at < high
            ]
            pending = {(tp.topic, tp.partition) for tp in short}
            probe.assign(short)
            deadline = time.monotonic() + 5
            while pending and time.monotonic() < deadline:
                for message in probe.consume(100, 0.1):
                    key, error = (message.topic() or "", message.partition() or 0), message.error()
                    if key in pending and (
                        error is None or error.code() == KafkaError._PARTITION_EOF
                    ):
                        offsets[key] = (message.offset() or 0, offsets[key][1])
                        pending.discard(key)
            probe.unassign()
            if pending:
                raise KafkaException(KafkaError._TIMED_OUT)
            return offsets
        except KafkaException:
            for client in (group, "bench-chaos-probe"):  # fresh clients after an outage
                self._consumers.pop(client).close()
            return None

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()


class _Run:
    """One chaos run: its deployments, producer thread, monitor and faults."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args, self.out = args, out
        self.bootstrap = f"127.0.0.1:{args.port}"
        labels = "AB" if args.two_deployments else "A"
        self.deployments = [_Deployment(self, label, args.workers) for label in labels]
        self.input = self.deployments[0].topics.name("raw")
        self.expected = Expected()
        self.produced: tuple[int, list[str]] = (0, ["the producer did not finish"])
        self.asked: dict[int, signal.Signals] = {}  # pid -> the signal sent to end it
        self.unexpected_exits: list[dict[str, Any]] = []
        self.stalls: list[dict[str, Any]] = []
        self.broker_up = True
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._reader = _OffsetReader(self.bootstrap)  # the main thread's, kept for speed

    def note(self, event: str, **fields: Any) -> dict[str, Any]:
        """Print ``event`` as a JSON line, stamped with the run's seconds; returns it."""
        line = {"t": round(time.monotonic() - self._t0, 1), "event": event, **fields}
        print(json.dumps(line, default=str), flush=True)
        return line

    def workers(self) -> Iterator[_Worker]:
        for deployment in self.deployments:
            yield from deployment.workers

    def broker(self, action: str) -> None:
        """Take the broker ``up`` or ``down``; raises when ``kafka.sh`` fails."""
        done = _kafka(action, self.args.port)
        self.note("broker_" + action, code=done.returncode)
        if done.returncode != 0:
            raise RuntimeError(f"kafka.sh {action} failed: {done.stderr[-2000:]}")

    def execute(self, faults: Sequence[Fault]) -> dict[str, Any]:
        """The run, blocking throughout; returns its summary.

        1. create the input, start the workers and wait until they are ready;
        2. start the monitor and the producer;
        3. apply each fault, then time the recovery from it;
        4. wait for the producer, then for the lag to drain;
        5. verify each deployment's outputs;
        6. (always) stop the monitor and the workers, delete the topics.
        """
        monitor = threading.Thread(target=self._watch, daemon=True)
        producer = threading.Thread(target=self._produce, daemon=True)
        recoveries = []
        try:
            # 1.
            create_topic(self.bootstrap, self.input)
            for deployment in self.deployments:
                for worker in deployment.workers[:-1]:
                    worker.start()
            for worker in self.workers():
                if worker.process is not None:
                    worker.process.wait_ready(timeout=120)
            # 2.
            monitor.start()
            producer.start()
            # 3.
            for fault in faults:
                time.sleep(fault.wait)
                recoveries.append(self._recover(self._apply(fault)))
            # 4.
            producer.join()
            drained = self._recover("drain")
            # 5. Transaction markers may reach the outputs just after the offsets commit.
            time.sleep(3)
            verified = {}
            for d in self.deployments:
                enriched = (v for _, v in _read(self.bootstrap, d.topics.name("enriched")) if v)
                letters = (v for _, v in _read(self.bootstrap, d.topics.name("dlq")) if v)
                states = _read(self.bootstrap, d.topics.name("state"))
                result = verify(self.expected, enriched, letters, states)
                verified[d.label] = asdict(result) | {"ok": result.ok}
        finally:
            # 6.
            self._stop.set()
            if monitor.is_alive():
                monitor.join(10)
            self._reader.close()
            for worker in filter(_Worker.alive, self.workers()):
                self._stop_worker(worker)
            if self.broker_up:  # else a failure left it down, and the topics stay
                delete_topics(self.bootstrap, [t for d in self.deployments for t in d.topics.all])
        count, errors = self.produced
        return {
            "plan": [asdict(f) for f in faults],
            "produced": count,
            "produce_errors": errors[:5],
            "recoveries": recoveries,
            "drained": drained,
            "verification": verified,
            "stalls": self.stalls,
            "unexpected_exits": self.unexpected_exits,
        }

    def _apply(self, fault: Fault) -> str:
        """Apply ``fault``, blocking for its duration; returns what it did."""
        victims = [self.deployments[d].workers[w] for d, w in fault.targets]
        label = " ".join([fault.kind, *(w.name for w in victims), f"{fault.seconds:.0f}s"])
        if fault.kind in ("kill", "kill2"):
            for worker in victims:
                worker.send(signal.SIGKILL)
            time.sleep(fault.seconds)
            for worker in victims:
                worker.wait()
                worker.start()
        elif fault.kind == "stop":
            victims[0].send(signal.SIGSTOP)
            time.sleep(fault.seconds)
            victims[0].send(signal.SIGCONT)
        elif fault.kind == "broker":
            self.broker_up = False
            self.broker("down")
            time.sleep(fault.seconds)
            self.broker("up")
            self.broker_up = True
            if self.args.py_spy:
                later = threading.Timer(12, self._dump, ["12 s after the broker returned"])
                later.daemon = True  # fires at most on the workers still running
                later.start()
        else:
            joiner = victims[0]
            joiner.start()
            time.sleep(fault.seconds)
            joiner.send(signal.SIGTERM)
            if joiner.wait(30) is None:
                self.unexpected_exits.append(self.note("no_exit_on_sigterm", worker=joiner.name))
                joiner.send(signal.SIGKILL)
                joiner.wait()
        return label

    def _recover(self, label: str) -> dict[str, Any]:
        """Time each deployment's ``Recovery`` from now, for up to ``_LIMIT`` seconds."""
        ended = time.monotonic()
        recoveries = {d.label: Recovery(ended, self.input, d.repartition) for d in self.deployments}
        pending = list(self.deployments)
        while pending and time.monotonic() - ended < _LIMIT:
            for d in list(pending):
                offsets = self._reader.read(d.topics.tag, [self.input, d.repartition])
                if offsets is not None and recoveries[d.label].update(time.monotonic(), offsets):
                    pending.remove(d)
            time.sleep(0.25)
        stages = {k: {"stage1_s": r.stage1, "stage2_s": r.stage2} for k, r in recoveries.items()}
        return self.note("recovered", fault=label, **stages)

    def _produce(self) -> None:
        """Produce the generated calls at ``--rate``, noting what each deployment must write."""
        args = self.args

        def paced() -> Iterator[tuple[bytes, bytes]]:
            started = time.monotonic()
            calls = generate_calls(args.calls, args.seed, groups=args.groups)
            for i, (key, value, kind) in enumerate(calls):
                self.expected.add(value, kind)
                time.sleep(max(started + i / args.rate - time.monotonic(), 0))
                yield key, value

        # Deliveries wait out the broker's absences; its complaints meanwhile are expected.
        producer = fast_producer(self.bootstrap, **{"message.timeout.ms": 900_000, "log_level": 0})
        self.produced = produce_all(producer, self.input, paced(), timeout=900)
        self.note("produced", delivered=self.produced[0], errors=self.produced[1][:5])

    def _watch(self) -> None:
        """The monitor: once a second, workers exiting unasked, and stalls."""
        reader = _OffsetReader(self.bootstrap)
        stalls = {d.label: Stalls() for d in self.deployments}
        seen: set[WorkerProcess] = set()
        while not self._stop.wait(1):
            for worker in self.workers():
                process = worker.process
                if process and process not in seen and process.process.poll() is not None:
                    seen.add(process)
                    self._exited(worker.name, process)
            for d in self.deployments:
                watch = stalls[d.label]
                topics = [self.input, d.repartition]
                offsets = reader.read(d.topics.tag, topics) if self.broker_up else None
                if offsets is None:
                    watch.restart()  # the broker's absence is a fault of its own, not a stall
                    continue
                stalled = watch.update(time.monotonic(), offsets)
                for tp in stalled:
                    at, high = offsets[tp]
                    where = {"topic": tp[0], "partition": tp[1], "offset": at, "high": high}
                    self.stalls.append(self.note("stall", deployment=d.label, **where))
                if stalled:
                    self._dump(f"stall in {d.label}")
        reader.close()

    def _exited(self, name: str, process: WorkerProcess) -> None:
        code = process.process.returncode
        asked = self.asked.get(process.process.pid)
        if asked == signal.SIGKILL or (asked == signal.SIGTERM and code == 0):
            self.note("worker_exited", worker=name, code=code)
            return
        tail = process.log_path.read_text(errors="replace")[-1500:]
        self.unexpected_exits.append(
            self.note("worker_exited_unasked", worker=name, code=code, log_tail=tail)
        )

    def _dump(self, why: str) -> None:
        """With ``--py-spy``, each live worker's stacks in a file of the run directory."""
        for worker in self.workers():
            if self.args.py_spy is None or worker.process is None or not worker.alive():
                continue
            command = [str(self.args.py_spy), "dump", "--pid", str(worker.process.process.pid)]
            done = subprocess.run(command, capture_output=True, timeout=60)
            path = self.out / f"py-spy-{worker.name}-{time.monotonic() - self._t0:.0f}.txt"
            path.write_bytes(done.stdout + done.stderr)
            self.note("py_spy", worker=worker.name, why=why, file=str(path))

    def _stop_worker(self, worker: _Worker) -> None:
        """SIGTERM, SIGKILL after 30 s; an exit code but 0 counts as an unasked exit."""
        assert worker.process is not None
        code = worker.process.stop()
        self.note("worker_stopped", worker=worker.name, code=code)
        if code != 0:
            self.unexpected_exits.append({"worker": worker.name, "code": code, "on": "SIGTERM"})


def _read(bootstrap: str, topic: str) -> Iterator[tuple[bytes | None, bytes | None]]:
    """Every committed record of ``topic`` as ``(key, value)``, to its end; blocks."""
    consumer = _consumer(bootstrap, f"bench-chaos-reader-{os.getpid()}", "read_committed")
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        ends = 0
        while ends < len(partitions):
            for message in consumer.consume(1000, 1.0):
                error = message.error()
                if error is None:
                    yield message.key(), message.value()
                elif error.code() == KafkaError._PARTITION_EOF:
                    ends += 1
                else:
                    raise RuntimeError(f"reading {topic}: {error.str()}")
    finally:
        consumer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seed", type=int, default=1, help="draws the calls and the faults")
    parser.add_argument("--calls", type=int, default=300_000)
    parser.add_argument("--rate", type=float, default=2500, help="calls a second")
    parser.add_argument("--groups", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="workers of each deployment")
    parser.add_argument("--dynamic", action="store_true", help="dynamic group membership")
    parser.add_argument("--two-deployments", action="store_true")
    parser.add_argument(
        "--plan",
        default="kill,stop,broker,join_leave",
        help="of kill, kill2, stop, broker, join_leave",
    )
    parser.add_argument("--gap", type=float, default=10.0, help="seconds between faults")
    parser.add_argument("--port", type=int, default=29092, help="the local broker's port")
    parser.add_argument("--name", default="", help="the run's name (default: seed and time)")
    parser.add_argument("--out", type=Path, help="its directory (default .cache/chaos/NAME)")
    parser.add_argument("--py-spy", type=Path, help="a py-spy binary: dump stacks on stalls")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="the checkout the workers run from (to compare)"
    )
    args = parser.parse_args(argv)
    if min(args.workers, args.rate, args.calls, args.groups) <= 0:
        parser.error("--workers, --rate, --calls and --groups must be positive")
    deployments = 2 if args.two_deployments else 1
    kinds = [kind for kind in args.plan.split(",") if kind]
    try:
        faults = draw_faults(kinds, args.seed, args.gap, deployments, args.workers)
    except ValueError as e:
        parser.error(str(e))
    name = args.name or f"s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = args.out or ROOT / ".cache" / "chaos" / name
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(args, out)
    ours = _kafka("status", args.port).returncode != 0
    try:
        if ours:
            run.broker("up")
        summary = run.execute(faults)
    finally:
        if ours:
            _kafka("down", args.port)
    verdicts = summary["verification"].values()
    ok = all(v["ok"] for v in verdicts) and not (
        summary["unexpected_exits"] or summary["produce_errors"]
    )
    summary = {"name": name, "ok": ok, **summary}
    print(json.dumps(summary, default=str))
    print(format_table(summary))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if ok:  # a failed run keeps the workers' stores to look into
        for worker in run.workers():
            shutil.rmtree(out / f"{worker.name}.state", ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
