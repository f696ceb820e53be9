"""The endpoints' configuration and statistics (``EndpointConfig``, ``EndpointStatistics``).

What an operator sets for the SSE and WebSocket endpoints of ``orchestrator.asgi`` (where
streams start, heartbeat and send timeouts, which delivery path each transport takes) and
the counters they report, with their metric families. Pure data: pydantic and the metrics
families, nothing from Starlette.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from asyncstore.storage.families import Family, MetricSink

__all__ = ["EndpointConfig", "EndpointStatistics"]


class EndpointConfig(BaseModel):
    """How the endpoints stream; pass one to :class:`EventStreams`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    session_param: str = Field(default="session_id", description="path parameter of the id")
    resume_query_param: str = Field(
        default="last_event_id",
        description="query parameter for clients that cannot set Last-Event-ID",
    )
    start: Literal["beginning", "live"] = Field(
        default="beginning",
        description="where a client without a resume point starts: all stored events or now",
    )
    heartbeat_interval_s: float = Field(default=15.0, gt=0, le=15.0)
    retry_ms: int = Field(default=2000, ge=0, description="the SSE reconnect delay hint")
    send_timeout_s: float = Field(
        default=30.0, gt=0, description="a client that takes longer to accept a frame is dropped"
    )
    first_message_timeout_s: float = Field(
        default=10.0, gt=0, description="WebSocket: wait this long for the subscribe message"
    )
    cancel_on_disconnect: bool = Field(
        default=False, description="a client leaving cancels the session's turn"
    )
    ws_send: Literal["fanout", "fanout_starlette", "batched", "per_frame"] = Field(
        default="fanout",
        description="WebSocket delivery: fanout writes each event from the publisher's task "
        "straight to every connection that is idle at the live head (no task wake-up per "
        "subscriber; a busy or slow connection's own task takes over, under the send "
        "timeout and the lag policy), on the ASGI send beneath Starlette's WebSocket "
        "wrapper, with one message per event shared by the session's subscribers; "
        "fanout_starlette is the same fan-out sending through Starlette's "
        "WebSocket.send (its earlier form); batched wakes each connection's task, which sends the "
        "events that are ready together (one timeout and lock per batch, frames encoded "
        "once per session and shared by its subscribers); per_frame is the legacy path "
        "(each frame encoded, timed and locked on its own)",
    )
    sse_send: Literal["fanout", "per_connection"] = Field(
        default="fanout",
        description="SSE delivery: fanout is the WebSocket fan-out's design (the publisher's "
        "task writes each event to every idle stream at the live head; a busy or slow one's "
        "own task takes over, under the send timeout and the lag policy) and coalesces the "
        "events that are ready into one body write; per_connection is the legacy path (each "
        "stream's task is woken per event and writes each frame under its own timeout)",
    )


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    open_sse: int
    open_websockets: int
    accepted: int
    resumed: int
    refused: int  # not authorized, malformed resume point, or closing
    events_sent: int
    events_pushed: int  # of events_sent: written by the publisher's task (ws_send="fanout")
    resets_sent: int
    heartbeats: int
    ended_by_client: int
    disconnected_mid_send: int  # of ended_by_client: the client vanished while being sent to
    ended_lagged: int
    ended_stalled: int  # a send took over send_timeout_s
    ended_shutdown: int
    shutdown_forced: int  # of ended_shutdown: still open when wait_closed's grace ran out
    ended_dropped: int  # drop()
    cancels_requested: int

    METRIC_FAMILIES: ClassVar[tuple[Family, ...]] = (
        Family(
            "endpoint_open_streams",
            "gauge",
            "Open SSE and WebSocket streams, by transport.",
            ("transport",),
            known=("sse", "websocket"),
        ),
        Family("endpoint_streams_accepted", "counter", "Streams accepted (SSE and WebSocket)."),
        Family("endpoint_streams_resumed", "counter", "Accepted streams that resumed from an id."),
        Family(
            "endpoint_streams_refused",
            "counter",
            "Streams refused: not authorized, malformed resume point, or shutting down.",
        ),
        Family(
            "endpoint_streams_ended",
            "counter",
            "Streams ended, by reason: client (left), lagged (too slow for the hub), stalled "
            "(a send outlasted send_timeout_s), shutdown, dropped (drop()).",
            ("reason",),
            known=("client", "lagged", "stalled", "shutdown", "dropped"),
        ),
        Family(
            "endpoint_disconnects_mid_send",
            "counter",
            "Of the streams ended by the client: those that vanished while being sent to.",
        ),
        Family(
            "endpoint_shutdown_forced",
            "counter",
            "Streams still open when the shutdown grace ran out, cut without a final message.",
        ),
        Family("endpoint_events_sent", "counter", "Stream events sent to clients."),
        Family(
            "endpoint_events_pushed",
            "counter",
            "Of the events sent: those the publishing task wrote straight to an idle "
            "WebSocket (fan-out), with no task woken for the subscriber.",
        ),
        Family("endpoint_resets_sent", "counter", "Resets sent to clients."),
        Family("endpoint_heartbeats", "counter", "Heartbeats sent to idle streams."),
        Family("endpoint_cancels_requested", "counter", "Cancels requested through the endpoints."),
    )

    def export(self, out: MetricSink) -> None:
        open_ = {"sse": self.open_sse, "websocket": self.open_websockets}
        out.samples("endpoint_open_streams", {}, open_)
        out.sample("endpoint_streams_accepted", {}, self.accepted)
        out.sample("endpoint_streams_resumed", {}, self.resumed)
        out.sample("endpoint_streams_refused", {}, self.refused)
        ended = {
            "client": self.ended_by_client,
            "lagged": self.ended_lagged,
            "stalled": self.ended_stalled,
            "shutdown": self.ended_shutdown,
            "dropped": self.ended_dropped,
        }
        out.samples("endpoint_streams_ended", {}, ended)
        out.sample("endpoint_disconnects_mid_send", {}, self.disconnected_mid_send)
        out.sample("endpoint_shutdown_forced", {}, self.shutdown_forced)
        out.sample("endpoint_events_sent", {}, self.events_sent)
        out.sample("endpoint_events_pushed", {}, self.events_pushed)
        out.sample("endpoint_resets_sent", {}, self.resets_sent)
        out.sample("endpoint_heartbeats", {}, self.heartbeats)
        out.sample("endpoint_cancels_requested", {}, self.cancels_requested)
