"""A stand-in for hostmaint-agent's process: reads the lab's config file, holds its port.

Used to test that the lab starts one agent per host with its own config and
stops it again, independently of the real agent's state of completion.
"""

from __future__ import annotations

import configparser
import signal
import socket
import sys


def main() -> None:
    config = configparser.ConfigParser()
    config.read(sys.argv[sys.argv.index("--config-file") + 1])
    host, port = config["grpc"]["listen"].rsplit(":", 1)
    assert config["libvirt"]["uri"].startswith("qemu+unix:///system?socket=")
    server = socket.create_server((host, int(port)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        conn, _ = server.accept()
        conn.close()


if __name__ == "__main__":
    main()
