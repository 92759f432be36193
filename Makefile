# unclip-pipeline — `make help` lists the targets.
SHELL := /bin/bash
PY    := .venv/bin/python
VENV_STAMP := .venv/.installed
# Reference tools whose pins clash with ours live in their own venv (see `make bench-anchors`).
export WANDB_MODE ?= disabled
export NO_ALBUMENTATIONS_UPDATE ?= 1

URLS ?=
OUT ?=
SHARDS ?=
DEMO_OUT ?= demo_out
STORE ?= store
PRIOR_OUT ?= prior
DECODER_OUT ?= decoder
BASE_OUT ?=
PROMPT ?=
SAMPLES ?= samples.png
# Paths and the prompt reach the commands through the environment ("$$VAR"), never pasted into the shell line:
# a quote or a space in them is then just a character. ARGS is pasted, so that it splits into flags. (After
# the defaults: `export X` of a variable not yet set sets it empty, and a later `X ?= default` is then ignored.)
export URLS OUT SHARDS DEMO_OUT STORE PRIOR_OUT DECODER_OUT BASE_OUT PROMPT SAMPLES

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slow lint download usage-download usage-embed usage-sample

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

# torch's CUDA build (the only one that imports beside torchvision here) fills ~6.6 GiB of .venv: say so up front
# rather than let pip die of ENOSPC minutes in.
NEED_KIB := 7340032
TORCH := 2.14.1
TORCHVISION := 0.29.1
$(VENV_STAMP): pyproject.toml
	@if ! ls .venv/lib/python3*/site-packages/torch-$(TORCH).dist-info/RECORD >/dev/null 2>&1; then \
	  free=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	  if [ "$$free" -lt $(NEED_KIB) ]; then \
	    echo "error: installing needs about 7 GiB free on $$(df -P . | awk 'NR==2 {print $$6}'), $$((free / 1048576)) GiB free; free some space and rerun" >&2; \
	    exit 2; \
	  fi; \
	fi
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned together: open_clip needs torchvision, and only these two import side by side here.
	$(PY) -m pip install -q -e '.[dev,export]' 'torch==$(TORCH)' 'torchvision==$(TORCHVISION)'
	touch $(VENV_STAMP)

install: $(VENV_STAMP) ## create .venv and install the project (fast when already done)

# A variable a target needs, given empty (`make validate STORE=`): one line naming it, before the venv is built.
need-%:
	@test -n "$${$*}" || { echo "make: $* is empty; give it a value (make help lists the targets)" >&2; exit 2; }

demo: need-DEMO_OUT $(VENV_STAMP) ## run every stage end to end on the built-in demo dataset (CPU, offline; ARGS='--n 8000 ...')
	.venv/bin/unclip demo --out "$$DEMO_OUT" $(ARGS)

test: $(VENV_STAMP) ## run the test suite (slow tests excluded)
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(VENV_STAMP) ## run every test, slow ones included
	$(PY) -m pytest -q -p no:cacheprovider -m ''

lint: $(VENV_STAMP) ## ruff lint and format check
	.venv/bin/ruff check pipeline models jobs tests
	.venv/bin/ruff format --check pipeline models jobs tests

usage-download:
	@test -n "$$URLS" || { echo "usage: make download URLS=urls.parquet OUT=shards/" >&2; exit 2; }

download: usage-download $(VENV_STAMP) ## download URLS=table.parquet into OUT=shards/ (webdataset, img2dataset)
	.venv/bin/unclip download --urls "$$URLS" --out "$${OUT:-shards}" $(ARGS)

.PHONY: embed validate train-prior eval-prior

usage-embed:
	@test -n "$$SHARDS" || { echo "usage: make embed SHARDS=shards/ OUT=store/ [ARGS='--clip ViT-B-32 --pretrained …']" >&2; exit 2; }

embed: usage-embed $(VENV_STAMP) ## embed SHARDS='shards/{00000..00009}.tar' into OUT=store/ (add ARGS='--latents vae --vae …')
	.venv/bin/unclip embed --shards "$$SHARDS" --out "$${OUT:-$$STORE}" $(ARGS)

validate: need-STORE $(VENV_STAMP) ## check an embedding store: make validate STORE=store/
	.venv/bin/unclip validate "$$STORE"

