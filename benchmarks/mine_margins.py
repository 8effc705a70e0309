"""How the margin rule and ``--range-max`` of ``hybridray data mine`` shape the mined negatives,
from the vectors a finished mine cached (``OUT/_mine/``): no re-encoding, seconds of CPU.

Usage (after ``hybridray data mine --model M --shards IN --out OUT``)::

    python benchmarks/mine_margins.py --shards IN --out OUT

Prints a markdown table: per setting, rows left without a negative, rows short of ``top_k``,
negatives per row, candidates dropped by the margin.
"""
from __future__ import annotations

import argparse

from hybridray.data import reader
from hybridray.data.mine import (MineOptions, SelectionCounts, _input_fingerprint, _load_vectors, _vectors_path,
                                 build_pools, mine_file)

SETTINGS = [
    dict(relative_margin=0.05, range_max=50), dict(relative_margin=0.05, range_max=50, range_max_cap=1000), dict(relative_margin=0.03, range_max=50),
    dict(relative_margin=0.01, range_max=50), dict(relative_margin=None, absolute_margin=0.0, range_max=50),
    dict(relative_margin=None, range_max=50), dict(relative_margin=0.05, range_max=200),
    dict(relative_margin=0.05, range_max=1000), dict(relative_margin=0.02, range_max=200),
    dict(relative_margin=0.01, range_max=200),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True, help="a finished `hybridray data mine` output")
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args()
    from pathlib import Path

    files = reader.list_shard_files(args.shards)
    rows = [[rec for _, rec in reader.iter_file_rows(f)] for f in files]
    vectors = {side: [_load_vectors(_vectors_path(Path(args.out), i), side, len(r), _input_fingerprint(files[i]))
                      for i, r in enumerate(rows)] for side in ("queries", "passages")}
    import tempfile

    workdir = tempfile.TemporaryDirectory(prefix="mine-margins-")  # the pool on disk, deleted at exit
    pools = build_pools(files, lambda i: vectors["passages"][i], Path(workdir.name) / "pool")
    print("| relative margin | absolute margin | range_max | rows without | rows short of top_k | negatives/row "
          "| dropped by margin |\n|---|---|---|---|---|---|---|")
    for setting in SETTINGS:
        counts = SelectionCounts()
        for i, records in enumerate(rows):
            mine_file(records, vectors["queries"][i], vectors["passages"][i], pools,
                      MineOptions(model="-", top_k=args.top_k, **{"range_max_cap": setting["range_max"], **setting}),
                      counts)
        print(f"| {setting.get('relative_margin') or 'off'} | {setting.get('absolute_margin', 'off')} | "
              f"{setting['range_max']}{' -> ' + str(setting['range_max_cap']) if 'range_max_cap' in setting else ''} | {counts.empty_rows} ({counts.empty_rows / counts.rows:.1%}) | "
              f"{counts.short_rows} | {counts.negatives / counts.rows:.2f} | {counts.margin} |")


if __name__ == "__main__":
    main()
