# Every target bootstraps .venv itself: a fresh clone needs nothing but python3.11 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Dependencies are resolved once, by `make lock`, into files that pin every package (build tools included)
# with its hashes; installs take exactly those files and nothing newer (a `>=` range would have taken any
# new release, such as the LiteLLM releases on PyPI that shipped a credential stealer). requirements.lock:
# runtime + dev, for make; compose/requirements.lock: runtime only, for the image, same versions.
LOCK := requirements.lock
IMAGE_LOCK := compose/requirements.lock
LOCK_VENV := .venv-lock
PIP_TOOLS := pip-tools==7.6.2
COMPILE = $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --all-build-deps --strip-extras \
	--no-emit-index-url --no-emit-find-links --no-emit-trusted-host

.PHONY: up test lint fmt bench schemas clean system-deps lock

# pip is not upgraded first: that would be the one unpinned download of the install.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Refresh the locks after changing dependencies in pyproject.toml; existing pins are kept where they still
# fit. `make lock LOCK_ARGS=--upgrade` moves everything to the newest releases (review the diff: new
# versions are new code). The image lock takes the versions of the main lock, so both install the same.
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || ($(PY) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q '$(PIP_TOOLS)')
	$(COMPILE) --extra dev $(LOCK_ARGS) --output-file $(LOCK) pyproject.toml
	sed -n 's/^\([A-Za-z0-9][A-Za-z0-9._-]*==[^ ]*\).*/\1/p' $(LOCK) > $(LOCK_VENV)/pins.txt
	$(COMPILE) --constraint $(LOCK_VENV)/pins.txt --output-file $(IMAGE_LOCK) pyproject.toml

up: $(STAMP)
	$(BIN)/tollway up --demo

# Debian packages the tests drive as real processes: redis-server (shared rate limits), chromium (the
# dashboard's real-browser test, driven by playwright; no browser download) and faketime (the month-in-the-life
# e2e test runs `tollway up` on a shifted clock).
system-deps:
	@missing=""; command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v faketime >/dev/null || missing="$$missing faketime"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (sudo apt-get install$$missing)"; exit 1; fi; fi

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Proxy overhead vs direct and vs LiteLLM/Portkey, metering throughput, quota lag (see bench/README.md).
bench: $(STAMP)
	$(BIN)/python -m bench.run

schemas: $(STAMP)
	$(BIN)/python -m schemas.export

clean:
	rm -rf $(VENV) $(LOCK_VENV) data .pytest_cache
