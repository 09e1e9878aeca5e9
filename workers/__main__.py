"""``python -m workers train SPEC --run-dir DIR``: run one meta-training job from a spec file.

Runs on Ray (``--ray``, the default: a local cluster, or the one in ``RAY_ADDRESS``) or in this
process (``--local``). Launching it again with the same ``--run-dir`` resumes from the last
checkpoint, which is how a job survives the death of the process that launched it.

Omniglot comes from ``task.path`` or ``--data-root``; its decoded cache goes to ``--cache-dir``.
This entry point, not the engine, falls back to ``MAML_DATA_ROOT`` and ``MAML_CACHE_DIR`` (the
service's variables) when they are not given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from workers.spec import JobSpec


def load_spec(path: Path) -> JobSpec:
    text = path.read_text()
    data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    return JobSpec.model_validate(data)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="meta-train a job spec (YAML or JSON)")
    train.add_argument("spec", type=Path)
    train.add_argument("--run-dir", type=Path, required=True, help="checkpoints and the trained model go here")
    train.add_argument("--local", action="store_true", help="compute in this process instead of on Ray")
    train.add_argument("--data-root", type=Path, default=_env_path("MAML_DATA_ROOT"),
                       help="dataset folder for Omniglot without task.path (default: $MAML_DATA_ROOT)")
    train.add_argument("--cache-dir", type=Path,
                       default=_env_path("MAML_CACHE_DIR") or Path("~/.cache/maml-service"),
                       help="decoded dataset caches (default: $MAML_CACHE_DIR, else ~/.cache/maml-service)")
    train.add_argument("--checkpoint-dir", default=None,
                       help="where checkpoints go instead of RUN_DIR/checkpoints: a path or a URI (s3://bucket/job)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = load_spec(args.spec)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"{args.spec}: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    # Absolute, so a Ray worker finds the same folders whatever its working directory.
    data_root = args.data_root.expanduser().resolve() if args.data_root else None
    cache_dir = args.cache_dir.expanduser().resolve()
    if args.local:
        from workers.run import Trainer

        result = Trainer(spec, run_dir=args.run_dir, data_root=data_root, cache_dir=cache_dir,
                         checkpoint_dir=args.checkpoint_dir).run()
    else:
        from workers.raygroup import ensure_ray
        from workers.run import log_reporter, run_training

        ensure_ray(os.environ.get("RAY_ADDRESS") or None)  # the cluster to join, as Ray's own tools read it
        result = run_training(spec, run_dir=args.run_dir, reporter=log_reporter(spec), should_stop=lambda: False,
                              data_root=data_root, cache_dir=cache_dir, checkpoint_dir=args.checkpoint_dir)
    print(json.dumps({"iteration": result.iteration, "eval": result.eval_metrics,
                      "model_dir": str(result.model_dir) if result.model_dir else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
