"""A real HTTP server on 127.0.0.1 speaking OpenAI's chat-completions protocol, with scripted faults.

The judged answer's text scripts the reply: [[429x2]] answers 429 twice first, [[500]] 500 once, [[slow]]
sleeps past the client's timeout once, [[garbage]] never gives a rating, [[garbage-once]] only the first time,
[[down]] always 503, [[401]] rejects the key; `score=N` asks for Rating: N; otherwise N = len(answer) % 10 + 1.
A server can also misbehave on every request: `models` (a judge model name outside it gets vLLM's 404, as a
mistyped name does), `fault="no-choices"` (200 with JSON but no `choices`), `fault="truncated-json"` (200 with a JSON
body cut short) or `fault="not-json"` (200 with an HTML page, as a proxy or a wrong URL gives)."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    def __init__(
        self,
        delay: float = 0.0,
        slow_seconds: float = 3.0,
        models: tuple[str, ...] | None = None,
        fault: str | None = None,
    ):
        self.attempts: Counter = Counter()  # answer -> requests seen
        self.authorization: list[str] = []
        self.delay, self.slow_seconds = delay, slow_seconds
        self.models, self.fault = models, fault
        self.requests = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:  # noqa: N802
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                first_user = next(m["content"] for m in request["messages"] if m["role"] == "user")
                answer = first_user.split("[Assistant's answer]\n", 1)[1].rsplit("\n\nReply with", 1)[0]
                with server.lock:
                    server.requests += 1
                    server.attempts[answer] += 1
                    attempt = server.attempts[answer]
                    server.authorization.append(self.headers.get("Authorization", ""))
                time.sleep(server.delay)
                reminded = len(request["messages"]) > 2
                if server.models is not None and request["model"] not in server.models:
                    message = f"The model `{request['model']}` does not exist."
                    return self._send(
                        404, {"object": "error", "message": message, "type": "NotFoundError", "code": 404}
                    )
                if server.fault == "no-choices":
                    return self._send(200, {"id": "x", "object": "chat.completion", "model": request["model"]})
                if server.fault == "truncated-json":  # status 200, a JSON body cut short (a proxy, a crash)
                    body = json.dumps({"id": "x", "object": "chat.completion", "choices": [{"index": 0}]}).encode()
                    body = body[:37]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    return self.wfile.write(body)
                if server.fault == "not-json":
                    page = b"<html><body>Welcome to nginx!</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    return self.wfile.write(page)
                if "[[401]]" in answer:
                    return self._send(401, {"error": {"message": "invalid api key"}})
                if "[[down]]" in answer:
                    return self._send(503, {"error": {"message": "overloaded"}})
                if (m := re.search(r"\[\[429x(\d)\]\]", answer)) and attempt <= int(m.group(1)):
                    return self._send(429, {"error": {"message": "rate limited"}})
                if "[[500]]" in answer and attempt == 1:
                    return self._send(500, {"error": {"message": "boom"}})
                if "[[slow]]" in answer and attempt == 1:
                    time.sleep(server.slow_seconds)
                if "[[garbage]]" in answer or ("[[garbage-once]]" in answer and not reminded):
                    content = "I think this answer is quite good overall."
                else:
                    m = re.search(r"score=(\d+)", answer)
                    content = f"Rating: {m.group(1) if m else len(answer) % 10 + 1}"
                self._send(
                    200,
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": request["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                        ],
                        "usage": {"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53},
                    },
                )

        return Handler


if __name__ == "__main__":  # a standalone server for subprocess tests: prints its base URL, serves until killed
    # argv: [delay] [fault or models=a,b]
    extra = sys.argv[2] if len(sys.argv) > 2 else ""
    served = tuple(extra.removeprefix("models=").split(",")) if extra.startswith("models=") else None
    fault = extra if extra and served is None else None
    with JudgeServer(delay=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0, models=served, fault=fault) as srv:
        print(srv.base_url, flush=True)
        while True:
            time.sleep(1)
