"""Journal on the port's file system: append, recover, torn tail, damage, acks, folding."""

import json

import harness
from fakes import FakeClock
from evse_agent.journal import AGGREGATE, EVENT, SESSION, SUMMARY, Journal, encode_record


def _config(max_bytes=65536, reserve_bytes=8192, segment_bytes=2048):
    return {"max_bytes": max_bytes, "reserve_bytes": reserve_bytes, "segment_bytes": segment_bytes,
            "sync_interval_s": 30.0, "cursor_sync_s": 60.0}


def _aggregate(i):
    return json.dumps({"kind": "aggregate", "n": i, "power_total_w": {"min": 10900.5, "avg": 11000.0 + i,
                                                                     "max": 11100.0},
                       "start": "2026-11-18T11:06:%02d.000Z" % (i % 60), "station": "mpy-001"}).encode()


def _records(journal):
    return [[r.seq, r.type, json.loads(r.payload).get("n")] for r in journal.read_after(0, 1000)]


async def main():
    root = harness.workdir("journal")
    fs = harness.port_fs(root)
    clock = FakeClock()
    alarms = []
    journal = Journal(fs, _config(), clock, lambda name, active, values: alarms.append([name, active]))
    harness.emit("fresh", journal.recover().as_dict())
    for i in range(24):
        clock.advance(1000)
        if i % 8 == 3:
            journal.append(SESSION, json.dumps({"event": "end", "n": i, "energy_wh": 36 + i}).encode())
        elif i % 8 == 6:
            journal.append(EVENT, json.dumps({"type": "power_drop", "n": i}).encode())
        else:
            journal.append(AGGREGATE, _aggregate(i))
        await harness.checkpoint("append")
    harness.emit("appended", {"stats": journal.stats(), "records": _records(journal),
                              "publishable": journal.publishable_seq()})
    journal.sync()
    harness.emit("segments", sorted(fs.listdir()))
    journal.close()
    await harness.checkpoint("closed")

    # Power lost mid-write: half a frame at the end of the last segment.
    last = sorted(n for n in fs.listdir() if n.startswith("seg-"))[-1]
    size_before = len(fs.read(last))
    handle = fs.open_append(last)
    handle.write(encode_record(SESSION, 25, 1795000000000, b'{"event":"end","n":25}')[:21])
    handle.close()
    again = Journal(fs, _config(), clock)
    report = again.recover()
    harness.emit("torn", {"report": report.as_dict(), "cut_to_old_size": len(fs.read(last)) == size_before,
                          "records": len(_records(again))})
    again.close()
    await harness.checkpoint("torn")

    # A damaged record inside an older segment is skipped and reported, never accepted.
    first = sorted(n for n in fs.listdir() if n.startswith("seg-"))[0]
    data = bytearray(fs.read(first))
    data[40] ^= 0x55
    fs.write_atomic(first, bytes(data))
    # The console's journal verify: the core's check, in the words evse-journal uses.
    from evse_agent.journal_check import JournalCheck, report_lines
    check = JournalCheck()
    for name in sorted(n for n in fs.listdir() if n.startswith("seg-")):
        check.segment(name, fs.read(name))
    check.finish()
    harness.emit("verified", report_lines(check, 20, 80))
    del check
    damaged = Journal(fs, _config(), clock)
    report = damaged.recover()
    harness.emit("damaged", {"report": report.as_dict(), "records": _records(damaged)})
    seq = damaged.append(SESSION, b'{"event":"start","n":99}')
    harness.emit("next", [seq, damaged.next_seq])
    await harness.checkpoint("damaged")

    # Acknowledged segments go; the cursor survives a restart.
    damaged.acknowledge(12)
    damaged.save_cursor()
    damaged.close()
    after = Journal(fs, _config(), clock)
    report = after.recover()
    harness.emit("acked", {"report": report.as_dict(), "segments": len(after.segments),
                           "first_left": after.read_after(after.acked, 1)[0].seq})
    after.close()
    await harness.checkpoint("acked")

    # Near the bound the oldest aggregates fold into one summary; sessions are never dropped.
    small = harness.port_fs(harness.workdir("journal-small"))
    bounded = Journal(small, _config(max_bytes=6000, reserve_bytes=1000, segment_bytes=1024), clock,
                      lambda name, active, values: alarms.append([name, active]))
    bounded.recover()
    for i in range(60):
        clock.advance(10000)
        if i % 20 == 10:
            bounded.append(SESSION, json.dumps({"event": "end", "n": i}).encode())
        else:
            bounded.append(AGGREGATE, _aggregate(i))
        if i % 5 == 4:
            await harness.checkpoint("bounded")
    summaries = [json.loads(r.payload) for r in bounded.read_after(0, 1000) if r.type == SUMMARY]
    harness.emit("bounded", {"stats": bounded.stats(), "summaries": len(summaries),
                             "sessions": [json.loads(r.payload)["n"] for r in bounded.read_after(0, 1000)
                                          if r.type == SESSION],
                             "first_summary": summaries[0] if summaries else None})
    harness.emit("alarms", alarms)
    bounded.close()


if __name__ == "__main__":
    harness.run(main)
