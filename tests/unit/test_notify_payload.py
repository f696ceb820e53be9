"""The stream notification format: advances with the stored events inline when they fit,
packed in bytes (not characters) under the notification budget, readable by old receivers
(advances only) and reading their payloads; malformed input is skipped, never raised."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncstore.orchestrator.broadcast import (
    MAX_NOTIFY_BYTES,
    NoteSegment,
    StreamNote,
    decode_advance,
    decode_stream_notes,
    encode_advances,
    encode_stream_notes,
)
from asyncstore.storage import StreamEvent

STAMP = 1_780_000_000_123_456  # microseconds since the Unix epoch
WHEN = datetime.fromtimestamp(STAMP // 1_000_000, UTC).replace(microsecond=STAMP % 1_000_000)


def segment(session_id: str, epoch: int, first: int, payloads: list[object]) -> NoteSegment:
    events = [("delta", orjson.dumps(p)) for p in payloads]
    return NoteSegment(session_id, epoch, first, first + len(events) - 1, STAMP, events)


def decode_all(payloads: list[str]) -> list[StreamNote]:
    return [note for p in payloads for note in decode_stream_notes(p)]


def carried(notes: list[StreamNote]) -> list[StreamEvent]:
    return [e for n in notes if n.events is not None for e in n.events]


def nbytes(payload: str) -> int:
    return len(payload.encode("utf-8"))


def test_events_round_trip_as_the_stream_events_a_read_would_return() -> None:
    segs = [segment("s1", 3, 5, [{"text": "a"}, [1, 2], None]), segment("s2", 1, 1, ["x"])]
    payloads = encode_stream_notes(segs)
    assert len(payloads) == 1
    notes = decode_stream_notes(payloads[0])
    assert [(n.session_id, n.epoch, n.first, n.last) for n in notes] == [
        ("s1", 3, 5, 7),
        ("s2", 1, 1, 1),
    ]
    assert carried(notes) == [
        StreamEvent("s1", 3, 5, "delta", {"text": "a"}, WHEN),
        StreamEvent("s1", 3, 6, "delta", [1, 2], WHEN),
        StreamEvent("s1", 3, 7, "delta", None, WHEN),
        StreamEvent("s2", 1, 1, "delta", "x", WHEN),
    ]
    assert carried(notes)[0].created_at.tzinfo is not None


def test_the_limit_is_in_utf8_bytes_for_multibyte_text() -> None:
    # 3-byte characters: 60 events of ~600 bytes each would fit 7800 by characters (about
    # 200 each) but need several payloads by bytes.
    text = "日本語のテキスト" * 25  # 200 characters, 600 bytes
    payloads = encode_stream_notes([segment("s1", 1, 1, [text] * 60)])
    assert all(nbytes(p) <= MAX_NOTIFY_BYTES for p in payloads)
    assert len(payloads) == 5  # 60 x ~611 bytes = ~36.7 kB: as few payloads as fit
    events = carried(decode_all(payloads))
    assert [e.seq for e in events] == list(range(1, 61))
    assert all(e.payload == text for e in events)


@pytest.mark.parametrize("limit", [300, 1000, MAX_NOTIFY_BYTES])
def test_a_run_split_across_payloads_is_announced_part_by_part(limit: int) -> None:
    segs = [
        segment("a", 2, 10, [{"i": i, "t": "é" * (i % 7)} for i in range(150)]),
        segment("b", 2, 1, [{"i": i} for i in range(40)]),
    ]
    payloads = encode_stream_notes(segs, limit)
    assert all(nbytes(p) <= limit for p in payloads)
    if limit == MAX_NOTIFY_BYTES:
        assert len(payloads) == 1
    for payload in payloads:  # each payload stands alone: every advance has its events
        for note in decode_stream_notes(payload):
            assert note.events is not None
            assert [e.seq for e in note.events] == list(range(note.first, note.last + 1))
    notes = decode_all(payloads)
    a = [e for e in carried(notes) if e.session_id == "a"]
    assert [e.seq for e in a] == list(range(10, 160))
    assert [e.payload["i"] for e in a] == list(range(150))
    # Payloads are filled before a new one starts: none but the last could have taken
    # the next payload's first announcement.
    sizes = [nbytes(p) for p in payloads]
    assert all(size > limit // 2 for size in sizes[:-1])


def test_an_event_too_big_to_carry_is_announced_by_its_advance_alone() -> None:
    big = "x" * MAX_NOTIFY_BYTES
    segs = [segment("s1", 1, 1, ["small", big, big, "after"]), segment("s2", 1, 1, ["other"])]
    payloads = encode_stream_notes(segs)
    assert len(payloads) == 1 and nbytes(payloads[0]) < 1000
    notes = decode_stream_notes(payloads[0])
    assert [(n.session_id, n.first, n.last, n.events is None) for n in notes] == [
        ("s1", 1, 1, False),
        ("s1", 2, 3, True),  # the receiver fetches these two
        ("s1", 4, 4, False),
        ("s2", 1, 1, False),
    ]


def test_advances_only_keep_the_old_format_byte_for_byte() -> None:
    assert encode_advances([("s1", 1, 2, 3), ("s2", 4, 5, 6)]) == ['[["s1",1,2,3],["s2",4,5,6]]']
    many = [(f"session-{i:05d}", 9, i, i + 3) for i in range(1000)]
    payloads = encode_advances(many)
    assert len(payloads) > 1 and all(nbytes(p) <= MAX_NOTIFY_BYTES for p in payloads)
    assert [a for p in payloads for a in decode_advance(p)] == many


def test_old_payloads_decode_as_advances_to_fetch() -> None:
    notes = decode_stream_notes('[["s1",3,1,20],["s2",1,4,4]]')
    assert notes == [StreamNote("s1", 3, 1, 20), StreamNote("s2", 1, 4, 4)]


def test_old_receivers_see_every_advance_of_a_new_payload() -> None:
    # An old receiver keeps the entries that are [str, int, int, int] and skips the rest,
    # so it fetches every announced range as before.
    segs = [segment("s1", 1, 1, ["a", "b"]), NoteSegment("s2", 2, 5, 9)]
    payload = encode_stream_notes(segs)[0]
    old_view = [
        tuple(e)
        for e in orjson.loads(payload)
        if isinstance(e, list) and len(e) == 4 and isinstance(e[0], str)
    ]
    assert old_view == [("s1", 1, 1, 2), ("s2", 2, 5, 9)]
    assert all(isinstance(e, list | dict) for e in orjson.loads(payload))
    assert decode_advance(payload) == [("s1", 1, 1, 2), ("s2", 2, 5, 9)]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("not json", []),
        ('{"s1": 1}', []),
        ("[]", []),
        ('[["s1",1,2],["s1","1",2,3],[1,1,2,3],["s1",true,1,1],"x",null]', []),
        # A body without an advance before it is ignored.
        ('[{"t":0,"e":[["k",1]]},["s1",1,1,1]]', [StreamNote("s1", 1, 1, 1)]),
        # A body that does not hold exactly the advance's events leaves the advance alone.
        ('[["s1",1,1,2],{"t":0,"e":[["k",1]]}]', [StreamNote("s1", 1, 1, 2)]),
        ('[["s1",1,1,1],{"t":"0","e":[["k",1]]}]', [StreamNote("s1", 1, 1, 1)]),
        ('[["s1",1,1,1],{"t":0,"e":[[1,1]]}]', [StreamNote("s1", 1, 1, 1)]),
        ('[["s1",1,1,1],{"t":0,"e":[["k"]]}]', [StreamNote("s1", 1, 1, 1)]),
        ('[["s1",1,1,1],{"t":99999999999999999999,"e":[["k",1]]}]', [StreamNote("s1", 1, 1, 1)]),
        # A malformed entry between an advance and a body detaches the body.
        ('[["s1",1,1,1],7,{"t":0,"e":[["k",1]]}]', [StreamNote("s1", 1, 1, 1)]),
    ],
)
def test_malformed_entries_are_skipped(payload: str, expected: list[StreamNote]) -> None:
    assert decode_stream_notes(payload) == expected


def test_a_body_must_match_its_advance_to_be_encoded() -> None:
    with pytest.raises(ValueError, match="carries 1 events"):
        encode_stream_notes([NoteSegment("s1", 1, 1, 2, STAMP, [("k", b"1")])])


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    runs=st.lists(
        st.tuples(
            st.text(min_size=1, max_size=12),
            st.integers(1, 2**40),
            st.integers(1, 2**40),
            st.lists(st.tuples(st.text(min_size=1, max_size=10), _json_values), max_size=30),
        ),
        max_size=6,
    ),
    limit=st.integers(200, MAX_NOTIFY_BYTES),
)
def test_every_event_is_carried_or_announced_once_within_the_byte_limit(
    runs: list[tuple[str, int, int, list[tuple[str, object]]]], limit: int
) -> None:
    segs = [
        NoteSegment(
            sid,
            epoch,
            first,
            first + len(events) - 1,
            STAMP,
            [(kind, orjson.dumps(value)) for kind, value in events],
        )
        for sid, epoch, first, events in runs
        if events
    ]
    payloads = encode_stream_notes(segs, limit)
    assert all(nbytes(p) <= limit for p in payloads)
    notes = decode_all(payloads)
    # Per segment, the announced ranges tile first..last in order; carried events are exact.
    cursor = 0
    for seg, (_, _, _, events) in zip(segs, [r for r in runs if r[3]], strict=True):
        seq = seg.first
        while seq <= seg.last:
            note = notes[cursor]
            cursor += 1
            assert (note.session_id, note.epoch, note.first) == (seg.session_id, seg.epoch, seq)
            if note.events is not None:
                assert [(e.seq, e.kind, e.payload) for e in note.events] == [
                    (s, *events[s - seg.first]) for s in range(note.first, note.last + 1)
                ]
            seq = note.last + 1
        assert seq == seg.last + 1
    assert cursor == len(notes)
