"""torch's intra-op thread count, set for a block of work and restored after.

    python -c "from metamorph.threads import torch_threads; import torch; print(torch.get_num_threads())"

Drivers pin their torch work (encoding, evaluation) to the CPUs they reserved: float sums follow
the thread count, so pinned figures do not depend on where the driver runs, and on a shared box
OpenMP spinning across oversubscribed cores made a tiny UNet step ~50x slower with 2 threads.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``max(1, n)`` torch threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
