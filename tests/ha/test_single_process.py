"""The default without a coordination service, and the options checked before connecting."""

from __future__ import annotations

import pytest

from hostmaint.coordinator import ha


def test_ttl_must_leave_room_for_heartbeats() -> None:
    with pytest.raises(ValueError, match="lease_ttl_s=3"):
        ha.from_config("etcd3+http://127.0.0.1:1", "g", "", 3, 1.5)


def test_single_process_by_default() -> None:
    elected: list[bool] = []
    one = ha.from_config("", "g", "", 10, 2.0, on_elected=lambda: elected.append(True))
    assert isinstance(one, ha.SingleProcess)
    assert not one.is_leader()
    one.start()
    assert elected == [True] and one.is_leader()
    assert one.members() == {one.member_id}
    assert one.lock_host("h") and not one.lock_host("h") and one.holds_host("h")
    one.unlock_host("h")
    assert one.lock_host("h")
    one.stop()
    assert not one.is_leader() and not one.holds_host("h")
