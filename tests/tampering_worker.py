"""``python tests/tampering_worker.py PORT UPSTREAM_PORT MODE``: a process on a rollout worker's
listed port that passes requests to the real worker at UPSTREAM_PORT and changes its batches
before they reach the trainer (what a process squatting on the port could send), or delays them:

- ``vocab``: the first completion token of micro-batch 0 becomes an id past the vocabulary;
- ``future``: the batch says it was made from a version the trainer has not written;
- ``slow``: the first batch reaches the trainer ``SLOW_S`` late, unchanged (a first generation
  that is slow, as on a loaded machine).

Everything else is the real worker's answer, bytes for bytes re-packed with safetensors."""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from safetensors.torch import load, save

PORT, UPSTREAM, MODE = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
SLOW_S = 4.0
first = threading.Event()  # set once the first batch has been passed on


def tamper(data: bytes) -> bytes:
    tensors = load(data)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    doc = json.loads(header["__metadata__"]["json"])
    if MODE == "vocab":
        tensors["0/completion_ids"][0, 0] = 10**6
    elif MODE == "future":
        doc["version"] += 1000
    elif MODE == "slow":
        if not first.is_set():
            time.sleep(SLOW_S)
        first.set()
    return save(tensors, metadata={"json": json.dumps(doc)})


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        conn = http.client.HTTPConnection("127.0.0.1", UPSTREAM, timeout=600)
        try:
            conn.request("POST", self.path, body=body, headers={"Content-Type": "application/octet-stream"})
            answer = conn.getresponse()
            status, data, kind = answer.status, answer.read(), answer.getheader("Content-Type")
        except OSError:  # the real worker is not up: neither is this one
            self.close_connection = True
            return
        finally:
            conn.close()
        if status == 200:
            data = tamper(data)
        self.send_response(status)
        self.send_header("Content-Type", kind or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    print("tampering on", PORT, flush=True)
    server.serve_forever()
