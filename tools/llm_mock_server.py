"""An OpenAI-compatible chat-completions endpoint for timing the pipeline against an LLM
that is slow or rate-limited (docs/PERFORMANCE.md, "LLM calls in flight").

    python3 tools/llm_mock_server.py PORT LATENCY [RATE]

Answers every POST after LATENCY seconds with a concept no other call got. With RATE > 0 it
admits at most RATE requests a second (a token bucket of RATE) and answers the others 429 with
Retry-After: 1, as a rate-limited account sees. GET returns its counts: answered, refused
(429) and the most requests in flight at once.
"""
import json, sys, time, threading, itertools
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
L = float(sys.argv[2]); R = float(sys.argv[3]) if len(sys.argv) > 3 else 0
counter = itertools.count(); stats = {"ok": 0, "429": 0, "inflight": 0, "max_inflight": 0}
lock = threading.Lock(); bucket = [R, time.time()]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def reply(self, code, out, extra=()):
        self.send_response(code); self.send_header("content-type", "application/json")
        for k, v in extra: self.send_header(k, v)
        self.send_header("content-length", str(len(out))); self.end_headers(); self.wfile.write(out)
    def do_POST(self):
        n = int(self.headers.get("content-length", 0)); self.rfile.read(n)
        with lock:
            if R > 0:
                now = time.time(); bucket[0] = min(R, bucket[0] + (now - bucket[1]) * R); bucket[1] = now
                if bucket[0] < 1:
                    stats["429"] += 1
                    return self.reply(429, b'{"error":{"message":"rate limit","type":"rate_limit_error"}}', [("retry-after", "1")])
                bucket[0] -= 1
            stats["inflight"] += 1; stats["max_inflight"] = max(stats["max_inflight"], stats["inflight"])
        time.sleep(L)
        k = next(counter)
        out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"concept {k}"}, "finish_reason": "stop"}]}).encode()
        with lock: stats["inflight"] -= 1; stats["ok"] += 1
        self.reply(200, out)
    def do_GET(self):
        self.reply(200, json.dumps(stats).encode())
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
