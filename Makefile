# minigpt — every target does the set-up it needs and is safe to run again.
#   make train   set up, build, train the notebook's configuration, print a sample
#   make train-gpt  set up, build, train the transformer at the quality target's configuration
#   make test    set up, check formatting and lints (rustfmt, clippy -D warnings), run every test
#   make parity  set up, compare minigpt with the notebook under Python TensorFlow, print a table
#   make bench   set up, time the notebook's code and minigpt side by side (bench/results.md)
#   make gpu-check  install the CUDA wheel apart (.venv-gpu, .tf-gpu, target/gpu: ~6 GB) and check
#                that minigpt linked against it finds CUDA inside it (no GPU needed; not in make test;
#                make clean-gpu removes it all)
#
# The TensorFlow C library comes from the pinned pip wheel. For NVIDIA GPUs:
#   make TF_PACKAGE='tensorflow[and-cuda]==2.21.0' train
TF_PACKAGE ?= tensorflow-cpu==2.21.0
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
# A regular file (make would judge the symlinks by the wheel's old timestamps).
TF_LIB := .tf/lib/tensorflow.pc
BIN := target/release/minigpt
RUN ?= runs/notebook-$(shell date +%Y%m%d-%H%M%S)
RUN_GPT ?= runs/gpt-$(shell date +%Y%m%d-%H%M%S)
# The published CPU configuration of the best-known small character-level GPT (nanoGPT's
# shakespeare_char on a CPU); evaluated as it does, on 20 random batches every 250 steps.
GPT_CONFIG := --model gpt --block-size 64 --batch-size 12 --n-layer 4 --n-head 4 --n-embd 128 \
  --dropout 0 --max-steps 2000 --lr 1e-3 --warmup-steps 100 --lr-decay-steps 2000 --min-lr 1e-4 \
  --beta2 0.99 --weight-decay 0.1 --grad-clip 1.0 --shuffle global --eval-every 250 --eval-batches 20
DATA ?= $(or $(MINIGPT_DATA),builtin:tinyshakespeare)
REPS ?= 3
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup build train train-gpt test parity bench gpu-check clean-tf clean-gpu

setup: $(TF_LIB)

$(VENV_STAMP): python_export/requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TF_PACKAGE)" $$(grep -v '^tensorflow' python_export/requirements.txt | grep -v '^#')
	touch $@

# TF_LINK python,dir: links the C library of the wheel installed for `python` into `dir`, under the
# names build.rs and tensorflow-sys-runtime look for (the wheel has no libtensorflow.so), with a
# tensorflow.pc for C code. The links point at the wheel's real folder (symlinks resolved), the path
# minigpt loads the library by (src/library.rs): the wheel's libraries find CUDA through RUNPATHs
# relative to their own folder ($$ORIGIN/../nvidia/...).
define TF_LINK
@mkdir -p $(2)
@tf=$$($(1) -c "import os, tensorflow as tf; print(os.path.realpath(tf.sysconfig.get_lib()))" 2>/dev/null) && \
	  test -f "$$tf/libtensorflow_cc.so.2" || { echo "error: no libtensorflow_cc.so.2 in the installed wheel"; exit 1; }; \
	  ln -sf "$$tf/libtensorflow_cc.so.2" $(2)/libtensorflow_cc.so.2; \
	  ln -sf "$$tf/libtensorflow_cc.so.2" $(2)/libtensorflow.so.2; \
	  ln -sf "$$tf/libtensorflow_cc.so.2" $(2)/libtensorflow.so; \
	  ln -sf "$$tf/libtensorflow_framework.so.2" $(2)/libtensorflow_framework.so.2; \
	  ln -sf "$$tf/libtensorflow_framework.so.2" $(2)/libtensorflow_framework.so; \
	  printf 'libdir=%s\nincludedir=%s/include\n\nName: tensorflow\nDescription: TensorFlow C library (from the pip wheel)\nVersion: 2.21.0\nLibs: -L$${pcfiledir} -Wl,-rpath,$${libdir} -ltensorflow -ltensorflow_framework\nCflags: -I$${includedir}\n' "$$tf" "$$tf" > $(2)/tensorflow.pc
@echo "TensorFlow C library linked into $(2) (from $$(dirname $$(readlink $(2)/libtensorflow_cc.so.2)))"
endef

# .tf/lib: the wheel's C library under the names build.rs and tensorflow-sys-runtime expect.
$(TF_LIB): $(VENV_STAMP)
	$(call TF_LINK,$(PY),.tf/lib)

build: setup
	cargo build --release

train: build
	$(BIN) train --out $(RUN)
	$(BIN) generate --run $(RUN) --prompt "To be, or not to be" --chars 200

# The transformer trains and evaluates with XLA by default (`--no-xla` to opt out).
train-gpt: build
	$(BIN) train --out $(RUN_GPT) $(GPT_CONFIG)
	$(BIN) eval --run $(RUN_GPT)
	$(BIN) generate --run $(RUN_GPT) --prompt "ROMEO:" --chars 300 --top-k 20

test: setup
	cargo fmt --check
	cargo clippy --all-targets --quiet -- -D warnings
	cargo test

parity: setup
	cargo run --quiet --example parity

bench: setup
	cargo build --release --bin minigpt --example bench --example bench_cluster --example bench_gpt --example bench_serve
	$(PY) bench/run.py --python $(PY) --minigpt target/release/examples/bench --data "$(DATA)" --reps $(REPS) \
		--gpt-bench target/release/examples/bench_gpt --cluster-bench target/release/examples/bench_cluster \
		--serve-bench target/release/examples/bench_serve --minigpt-bin $(BIN)

# The CUDA wheel, apart from the CPU set-up: its own virtualenv, library folder and target directory.
TF_GPU_PACKAGE ?= tensorflow[and-cuda]==2.21.0
VENV_GPU := .venv-gpu
PY_GPU := $(VENV_GPU)/bin/python
TF_LIB_GPU := .tf-gpu/lib/tensorflow.pc

$(VENV_GPU)/.installed: Makefile
	test -x $(PY_GPU) || $(PYTHON) -m venv $(VENV_GPU)
	$(PY_GPU) -m pip install --quiet --upgrade pip
	$(PY_GPU) -m pip install --quiet "$(TF_GPU_PACKAGE)"
	touch $@

$(TF_LIB_GPU): $(VENV_GPU)/.installed
	$(call TF_LINK,$(PY_GPU),.tf-gpu/lib)

# Builds minigpt against the CUDA wheel and checks, with the loader's own trace, that TensorFlow
# finds CUDA's libraries (and XLA's ptxas and libdevice) inside the wheel. No GPU is needed.
gpu-check: $(TF_LIB_GPU)
	MINIGPT_TF_LIB=$(CURDIR)/.tf-gpu/lib CARGO_TARGET_DIR=target/gpu cargo build --bin minigpt
	$(PY_GPU) bench/gpu_check.py --minigpt target/gpu/debug/minigpt --tf-lib .tf-gpu/lib --log target/gpu/gpu-check.log

clean-tf:
	rm -rf .tf $(VENV)

clean-gpu:
	rm -rf .tf-gpu $(VENV_GPU) target/gpu
