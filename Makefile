# The verbs of the project. `make demo` and `make test` start from nothing: they create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# The GPU machines have their own torch and triton; the missing pure-Python wheels travel in .wheels/.
GPU_WHEELS := omegaconf==2.4.0 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
	flash-linear-attention==0.6.0 fla-core==0.6.0

.PHONY: install demo test test-gpu bench bench-scaling wheels device-triton lint clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(INSTALLED)

demo: install
	rm -rf runs/lm-demo
	$(BIN)/hgrn2 fit --config configs/lm/demo.yaml
	$(BIN)/hgrn2 generate --ckpt_path runs/lm-demo/checkpoints/last.ckpt --prompt "def " --max_new_tokens 300 --seed 0

test: install
	$(BIN)/python -m pytest -q -m "not gpu"

# The image's triton is older than the pin (GPU.md), and the pinned wheel is too big to travel (248 MB against a
# call's 64 MiB): `make device-triton` packs it for the image's Python 3.12 without libtriton's debug information
# and without what our kernels never load (Blackwell's ptxas, CUPTI, the profiler's library), 59 MB under xz.
TRITON_PIN := $(shell sed -n 's/.*"triton==\([^"]*\)".*/\1/p' pyproject.toml)
DEVICE_TRITON := .device-triton/triton-$(TRITON_PIN)-cp312.tar.xz

# On a GPU machine: its python3 has torch and triton (its own versions); the rest comes as wheels
# from .wheels/ (`make wheels` here, then carry the folder), installed beside the project. Where .device-triton/
# travels too (`make device-triton`), its pinned triton goes first on the path instead of the image's.
GPU_ENV := python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/hgrn2-site \
	.wheels/*.whl && rm -rf /tmp/triton-pin && mkdir /tmp/triton-pin && \
	{ test ! -f $(DEVICE_TRITON) || tar -xJf $(DEVICE_TRITON) -C /tmp/triton-pin; } && \
	export PYTHONPATH=/tmp/triton-pin:/tmp/hgrn2-site:$(CURDIR) PYTHONUNBUFFERED=1 &&

# The GPU tests' time goes to compiling Triton kernels on the CPU, so they run as PARTS interleaved parts
# (`--shard I/PARTS`) in parallel processes. On a fresh 16-core H100 machine the whole suite takes 3 min 36 s at 8
# parts and 6 min 11 s at 4, against more than the device tool's 10 minutes in one process. Each part's log goes to
# runs/test-gpu/.
PARTS ?= 8
test-gpu:
	$(GPU_ENV) rm -rf runs/test-gpu && mkdir -p runs/test-gpu && pids= && \
	for part in $$(seq $(PARTS)); do \
		python3 -m pytest -q -m gpu -p no:cacheprovider --shard $$part/$(PARTS) > runs/test-gpu/part-$$part.log 2>&1 & \
		pids="$$pids $$!"; \
	done; failed=0; for pid in $$pids; do wait $$pid || failed=1; done; \
	tail -n 3 runs/test-gpu/part-*.log; exit $$failed

# Every single-GPU benchmark, each writing its results under benchmarks/results. fla's autotuning takes minutes
# per shape: the scan's is kept in benchmarks/fla-tuning, but fla's model in the training and generation baselines
# still tunes on first use, so the whole run takes over half an hour: where commands are time-limited, run them
# one by one.
bench:
	$(GPU_ENV) python3 benchmarks/scan.py && python3 benchmarks/generate.py && \
		python3 benchmarks/train.py --run "1gpu=" --baselines llama fla && python3 benchmarks/step_profile.py && \
		python3 benchmarks/vision.py && python3 benchmarks/lra.py

# Two GPUs: the LM under DDP and FSDP, the ViT with repeated augmentation, resuming across device counts.
bench-scaling:
	$(GPU_ENV) bash benchmarks/scaling.sh benchmarks/results

wheels:
	$(PYTHON) -m pip download -q --no-deps -d .wheels $(GPU_WHEELS)

device-triton: $(DEVICE_TRITON)

$(DEVICE_TRITON): pyproject.toml
	rm -rf .device-triton && mkdir -p .device-triton/unpacked
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 -d .device-triton triton==$(TRITON_PIN)
	cd .device-triton/unpacked && unzip -q ../triton-$(TRITON_PIN)-*.whl && \
		strip --strip-debug triton/_C/libtriton.so && rm -rf triton/_C/libproton.so \
		triton/backends/nvidia/lib/cupti triton/backends/nvidia/lib/cupti-blackwell \
		triton/backends/nvidia/bin/ptxas-blackwell
	tar -cf - -C .device-triton/unpacked . | xz -T0 > $@
	rm -rf .device-triton/unpacked .device-triton/*.whl

lint: install
	$(BIN)/python -m pip install -q ruff==0.17.6
	$(BIN)/ruff check hgrn2_lightning kernels datamodules tests benchmarks

clean:
	rm -rf runs lightning_logs .pytest_cache
