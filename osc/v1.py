"""`openstack maintenance ...`: the hostmaint coordinator's calls as OpenStack client commands.

    openstack maintenance plan HOST [policy options]      the plan, one row per VM; nothing changes
    openstack maintenance drain HOST [policy options] [--reason TEXT] [--no-wait]
    openstack maintenance status [HOST] [--drain-id ID]
    openstack maintenance cancel HOST [--drain-id ID] [--abort-running]
    openstack maintenance undrain HOST
    openstack maintenance agent list [--long]

Listers and ShowOnes, so `-f table|json|yaml|value|csv` and `-c COLUMN` work.
The policy options, their checks and the exit codes are `hostmaint`'s
(coordinator/client.py): 2 bad arguments (nothing sent), 3 not found, 4 refused,
5 unavailable; `drain` ends 0 only when the drain COMPLETED (6 incomplete,
7 failed, 8 cancelled). A failed call prints one line on stderr,
`openstack maintenance <command>: <CODE>: <details>`, and when the coordinator
cannot be reached over TLS (or without), what that says about the certificates.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from osc_lib.cli import format_columns
from osc_lib.command import command

from hostmaint.coordinator import client, cliformat, cliview
from hostmaint.osc.plugin import API_NAME, CA, CERT, KEY, MaintenanceClient, option
from hostmaint.protos import coordinator_pb2 as pb

Row = tuple[Any, ...]

TLS_OPTIONS = (option(CERT), option(KEY), option(CA))

STATUS_COLUMNS = (
    "drain_id",
    "host",
    "state",
    "reason",
    "started_at",
    "finished_at",
    "predicted_makespan_s",
    "actual_makespan_s",
    "migrated",
    "failed",
    "unmovable",
    "postcopy_used",
    "max_downtime_ms",
    "vms",
)
PLAN_COLUMNS = (
    "Position",
    "VM",
    "Name",
    "Action",
    "Target",
    "Start (s)",
    "Predicted (s)",
    "Downtime (ms)",
    "Tuning",
    "Reason",
)
PLAN_LONG_COLUMNS = ("Memory (MiB)", "Dirty rate (MiB/s)", "Rounds", "QEMU limit (ms)")
AGENT_COLUMNS = ("Host", "Address", "Health", "Error", "Checked At")
AGENT_LONG_COLUMNS = (
    "Hostname",
    "Libvirt",
    "Domains",
    "Running",
    "Memory Free (MiB)",
    "Memory Total (MiB)",
)


def _timestamp(ts: Any) -> str | None:
    return None if cliformat.timestamp_s(ts) is None else str(ts.ToJsonString())


def _mib(value: float) -> float:
    return round(value / cliview.MIB, 1)


def vm_entry(vm: pb.VmStatus) -> dict[str, Any]:
    return {
        "vm_uuid": vm.vm_uuid,
        "name": vm.name,
        "state": cliformat.vm_state_label(vm.state),
        "target_host": vm.target_host,
        "attempts": vm.attempts,
        "predicted_total_s": round(vm.predicted_total_s, 3),
        "actual_total_s": round(vm.actual_total_s, 3),
        "predicted_downtime_ms": vm.predicted_downtime_ms,
        "actual_downtime_ms": vm.actual_downtime_ms,
        "tuning": list(vm.tuning_applied),
        "error": vm.error,
    }


def status_show(status: pb.DrainStatus) -> tuple[Sequence[str], Row]:
    """A drain's status as a ShowOne's columns and values."""
    summary = status.summary
    return STATUS_COLUMNS, (
        status.drain_id,
        status.host,
        cliformat.drain_state_label(status.state),
        status.reason,
        _timestamp(status.started_at),
        _timestamp(status.finished_at),
        round(summary.predicted_makespan_s, 3),
        round(summary.actual_makespan_s, 3),
        summary.migrated,
        summary.failed,
        summary.unmovable,
        summary.postcopy_used,
        summary.max_downtime_ms,
        format_columns.ListDictColumn([vm_entry(vm) for vm in status.vms]),
    )


def plan_rows(plan: pb.DrainPlan, long: bool) -> Iterable[Row]:
    """One row per VM: live migrations in plan order, then cold migrations, then those that stay."""
    extra: Row = (None,) * len(PLAN_LONG_COLUMNS) if long else ()
    for m in sorted(plan.migrations, key=lambda m: m.position):
        row: Row = (
            m.position,
            m.vm_uuid,
            m.name,
            "live",
            m.target_host or None,
            round(m.start_s, 3),
            round(m.predicted_total_s, 3),
            m.predicted_downtime_ms,
            cliformat.tuning_label(m.tuning),
            "",
        )
        if long:
            row += (
                _mib(m.memory_bytes),
                _mib(m.dirty_rate_bytes_per_s),
                m.predicted_rounds,
                m.qemu_max_downtime_ms,
            )
        yield row
    for c in plan.cold_migrations:
        yield (
            None,
            c.vm_uuid,
            c.name,
            "cold",
            c.target_host or None,
            *(None,) * 4,
            c.reason,
            *extra,
        )
    for u in plan.unmovable:
        yield (None, u.vm_uuid, u.name, "stays", None, None, None, None, None, u.reason, *extra)


class StreamEnded(Exception):
    pass


class _MaintenanceCommand(command.Command):
    """The plumbing of every command: no Keystone credentials, the coordinator's
    errors as hostmaint's exit codes."""

    auth_required = False
    exit_code = client.EXIT_OK  # a command may set another before its output

    def client(self) -> MaintenanceClient:
        # The OpenStack client sets the attribute when it loads the plugin (plugin.API_NAME).
        maintenance: MaintenanceClient = getattr(self.app.client_manager, API_NAME)
        return maintenance

    def _fail(self, text: str) -> None:
        self.app.stderr.write(f"openstack {self.cmd_name}: {text}\n")

    def run(self, parsed_args: argparse.Namespace) -> int:
        try:
            return super().run(parsed_args) or self.exit_code
        except client.UsageError as err:
            self._fail(f"error: {err}")
            return client.EXIT_USAGE
        except grpc.RpcError as err:
            code, text = client.rpc_error(err)
            hint = client.tls_hint(err, self.client().tls, TLS_OPTIONS)
            self._fail(f"{text} ({hint})" if hint else text)
            return code
        except StreamEnded as err:
            self._fail(str(err))
            return client.EXIT_ERROR


