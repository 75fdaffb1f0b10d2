"""Serve's default routing (power of two choices, multiplexed model ids), plus one addition: a call
with a `replica_id` keyword goes to that replica. The admin routes use it to act on every replica
and read each one's status; the router also tells the front which replicas are up."""
from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

ROUTERS: dict[str, "TargetedRouter"] = {}  # Serve app name -> its router (in the front's process)


class TargetedRouter(PowerOfTwoChoicesRequestRouter):
    def initialize_state(self, app: str = "", **kwargs) -> None:
        super().initialize_state(**kwargs)
        # Serve ships this class pickled by value: its globals are a copy. The import finds the
        # module the front imported, whose ROUTERS replica_ids() reads.
        import utils.cluster.router as home  # deferred: this module, as the front imported it
        home.ROUTERS[app] = self

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        target = pending_request.kwargs.get("replica_id") if pending_request is not None else None
        if target:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if chosen:
                return [chosen]
            # gone meanwhile: any replica answers "not me" (the caller skips it), never a wait
        return await super().choose_replicas(candidate_replicas, pending_request)


def replica_ids(app: str) -> list[str]:
    router = ROUTERS.get(app)
    return sorted(rid.unique_id for rid in list(router.curr_replicas)) if router else []
