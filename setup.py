"""hostmaint: drain KVM compute hosts for maintenance, fast and safely."""

from setuptools import setup

# The folders stand at the top of the tree; installed, they live under one
# namespace so hostmaint never claims generic names such as `agent`.
PACKAGES = {
    "hostmaint.agent": "agent",
    "hostmaint.coordinator": "coordinator",
    "hostmaint.coordinator.drivers": "coordinator/drivers",
    "hostmaint.protos": "protos",
    "hostmaint.lab": "lab",
    "hostmaint.common": "common",
    "hostmaint.osc": "osc",
}

setup(
    name="hostmaint",
    version="0.1.0",
    description="Drain KVM compute hosts for maintenance: a libvirt agent and a migration coordinator",
    python_requires=">=3.11",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={
        "hostmaint.protos": ["*.proto", "*.pyi", "py.typed"],
        "hostmaint.agent": ["py.typed"],
        "hostmaint.coordinator": [
            "py.typed",
            "migrations/*.py",
            "migrations/script.py.mako",
            "migrations/versions/*.py",
        ],
        "hostmaint.common": ["py.typed"],
        "hostmaint.lab": ["py.typed", "guest_src/*"],
        "hostmaint.osc": ["py.typed"],
    },
    install_requires=[
        "grpcio>=1.76,<2",
        "grpcio-health-checking>=1.76,<2",
        "grpcio-reflection>=1.76,<2",
        "protobuf>=6.31.1,<7",
        "libvirt-python>=9.0",
        "psutil>=5.9",
        "oslo.config>=9.0",
        "openstacksdk>=3.0",
        "keystoneauth1>=5.10",  # the nova driver's sessions (openstacksdk's own dependency)
        "SQLAlchemy>=2.0,<2.1",
        "cryptography>=42",
        "alembic>=1.13,<2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2",
            "hypothesis>=6.100",
            "grpcio-testing>=1.76,<2",
            "grpcio-tools>=1.76,<2",
            "mypy-protobuf>=3.6",
        ],
        # The journal on PostgreSQL (postgresql+psycopg://).
        "postgres": ["psycopg[binary]>=3.1,<4"],
        # Several coordinators: leader election and host locks ([coordination]).
        "ha": ["tooz>=6.0", "etcd3gw>=2.0"],
        # Prometheus metrics on both daemons ([metrics] listen).
        "metrics": ["prometheus-client>=0.20,<1"],
        # `openstack maintenance ...`: the OpenStack client plugin.
        "osc": ["python-openstackclient>=7.0", "osc-lib>=3.0", "cliff>=4.0"],
    },
    entry_points={
        "console_scripts": [
            "hostmaint-agent=hostmaint.agent.cmd:main",
            "hostmaint-coordinator=hostmaint.coordinator.cmd:main",
            "hostmaint-coordinator-db=hostmaint.coordinator.migrations.cli:main",
            "hostmaint=hostmaint.coordinator.cli:main",
            "hostmaint-lab=hostmaint.lab.cli:main",
        ],
        # `openstack maintenance ...` (the osc extra): the plugin and its commands.
        "openstack.cli.extension": ["maintenance=hostmaint.osc.plugin"],
        "openstack.maintenance.v1": [
            "maintenance_plan=hostmaint.osc.v1:PlanMaintenance",
            "maintenance_drain=hostmaint.osc.v1:DrainMaintenance",
            "maintenance_status=hostmaint.osc.v1:ShowMaintenance",
            "maintenance_cancel=hostmaint.osc.v1:CancelMaintenance",
            "maintenance_undrain=hostmaint.osc.v1:UndrainMaintenance",
            "maintenance_agent_list=hostmaint.osc.v1:ListMaintenanceAgents",
        ],
        "oslo.config.opts": [
            "hostmaint.agent=hostmaint.agent.config:list_opts",
            "hostmaint.coordinator=hostmaint.coordinator.config:list_opts",
        ],
    },
)
