"""moto's DynamoDB server, one request at a time.

moto's own `moto_server` serves requests on many threads, and its DynamoDB model has no locks:
two UpdateItem ADDs on one item at once can lose one (a read-modify-write race in Python).
DynamoDB applies each write atomically; serving one request at a time gives the tests that
guarantee. Usage: python moto-server.py HOST PORT
"""

import signal
import sys

from werkzeug.serving import run_simple

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, app, threaded=False, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
