"""Adapter administration of an engine in this process, transport-neutral: the gRPC AdapterService and a
cluster replica both call it. Each call looks at the disk or waits on the loader's administrative thread,
so it runs on an executor thread, off the caller's event loop; errors come out as exceptions."""

import asyncio
from concurrent.futures import Future

from ..adapters.loader import AdapterLoader
from ..adapters.registry import AdapterStatus
from .engine.weight_sets import MergeStatus, WeightSets
from .errors import InvalidArgumentError


class AdapterAdmin:
    def __init__(self, adapters: AdapterLoader, weights: WeightSets, default_method: str):
        self.adapters = adapters
        self.weights = weights
        self.default_method = default_method

    async def catalog(self) -> tuple[list[AdapterStatus], MergeStatus | None]:
        return await _off_loop(self.adapters.catalog), self.weights.status()

    async def describe(self, adapter_id: str) -> tuple[AdapterStatus, MergeStatus | None]:
        return await _off_loop(lambda: self.adapters.describe(_checked(adapter_id))), self.weights.status()

    async def load(self, adapter_id: str, pin: bool = False) -> tuple[AdapterStatus, MergeStatus | None]:
        return await _off_loop(lambda: self.adapters.load(_checked(adapter_id), pin)), self.weights.status()

    async def unload(self, adapter_id: str) -> tuple[AdapterStatus, None]:
        def unload():
            self.weights.unmerge_if(_checked(adapter_id))
            return self.adapters.unload(adapter_id)
        return await _off_loop(unload), None

    async def merge(self, adapter_id: str, method: str = "") -> MergeStatus:
        return await _off_loop(lambda: self.weights.merge(_checked(adapter_id), method or self.default_method))

    async def unmerge(self) -> MergeStatus:
        return await _off_loop(self.weights.unmerge)


async def _off_loop(fn):
    """fn on an executor thread; a load or merge returns a future of an administrative thread, awaited."""
    result = await asyncio.get_running_loop().run_in_executor(None, fn)
    return await asyncio.wrap_future(result) if isinstance(result, Future) else result


def _checked(adapter_id: str) -> str:
    if not adapter_id:
        raise InvalidArgumentError("adapter_id", "is empty")
    return adapter_id