class PlanMaintenance(_MaintenanceCommand, command.Lister):
    """Plan the drain of a compute host: one row per VM, nothing changes."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        client.policy_options(parser)
        parser.add_argument(
            "--long", action="store_true", help="also memory, dirty rate, rounds, QEMU limit"
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Sequence[str], Iterable[Row]]:
        host = client.check_host(parsed_args.host)
        policy = client.policy_from_args(parsed_args)
        maintenance = self.client()
        with maintenance.connect() as stub:
            plan = stub.PlanDrain(
                pb.PlanDrainRequest(host=host, policy=policy), timeout=maintenance.timeout_s
            )
        for line in (*plan.warnings, *plan.notes):
            self.log.warning(line)
        columns = PLAN_COLUMNS + (PLAN_LONG_COLUMNS if parsed_args.long else ())
        return columns, list(plan_rows(plan, parsed_args.long))


class DrainMaintenance(_MaintenanceCommand, command.ShowOne):
    """Disable a compute host and migrate every VM away; shows the drain when it ends."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        client.policy_options(parser)
        parser.add_argument("--reason", default="", metavar="TEXT", help="kept with the drain")
        parser.add_argument(
            "--no-wait",
            action="store_true",
            help="return once the drain is planned; it goes on on the coordinator",
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Sequence[str], Row]:
        host = client.check_host(parsed_args.host)
        request = pb.DrainRequest(
            host=host,
            policy=client.policy_from_args(parsed_args),
            reason=client.check_reason(parsed_args.reason),
        )
        maintenance = self.client()
        with maintenance.connect() as stub:
            final, drain_id = self._follow(stub.Drain(request), parsed_args.no_wait)
            if final is None:
                final = stub.GetDrain(
                    pb.GetDrainRequest(host=host, drain_id=drain_id), timeout=maintenance.timeout_s
                )
            else:
                self.exit_code = client.EXIT_BY_DRAIN_STATE.get(final.state, client.EXIT_ERROR)
        return status_show(final)

    def _follow(self, events: Any, detach_when_planned: bool) -> tuple[pb.DrainStatus | None, str]:
        """(the final status, or None once detached; the drain's id), one line per event on stderr."""
        drain_id = ""
        for event in events:
            drain_id = drain_id or event.drain_id
            self.app.stderr.write(cliview.render_event_line(event) + "\n")
            if event.kind == pb.DRAIN_EVENT_KIND_FINISHED:
                return event.status, drain_id
            if detach_when_planned and event.kind == pb.DRAIN_EVENT_KIND_PLANNED:
                events.cancel()  # the drain goes on on the coordinator
                return None, drain_id
        raise StreamEnded(
            "the event stream ended before the drain finished; "
            f"follow it with: openstack maintenance status --drain-id {drain_id}"
        )


