"""The program as the serving process holds it: the descriptors the loader
handed over (tracer/handoff.py). Holding the attachment's descriptor keeps
the program attached; closing them all detaches it. The maps are read by
mmap (tracer/serve_maps.py): nothing here imports bcc.
"""

from __future__ import annotations

import logging
import os

from . import netns
from .program import Attachment
from .serve_maps import ServeMaps, Snapshot, prog_stats_of_fd, serve_layout

log = logging.getLogger(__name__)


class HeldProgram:
    """serve's program, loaded by the loader and held here."""

    def __init__(self, description: dict, fds: list[int]):
        self._fds = fds
        try:
            self.prog_fd, self.attachment_fd, *map_fds, self.table_fd = fds
            self.attachment = Attachment(description["attach"], {})
            self.attach_kind = self.attachment.kind
            self.port_labels = tuple(description["port_labels"])
            self.table_capacity = description["table_capacity"]
            self.bcc_version = description["bcc_version"]
            self.loader_peak_kib = description.get("loader_peak_kib", 0)
            self.close_reasons = description["close_reasons"]
            layout = serve_layout(description["port_slots"], self.close_reasons)
            if list(layout) != description["maps"]:
                raise ValueError(f"the loader's maps {description['maps']} are not "
                                 f"this version's {list(layout)}")
            self.table_ways = description["table_ways"]
            self.maps = ServeMaps(dict(zip(description["maps"], map_fds)), layout,
                                  description["cpus"], self.table_fd,
                                  self.table_capacity // self.table_ways, self.table_ways)
        except BaseException:
            self.close()
            raise

    def prog_stats(self) -> dict[str, int]:
        return prog_stats_of_fd(self.prog_fd)

    def read(self) -> Snapshot:
        return self.maps.snapshot(self.table_capacity,
                                  self.prog_stats().get("recursion_misses", 0))

    def refresh_sums(self) -> None:
        self.maps.refresh_sums()

    def time_wait(self) -> int:
        """TIME-WAIT mini-sockets in every namespace (the kernel's count)."""
        return netns.time_wait_total()

    def close(self) -> None:
        maps = getattr(self, "maps", None)
        if maps is not None:
            maps.close()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
