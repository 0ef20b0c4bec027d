"""A standard gRPC health check from the command line (container and systemd probes).

    python -m hostmaint.common.probe 127.0.0.1:7710 [--service hostmaint.v1.HostAgent]

Exits 0 when SERVING, 1 when not serving, 2 when unreachable.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hostmaint.common import daemon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gRPC health probe")
    parser.add_argument("address", help="host:port of the daemon")
    parser.add_argument("--service", default="", help="service name; empty for the server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument("--cert", default="", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--key", default="", help="client key (PEM)")
    parser.add_argument("--ca", default="", help="CA (PEM) of the server")
    args = parser.parse_args(argv)
    tls = daemon.TlsFiles(args.cert, args.key, args.ca)
    with daemon.channel(args.address, tls) as ch:
        try:
            answer = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"{args.address}: {e.code().name}: {e.details()}")
            return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{args.address}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
