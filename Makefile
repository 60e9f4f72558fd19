# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgepipe-installed
BEAM_STAMP := $(VENV)/.edgepipe-beam-installed
NODE_DIR := pipeline/runners/tfjs
NODE_STAMP := $(NODE_DIR)/node_modules/.package-lock.json
CHROMIUM := /usr/bin/chromium
PYTEST_ARGS ?=

.PHONY: setup browser setup-arm64 setup-beam demo test bench bench-chain bench-beam bench-compare cross-validate clean

# Python and Node dependencies: all `make demo` needs (no root, no browser).
setup: $(STAMP) $(NODE_STAMP)

# Headless Chromium, for the tests of each TF.js bundle's demo page (tests/test_browser.py).
browser: $(CHROMIUM)

# The Raspberry Pi's TFLite runtimes under QEMU, for the -arm64 runtimes (tests/test_arm64.py): Debian 12
# arm64 and the Pi's wheels in the cache, about 275 MB; apt-get installs qemu-user-static and mmdebstrap
# when missing (root, as in CI). Idempotent: once set up it returns at once.
setup-arm64: $(STAMP)
	$(VENV)/bin/edgepipe setup-arm64

# The optional Apache Beam extra, edgepipe[beam], constrained by the lock; `make test` installs it too.
# Idempotent: installed once, again only when pyproject.toml or requirements.lock change.
setup-beam: $(BEAM_STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.2
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

$(BEAM_STAMP): pyproject.toml requirements.lock $(STAMP)
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test,beam,beam-test]'
	touch $@

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund --loglevel=error

# Headless Chromium for tests/test_browser.py (each TF.js bundle's demo page). Debian's package, as
# Playwright's own browser download needs a network CI does not have; apt-get needs root, as in CI.
# The file is the target: installed once, never again while it exists.
$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

demo: setup
	$(PY) scripts/demo.py

test: setup browser setup-arm64 setup-beam
	$(PY) -m pytest $(PYTEST_ARGS)

# Bottleneck extraction and retrain speed against poets' loop (about 3 minutes; README "Measured").
bench: $(STAMP)
	$(PY) scripts/bench_bottlenecks.py

# The whole chain, cold, against its floor and the old shape, for 0.25_224 and the real 1.0_224,
# then verify's peak memory on caltech101 (about 40 minutes; README "Measured").
bench-chain: setup
	$(PY) scripts/bench_chain.py

# Beam DirectRunner vs the local engine on caltech101 (README "Measured").
bench-beam: $(BEAM_STAMP)
	$(PY) scripts/bench_beam.py

# A cold `edgepipe compare` of mobilenet_v1_0.25_224 and 0.25_128 on flowers8 against the two cold
# runs one after the other, then the same compare again, every stage skipped (about 4 minutes).
bench-compare: setup
	$(PY) scripts/bench_compare.py

# Training settings for the 1.0_224 graph on flowers8, scored by 5-fold cross-validation on the
# training folder, each also scored on the test photos (README "Fine-tuning"; about 30 minutes).
cross-validate: setup
	EDGEPIPE_MIRROR=$${EDGEPIPE_MIRROR:-../shared/mirror} $(PY) scripts/cross_validate.py --offline \
	  --graph ../shared/graphs/poets_retrained_mobilenet_v1_1.0_224.pb \
	  --images ../shared/datasets/flowers8/train --test-images ../shared/datasets/flowers8/test \
	  --try "head" --try "head, flips: augment_copies=4 flip_left_right=true" --try "ft2: fine_tune=2" \
	  --try "ft2, flips: fine_tune=2 augment_copies=2 flip_left_right=true" --try "ft4: fine_tune=4" \
	  --try "ft4, flips: fine_tune=4 augment_copies=2 flip_left_right=true"

clean:
	rm -rf runs/demo .pytest_cache
