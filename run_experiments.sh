#!/usr/bin/env bash
# run_experiments.sh - run a plan of training experiments on this machine's GPUs, one per GPU at a
# time, or submit them to SLURM as one job array (--slurm). The launcher is Python: iqa/launch.py
# (local queue), iqa/slurm_submit.py and iqa/slurm_batch.sh.template (SLURM), iqa/slurm_task.py
# (per-task bookkeeping); `./run_experiments.sh --help` is the manual.
#
#   ./run_experiments.sh EXPERIMENT_FILE [--gpus 0,1|0,0|cpu] [--dry-run] [--python PY]
#                        [--log_dir logs/experiments] [--script train_clip.py]
#   ./run_experiments.sh EXPERIMENT_FILE --slurm [--max_running N] [--dry-run] [sbatch options]
#
# EXPERIMENT_FILE: one experiment per line, a name and then the trainer's flags as typed on a
# command line (`A1 --lr 5e-6 --no_spaq`), '#' comments, a trailing backslash continues a line,
# an optional `# script: train_clip.py` line before the first experiment.
#
# This file only finds an interpreter for the launcher: .venv/bin/python next to it if there is
# one, else python3 (the launcher needs the standard library only; it imports no torch, so it
# starts at once on a login node). The trainer's interpreter is chosen by the launcher: --python,
# else $PYTHON, else that .venv, else python.
set -u
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -x $SCRIPT_DIR/.venv/bin/python ]]; then
    LAUNCHER_PY=$SCRIPT_DIR/.venv/bin/python
elif command -v python3 >/dev/null 2>&1; then
    LAUNCHER_PY=python3
else
    echo "run_experiments.sh: error: no python3 found (and no $SCRIPT_DIR/.venv)" >&2
    exit 2
fi
# The launcher comes from the iqa/ next to this file; the launcher reads IQA_LAUNCHER_DIR to find
# the trainers and the .venv next to it.
export IQA_LAUNCHER_DIR=$SCRIPT_DIR
export PYTHONPATH=$SCRIPT_DIR${PYTHONPATH:+:$PYTHONPATH}
exec "$LAUNCHER_PY" -m iqa.launch "$@"
