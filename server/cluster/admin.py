"""loraplex.v1.AdapterService on a cluster front: each call goes to every replica (Serve's broadcast), or
to the one a request's `replica` names, and the answers are combined into the single-server messages, with
`replicas` (who holds the adapter in memory) and `by_replica` (each one's view) filled in.

A replica that does not answer within the timeout, or is stopping, is left out; a call no replica answers
is UNAVAILABLE; a named replica that is not running is NOT_FOUND. A change (load, unload, merge, unmerge)
that fails on any replica fails with the first such error, after every replica has been asked.
"""

import logging

from loraplex.v1 import adapters_pb2 as pb
from loraplex.v1 import adapters_pb2_grpc as pb_grpc

from ..errors import NotFoundError, UnavailableError
from ..rpc.adapters import STATES, TIERS, method_name, to_info, to_merge_info
from ..rpc.errors import abort_with

log = logging.getLogger(__name__)

ADMIN_TIMEOUT_S = 120.0


class ClusterAdapterService(pb_grpc.AdapterServiceServicer):
    def __init__(self, handle, timeout_s: float = ADMIN_TIMEOUT_S):
        self.handle = handle
        self.timeout_s = timeout_s

    async def ListAdapters(self, request, context):
        answers = await self._answer(context, self._ask("catalog"))
        by_id: dict[str, list] = {}
        for replica_id, (statuses, merged) in answers:
            for status in statuses:
                by_id.setdefault(status.adapter_id, []).append((replica_id, (status, merged)))
        return pb.ListAdaptersResponse(adapters=[combined(by_id[i]) for i in sorted(by_id)])

    async def GetAdapter(self, request, context):
        return combined(await self._answer(context, self._ask("describe", adapter_id=request.adapter_id)))

    async def LoadAdapter(self, request, context):
        return combined(await self._answer(context, self._change(request.replica, "load",
                                                                 adapter_id=request.adapter_id, pin=request.pin)))

    async def UnloadAdapter(self, request, context):
        return combined(await self._answer(context, self._change(request.replica, "unload",
                                                                 adapter_id=request.adapter_id)))

    async def MergeAdapter(self, request, context):
        async def merge():
            return await self._change(request.replica, "merge", adapter_id=request.adapter_id,
                                      method=method_name(request))
        return to_merge_info((await self._answer(context, merge()))[0][1])

    async def UnmergeAdapter(self, request, context):
        return to_merge_info((await self._answer(context, self._change(request.replica, "unmerge")))[0][1])

    async def _answer(self, context, call):
        try:
            return await call
        except Exception as exc:   # noqa: BLE001 - abort_with maps each kind, the unexpected to INTERNAL
            await abort_with(context, exc)

    async def _ask(self, operation: str, target: str = "", **args) -> list[tuple[str, object]]:
        """(replica id, result) of each replica that answered without an error; if none did, the first
        error (NOT_FOUND when every replica says so)."""
        answers = await self._broadcast(operation, target, **args)
        results = [(r, value) for r, value in answers if not isinstance(value, BaseException)]
        if not results:
            raise answers[0][1]
        return results

    async def _change(self, target: str, operation: str, **args) -> list[tuple[str, object]]:
        answers = await self._broadcast(operation, target, **args)
        failures = [value for _, value in answers if isinstance(value, BaseException)]
        if operation == "unload" and len(failures) < len(answers):   # unloaded where it was loaded
            failures = [f for f in failures if not isinstance(f, NotFoundError)]
        if failures:
            raise failures[0]
        return [(r, value) for r, value in answers if not isinstance(value, BaseException)]

    async def _broadcast(self, operation: str, target: str, **args) -> list[tuple[str, object]]:
        responses = self.handle.broadcast("administer", operation, target, **args)
        results = await responses.results_async(timeout_s=self.timeout_s, return_exceptions=True)
        answers = [r for r in results if r is not None and not isinstance(r, BaseException)]
        for r in results:
            if isinstance(r, BaseException):
                log.warning("a replica did not answer %s: %s", operation, type(r).__name__)
        if not answers:
            if target:
                raise NotFoundError(f"replica {target!r} is not running (ListAdapters shows the replicas)")
            raise UnavailableError("no replica answered; retry")
        return answers


def combined(answers: list[tuple[str, tuple]]) -> pb.AdapterInfo:
    """One adapter's AdapterInfo from each replica's (status, merged): the fields of the replica holding
    its newest version in memory (else the first's), `replicas` and `by_replica` from all of them."""
    def rank(item):
        status = item[1][0]
        return (status.state == "loaded", status.version)
    _, (status, merged) = max(answers, key=rank)
    info = to_info(status, merged)
    for replica_id, (s, _) in answers:
        if s.state == "loaded":
            info.replicas.append(replica_id)
        info.by_replica.append(pb.ReplicaAdapter(replica_id=replica_id, state=STATES[s.state], tier=TIERS[s.tier],
                                                 version=s.version, pinned=s.pinned,
                                                 running_requests=s.running_requests))
    return info

