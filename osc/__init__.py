"""The OpenStack client plugin: `openstack maintenance ...` (the `osc` extra).

gRPC's core writes a failed TLS handshake to stderr at INFO level (two lines,
before a command's own one-line error) unless GRPC_VERBOSITY says otherwise
when grpc is first imported, which in the `openstack` process is when it loads
this plugin. An operator's own GRPC_VERBOSITY wins.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
