"""``decode_stream_notes(payload, skip)``: advances the receiver has no use for are left
out with their inline events, and the others decode exactly as without ``skip``."""

from __future__ import annotations

from asyncstore.orchestrator.broadcast import (
    NoteSegment,
    decode_stream_notes,
    encode_stream_notes,
)


def test_skipped_advances_are_left_out_with_their_events() -> None:
    payload = encode_stream_notes(
        [
            NoteSegment("a", 1, 1, 2, 0, [("k", b"1"), ("k", b"2")]),
            NoteSegment("b", 1, 5, 5, 0, [("k", b"3")]),
            NoteSegment("c", 2, 7, 9),  # an advance alone
        ]
    )[0]
    full = decode_stream_notes(payload)
    seen: list[tuple[str, int, int, int]] = []

    def skip_a(session_id: str, epoch: int, first: int, last: int) -> bool:
        seen.append((session_id, epoch, first, last))
        return session_id == "a"

    assert decode_stream_notes(payload, skip_a) == full[1:]
    assert seen == [("a", 1, 1, 2), ("b", 1, 5, 5), ("c", 2, 7, 9)]
    assert decode_stream_notes(payload, lambda *advance: advance[0] == "b") == [full[0], full[2]]
    assert decode_stream_notes(payload, lambda *advance: True) == []
    assert full[1].events is not None and [e.payload for e in full[1].events] == [3]
