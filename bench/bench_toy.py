"""The full toy induction run (issue 23): train train/configs/toy_induction.yaml from scratch, then ablate each head.

    python bench/bench_toy.py OUT [STEPS] [MODEL_JSON] [DATA_JSON]
    python bench/bench_toy.py /tmp/toy-bench 800

Prints the training time, the final losses, the jobs' heads, every head's scores and the in-context drop with
each head mean-ablated ((L, H), first copy's loss minus the second's).
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(argv: list[str]) -> None:
    from headprobe.extract.models import load_model
    from headprobe.train.toy import train_task
    from headprobe.train.toy.check import drops, head_ablations

    out, steps = argv[0], int(argv[1]) if len(argv) > 1 else None
    model = json.loads(argv[2]) if len(argv) > 2 else {}
    data = json.loads(argv[3]) if len(argv) > 3 else {}
    t0 = time.time()
    r = train_task("induction", out, steps=steps, model=model, data=data, logger="none", progress=False,
                   overwrite=True)
    print(f"time {time.time() - t0:.0f} s; losses {r.losses}; jobs {r.jobs}; phase change {r.phase_change_step}")
    for name in ("previous_token", "induction", "head_norm"):
        print(name, np.round(r.scores[name], 2).tolist())
    print("drops", np.round(drops(head_ablations(load_model(str(r.folder)).model, "induction")), 2).tolist())


if __name__ == "__main__":
    main(sys.argv[1:])
