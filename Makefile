# `make quickstart` and `make test` each create/refresh .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: quickstart speculative test test-slow lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

QS := runs/quickstart
QS_DATA := --domains python_code,sotu,metamath --max-bytes-per-domain 2M
QS_PROMPTS := --prompt "The Congress shall" --prompt "def parse_args(" --prompt "The state of the Union is"

# Real corpus -> tokenizer -> pretraining (hybrid Mamba/attention latent MoE + MTP) -> eval -> samples.
quickstart: $(STAMP)
	bash scripts/install_data.sh
	rm -rf $(QS)
	$(BIN)/kinetic tokenizer train --out $(QS)/tokenizer --vocab-size 4096 $(QS_DATA)
	$(BIN)/kinetic data build --out $(QS)/corpus --tokenizer $(QS)/tokenizer $(QS_DATA)
	$(BIN)/kinetic pretrain --config configs/quickstart.toml
	$(BIN)/kinetic eval --checkpoint $(QS)/pretrain --corpus $(QS)/corpus --out $(QS)/eval.json
	$(BIN)/kinetic generate --checkpoint $(QS)/pretrain $(QS_PROMPTS) --max-new-tokens 40
	@echo "run directory: $(QS)/pretrain (metrics.jsonl, summary.json, loss.png, checkpoints/)"

# MTP speculative decoding on a deeper model (configs/speculative.toml) trained on the quickstart's
# corpus (built here if `make quickstart` has not run), then the speculative section of the decode
# benchmark on it: plain vs speculative tokens/s, acceptance, and where a round's time goes.
SPEC := runs/speculative
speculative: $(STAMP)
	bash scripts/install_data.sh
	test -f $(QS)/corpus/index.json || { \
	  $(BIN)/kinetic tokenizer train --out $(QS)/tokenizer --vocab-size 4096 $(QS_DATA) && \
	  $(BIN)/kinetic data build --out $(QS)/corpus --tokenizer $(QS)/tokenizer $(QS_DATA); }
	rm -rf $(SPEC)
	$(BIN)/kinetic pretrain --config configs/speculative.toml
	$(BIN)/python benchmarks/decode.py --sections speculative --checkpoint $(SPEC)/pretrain \
	  --draft-tokens 1 2 3 5 7 --json $(SPEC)/decode.json

test: $(STAMP)
	$(BIN)/ruff check kinetic tests benchmarks
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check kinetic tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/model_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
