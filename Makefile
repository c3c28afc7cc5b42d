# Entry points. Each target is a thin wrapper over scripts/ and playbooks/; `make help` lists them.
# Two commands do everything on a fresh Debian 12 machine: `make up` and `make test`.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
# Debian release of the local hosts (make up DEBIAN=13); the vms scenario uses both.
export DEBIAN ?= 12
KAFKA_VERSION ?= 4.1.1
# Images `make up` sends through the pipeline, and `make simulate` sends on demand.
IMAGES ?= 200
N ?= 100
# Extra flags of bench/run.py for `make bench` (e.g. BENCH_ARGS=--skip-seed).
BENCH_ARGS ?=
# Extra flags of bench/scale.py for `make bench-scale` (e.g. SCALE_ARGS="--cpus 0.4").
SCALE_ARGS ?=
# Extra flags of bench/chaos.py for `make chaos` (e.g. CHAOS_ARGS="-n 5000 --scenarios poison").
CHAOS_ARGS ?=
# CIFAR-100 for `make train` / `make evaluate`: $IOT_DATASET_DIR, else ../shared/datasets/cifar-100
# beside the repository when it exists, else the official archive (downloaded once).
DATASET ?= $(or $(IOT_DATASET_DIR),$(wildcard $(CURDIR)/../shared/datasets/cifar-100),download)
# The model `make train` writes and `make evaluate` scores (PREFIX.card.json, PREFIX.weights.npz).
MODEL ?= files/models/resnet50-cifar100
# Checkpoints of `make train` (outside the work tree, so a fresh checkout can resume a run).
TRAIN_DIR ?= $(HOME)/.cache/iot-pipeline/train/resnet50-cifar100
# Extra flags of iot-train (e.g. TRAIN_ARGS="--epochs 30 --stop-after 5"); iot-train --help.
TRAIN_ARGS ?=
# Test images `make evaluate` scores (0 = all 10,000).
EVAL_N ?= 0
# Molecule scenario for `make molecule`.
SCENARIO ?= default

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_VAULT_PASSWORD_FILE := $(CURDIR)/.vault-password
export ANSIBLE_FORCE_COLOR ?= 1
PLAYBOOK := ansible-playbook

.PHONY: help
help: ## list the entry points
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# --- set-up (each step is idempotent and fast when already done) ------------------------------
.PHONY: deps host-packages venv docker image vm-image kafka-archive jmx-exporter vault
deps: host-packages venv docker image vm-image kafka-archive jmx-exporter vault ## install everything the other targets need

host-packages: ## Debian packages on the controller (java, maven, postgresql, debootstrap, promtool, chromium)
	scripts/install-host-packages.sh

venv: ## .venv with pinned ansible, molecule, testinfra, linters and the package
	scripts/bootstrap-venv.sh

docker: ## install and start the Docker engine
	scripts/install-docker.sh

image: docker ## build the Debian systemd base images (debootstrap + docker import): DEBIAN's, and 12 and 13 for the vms scenario
	DEBIAN=12 scripts/build-base-image.sh
	DEBIAN=13 scripts/build-base-image.sh

vm-image: image ## build the images of the vms scenario's hosts (fresh Debian 12 and 13 cloud VMs: sshd, sudo, python3)
	DEBIAN=12 scripts/build-vm-image.sh
	DEBIAN=13 scripts/build-vm-image.sh

kafka-archive: ## build the offline Kafka archive from Maven Central into .cache/kafka
	scripts/build-kafka-archive.sh $(KAFKA_VERSION)

jmx-exporter: ## fetch the Prometheus JMX exporter agent (sha256-checked) into .cache/jmx-exporter
	scripts/fetch-jmx-exporter.sh

vault: venv ## create the local inventory's vault (random passwords) if missing
	scripts/local-vault.sh

# --- the local deployment ---------------------------------------------------------------------
.PHONY: up hosts deploy status simulate accuracy down
up: deps hosts deploy ## bring up the 4 local hosts, deploy site.yml, send IMAGES images, print status
	$(PLAYBOOK) playbooks/status.yml -e expect_rows=$(IMAGES)

hosts: ## create the four local systemd containers
	$(PLAYBOOK) playbooks/local-hosts.yml

deploy: ## run playbooks/site.yml against the inventory
	$(PLAYBOOK) playbooks/site.yml -e iot_simulator_count=$(IMAGES)

