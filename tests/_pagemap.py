"""What /proc/self/pagemap says of address ranges: for the tests of train/cpu.py's FrozenPages."""

from __future__ import annotations

import mmap


def resident_file_bytes(spans: list[tuple[int, int]]) -> tuple[int, int]:
    """(bytes of the file's own pages resident, bytes of the process's written copies) in `spans`, by pagemap."""
    import numpy as np

    page = mmap.PAGESIZE
    file_bytes = own_bytes = 0
    with open("/proc/self/pagemap", "rb", buffering=0) as fh:
        for lo, hi in spans:
            fh.seek(lo // page * 8)
            entries = np.frombuffer(fh.read((hi - lo) // page * 8), dtype=np.uint64)
            present = (entries >> np.uint64(63)) & np.uint64(1) == 1
            file_page = (entries >> np.uint64(61)) & np.uint64(1) == 1
            file_bytes += int((present & file_page).sum()) * page
            own_bytes += int((present & ~file_page).sum()) * page
    return file_bytes, own_bytes
