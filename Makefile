# `make run` and `make test` each set themselves up first (.venv with the project installed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# exact versions of everything the project runs (torch==2.14.1, torchvision==0.29.1 among them: on this
# project's machines pip takes those from local disk); images/Dockerfile installs the same file
LOCK := requirements.lock
OUT ?= out
DATA ?=
BACKBONES ?= resnet18,efficientnet_b3
EPOCHS ?= 2
IMAGE_SIZE ?= 64

.PHONY: setup system-packages run test test-image lint mutation compile image base-image lock clean

# torch's build alone is ~5.5 GB: say so up front instead of failing midway with ENOSPC
SETUP_FREE_GB ?= 8
$(BIN)/.installed: pyproject.toml $(LOCK)
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); if [ "$$free" -lt $(SETUP_FREE_GB) ]; then \
	  echo "make setup: $(VENV) needs about $(SETUP_FREE_GB) GB free on $$(pwd), only $$free GB left; free some space (or SETUP_FREE_GB=N to try anyway)" >&2; exit 2; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r $(LOCK) -e '.[dev,docker]'
	$(BIN)/pip check
	touch $@

setup: $(BIN)/.installed

# RUNNER=docker: every task in this checkout's image (built first; cached layers make that quick), GPUS=all|N
RUNNER ?= subprocess
GPUS ?=
run: setup $(if $(filter docker,$(RUNNER)),image)
	$(BIN)/pneumonia-kfp run-local --output $(OUT) --backbones $(BACKBONES) --epochs $(EPOCHS) \
		--image-size $(IMAGE_SIZE) $(if $(DATA),--data $(DATA)) --runner $(RUNNER) $(if $(GPUS),--gpus $(GPUS))

# the Debian packages the tests use as real parts (pushgateway, chromium): installed once, or one line saying how
system-packages:
	@scripts/system-packages.sh

# The tests run the pipeline in this checkout's image too: start the Docker engine (stopped again after,
# if this started it), build the image on the Debian base (Docker Hub may be out of reach), then drop what
# the build left dangling (older images of the tag, build cache) so repeated runs do not fill the disk.
TEST_BASE_IMAGE ?= $(DEBIAN_BASE)
test: setup system-packages
	scripts/docker-engine.sh start
	status=0; $(MAKE) --no-print-directory test-image && $(BIN)/python -m pytest -q || status=$$?; \
	  scripts/docker-engine.sh stop; exit $$status

# the test image of an older lock or version (another tag of the same local name) is ~6 GB the tests will not
# use again: removed, like the dangling images, so each lock change does not leave one more behind
test-image: setup
	$(if $(filter $(DEBIAN_BASE),$(TEST_BASE_IMAGE)),images/base-image.sh $(DEBIAN_BASE))
	$(MAKE) --no-print-directory image BASE_IMAGE=$(TEST_BASE_IMAGE) IMAGE= REGISTRY=
	docker image ls --format '{{.Repository}}:{{.Tag}}' $(LOCAL_REPOSITORY) | grep -vxF '$(LOCAL_IMAGE)' \
	  | xargs -r docker image rm >/dev/null
	docker image prune -f >/dev/null
	docker builder prune -f >/dev/null

lint: setup
	$(BIN)/ruff check .

# mutation testing of the decision modules (mutmut), not part of `make test`: each module against the
# tests mapped to it in scripts/mutation.py; writes docs/mutation-summary.md. MODULES=metrics,storage for some.
MUTATION_JOBS ?= 2
mutation: setup
	$(BIN)/python scripts/mutation.py --jobs $(MUTATION_JOBS) $(if $(MODULES),--only $(MODULES))

compile: setup
	$(BIN)/pneumonia-kfp compile -o pipeline.yaml $(if $(IMAGE),--image $(IMAGE))

# The default image tag: the package version and the lock's hash (components/kfp_defaults.py IMAGE_TAG),
# so an image built from this checkout is the one its compiled pipeline expects.
IMAGE_TAG = $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' pneumonia_kfp/__init__.py)-$(shell sha256sum $(LOCK) | cut -c1-12)
IMAGE ?= $(if $(REGISTRY),$(REGISTRY)/pneumonia-kfp:$(IMAGE_TAG))
# the name the components default to (kfp_defaults.BASE_IMAGE): what run-local --runner docker runs
LOCAL_REPOSITORY = ghcr.io/pneumonia-kfp/pneumonia-kfp
LOCAL_IMAGE = $(LOCAL_REPOSITORY):$(IMAGE_TAG)
# the base: the Dockerfile's python:3.11 slim; without Docker Hub, `make base-image` and BASE_IMAGE=$(DEBIAN_BASE)
BASE_IMAGE ?=
DEBIAN_BASE = pneumonia-kfp-base:3.11-bookworm

# `make image`: build this checkout's image as $(LOCAL_IMAGE) (images/build.sh picks a BuildKit builder
# and says which). `make image REGISTRY=registry.example.com/team` (or IMAGE=registry/name:tag) also pushes
# it. A pinned tag only: the compiled pipeline must name exactly what was pushed, never :latest.
image: setup
	@case "$(lastword $(subst /, ,$(IMAGE)))" in \
	  *:latest|*:) echo "make image: IMAGE=$(IMAGE) must have a pinned tag (not :latest); e.g. REGISTRY=registry/path (tag $(IMAGE_TAG))" >&2; exit 2;; \
	  ""|*:*) ;; \
	  *) echo "make image: IMAGE=$(IMAGE) has no tag; use registry/name:tag" >&2; exit 2;; \
	esac
	PYTHON=$(BIN)/python BASE_IMAGE=$(BASE_IMAGE) images/build.sh $(LOCAL_IMAGE)
	$(if $(IMAGE),docker tag $(LOCAL_IMAGE) $(IMAGE) && docker push $(IMAGE) && echo "pushed $(IMAGE); compile or submit with --image $(IMAGE)")

# a Python 3.11 base image from Debian packages (debootstrap), for sites that cannot pull Docker Hub
base-image:
	images/base-image.sh $(DEBIAN_BASE)

# rewrite requirements.lock (and the lock hash in the default image tag) from pyproject.toml's ranges
lock: setup
	$(BIN)/python scripts/lock.py

clean:
	rm -rf $(VENV) $(OUT) pipeline.yaml
