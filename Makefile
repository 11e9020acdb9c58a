.PHONY: setup test test-gpu serve

setup:
	bash scripts/setup.sh

test: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

# On a CUDA machine (the device tool runs this): the GPU equivalence and overlap tests.
test-gpu:
	HF_HUB_OFFLINE=1 python3 -m pytest -q -m gpu tests/gpu

serve: setup
	.venv/bin/loraserve serve $(ARGS)
