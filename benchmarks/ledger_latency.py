"""Re-time a finished run's stages side by side, by the code path `effitrain run` uses at its end
(`measure.final_retime`, effitrain.retime): every completed stage's saved model reloaded in one
process and timed in interleaved rounds on the run's measurement batch, in the run's runtime.

Use it on runs made with `measure.final_retime=false`, or to see how stable the ratios are.

Run: python benchmarks/ledger_latency.py RUN_DIR [--rounds 7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: the run's measure.rounds)")
    args = parser.parse_args()

    from effitrain import retime
    from effitrain.runfiles import read_summary
    from effitrain.runs import load_run_models

    summary = read_summary(args.run_dir)
    names = [row["name"] for row in summary["stages"]]
    models, data, plan = load_run_models(args.run_dir, names)
    measure = plan.cfg.measure
    if args.rounds is not None:
        measure = OmegaConf.merge(measure, {"rounds": args.rounds})
    example = data.example_batch(measure.batch_size, split=plan.task.split)
    latencies = retime.retime(models, example, plan.precision, measure)
    first = names[0]
    print(f"{args.run_dir} ({summary['recipe']}): batch {measure.batch_size}, {measure.rounds} interleaved rounds, runtime {measure.runtime}")
    print(f"{'stage':16}{'ledger ms':>12}{'during run':>12}{'now ms':>10}{'faster x':>10}")
    for row in summary["stages"]:
        name, metrics = row["name"], row["metrics"]
        during = metrics.get("latency_ms_during_run", metrics["latency_ms"])
        print(f"{name:16}{metrics['latency_ms']:12.3f}{during:12.3f}{latencies[name]:10.3f}{latencies[first] / latencies[name]:10.2f}")


if __name__ == "__main__":
    main()
