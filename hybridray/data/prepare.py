"""``hybridray data prepare``: a LAReQA / SQuAD-style directory -> train and held-out shards.

Output layout (``OUT``)::

    OUT/train/            shard dataset (parquet + manifest.json): the training split
    OUT/heldout/          shard dataset: the held-out split, same schema
    OUT/heldout-lareqa/   the held-out articles in the source layout, for LAReQA evaluation
                          (the candidate pool is every sentence of those articles)
    OUT/rejects.jsonl     every source question that failed validation, with file and reason
    OUT/prepare.json      what was done: source, seed, fraction, counts per split and language,
                          where the rows' hard negatives came from

Every row carries in-context hard negatives (``lareqa.in_context_negatives``: the other
sentences of its answer's paragraph, in its language, with the groups they answer) unless
``hard_negatives=False`` (``--no-hard-negatives``). Training reads them only with
``loss.hard_negatives`` > 0; otherwise they cost disk (on MLQA-R the shards grow 1.8x) and the index
pass's validation of a few more strings per row, never tokenisation. The held-out shards
get them too; ``heldout-lareqa/`` (what the evaluation reads) keeps every sentence of its
articles as the candidate pool, unchanged.

``SOURCE`` and ``OUT`` may be ``s3://`` URIs. A local ``OUT`` is built beside itself and
swapped in, so a failure never leaves half an output or damages an old one. An ``s3://``
``OUT`` is built in a local temporary directory first -- every data error happens before S3
is touched -- then uploaded (an old output is deleted just before, with ``--overwrite``).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional

from hybridray import storage
from hybridray.data.lareqa import (
    article_clusters,
    filter_lareqa,
    in_context_negatives,
    question_rows,
    read_lareqa,
    split_by_article,
)
from hybridray.data.shards import write_shards
from hybridray.errors import UserError


def prepare_lareqa(
    source_dir: str | Path,
    out_dir: str | Path,
    *,
    heldout_fraction: float = 0.3,
    seed: int = 0,
    langs: Optional[Iterable[str]] = None,
    source_name: Optional[str] = None,
    overwrite: bool = False,
    hard_negatives: bool = True,
) -> dict:
    """Convert, validate and split; returns the summary also written to ``prepare.json``."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction: {heldout_fraction} is not in [0, 1)")
    if storage.is_remote(str(out_dir)):
        out = str(out_dir).rstrip("/")
        if storage.exists(out) and not overwrite:
            raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
        storage.check_writable(out)  # a missing bucket or denied access, before the work
        with tempfile.TemporaryDirectory(prefix="hybridray-prepare-") as local:
            summary = prepare_lareqa(source_dir, Path(local) / "out", heldout_fraction=heldout_fraction,
                                     seed=seed, langs=langs, source_name=source_name,
                                     hard_negatives=hard_negatives)
            storage.delete_tree(out)
            storage.copy_tree(str(Path(local) / "out"), out)
        return summary
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    source = read_lareqa(source_dir, langs)
    if not source.questions:
        raise UserError(f"{source_dir}: no valid questions ({len(source.rejects)} rejected)")
    remote_source = storage.is_remote(str(source_dir))
    source_name = source_name or (str(source_dir).rstrip("/").rsplit("/", 1)[-1] if remote_source
                                  else Path(source_dir).resolve().name)
    cluster_of = article_clusters(source.questions)
    heldout_keys = split_by_article(source.questions, heldout_fraction, seed)
    heldout = [q for q in source.questions if cluster_of[(q.lang, q.article)] in heldout_keys]
    train = [q for q in source.questions if cluster_of[(q.lang, q.article)] not in heldout_keys]

    # Build everything beside OUT, then swap it in: nothing half-written is ever left.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        manifests, origins = {}, {}
        for split, questions in (("train", train), ("heldout", heldout)):
            negatives = (in_context_negatives(questions, source.raw, answered_by=source.questions)
                         if hard_negatives else None)
            origins[split] = dict(sorted(negatives.origin.items())) if negatives else None
            manifests[split] = write_shards(question_rows(questions, source_name, cluster_of, negatives),
                                            tmp / split, source=source_name)
        lareqa_dir = tmp / "heldout-lareqa"
        lareqa_dir.mkdir()
        for lang, raw in source.raw.items():
            kept = [q for q in heldout if q.lang == lang]
            (lareqa_dir / f"{lang}.json").write_text(json.dumps(filter_lareqa(raw, kept), ensure_ascii=False))
        with open(tmp / "rejects.jsonl", "w") as f:
            for reject in source.rejects:
                f.write(json.dumps(asdict(reject), ensure_ascii=False) + "\n")
        summary = {
            "source": str(source_dir) if remote_source else str(Path(source_dir).resolve()),
            "source_name": source_name,
            "seed": seed,
            "heldout_fraction": heldout_fraction,
            "languages": sorted(source.files),
            "source_questions": dict(sorted(source.counts.items())),
            "rows": {split: m["rows_per_language"] for split, m in manifests.items()},
            "articles": {
                "train": len({cluster_of[(q.lang, q.article)] for q in train}),
                "heldout": len(heldout_keys),
            },
            "rejected": dict(sorted(Counter(Path(r.file).stem for r in source.rejects).items())),
            # rows per origin of their negatives: paragraph, article, next_article, none
            "hard_negatives": origins if hard_negatives else None,
        }
        (tmp / "prepare.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
