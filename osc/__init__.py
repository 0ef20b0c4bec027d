"""The OpenStack client plugin: `openstack maintenance ...` (the `osc` extra)."""
