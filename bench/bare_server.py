#!/usr/bin/env python3
"""The baseline for the benchmark: a bare http.server.ThreadingHTTPServer that answers every POST
with the same 403 JSON gopdater gives a wrong secret, with keep-alive (HTTP/1.1) and TCP_NODELAY,
as a careful user of the standard library would write it; with a certificate and key, wrapped in ssl.
Usage: bare_server.py PORT [CERT KEY]"""

import http.server
import json
import ssl
import sys

BODY = json.dumps({"status": "error", "reason": "forbidden"}).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that hangs up mid-request is not news


if __name__ == "__main__":
    server = Server(("127.0.0.1", int(sys.argv[1])), Handler)
    if len(sys.argv) == 4:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[2], sys.argv[3])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()
