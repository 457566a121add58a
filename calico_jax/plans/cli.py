"""``train.py --compile_only`` dispatch: the plan (train step or predict program) or the search, for a target.

Exit codes: 0 the plan fits; 2 a bad target, a missing extra, or a plan that does not fit (one line on stderr).
"""
from __future__ import annotations

import sys

from calico_jax.plans import targets
from calico_jax.plans.predict_plan import compile_predict
from calico_jax.plans.search import search
from calico_jax.plans.train_plan import PlanDoesNotFit, compile_only


def run_plan(cfg, args) -> int:
    spec = args.target or f"cpu:{args.devices or 0}"
    try:
        target = targets.parse(spec)
        if args.search:
            return 0 if search(cfg, target, cache_dir=args.plan_cache or None, json_path=args.plan_json or None,
                               memory_gb=args.memory_gb) else 2
        if args.program == "predict":
            compile_predict(cfg, target, memory_gb=args.memory_gb, json_path=args.plan_json or None)
        else:
            compile_only(cfg, target, memory_gb=args.memory_gb, json_path=args.plan_json or None)
    except (ValueError, PlanDoesNotFit) as e:   # TargetError, bad mesh shapes, over budget
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    return 0
