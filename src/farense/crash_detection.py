"""Flow runs whose process died (SIGKILL, a lost machine) are marked Crashed by Prefect itself: every farense flow
run sends a heartbeat event every HEARTBEAT_SECONDS, and an automation on the server sets a run Crashed when its
heartbeats stop before it reached a final state (Prefect's "zombie flow" recipe, created by `farense server up`).
"""

from __future__ import annotations

import os
from datetime import timedelta

HEARTBEAT_SECONDS = 30  # Prefect's minimum; its default (180 s) would leave a dead run Running for minutes
MISSED_HEARTBEATS = 2.5  # silence this many heartbeats long means dead; a busy CPU may delay one, not two
AUTOMATION_NAME = "farense: mark flow runs Crashed when their heartbeats stop"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


def heartbeat_seconds() -> int:
    """The heartbeat interval our processes use: PREFECT_FLOWS_HEARTBEAT_FREQUENCY when set, else ours."""
    return max(int(os.environ.get(HEARTBEAT_ENV) or HEARTBEAT_SECONDS), 30)


def heartbeat_env() -> dict[str, str]:
    return {HEARTBEAT_ENV: str(heartbeat_seconds())}


def crash_automation(heartbeat_s: int) -> "AutomationCore":  # noqa: F821 - Prefect imported lazily
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    within = timedelta(seconds=round(heartbeat_s * MISSED_HEARTBEATS))
    return AutomationCore(
        name=AUTOMATION_NAME,
        description=f"A farense flow run that sent no heartbeat for {within.seconds} s and did not finish has lost "
        "its process (killed, machine down): mark it Crashed. Created by `farense server up`.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},  # fmt: skip
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # Only our flows: other flows on the same server may send heartbeats less often.
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.name": ["farense*"]}),  # fmt: skip
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=within,
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {within.seconds} s: the flow run's process died (killed, or its machine went "
                    "down). A rerun resumes from the last checkpoint.",
        )],  # fmt: skip
    )


def ensure_crash_automation(url: str, heartbeat_s: int | None = None) -> None:
    """Create the automation on the server at `url`, or bring an existing one up to date (idempotent)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    wanted = crash_automation(heartbeat_s or heartbeat_seconds())
    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        if existing:
            client.update_automation(existing[0].id, wanted)
            for extra in existing[1:]:
                client.delete_automation(extra.id)
        else:
            client.create_automation(wanted)