class ShowMaintenance(_MaintenanceCommand, command.ShowOne):
    """Show the latest drain of a compute host, or a drain by id."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("host", metavar="HOST", nargs="?", default="")
        parser.add_argument("--drain-id", default="", metavar="ID")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Sequence[str], Row]:
        host = client.check_host(parsed_args.host) if parsed_args.host.strip() else ""
        drain_id = parsed_args.drain_id.strip()
        if not host and not drain_id:
            raise client.UsageError("status needs HOST or --drain-id")
        maintenance = self.client()
        with maintenance.connect() as stub:
            status = stub.GetDrain(
                pb.GetDrainRequest(host=host, drain_id=drain_id), timeout=maintenance.timeout_s
            )
        return status_show(status)


class CancelMaintenance(_MaintenanceCommand, command.ShowOne):
    """Stop a drain from starting more migrations (the host stays disabled)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("host", metavar="HOST")
        parser.add_argument("--drain-id", default="", metavar="ID")
        parser.add_argument(
            "--abort-running", action="store_true", help="also abort the migrations running now"
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Sequence[str], Row]:
        request = pb.CancelDrainRequest(
            host=client.check_host(parsed_args.host),
            drain_id=parsed_args.drain_id.strip(),
            abort_running=parsed_args.abort_running,
        )
        maintenance = self.client()
        with maintenance.connect() as stub:
            status = stub.CancelDrain(request, timeout=maintenance.timeout_s)
        return status_show(status)


class UndrainMaintenance(_MaintenanceCommand, command.ShowOne):
    """Re-enable a drained compute host."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("host", metavar="HOST")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Sequence[str], Row]:
        host = client.check_host(parsed_args.host)
        maintenance = self.client()
        with maintenance.connect() as stub:
            answer = stub.Undrain(pb.UndrainRequest(host=host), timeout=maintenance.timeout_s)
        if not answer.enabled:
            self.exit_code = client.EXIT_ERROR
        return ("host", "enabled"), (answer.host or host, answer.enabled)


class ListMaintenanceAgents(_MaintenanceCommand, command.Lister):
    """List the agents the coordinator knows, with their health."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument(
            "--long", action="store_true", help="also each agent's last report of its host"
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Sequence[str], Iterable[Row]]:
        maintenance = self.client()
        with maintenance.connect() as stub:
            answer = stub.ListAgents(pb.ListAgentsRequest(), timeout=maintenance.timeout_s)
        rows: list[Row] = []
        for a in sorted(answer.agents, key=lambda a: a.host):
            row: Row = (a.host, a.address, a.health, a.error, _timestamp(a.checked_at))
            if parsed_args.long:
                r = a.last_report
                row += (
                    r.hostname,
                    r.libvirt_version,
                    r.domain_count,
                    r.running_domain_count,
                    _mib(r.memory_free_bytes),
                    _mib(r.memory_total_bytes),
                )
            rows.append(row)
        columns = AGENT_COLUMNS + (AGENT_LONG_COLUMNS if parsed_args.long else ())
        return columns, rows
