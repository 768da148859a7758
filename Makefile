# minigpt — every target does the set-up it needs and is safe to run again.
#   make train   set up, build, train the notebook's configuration, print a sample
#   make test    set up, run every test
#   make parity  set up, compare minigpt with the notebook under Python TensorFlow, print a table
#   make bench   set up, time the notebook's code and minigpt side by side (bench/results.md)
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
DATA ?= $(or $(MINIGPT_DATA),https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt)
REPS ?= 3
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup build train test parity bench clean-tf

setup: $(TF_LIB)

$(VENV_STAMP): python_export/requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TF_PACKAGE)" $$(grep -v '^tensorflow' python_export/requirements.txt | grep -v '^#')
	touch $@

# .tf/lib: the wheel's C library under the names the linker and pkg-config expect.
$(TF_LIB): $(VENV_STAMP)
	@mkdir -p .tf/lib
	@tf=$$($(PY) -c "import os, tensorflow as tf; print(tf.sysconfig.get_lib())" 2>/dev/null) && \
	  test -f "$$tf/libtensorflow_cc.so.2" || { echo "error: no libtensorflow_cc.so.2 in the installed wheel"; exit 1; }; \
	  ln -sf "$$tf/libtensorflow_cc.so.2" .tf/lib/libtensorflow_cc.so.2; \
	  ln -sf "$$tf/libtensorflow_cc.so.2" .tf/lib/libtensorflow.so.2; \
	  ln -sf "$$tf/libtensorflow_cc.so.2" .tf/lib/libtensorflow.so; \
	  ln -sf "$$tf/libtensorflow_framework.so.2" .tf/lib/libtensorflow_framework.so.2; \
	  ln -sf "$$tf/libtensorflow_framework.so.2" .tf/lib/libtensorflow_framework.so; \
	  printf 'libdir=$${pcfiledir}\nincludedir=%s/include\n\nName: tensorflow\nDescription: TensorFlow C library (from the pip wheel)\nVersion: 2.21.0\nLibs: -L$${libdir} -ltensorflow -ltensorflow_framework\nCflags: -I$${includedir}\n' "$$tf" > .tf/lib/tensorflow.pc
	@echo "TensorFlow C library linked into .tf/lib"

build: setup
	cargo build --release

train: build
	$(BIN) train --out $(RUN)
	$(BIN) generate --run $(RUN) --prompt "To be, or not to be" --chars 200

test: setup
	cargo test

parity: setup
	cargo run --quiet --example parity

bench: setup
	cargo build --release --example bench
	$(PY) bench/run.py --python $(PY) --minigpt target/release/examples/bench --data "$(DATA)" --reps $(REPS)

clean-tf:
	rm -rf .tf $(VENV)
