.PHONY: setup test test-gpu bench-gpu serve

# .venv is (re)installed only when it is missing or one of these changed since the last install.
INSTALLED := .venv/.installed

setup: $(INSTALLED)

$(INSTALLED): requirements.lock pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

# On a CUDA machine (the device tool runs this): the GPU equivalence and overlap tests.
test-gpu:
	HF_HUB_OFFLINE=1 python3 -m pytest -q -m gpu tests/gpu

# On a CUDA machine: the GPU tests and the standard benchmark runs into $(OUT) (scripts/gpu_battery.sh).
bench-gpu:
	bash scripts/gpu_battery.sh

serve: setup
	.venv/bin/loraserve serve $(ARGS)
