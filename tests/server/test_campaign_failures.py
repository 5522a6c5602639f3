"""A campaign's failed members with their failure class (what the console groups by reason), on
SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from onenet_ota.protocol.states import TaskState
from onenet_ota.server.admin_service import AdminService
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.campaign_engine import FailureClass, StageSpec
from onenet_ota.server.campaigns import CampaignService, FailedMember
from tests.server.test_campaigns import Clock, _fleet, _report, _spec, _stage_members


def test_failures_lists_failed_members_with_their_class_and_is_bounded(
    engine: Engine, tmp_path: Path
) -> None:
    clock = Clock()
    admin = AdminService(engine, BlobStore(tmp_path / "packages"), clock=clock)
    service = CampaignService(engine, clock=clock)
    package = _fleet(admin, 10)
    spec = _spec(package, StageSpec(rest=True)).model_copy(
        update={"failure_classes": {206: FailureClass.ENVIRONMENT}}
    )
    campaign = service.create(spec)
    assert service.failures(campaign.id) == ([], False)
    service.act(campaign.id, "start")
    members = _stage_members(engine, campaign.id, 0)
    _report(engine, campaign.id, members[:2], TaskState.FAILED, 205)
    _report(engine, campaign.id, members[2:3], TaskState.FAILED, 206)  # overridden class
    _report(engine, campaign.id, members[3:4], TaskState.FAILED, None)  # T5: no code
    _report(engine, campaign.id, members[4:6], TaskState.SUCCEEDED, 201)
    failed, more = service.failures(campaign.id)
    assert not more
    assert failed == [
        FailedMember(members[0], f"d{members[0] - 1}", 205, FailureClass.PACKAGE),
        FailedMember(members[1], f"d{members[1] - 1}", 205, FailureClass.PACKAGE),
        FailedMember(members[2], f"d{members[2] - 1}", 206, FailureClass.ENVIRONMENT),
        FailedMember(members[3], f"d{members[3] - 1}", None, FailureClass.ENVIRONMENT),
    ]
    first, more = service.failures(campaign.id, limit=3)
    assert (first, more) == (failed[:3], True)
