"""A chat page that streams a simulated agent turn over SSE, with exact resume and a stop button.

One Starlette app on uvicorn, on the SQLite default: ``GET /`` is the page (inline HTML and
JavaScript, no build step); ``POST /sessions/{id}/turns`` starts a turn (through
``rt.turn``, like ``examples/agent_turn.py``); ``GET /sessions/{id}/events`` streams it
(SSE, resumed by the browser's ``Last-Event-ID``) and ``/sessions/{id}/ws`` is the same
over a WebSocket; ``POST /sessions/{id}/cancel`` is the stop button; ``POST
/sessions/{id}/drop`` ends the session's open streams as a network drop would, so the
browser's reconnect can be watched (and tested). Reload the page: it replays the session.

Who may use a session: the server, never the browser, creates session ids. ``GET /`` gives
the browser a signed cookie naming its user (HMAC-SHA256 with a server secret, HttpOnly,
SameSite=Strict) and redirects it to a new session that user owns; every endpoint checks
the cookie's signature and that its user owns the session in the path, and a WebSocket
must also come from this site's own page (its Origin). Here the owners are a dict and the
secret is made at start; a real service keeps the owner beside the session in its
database, takes the user from its login and the secret from its secret store.

SIGTERM and Ctrl-C stop it cleanly: streams get their final ``shutdown`` event, turns are
cancelled, the runtime drains and its report is printed.

    python examples/chat_app.py [--port 8000] [--url postgresql://...] [--token-delay 0.12]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import secrets
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import anyio.abc
import uvicorn
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute

import asyncstore

USER_COOKIE = "chat_user"
ANSWER_TEXT = (
    "Paris is sunny today with a light breeze from the west. The high is twenty two degrees "
    "and the evening stays mild, so a walk along the Seine after dinner sounds perfect."
)
ANSWER = ANSWER_TEXT.split(" ")


class CookieSigner:
    """``value.signature`` tokens: HMAC-SHA256 of the value under a server secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the cookie secret must be at least 32 bytes")
        self._secret = secret

    def _mac(self, value: str) -> str:
        digest = hmac.new(self._secret, value.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, value: str) -> str:
        return f"{value}.{self._mac(value)}"

    def verify(self, token: str | None) -> str | None:
        """The signed value, or None for a missing, malformed or forged token."""
        if not token:
            return None
        value, _, mac = token.rpartition(".")
        # compare_digest: the time taken does not tell how much of a forgery was right.
        if not value or not hmac.compare_digest(mac, self._mac(value)):
            return None
        return value


