"""Command line of codi-attn: python -m codi_attn export RUN_ID OUT_DIR."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = """examples:
  python -m codi_attn export 1795664249475220 out/
  python -m codi_attn export latest out/ --name llama-run2
  python -m codi_attn export AttentionFlow/17 out/ --datastore /data/runs --no-figures

out/results/<model>/ gets attention_raw.npy, attention_mass.npy, attention_avg.npy, attention_std.npy,
problems.csv, ranked_heads.csv, heads_ranked_by_*.csv, criteria.csv, comparison_*.csv,
attention_stats.json, failed_problems.json, summary.json, and from the analyses that ran: head_effects.csv,
head_correlations.csv, head_attribution_agreement.csv, held_out_sets.csv, held_out_summary.csv,
causal_comparison_*.csv, validation.csv, thought_probes.csv, thought_lens.csv, thought_mean_patching.csv,
thought_pair_patching.csv, thought_attended_by_kind.csv, thought_attended_by_step.csv and
thought_findings.json; out/figures/<model>/ the cards' figures (.png).
Files are written to a hidden folder in OUT_DIR and moved into place when all are complete: a failed export
leaves nothing behind; an existing export of that name is kept unless --overwrite."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m codi_attn", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ex = sub.add_parser("export", help="write a finished AttentionFlow run as results/<model>/ and figures/<model>/",
                        description="Write a finished AttentionFlow run's artifacts as .npy, .csv, .json and .png "
                                    "files.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("run_id", metavar="RUN_ID", help="run id, pathspec (AttentionFlow/ID) or 'latest' "
                                                     "(latest successful run)")
    ex.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder that gets results/ and figures/")
    ex.add_argument("--name", help="folder name under results/ and figures/ (default: the run's model)")
    ex.add_argument("--datastore", metavar="DIR", type=Path,
                    help="folder holding the .metaflow datastore (default: Metaflow's own lookup: "
                         "METAFLOW_DATASTORE_SYSROOT_LOCAL, else .metaflow in this folder or above)")
    ex.add_argument("--flow", default="AttentionFlow", help="flow name (default: %(default)s)")
    ex.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export of that name (once the new "
                                                             "one is complete)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("USERNAME", "codi")  # the Metaflow client wants a user name, also as root
    from codi_attn.export import ExportError, export_run, find_run

    if args.datastore is not None:
        from metaflow import metadata

        if not (args.datastore / ".metaflow").is_dir():
            print(f"error: no .metaflow datastore in {args.datastore}", file=sys.stderr)
            return 2
        metadata(f"local@{args.datastore.resolve()}")
    try:
        run = find_run(args.run_id, args.flow)
        paths = export_run(run, args.out_dir, name=args.name, figures=not args.no_figures,
                           overwrite=args.overwrite)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folders = sorted({str(p.parent) for p in paths})
    print(f"exported {run.pathspec}: {len(paths)} files in {', '.join(folders)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
