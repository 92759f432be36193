"""A threaded static file server on 127.0.0.1 for the demo, the tests and the benchmark downloads."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class _QuietHandler(SimpleHTTPRequestHandler):
    delay = 0.0

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass

    def do_GET(self) -> None:
        if self.delay:
            time.sleep(self.delay)  # a slow network, for tests that interrupt a download mid-run
        super().do_GET()


@contextlib.contextmanager
def serve_folder(folder: str, delay: float = 0.0) -> Iterator[str]:
    """Serve ``folder`` on a free port of 127.0.0.1 while the block runs; yields the base URL."""
    handler_cls = type("Handler", (_QuietHandler,), {"delay": delay})
    handler = functools.partial(handler_cls, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
