"""`--adapter-watch-seconds`: publish a new version of a loaded adapter when its files change on disk.

A thread looks at the files of every adapter in memory each interval. An adapter whose files differ from
the version being served, and did not change again during the last interval (a writer may still be at
work), is loaded again on the loader's administrative thread, exactly as `adapters load ID` would:
running requests finish on the version they started with, new ones get the new one. Adapters not in memory
need nothing: their first request reads the files as they are.
"""

import logging
import threading
from concurrent.futures import Future
from typing import Callable

from ..server.errors import LoraplexError

log = logging.getLogger(__name__)


class AdapterWatcher:
    def __init__(self, changed_on_disk: Callable[[], dict], load: Callable[[str], Future], interval: float):
        """changed_on_disk(): {id: files' signature now} of loaded adapters whose files differ from the
        served version; load(id): a future of its reload (AdapterLoader.changed_on_disk and .load)."""
        self.changed_on_disk = changed_on_disk
        self.load = load
        self.interval = interval
        self._seen: dict[str, tuple] = {}       # changed adapter -> its files' signature at the last look
        self._refused: dict[str, tuple] = {}    # adapter -> signature of files that could not be served
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraplex-adapter-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:       # a failing look must not end the watching
                log.exception("watching adapter files failed")

    def poll(self) -> list[str]:
        """Loads the adapters whose changed files held still for one interval; returns their ids."""
        changed = {i: sig for i, sig in self.changed_on_disk().items()
                   if i not in self._refused or self._refused[i] != sig}     # refused files: until they change
        settled = [i for i, sig in changed.items() if i in self._seen and self._seen[i] == sig]
        self._seen = {i: sig for i, sig in changed.items() if i not in settled}
        for adapter_id in settled:
            try:
                status = self.load(adapter_id).result()
                log.info("adapter %s changed on disk: version %d published", adapter_id, status.version)
                self._refused.pop(adapter_id, None)
            except Exception as exc:      # any one adapter's failure, whatever it is, stays its own
                self._refused[adapter_id] = changed[adapter_id]
                log.warning("adapter %s changed on disk but cannot be served (%s); the loaded version stays",
                            adapter_id, exc, exc_info=not isinstance(exc, LoraplexError))
        return settled