train-prior: need-STORE need-PRIOR_OUT $(VENV_STAMP) ## train the diffusion prior: make train-prior STORE=store/ PRIOR_OUT=prior/ [ARGS='--preset vit-b-32']
	.venv/bin/unclip train-prior --data "$$STORE" --out "$$PRIOR_OUT" $(ARGS)

eval-prior: need-STORE need-PRIOR_OUT $(VENV_STAMP) ## evaluate the prior's EMA weights on the held-out split
	.venv/bin/unclip eval-prior --ckpt "$$PRIOR_OUT" --data "$$STORE" $(ARGS)

.PHONY: train-decoder eval-decoder sample

train-decoder: need-STORE need-DECODER_OUT $(VENV_STAMP) ## train the decoder: make train-decoder STORE=store/ DECODER_OUT=decoder/ [ARGS='--preset base']
	.venv/bin/unclip train-decoder --data "$$STORE" --out "$$DECODER_OUT" $(ARGS)

eval-decoder: need-STORE need-DECODER_OUT $(VENV_STAMP) ## re-embed the decoder's images on the held-out split, and text -> image with the prior (PRIOR_OUT= for the decoder alone)
	.venv/bin/unclip eval-decoder --decoder "$$DECODER_OUT" $(if $(BASE_OUT),--base "$$BASE_OUT") $(if $(PRIOR_OUT),--prior "$$PRIOR_OUT") --data "$$STORE" $(ARGS)

usage-sample:
	@test -n "$$PROMPT" || { echo 'usage: make sample PROMPT="a red circle on a white background" [ARGS=--n 8]' >&2; exit 2; }

sample: usage-sample need-PRIOR_OUT need-DECODER_OUT need-SAMPLES $(VENV_STAMP) ## text -> image: make sample PROMPT="a red circle" [PRIOR_OUT=prior DECODER_OUT=decoder BASE_OUT=base SAMPLES=out.png]
	.venv/bin/unclip sample --prior "$$PRIOR_OUT" --decoder "$$DECODER_OUT" $(if $(BASE_OUT),--base "$$BASE_OUT") --prompt "$$PROMPT" --out "$$SAMPLES" $(ARGS)

.PHONY: bench
bench: $(VENV_STAMP) ## every stage vs its physical limit, side by side -> bench/results.{json,md} (~10-15 min, 2 cores)
	.venv/bin/unclip bench --out bench $(ARGS)

# Reference tools in their own venv: clip-retrieval 2.45 pins numpy<2, pyarrow<16, open_clip<3 and imports
# pkg_resources (setuptools<81); torch/torchvision as in .venv. Their scripts are in bench/anchors/.
ANCHORS_PY := .venv-anchors/bin/python
ANCHORS_STAMP := .venv-anchors/.installed
.PHONY: bench-anchors

$(ANCHORS_STAMP):
	test -x $(ANCHORS_PY) || python3 -m venv .venv-anchors
	$(ANCHORS_PY) -m pip install -q --upgrade pip 'setuptools<81' wheel
	$(ANCHORS_PY) -m pip install -q 'clip-retrieval==2.45.0' 'dalle2-pytorch==1.15.6' 'open_clip_torch<3' \
		'numpy<2' 'pyarrow<16' 'setuptools<81' 'torch==$(TORCH)' 'torchvision==$(TORCHVISION)'
	touch $(ANCHORS_STAMP)

bench-anchors: $(VENV_STAMP) $(ANCHORS_STAMP) ## ours vs clip-retrieval, embedding-reader, dalle2-pytorch -> bench/anchors.{json,md} (6-12 min on 2 cores)
	.venv/bin/unclip bench-anchors --anchors-python $(ANCHORS_PY) $(ARGS)

# What a lent GPU machine (its own Python 3.12 and torch, no network) lacks, at the versions .venv holds.
DEVICE_KIT := open_clip_torch ftfy wcwidth diffusers importlib_metadata dask distributed partd locket tblib zict \
	tornado webdataset braceexpand
device-kit: $(VENV_STAMP) ## wheels for bench/device_check.sh on a lent GPU machine -> .whl/ (carry it)
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$($(PY) -m pip freeze | grep -iE '^($(shell echo $(DEVICE_KIT) | tr ' ' '|'))==' | sed 's/_/-/g')
	@du -sh .whl
