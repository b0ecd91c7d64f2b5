"""``python -m headprobe.probes.sae_eval_cli SAE --store STORE.h5``: an SAE's held-out reconstruction and sparsity,
and with ``--ce_tokens`` its CE loss recovered, printed as JSON (:func:`headprobe.probes.sae_eval.evaluate_checkpoint`;
SAE is a checkpoint folder, a registry id, a static hub URL or a Hugging Face repo)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from headprobe.probes.hub import resolve
from headprobe.probes.sae_eval import evaluate_checkpoint
from headprobe.train.cli import OneLineParser, guarded


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="python -m headprobe.probes.sae_eval_cli", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="SAE checkpoint: a folder, registry id, static hub URL or Hugging Face repo")
    p.add_argument("--store", required=True, help="all-token store of the same model, layer(s) and heads")
    p.add_argument("--split", default="test")
    p.add_argument("--max_rows", "--max-rows", type=int, default=None)
    p.add_argument("--ce_tokens", "--ce-tokens", type=int, default=0,
                   help="held-out tokens for CE loss recovered (0: skip)")
    p.add_argument("--model", default=None, help="model for CE (default: the checkpoint's model_id)")
    p.add_argument("--histogram", type=Path, default=None, help="write the feature-density histogram PNG here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def work() -> None:
        folder, _ = resolve(args.checkpoint)
        metrics = evaluate_checkpoint(folder, args.store, args.split, args.max_rows, args.ce_tokens, args.histogram,
                                      args.model)
        print(json.dumps(metrics, indent=2))
    guarded("sae_eval", work)


if __name__ == "__main__":
    main()
