"""OpenMP's wait policy for the servers (openai_api.py, web_demo.py). It must be set before torch loads OpenMP, and
anything under qwen/ loads torch, so this module stands apart and the entry scripts call it first (README "Threads").
"""

import os

# Rounds an idle compute thread spins before it sleeps. OpenMP's 300,000 made decode steps several times slower on 2
# cores under outside load; below ~3,000 the compiled step's worker sleeps between two of its parallel regions.
SERVER_SPIN_COUNT = 3000


def spin_briefly() -> None:
    """GOMP_SPINCOUNT=SERVER_SPIN_COUNT, unless the environment chooses (GOMP_SPINCOUNT or OMP_WAIT_POLICY)."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SERVER_SPIN_COUNT)