status: ## services, consumer lag, row counts and per-model accuracy
	$(PLAYBOOK) playbooks/status.yml

simulate: ## send N more images (make simulate N=500)
	$(PLAYBOOK) playbooks/simulate.yml -e images=$(N)

accuracy: ## per-model accuracy report and plot (bench/results/accuracy.png)
	$(PLAYBOOK) playbooks/accuracy.yml

down: ## remove the local containers and their network
	$(PLAYBOOK) playbooks/local-hosts.yml -e local_hosts_state=absent

# --- the model -------------------------------------------------------------------------------
.PHONY: train evaluate
train: venv ## train the CIFAR-100 ResNet-50 (resumable, ~2 h on 2 cores), export MODEL
	iot-train --data $(DATASET) --run-dir $(TRAIN_DIR) --export $(MODEL) $(TRAIN_ARGS)

evaluate: venv ## top-1/top-5 of MODEL on the test split (EVAL_N images), confusion PNG
	iot-evaluate $(MODEL).card.json --data $(DATASET) --limit $(EVAL_N) \
		--plot bench/results/confusion-$(notdir $(MODEL)).png

# --- benchmark --------------------------------------------------------------------------------
.PHONY: bench bench-model bench-scale bench-rate chaos
bench-model: venv ## the served model alone at batch 1/8/64 (JSON in bench/reports/)
	python bench/model_alone.py --imagenet-shaped

bench: deps ## model alone, pipeline (CPU per service), half-rate latency, original-design baseline, batch 1, delivery modes; JSON + plots in bench/results
	python bench/run.py $(BENCH_ARGS)

bench-scale: deps ## pipeline images/s with 1, 2, 3 ML hosts at the same CPU quota (adds, then removes, 2 hosts)
	python bench/scale.py $(SCALE_ARGS)

bench-rate: deps ## latency at one set rate (RATE_ARGS: --rate 45.5 --batches 64 8) per inference batch size
	python bench/same_rate.py $(RATE_ARGS)

chaos: deps ## fault-injection runs with figures (local deployment)
	python bench/chaos.py $(CHAOS_ARGS)

# --- tests ------------------------------------------------------------------------------------
.PHONY: test test-unit lint test-python molecule molecule-vms molecule-tls molecule-rollout test-all
test: deps lint test-python molecule molecule-vms ## lint + Python tests + molecule default and vms scenarios

lint: venv host-packages ## ruff, yamllint, ansible-lint (production profile), promtool checks and tests of the alert rules
	ruff check files/iot_pipeline tests bench molecule
	yamllint -s .
	ansible-lint --strict
	promtool check rules roles/prometheus/files/rules/*.rules.yml
	cd roles/prometheus/files/rules && promtool test rules *.test.yml

test-unit: venv host-packages ## the fast loop, no services: tests/ (drift, precedence, preflight, firewall) + unit tests without TensorFlow models
	python -m pytest -p no:cacheprovider -q tests
	cd files/iot_pipeline && python -m pytest -p no:cacheprovider -q tests/unit -m "not slow"

test-python: host-packages venv kafka-archive ## the services' tests; tests/: settings drift and inventory precedence
	python -m pytest -p no:cacheprovider tests
	cd files/iot_pipeline && python -m pytest -p no:cacheprovider

molecule: deps ## molecule test -s $(SCENARIO)
	molecule test -s $(SCENARIO)

molecule-vms: deps ## molecule test -s vms (site.yml over SSH on five fresh VM-like hosts, TLS, firewall)
	molecule test -s vms

molecule-tls: deps ## molecule test -s tls (the pipeline over TLS and SASL/SCRAM)
	molecule test -s tls

molecule-rollout: deps ## molecule test -s rollout (a model rolled out under load, two ML hosts)
	molecule test -s rollout

# Longer than CI's 90-minute budget on 2 cores allows, so CI runs `make test` only.
test-all: test ## make test + every other scenario (tls, kafka, postgresql, pipeline_app, zookeeper, cluster, rollout)
	molecule test -s tls
	scripts/build-kafka-archive.sh 3.9.1
	molecule test -s kafka
	molecule test -s postgresql
	molecule test -s pipeline_app
	molecule test -s zookeeper
	molecule test -s cluster
	molecule test -s rollout
