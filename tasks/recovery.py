"""Runs that died without telling the server: who holds a stage lock, and marking a dead holder's runs Crashed.

A process killed with SIGKILL (or a machine that lost power) cannot report its end, so its flow run stays Running.
Worker runs are caught by Prefect's heartbeat automation (`farense server up` creates it); runs with no server
watching (plain `farense run`) are caught here, when the next run of the same stage takes over the dead lock.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import Crashed

from farense.store import describe_holder


def lock_holder() -> dict[str, Any]:
    """The current flow and task run, written into the stage lock so waiters and successors know whose it is."""
    holder: dict[str, Any] = {}
    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        holder |= {"flow_run_id": str(flow_ctx.flow_run.id), "flow_run_name": flow_ctx.flow_run.name}
    task_ctx = TaskRunContext.get()
    if task_ctx is not None:
        holder["task_run_id"] = str(task_ctx.task_run.id)
    return holder


def mark_dead_holder_crashed(holder: dict[str, Any]) -> None:
    """Set the dead holder's task and flow run Crashed, where the server still shows them unfinished."""
    message = f"Crashed: its process ({describe_holder(holder)}) ended without reporting; a later run took over"
    logger = get_run_logger()
    try:
        _mark(holder, message, logger)
    except ObjectNotFound:  # recorded on another server (e.g. a run with a temporary server): nothing to mark here
        logger.info(f"the dead holder's run ({holder.get('flow_run_id')}) is not on this Prefect server")


def _mark(holder: dict[str, Any], message: str, logger: Any) -> None:
    with get_client(sync_client=True) as client:
        if holder.get("task_run_id"):
            run = client.read_task_run(UUID(holder["task_run_id"]))
            if run.state is not None and not run.state.is_final():
                client.set_task_run_state(run.id, Crashed(message=message), force=True)
        if holder.get("flow_run_id"):
            flow_run = client.read_flow_run(UUID(holder["flow_run_id"]))
            if flow_run.state is not None and not flow_run.state.is_final():
                client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
                logger.warning(f"marked flow run '{flow_run.name}' ({flow_run.id}) Crashed: {message}")
