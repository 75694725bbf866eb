"""The export stage uses the runtime's page-out of mapped weight files: see
:mod:`cpuflow.mapped_pages` (moved there so `cpuflow generate --low-memory` can use it too)."""
from cpuflow.mapped_pages import MADV_PAGEOUT, dropping_mapped_pages, mapped_ranges, page_out

__all__ = ["MADV_PAGEOUT", "dropping_mapped_pages", "mapped_ranges", "page_out"]
