# The two front-door commands: `make demo` and `make test`. Both set up .venv first if needed.
VENV  := .venv
STAMP := $(VENV)/.r1kit-setup
RUN   ?= runs/demo

.PHONY: setup demo demo-grpo-gsm8k demo-svamp demo-rft demo-pipeline test smoke bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh $(wildcard scripts/setup.d/*.sh)
	bash scripts/setup.sh
	touch $@

# The main job, the GSM8K target: cold-start SFT of the embedded model on 1,024 GSM8K-train worked
# solutions (`r1kit train sft --preset cpu_gsm8k`), evaluated before/after, greedily, on all 1,319
# GSM8K test problems. Report: $(RUN)/eval/report.md; rerunning resumes where it stopped.
demo: setup
	bash scripts/demo.sh $(RUN) cpu_gsm8k sft

# GRPO alone on GSM8K (the main job before SFT existed): evaluated on 200 GSM8K test problems.
demo-grpo-gsm8k: setup
	bash scripts/demo.sh $(RUN)-grpo-gsm8k cpu_demo_gsm8k grpo

# GRPO alone on SVAMP one-step word problems (700 train / 300 held out).
demo-svamp: setup
	bash scripts/demo.sh $(RUN)-svamp cpu_demo grpo

# Rejection-sampling fine-tuning on SVAMP (`r1kit distill --preset rft_svamp`, R1 stage 3 in miniature):
# the embedded model samples the train problems, its verified answers fine-tune it, evaluated before and
# after exactly as demo-svamp, sampling + SFT within the GRPO demo's 19 training minutes (1,140 CPU s).
# Report: $(RUN)-rft/report.md; rerunning resumes where it stopped.
demo-rft: setup
	$(VENV)/bin/r1kit distill --preset rft_svamp --num-threads 1 --output $(RUN)-rft

# The four-stage R1 pipeline on the embedded model and GSM8K (`--preset cpu_r1`): cold-start SFT, reasoning
# GRPO, rejection sampling + SFT from the base, final GRPO; every stage evaluated on 200 GSM8K test
# problems; rerunning resumes where it stopped. Report: $(RUN)-pipeline/report.md.
demo-pipeline: setup
	$(VENV)/bin/r1kit pipeline r1 --preset cpu_r1 --output $(RUN)-pipeline

# One intra-op thread per test process: the suite is many small matmuls plus sandbox subprocesses,
# and two OpenMP threads per process on 2 cores spin-wait against each other (the suite took 149 s so).
test: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q

# Two GRPO steps of the SVAMP demo's preset, then an evaluation on SVAMP, the task it trained on.
smoke: setup
	$(VENV)/bin/r1kit train grpo --preset cpu_demo --max-steps 2 --output runs/smoke
	$(VENV)/bin/r1kit eval --model runs/smoke --task svamp --limit 5 --k 1

clean:
	rm -rf runs .pytest_cache
