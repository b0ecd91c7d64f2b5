"""``python -m headprobe.probes.sae_eval_cli CHECKPOINT --store STORE.h5``: an SAE's held-out reconstruction, sparsity
(with ``--ce_tokens``) CE loss recovered, printed as JSON (:func:`headprobe.probes.sae_eval.evaluate_checkpoint`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from headprobe.probes.sae_eval import evaluate_checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m headprobe.probes.sae_eval_cli", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="SAE checkpoint folder")
    p.add_argument("--store", required=True, help="all-token store of the same model, layer(s) and heads")
    p.add_argument("--split", default="test")
    p.add_argument("--max_rows", "--max-rows", type=int, default=None)
    p.add_argument("--ce_tokens", "--ce-tokens", type=int, default=0, help="held-out tokens for CE loss recovered (0: skip)")
    p.add_argument("--model", default=None, help="model for CE (default: the checkpoint's model_id)")
    p.add_argument("--histogram", type=Path, default=None, help="write the feature-density histogram PNG here")
    args = p.parse_args(argv)
    metrics = evaluate_checkpoint(args.checkpoint, args.store, args.split, args.max_rows, args.ce_tokens,
                                  args.histogram, args.model)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