class ChatApp:
    """The demo service: the runtime, the stream endpoints, and the turns it runs."""

    def __init__(self, url: str, *, token_delay_s: float, secret: bytes | None = None) -> None:
        self.url = url
        self.token_delay_s = token_delay_s
        self.rt: asyncstore.Runtime | None = None
        self.running: set[str] = set()
        self.signer = CookieSigner(secret or secrets.token_bytes(32))
        self.owners: dict[str, str] = {}  # session id -> user id: your sessions table
        self._tg: anyio.abc.TaskGroup | None = None
        self.streams = asyncstore.EventStreams(
            self._subscribe,
            authorize=self._authorize,
            cancel=self._cancel,
            config=asyncstore.EndpointConfig(retry_ms=500),
        )
        self.app = Starlette(
            routes=[
                Route("/", self.page),
                Route("/sessions/{session_id}/events", self.streams.sse),
                WebSocketRoute("/sessions/{session_id}/ws", self.streams.websocket),
                Route("/sessions/{session_id}/turns", self.start_turn, methods=["POST"]),
                Route("/sessions/{session_id}/cancel", self.cancel, methods=["POST"]),
                Route("/sessions/{session_id}/drop", self.drop, methods=["POST"]),
                Route("/metrics", self.metrics),
            ],
            lifespan=self.lifespan,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        settings = asyncstore.load_settings(
            storage={"url": self.url}, migrate_on_start=True, runtime={"shutdown_grace_s": 1.0}
        )
        async with asyncstore.open_runtime(settings) as rt, anyio.create_task_group() as tg:
            self.rt, self._tg = rt, tg
            rt.metrics.add_source("endpoints", self.streams)  # asyncstore_endpoint_*
            print(f"chat app on {rt.storage.dialect}: {self.url}", flush=True)
            try:
                yield
            finally:
                self._tg = None
                tg.cancel_scope.cancel()  # running turns end with a "cancelled" event
        print(f"chat app stopped: {rt.report}", flush=True)

    def _runtime(self) -> asyncstore.Runtime:
        if self.rt is None:
            raise asyncstore.RuntimeClosed("the app is not running")
        return self.rt

    def _subscribe(self, session_id: str, after: tuple[int, int] | None) -> asyncstore.Subscription:
        return self._runtime().subscribe(session_id, after)

    async def _cancel(self, session_id: str, reason: str) -> None:
        await self._runtime().request_cancel(session_id, reason)

    def _user(self, conn: HTTPConnection) -> str | None:
        return self.signer.verify(conn.cookies.get(USER_COOKIE))

    def _authorize(self, conn: HTTPConnection, session_id: str) -> bool:
        """May this request use this session: a valid signed cookie whose user owns it."""
        user = self._user(conn)
        if user is None or self.owners.get(session_id) != user:
            return False
        if conn.scope["type"] == "websocket":
            # Browsers send cookies with cross-site WebSocket handshakes that SameSite does
            # not cover everywhere: accept only this site's own page as the origin.
            scheme = "https" if conn.url.scheme == "wss" else "http"
            origin = conn.headers.get("origin")
            if origin is not None and origin != f"{scheme}://{conn.headers.get('host')}":
                return False
        return True

    async def metrics(self, request: Request) -> Response:
        """Prometheus exposition of the runtime, the stream endpoints included."""
        body, content_type = self._runtime().metrics.render(request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": content_type})

    async def page(self, request: Request) -> Response:
        """The page of a session the caller owns; anyone else gets a new session of their own."""
        user = self._user(request)
        session_id = request.query_params.get("session")
        if user is not None and session_id is not None and self.owners.get(session_id) == user:
            return HTMLResponse(PAGE)
        if user is None:
            user = secrets.token_urlsafe(16)  # a real service: the logged-in user's id
        session_id = "chat-" + secrets.token_urlsafe(12)
        self.owners[session_id] = user
        response = RedirectResponse(f"/?session={session_id}", status_code=303)
        # HttpOnly: page scripts cannot read it; SameSite=Strict: no cross-site request
        # (a form post from another site) carries it. Add secure=True behind HTTPS.
        response.set_cookie(
            USER_COOKIE, self.signer.sign(user), httponly=True, samesite="strict", path="/"
        )
        return response

    async def start_turn(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        if not self._authorize(request, session_id):
            return JSONResponse({"error": "forbidden"}, status_code=403)
        body = await request.json()
        prompt = str(body.get("prompt", "")).strip()[:500] if isinstance(body, dict) else ""
        if not prompt:
            return JSONResponse({"error": "empty prompt"}, status_code=400)
        if session_id in self.running:
            return JSONResponse({"error": "a turn is running"}, status_code=409)
        if self._tg is None:
            return JSONResponse({"error": "shutting down"}, status_code=503)
        self.running.add(session_id)
        self._tg.start_soon(self._turn, session_id, prompt)
        return JSONResponse({"started": True}, status_code=202)

    async def _turn(self, session_id: str, prompt: str) -> None:
        try:
            async with self._runtime().turn(session_id) as turn:
                # The chat history, written under the turn's session lease (fenced).
                await turn.append_messages([asyncstore.NewMessage("user", {"text": prompt})])
                await turn.emit("user", {"text": prompt})
                await turn.emit("tool_call", {"tool": "weather", "args": {"city": "Paris"}})
                await anyio.sleep(self.token_delay_s * 3)
                result = {"sky": "sunny", "c": 22}
                await turn.emit("tool_result", {"tool": "weather", "result": result})
                text = ""
                for i, word in enumerate(ANSWER):
                    token = word if i == 0 else " " + word
                    text += token
                    await turn.emit("delta", {"text": token, "i": i})
                    await anyio.sleep(self.token_delay_s)
                await turn.append_messages([asyncstore.NewMessage("assistant", {"text": text})])
                await turn.emit("turn_completed", {"text": text, "tokens": len(ANSWER)})
        finally:
            self.running.discard(session_id)

    async def cancel(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        if not self._authorize(request, session_id):
            return JSONResponse({"error": "forbidden"}, status_code=403)
        await self._cancel(session_id, "user pressed stop")
        return JSONResponse({"cancel_requested": True})

    async def drop(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        if not self._authorize(request, session_id):
            return JSONResponse({"error": "forbidden"}, status_code=403)
        return JSONResponse({"dropped": self.streams.drop(session_id)})


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>asyncstore chat</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px/1.45 system-ui,sans-serif;max-width:760px;margin:24px auto;padding:0 16px;
      color:#1d2330;background:#f6f7f9}
 h1{font-size:20px;margin:0 0 4px} .sub{color:#667;margin:0 0 16px;font-size:13px}
 #log{background:#fff;border:1px solid #dde;border-radius:10px;padding:12px;min-height:220px}
 .msg{margin:8px 0;padding:8px 12px;border-radius:8px;white-space:pre-wrap}
 .user{background:#e8f0ff;margin-left:20%} .agent{background:#f1f3f5;margin-right:10%}
 .tool{font:12px ui-monospace,monospace;color:#5a4;margin:4px 0}
 .note{font-size:12px;color:#a60;margin:4px 0}
 .done{border-left:3px solid #3a3} .stopped{border-left:3px solid #c33}
 form{display:flex;gap:8px;margin-top:12px} input{flex:1;padding:8px;font-size:15px}
 button{padding:8px 14px;font-size:15px} #status{font-size:12px;color:#667;margin-top:8px}
</style></head><body>
<h1>asyncstore chat</h1>
<p class="sub">A simulated agent turn streamed over Server-Sent Events. Reload the page or drop
the connection: the stream resumes exactly where it left off.</p>
<div id="log"></div>
<form id="form"><input id="prompt" placeholder="Ask about the weather" autocomplete="off">
<button id="send" type="submit">Send</button><button id="stop" type="button">Stop</button>
<button id="drop" type="button" title="end the stream as a network drop would">Drop</button>
</form>
<div id="status">connecting…</div>
<script>
// The server made this session for this browser (its cookie proves the user) and put its
// id in the address; the page never invents one.
const session = new URLSearchParams(location.search).get("session");
const base = "/sessions/" + encodeURIComponent(session);
const log = document.getElementById("log");
const state = {session, seqs: [], tokens: [], connects: 0, completed: 0, cancelled: 0,
               resets: 0, status: "connecting"};
window.chatState = state;
let bubble = null;
function status(text) { state.status = text; document.getElementById("status").textContent =
  text + " · session " + session + " · connections " + state.connects; }
function add(cls, text) {
  const div = document.createElement("div"); div.className = cls; div.textContent = text;
  log.appendChild(div); return div;
}
function agentBubble() { if (!bubble) bubble = add("msg agent", ""); return bubble; }
function render(ev) {
  state.seqs.push(ev.seq);
  const p = ev.payload || {};
  if (ev.kind === "user") { bubble = null; add("msg user", p.text); }
  else if (ev.kind === "delta") { state.tokens.push(p.i); agentBubble().textContent += p.text; }
  else if (ev.kind === "tool_call") add("tool", "→ " + p.tool + " " + JSON.stringify(p.args));
  else if (ev.kind === "tool_result") add("tool", "← " + JSON.stringify(p.result));
  else if (ev.kind === "turn_completed") { state.completed++; agentBubble().classList.add("done");
    bubble = null; }
  else if (ev.kind === "cancelled") { state.cancelled++;
    agentBubble().classList.add("stopped"); add("note", "stopped: " + p.reason); bubble = null; }
  else add("note", ev.kind + " " + JSON.stringify(p));
}
let source = null;
function connect(from) {
  if (source) source.close();
  // The query parameter is only the first resume point: on a reconnect the browser sends
  // Last-Event-ID, which the server prefers.
  source = new EventSource(base + "/events?last_event_id=" + from);
  source.addEventListener("ready", () => { state.connects++; status("live"); });
  source.onmessage = (e) => render(JSON.parse(e.data));
  source.addEventListener("reset", (e) => {
    const r = JSON.parse(e.data); state.resets++;
    add("note", "stream reset (" + r.reason + "): reloading");
    log.textContent = ""; bubble = null; state.seqs = []; state.tokens = [];
    connect("0:0");
  });
  source.addEventListener("shutdown", () => status("server restarting, reconnecting…"));
  source.addEventListener("lagged", () => status("too slow, resuming…"));
  source.onerror = () => status("reconnecting…");
}
connect("0:0");
async function post(path, body) {
  const r = await fetch(base + path, {method: "POST", headers: {"content-type":
    "application/json"}, body: JSON.stringify(body || {})});
  if (!r.ok) add("note", path + ": " + r.status + " " + (await r.text()));
}
document.getElementById("form").onsubmit = (e) => {
  e.preventDefault(); const input = document.getElementById("prompt");
  const prompt = input.value.trim() || "What is the weather in Paris?"; input.value = "";
  post("/turns", {prompt});
};
document.getElementById("stop").onclick = () => post("/cancel");
document.getElementById("drop").onclick = () => post("/drop");
</script></body></html>
"""


def serve(url: str, host: str, port: int, token_delay_s: float) -> None:
    chat = ChatApp(url, token_delay_s=token_delay_s)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # from here connections queue until the app serves them
    bound = sock.getsockname()[1]
    print(f"open http://{host}:{bound}/", flush=True)
    config = uvicorn.Config(chat.app, log_level="warning", lifespan="on")
    server = asyncstore.StreamingServer(config, chat.streams, grace_s=5.0)
    server.run(sockets=[sock])
    if server.exit_signal is not None:
        print(f"stopped by {signal.Signals(server.exit_signal).name}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--url", help="postgresql://... (default: a SQLite file in a temp dir)")
    parser.add_argument("--token-delay", type=float, default=0.12, help="seconds per token")
    args = parser.parse_args(argv)
    # StreamingServer handles SIGTERM and SIGINT itself and returns once drained.
    if args.url is not None:
        serve(args.url, args.host, args.port, args.token_delay)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        serve(f"sqlite:///{Path(tmp) / 'chat.db'}", args.host, args.port, args.token_delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
