#!/usr/bin/env bash
# run_experiments.sh - run a list of train_swin.py experiments on N GPUs, one per GPU at a time,
# or submit them to SLURM as one job array.
#
#   ./run_experiments.sh EXPERIMENT_FILE [--gpus 0,1|cpu] [--dry-run] [--python PY]
#                        [--log_dir logs/experiments] [--script train_clip.py]
#   ./run_experiments.sh EXPERIMENT_FILE --slurm [--max_running N] [sbatch options]
#
# EXPERIMENT_FILE has one experiment per line, a name and then train_swin.py's flags exactly as
# typed on a command line:
#
#   # comments and blank lines are ignored
#   # script: train_clip.py      (optional, before the first experiment: the training script)
#   A1 --dataset koniq-10k --model_size base --lr 5e-6 \
#      --test_random_crop --no_spaq
#
# A trailing backslash continues a line. Words split like the shell's: '...' and "..." quote,
# a backslash escapes one character, a word starting with # starts a comment. Nothing is
# expanded ($VAR, ~, globs stay as written). Names are unique; they name the log files.
#
# Each experiment runs as `PY train_swin.py --name NAME FLAGS...` in the current directory, with
# CUDA_VISIBLE_DEVICES set to its GPU (empty on CPU), output appended to LOG_DIR/NAME.log.
# Exit code 0 writes LOG_DIR/NAME.done; a re-launch skips experiments that have one. A failed
# experiment is reported and the queue goes on. Ctrl-C or SIGTERM stops every running experiment
# (its whole process group) and writes no .done for it. At the end a summary, then the results
# table from collect_results.py. Exit status: 0 all done or skipped, 1 any failed, 2 bad usage,
# 130/143 interrupted.
#
# Defaults (see the README): --gpus: $CUDA_VISIBLE_DEVICES if set, else every GPU `nvidia-smi -L`
# lists, else the CPU (one experiment at a time). --python: $PYTHON if set, else .venv/bin/python
# next to this script if it exists, else python. train_swin.py and collect_results.py: the copy in
# the current directory if there is one, else the one next to this script.
#
# --slurm writes one batch script (LOG_DIR/slurm/FILE.sbatch) whose array task k runs the k-th
# unfinished experiment with the same command, log and .done marker, and submits it with
# `sbatch --array=0-(n-1)[%N] [sbatch options]`. The task stops and requeues itself on SIGUSR1
# (sent 300 s before the time limit) and its next attempt resumes the run's last.pkl; see the
# README (On a SLURM cluster) and slurm_task.py.
set -uo pipefail

if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 3) )); then
    echo "run_experiments.sh: needs bash >= 4.3 (for 'wait -n'); this is bash $BASH_VERSION" \
         "(on macOS: brew install bash, then run it with that bash)" >&2
    exit 2
fi

PROG=run_experiments.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# How long a running experiment gets to exit after SIGTERM before its process group is killed.
KILL_GRACE_S=30

usage() {
    cat <<'EOF'
usage: ./run_experiments.sh EXPERIMENT_FILE [--gpus 0,1|cpu] [--dry-run] [--python PY]
                            [--log_dir DIR] [--script FILE]
       ./run_experiments.sh EXPERIMENT_FILE --slurm [--max_running N] [--dry-run] [sbatch options]

Runs the experiments of EXPERIMENT_FILE (one per line: NAME --flag value ...) with
train_swin.py (or the file's '# script: FILE' line), one per GPU at a time; the next starts
when a GPU frees. With --slurm they go to SLURM as one job array instead.

  --gpus LIST     comma-separated GPU ids, one running experiment per entry (0,0 runs two
                  on GPU 0); 'cpu' runs one at a time on the CPU. Default: $CUDA_VISIBLE_DEVICES
                  if set, else all GPUs of `nvidia-smi -L`, else the CPU.
  --dry-run       print the GPU assignment and the exact commands; run nothing.
  --python PY     interpreter for train_swin.py. Default: $PYTHON, else .venv/bin/python next
                  to this script, else python.
  --log_dir DIR   where NAME.log and NAME.done go (default: logs/experiments).
  --script FILE   the training script of every line (wins over '# script:'; default
                  train_swin.py).
  --slurm         submit one SLURM job array, a task per unfinished experiment, each running
                  the same command; every later option not listed here goes to sbatch
                  (e.g. -p gpu --gpus-per-task 2 --nodes 2 --time 12:00:00). A task requeues
                  itself before its time limit and resumes its run's last.pkl.
  --max_running N with --slurm: at most N tasks at once (--array=...%N).

A re-launch skips experiments whose DIR/NAME.done exists; delete it to run one again.
Exit status: 0 all done or skipped, 1 any failed, 2 bad usage, 130/143 interrupted.
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

say() {
    printf '[%(%H:%M:%S)T] %s\n' -1 "$*"
}

# Shell-quote words into one line that can be pasted back into a shell.
quote_words() {
    local out="" w q
    for w in "$@"; do
        printf -v q '%q' "$w"
        out+="${out:+ }$q"
    done
    printf '%s' "$out"
}

duration() {
    local s=$1
    if (( s >= 3600 )); then printf '%dh%02dm%02ds' $((s / 3600)) $((s % 3600 / 60)) $((s % 60))
    elif (( s >= 60 )); then printf '%dm%02ds' $((s / 60)) $((s % 60))
    else printf '%ds' "$s"; fi
}

# ---------------------------------------------------------------- command line

EXP_FILE=""
GPU_SPEC=""
GPU_SPEC_SET=0
DRY_RUN=0
PY=""
LOG_DIR=logs/experiments

need_value() {
    [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value (see --help)"
}

SCRIPT_FLAG=""
SLURM=0
SBATCH_OPTS=()   # everything after --slurm that is not one of our options goes to sbatch
MAX_RUNNING=""

while [[ $# -gt 0 ]]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --dry-run|--dry_run) DRY_RUN=1; shift ;;
        --python) need_value "$@"; PY=$2; shift 2 ;;
        --python=*) PY=${1#*=}; shift ;;
        --log_dir|--log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
        --log_dir=*|--log-dir=*) LOG_DIR=${1#*=}; shift ;;
        --script) need_value "$@"; SCRIPT_FLAG=$2; shift 2 ;;
        --script=*) SCRIPT_FLAG=${1#*=}; shift ;;
        --slurm) SLURM=1; shift ;;
        --max_running|--max-running) need_value "$@"; MAX_RUNNING=$2; shift 2 ;;
        --max_running=*|--max-running=*) MAX_RUNNING=${1#*=}; shift ;;
        *)
            if (( SLURM )); then
                SBATCH_OPTS+=("$1"); shift
                continue
            fi
            case $1 in
                --gpus) need_value "$@"; GPU_SPEC=$2; GPU_SPEC_SET=1; shift 2 ;;
                --gpus=*) GPU_SPEC=${1#*=}; GPU_SPEC_SET=1; shift ;;
                -*) die "unknown option '$1' (see --help; sbatch options go after --slurm)" ;;
                *)
                    [[ -z $EXP_FILE ]] || die "one experiment file at a time (got '$EXP_FILE' and '$1')"
                    EXP_FILE=$1; shift ;;
            esac ;;
    esac
done
[[ -n $EXP_FILE ]] || { usage >&2; exit 2; }
[[ -n $LOG_DIR ]] || die "--log_dir is empty"
LOG_DIR=${LOG_DIR%/}
if [[ -n $MAX_RUNNING ]]; then
    (( SLURM )) || die "--max_running is for --slurm (the local queue runs one experiment per GPU)"
    [[ $MAX_RUNNING =~ ^[1-9][0-9]*$ ]] || die "--max_running '$MAX_RUNNING' is not a positive number"
fi
if (( SLURM && GPU_SPEC_SET )); then
    die "--gpus picks GPUs of this machine; with --slurm ask SLURM for them (--gpus-per-task N after --slurm)"
fi

# ---------------------------------------------------------------- experiment file

# Split one logical line into WORDS like the shell does, minus every expansion, so flag values with
# spaces survive when quoted and nothing in the file can run a command.
split_words() {
    local s=$1 n=${#1} i=0 c q="" word="" in_word=0
    WORDS=()
    while (( i < n )); do
        c=${s:i:1}
        if [[ -n $q ]]; then
            if [[ $c == "$q" ]]; then
                q=""
            elif [[ $q == '"' && $c == "\\" && ${s:i+1:1} == [\"\\\$\`] ]]; then
                i=$((i + 1)); word+=${s:i:1}
            else
                word+=$c
            fi
        elif [[ $c == [[:space:]] ]]; then
            (( in_word )) && WORDS+=("$word")
            word=""; in_word=0
        elif [[ $c == '#' ]] && (( ! in_word )); then
            break
        elif [[ $c == "'" || $c == '"' ]]; then
            q=$c; in_word=1
        elif [[ $c == "\\" ]]; then
            i=$((i + 1)); word+=${s:i:1}; in_word=1
        else
            word+=$c; in_word=1
        fi
        i=$((i + 1))
    done
    if [[ -n $q ]]; then
        PARSE_ERROR="unterminated $q quote"
        return 1
    fi
    (( in_word )) && WORDS+=("$word")
    return 0
}

# Experiments, in file order. The flags of all of them live in one flat array, EXP_ARGS; experiment
# i owns EXP_COUNT[i] words from EXP_START[i] (bash has no arrays of arrays).
EXP_NAMES=()
PLAN_SCRIPT=""       # from a '# script: FILE' line of the experiment file
PLAN_SCRIPT_LINE=""
EXP_LINES=()
EXP_START=()
EXP_COUNT=()
EXP_ARGS=()
declare -A LINE_OF_NAME=()

add_experiment() {
    local line_no=$1 text=$2 name w
    split_words "$text" || die "$EXP_FILE:$line_no: $PARSE_ERROR"
    (( ${#WORDS[@]} > 0 )) || return 0
    name=${WORDS[0]}
    if [[ $name == -* ]]; then
        die "$EXP_FILE:$line_no: a line starts with the experiment's name, then its flags;" \
            "got '$name' first (e.g. 'A1 $name ...')"
    fi
    [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.+-]*$ ]] ||
        die "$EXP_FILE:$line_no: experiment name '$name' may only hold letters, digits and . _ + -" \
            "(it names the log file)"
    if [[ -n ${LINE_OF_NAME[$name]:-} ]]; then
        die "$EXP_FILE:$line_no: duplicate experiment name '$name' (first on line ${LINE_OF_NAME[$name]})"
    fi
    if (( ${#WORDS[@]} > 1 )) && [[ ${WORDS[1]} != -* ]]; then
        die "$EXP_FILE:$line_no: '$name' is followed by '${WORDS[1]}', not a flag;" \
            "one experiment per line: NAME --flag value ... (names cannot hold spaces)"
    fi
    for w in "${WORDS[@]}"; do
        if [[ $w == --name || $w == --name=* ]]; then
            die "$EXP_FILE:$line_no: '$name' sets --name; $PROG passes --name $name itself, remove it"
        fi
    done
    LINE_OF_NAME[$name]=$line_no
    EXP_NAMES+=("$name")
    EXP_LINES+=("$line_no")
    EXP_START+=("${#EXP_ARGS[@]}")
    EXP_COUNT+=($(( ${#WORDS[@]} - 1 )))
    EXP_ARGS+=("${WORDS[@]:1}")
}

parse_experiment_file() {
    local line="" line_no=0 start=0 text="" continued=0 trimmed backslashes
    [[ -e $EXP_FILE ]] || die "experiment file not found: $EXP_FILE"
    [[ -f $EXP_FILE && -r $EXP_FILE ]] || die "cannot read experiment file: $EXP_FILE"
    while IFS= read -r line || [[ -n $line ]]; do
        line_no=$((line_no + 1))
        line=${line%$'\r'}
        if (( ! continued )); then
            trimmed=${line#"${line%%[![:space:]]*}"}
            if [[ $trimmed =~ ^#[[:space:]]*script:[[:space:]]*(.*)$ ]]; then
                directive=${BASH_REMATCH[1]%"${BASH_REMATCH[1]##*[![:space:]]}"}
                (( ${#EXP_NAMES[@]} == 0 )) ||
                    die "$EXP_FILE:$line_no: '# script:' must come before the first experiment"
                [[ -z $PLAN_SCRIPT ]] ||
                    die "$EXP_FILE:$line_no: a second '# script:' line (the first is on line $PLAN_SCRIPT_LINE)"
                [[ $directive =~ ^[^[:space:]]+$ ]] ||
                    die "$EXP_FILE:$line_no: '# script:' takes one file name, e.g. '# script: train_clip.py'"
                PLAN_SCRIPT=$directive
                PLAN_SCRIPT_LINE=$line_no
                continue
            fi
            # A comment line ends there even when it ends in a backslash, as in the shell.
            [[ -z $trimmed || $trimmed == '#'* ]] && continue
            start=$line_no
            text=""
        fi
        backslashes=${line##*[!\\]}
        if (( ${#backslashes} % 2 == 1 )); then
            text+=${line%\\}
            continued=1
            continue
        fi
        text+=$line
        continued=0
        add_experiment "$start" "$text"
    done <"$EXP_FILE"
    (( continued )) && add_experiment "$start" "$text"
    (( ${#EXP_NAMES[@]} > 0 )) || die "$EXP_FILE: no experiments (expected lines like 'A1 --lr 5e-6 ...')"
}

exp_flags() {  # sets FLAGS to the flags of experiment $1
    local i=$1
    FLAGS=()
    (( EXP_COUNT[i] > 0 )) && FLAGS=("${EXP_ARGS[@]:EXP_START[i]:EXP_COUNT[i]}")
    return 0
}

parse_experiment_file

# ---------------------------------------------------------------- GPUs, python, scripts

# One slot per entry of SLOT_GPU; "" is the CPU.
SLOT_GPU=()
gpu_list() {  # $1 comma-separated ids, $2 where they came from
    local ids=() id
    IFS=, read -ra ids <<<"$1"
    [[ ${#ids[@]} -gt 0 ]] || die "$2 lists no GPU (use --gpus cpu to run on the CPU)"
    [[ $1 != *, ]] || die "$2 '$1' has an empty entry"
    for id in "${ids[@]}"; do
        [[ $id =~ ^[A-Za-z0-9:._-]+$ ]] || die "$2 '$1': '$id' is not a GPU id (e.g. --gpus 0,1)"
        SLOT_GPU+=("$id")
    done
}

if (( SLURM )); then
    SLOT_GPU=("")   # SLURM hands out the GPUs
    GPU_SOURCE="SLURM"
elif (( GPU_SPEC_SET )); then
    if [[ $GPU_SPEC == cpu ]]; then
        SLOT_GPU=("")
        GPU_SOURCE="--gpus cpu"
    else
        [[ -n $GPU_SPEC ]] || die "--gpus is empty (use --gpus cpu to run on the CPU)"
        gpu_list "$GPU_SPEC" "--gpus"
        GPU_SOURCE="--gpus"
    fi
elif [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    if [[ -z $CUDA_VISIBLE_DEVICES ]]; then
        SLOT_GPU=("")
        GPU_SOURCE="CUDA_VISIBLE_DEVICES is empty"
    else
        gpu_list "$CUDA_VISIBLE_DEVICES" "CUDA_VISIBLE_DEVICES"
        GPU_SOURCE="from CUDA_VISIBLE_DEVICES"
    fi
else
    smi_ids=()
    if command -v nvidia-smi >/dev/null 2>&1; then
        while IFS= read -r smi_line; do
            [[ $smi_line =~ ^GPU\ ([0-9]+): ]] && smi_ids+=("${BASH_REMATCH[1]}")
        done < <(nvidia-smi -L 2>/dev/null)
    fi
    if (( ${#smi_ids[@]} > 0 )); then
        SLOT_GPU=("${smi_ids[@]}")
        GPU_SOURCE="from nvidia-smi -L"
    else
        SLOT_GPU=("")
        GPU_SOURCE="no GPU found by nvidia-smi -L"
    fi
fi

slot_label() {
    if [[ -z ${SLOT_GPU[$1]} ]]; then echo "CPU"; else echo "GPU ${SLOT_GPU[$1]}"; fi
}

if [[ -z $PY ]]; then
    if [[ -n ${PYTHON:-} ]]; then
        PY=$PYTHON
    elif [[ -x $SCRIPT_DIR/.venv/bin/python ]]; then
        # Relative when we run from the repository root, so the printed commands stay short.
        if [[ $SCRIPT_DIR == "$PWD" ]]; then PY=.venv/bin/python; else PY=$SCRIPT_DIR/.venv/bin/python; fi
    else
        PY=python
    fi
fi

# The scripts of the current directory win over the ones next to this file, so a checkout's
# run_experiments.sh can drive another working copy (and the tests can drive a stub trainer).
find_script() {
    if [[ -f $1 ]]; then echo "$1"
    elif [[ -f $SCRIPT_DIR/$1 ]]; then echo "$SCRIPT_DIR/$1"
    fi
}
SEARCHED=$PWD
[[ $SCRIPT_DIR == "$PWD" ]] || SEARCHED+=" or $SCRIPT_DIR"
# The training script: --script, else the file's '# script:' line, else train_swin.py.
if [[ -n $SCRIPT_FLAG ]]; then
    TRAINER_NAME=$SCRIPT_FLAG
    TRAINER_SOURCE="--script"
elif [[ -n $PLAN_SCRIPT ]]; then
    TRAINER_NAME=$PLAN_SCRIPT
    TRAINER_SOURCE="'# script:' on $EXP_FILE:$PLAN_SCRIPT_LINE"
else
    TRAINER_NAME=train_swin.py
    TRAINER_SOURCE="the default"
fi
TRAINER=$(find_script "$TRAINER_NAME")
COLLECT=$(find_script collect_results.py)

problem() {  # fatal in a real run, a warning in a dry run
    if (( DRY_RUN )); then echo "$PROG: warning: $*" >&2; else die "$*"; fi
}
command -v -- "$PY" >/dev/null 2>&1 || problem "python '$PY' not found (use --python PATH or PYTHON=...)"
if [[ -z $TRAINER ]]; then
    if [[ $TRAINER_NAME == /* ]]; then
        problem "training script $TRAINER_NAME ($TRAINER_SOURCE) not found"
    else
        problem "training script $TRAINER_NAME ($TRAINER_SOURCE) not found in $SEARCHED"
    fi
    TRAINER=$TRAINER_NAME
fi

# ---------------------------------------------------------------- plan

# Two runners on one log dir would run the same experiments twice on the same GPUs; take the lock
# before reading the .done markers so the skip list is not stale. Released by the kernel at exit.
if (( ! DRY_RUN )); then
    mkdir -p -- "$LOG_DIR" || die "cannot create log dir $LOG_DIR"
    if command -v flock >/dev/null 2>&1; then
        exec 9>>"$LOG_DIR/.run_experiments.lock" || die "cannot open $LOG_DIR/.run_experiments.lock"
        if ! flock -n 9; then
            die "another $PROG (pid $(cat "$LOG_DIR/.run_experiments.lock" 2>/dev/null)) is running" \
                "with --log_dir $LOG_DIR; stop it first, or use another --log_dir"
        fi
        echo $$ >"$LOG_DIR/.run_experiments.lock"
    fi
fi

declare -A OUTCOME=()   # name -> skipped | done | failed | interrupted; none: not started
N_SKIPPED=0
PENDING=()   # indices into EXP_NAMES, in file order
SKIP_LINES=()
for i in "${!EXP_NAMES[@]}"; do
    name=${EXP_NAMES[i]}
    done_file=$LOG_DIR/$name.done
    if [[ -e $done_file ]]; then
        SKIP_LINES+=("skip $name (finished)")
        # A marker records the flags it ran with: an edited line is pointed out, not run silently.
        exp_flags "$i"
        recorded=$(sed -n 's/^flags: //p' "$done_file" 2>/dev/null | head -n 1)
        if [[ -n $recorded && $recorded != "$(quote_words ${FLAGS[@]+"${FLAGS[@]}"})" ]]; then
            SKIP_LINES+=("  note: $name's flags in $EXP_FILE differ from the run recorded in"
                         "  $done_file; delete that file to run $name again")
        fi
        OUTCOME[$name]=skipped
        N_SKIPPED=$((N_SKIPPED + 1))
    else
        PENDING+=("$i")
    fi
done

# ---------------------------------------------------------------- SLURM (--slurm)

# The body of every batch script, after the generated part that sets PROG, PLAN, WORKDIR, PY,
# SCRIPT, TASK_PY, LOG_DIR, GPUS, NODES, KILL_GRACE_S and, per array task, NAME, LINE, OUTPUT_DIR
# and FLAGS. It runs the same command line as the local queue, with the same log, .done marker and
# log lines; what it adds is the bookkeeping a cluster needs (slurm_task.py) and the stop before
# the time limit: SIGUSR1 (--signal=B:USR1@...) stops the trainer and requeues the task, whose
# next attempt continues the run folder's last.pkl with --resume.
read -r -d '' BATCH_BODY <<'EOF'
# Set at once: a signal before the trainer starts must not kill this script unrecorded.
STOP=""
trap 'STOP=USR1' USR1
trap 'STOP=TERM' TERM
cd "$WORKDIR" || exit 1
TASK=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-0}}_${SLURM_ARRAY_TASK_ID:-0}
LOG=$LOG_DIR/$NAME.log
HOST=$(hostname -s 2>/dev/null || hostname)
mkdir -p -- "$LOG_DIR"

if [[ -e $LOG_DIR/$NAME.done ]]; then
    echo "$PROG: $NAME finished before ($LOG_DIR/$NAME.done); nothing to do"
    exit 0
fi

quote_words() {
    local out="" w q
    for w in "$@"; do printf -v q '%q' "$w"; out+="${out:+ }$q"; done
    printf '%s' "$out"
}
end_log() {  # the closing line, on a line of its own after a progress bar
    [[ -n $(tail -c 1 -- "$LOG" 2>/dev/null) ]] && echo >>"$LOG"
    printf '===== %s: %s =====\n' "$PROG" "$1" >>"$LOG"
}

RESUME=$("$PY" "$TASK_PY" start "$LOG_DIR/$NAME.task" "$TASK" "$NAME" "$OUTPUT_DIR" "$HOST")
cmd=("$SCRIPT" --name "$NAME" ${FLAGS[@]+"${FLAGS[@]}"})
[[ -n $RESUME ]] && cmd+=(--resume "$RESUME")
if (( NODES > 1 )); then
    # One torchrun per node; they meet at the first node (c10d rendezvous), GPUS processes each.
    HEAD=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" | head -n 1)
    PORT=$((29500 + ${SLURM_JOB_ID:-0} % 10000))
    cmd=(srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1
         "$PY" -m torch.distributed.run --nnodes="$NODES" --nproc_per_node="$GPUS"
         --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" --rdzv_id="$TASK" "${cmd[@]}")
elif (( GPUS > 1 )); then
    cmd=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" "${cmd[@]}")
else
    cmd=("$PY" "${cmd[@]}")
fi
DEVICE="SLURM task $TASK on $HOST"
(( GPUS > 0 )) && DEVICE+=", $((GPUS * NODES)) GPU(s)"
printf '===== %s: %s, %s, started %(%Y-%m-%d %H:%M:%S)T =====\n%s\n' \
    "$PROG" "$NAME" "$DEVICE" -1 "$(quote_words "${cmd[@]}")" >>"$LOG"
[[ -n $RESUME ]] && echo "$PROG: resuming $RESUME (its last.pkl)" >>"$LOG"

T0=$SECONDS
RC=0
if [[ -z $STOP ]]; then
    set -m   # the trainer gets its own process group, so a stop reaches its workers too
    (
        trap - USR1 TERM
        PYTHONUNBUFFERED=1 exec "${cmd[@]}" </dev/null >>"$LOG" 2>&1
    ) &
    PID=$!
    set +m
    wait "$PID"
    RC=$?
fi
if [[ -n $STOP && -n ${PID:-} ]]; then
    # SIGUSR1: the time limit is near; SIGTERM: cancelled, pre-empted or out of time. Either way
    # stop the trainer now: what it has finished is in last.pkl, written atomically each epoch.
    kill -TERM -- "-$PID" 2>/dev/null
    for ((k = 0; k < KILL_GRACE_S * 10; k++)); do
        kill -0 -- "-$PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$PID" 2>/dev/null
    wait "$PID" 2>/dev/null
fi
SECONDS_USED=$((SECONDS - T0))

if [[ $STOP == USR1 ]]; then
    end_log "$NAME stopped before the time limit after ${SECONDS_USED}s; requeued, it resumes from last.pkl"
    "$PY" "$TASK_PY" finish "$LOG_DIR/$NAME.task" "$NAME" "$OUTPUT_DIR" requeued 0 "$LOG"
    if ! scontrol requeue "$TASK"; then
        "$PY" "$TASK_PY" finish "$LOG_DIR/$NAME.task" "$NAME" "$OUTPUT_DIR" stopped 0 "$LOG"
        echo "$PROG: scontrol requeue $TASK failed; resubmit the plan to resume $NAME" >&2
        exit 1
    fi
    exit 0
elif [[ $STOP == TERM ]]; then
    end_log "$NAME stopped by SIGTERM after ${SECONDS_USED}s (cancelled, pre-empted or out of time)"
    "$PY" "$TASK_PY" finish "$LOG_DIR/$NAME.task" "$NAME" "$OUTPUT_DIR" stopped 143 "$LOG"
    exit 143
elif (( RC == 0 )); then
    TMP=$(mktemp "$LOG_DIR/.$NAME.done.XXXXXX") || exit 1
    {
        echo "name: $NAME"
        echo "experiment_file: $PLAN:$LINE"
        printf 'finished: %(%Y-%m-%d %H:%M:%S)T\n' -1
        echo "seconds: $SECONDS_USED"
        echo "device: $DEVICE"
        echo "flags: $(quote_words ${FLAGS[@]+"${FLAGS[@]}"})"
    } >"$TMP"
    chmod "$(printf '%o' $(( 0666 & ~0$(umask) )))" "$TMP" 2>/dev/null
    mv -f -- "$TMP" "$LOG_DIR/$NAME.done"
    end_log "$NAME exit code 0 after ${SECONDS_USED}s"
    "$PY" "$TASK_PY" finish "$LOG_DIR/$NAME.task" "$NAME" "$OUTPUT_DIR" done 0 "$LOG"
    exit 0
else
    end_log "$NAME exit code $RC after ${SECONDS_USED}s"
    REASON=$("$PY" "$TASK_PY" finish "$LOG_DIR/$NAME.task" "$NAME" "$OUTPUT_DIR" failed "$RC" "$LOG")
    echo "$PROG: $NAME FAILED (exit $RC): $REASON; log $LOG" >&2
    exit "$RC"
fi
EOF

# Seconds before the time limit at which SLURM sends SIGUSR1 to the batch script (unless the
# sbatch options set --signal): enough to stop the trainer and requeue, not to finish an epoch.
SIGNAL_BEFORE_S=300

json_field() {  # $1 file, $2 key: a string value of slurm_task.py's indented JSON, or ""
    sed -n "s/^  \"$2\": \"\\(.*\\)\",\\{0,1\\}\$/\\1/p" "$1" 2>/dev/null | head -n 1
}

slurm_submit() {
    local gpus=0 nodes=1 k o v signal_set=0 output_dir stem script_file task_py id out i name state job
    for ((k = 0; k < ${#SBATCH_OPTS[@]}; k++)); do
        o=${SBATCH_OPTS[k]}
        v=""
        case $o in
            --array|--array=*|-a|-a?*)
                die "$o: $PROG builds the job array itself (one task per experiment);" \
                    "cap the tasks that run at once with --max_running N" ;;
            --signal|--signal=*) signal_set=1 ;;
            --gpus-per-task=*) v=${o#*=} ;;
            --gpus-per-task) v=${SBATCH_OPTS[k + 1]:-} ;;
            --nodes=*) nodes=${o#*=} ;;
            --nodes|-N) nodes=${SBATCH_OPTS[k + 1]:-} ;;
            -N?*) nodes=${o#-N} ;;
        esac
        if [[ -n $v ]]; then
            gpus=${v##*:}   # --gpus-per-task=a100:2 -> 2
            [[ $gpus =~ ^[0-9]+$ ]] || die "--gpus-per-task '$v' is not a GPU count"
        fi
    done
    [[ $nodes =~ ^[1-9][0-9]*$ ]] ||
        die "--nodes '$nodes': each experiment needs a fixed number of nodes (e.g. --nodes 2)"
    if (( nodes > 1 && gpus == 0 )); then
        die "--nodes $nodes: a multi-node experiment runs torchrun on each node; give --gpus-per-task N"
    fi
    [[ $LOG_DIR != *[[:space:]]* ]] || die "--log_dir '$LOG_DIR': no spaces with --slurm (#SBATCH lines)"
    TASK_PY=$(find_script slurm_task.py)
    [[ -n $TASK_PY ]] || problem "slurm_task.py not found in $SEARCHED"
    [[ -z $TASK_PY || $TASK_PY == /* ]] || TASK_PY=$PWD/$TASK_PY

    # Experiments still in the queue from an earlier submission are not submitted twice.
    local submit=() queued_lines=()
    for i in ${PENDING[@]+"${PENDING[@]}"}; do
        name=${EXP_NAMES[i]}
        state=$(json_field "$LOG_DIR/$name.task" state)
        job=$(json_field "$LOG_DIR/$name.task" job)
        if [[ $state =~ ^(submitted|running|requeued)$ && -n $job ]] &&
           [[ -n $(squeue -h -j "$job" -o %T 2>/dev/null) ]]; then
            queued_lines+=("skip $name (in the SLURM queue as $job, $state)")
        else
            [[ $state == failed ]] &&
                queued_lines+=("  $name failed last time ($job): $(json_field "$LOG_DIR/$name.task" reason)")
            [[ $state =~ ^(stopped|requeued|running)$ ]] &&
                queued_lines+=("  $name was stopped last time ($job): this task resumes its run")
            submit+=("$i")
        fi
    done

    stem=$(basename -- "$EXP_FILE")
    stem=${stem%.*}
    stem=${stem//[^A-Za-z0-9_.+-]/_}
    local script_text array hint
    hint="$PY ${COLLECT:-collect_results.py}"
    [[ $LOG_DIR == logs/experiments ]] || hint+=" --tasks_dir $LOG_DIR"
    script_text=$(
        echo '#!/bin/bash'
        echo "# Generated by $PROG from $EXP_FILE; one array task per experiment, task id -> line below."
        echo "# Submit with: sbatch --array=0-N[%M] [options] THIS_FILE (run_experiments.sh --slurm does)."
        echo "#SBATCH --job-name=$stem"
        echo "#SBATCH --output=$LOG_DIR/slurm/%A_%a.out"
        echo "#SBATCH --open-mode=append"
        echo "#SBATCH --requeue"
        (( signal_set )) || echo "#SBATCH --signal=B:USR1@$SIGNAL_BEFORE_S"
        echo "#SBATCH --ntasks-per-node=1"
        echo "set -uo pipefail"
        printf 'PROG=%q\nPLAN=%q\nWORKDIR=%q\nPY=%q\nSCRIPT=%q\nTASK_PY=%q\nLOG_DIR=%q\n' \
            "$PROG" "$EXP_FILE" "$PWD" "$PY" "$TRAINER" "$TASK_PY" "$LOG_DIR"
        echo "GPUS=$gpus   # per node (--gpus-per-task); more than 1: torchrun"
        echo "NODES=$nodes  # more than 1: srun starts torchrun on each node"
        echo "KILL_GRACE_S=$KILL_GRACE_S"
        echo 'case ${SLURM_ARRAY_TASK_ID:-} in'
        k=0
        for i in ${submit[@]+"${submit[@]}"}; do
            exp_flags "$i"
            output_dir=$(dirname -- "$TRAINER")/checkpoints
            for ((o = 0; o < ${#FLAGS[@]}; o++)); do
                case ${FLAGS[o]} in
                    --output_dir=*) output_dir=${FLAGS[o]#*=} ;;
                    --output_dir) output_dir=${FLAGS[o + 1]:-} ;;
                esac
            done
            printf '    %d) NAME=%s; LINE=%s; OUTPUT_DIR=%s\n       FLAGS=(%s) ;;\n' "$k" \
                "${EXP_NAMES[i]}" "${EXP_LINES[i]}" "$(quote_words "$output_dir")" \
                "$(quote_words ${FLAGS[@]+"${FLAGS[@]}"})"
            k=$((k + 1))
        done
        echo '    *) echo "no experiment for array task ${SLURM_ARRAY_TASK_ID:-(none)}" >&2; exit 2 ;;'
        echo 'esac'
        printf '%s\n' "$BATCH_BODY"
    )
    array="0-$(( ${#submit[@]} - 1 ))${MAX_RUNNING:+%$MAX_RUNNING}"

    echo "$PROG: $EXP_FILE: ${#EXP_NAMES[@]} experiments, ${#submit[@]} to submit, $N_SKIPPED finished"
    echo "$PROG: python $PY, trainer $TRAINER ($TRAINER_SOURCE), logs in $LOG_DIR/"
    (( ${#SKIP_LINES[@]} )) && printf '%s\n' "${SKIP_LINES[@]}"
    (( ${#queued_lines[@]} )) && printf '%s\n' "${queued_lines[@]}"
    if (( ${#submit[@]} == 0 )); then
        echo "nothing to submit; the results table: $hint"
        exit 0
    fi
    if (( DRY_RUN )); then
        echo "dry run: nothing is submitted. The command, then the batch script:"
        echo "  $(quote_words sbatch --array="$array" ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"} \
            "$LOG_DIR/slurm/$stem.sbatch")"
        k=0
        for i in "${submit[@]}"; do
            echo "  task $k: ${EXP_NAMES[i]} (line ${EXP_LINES[i]}, log $LOG_DIR/${EXP_NAMES[i]}.log)"
            k=$((k + 1))
        done
        echo "----- $LOG_DIR/slurm/$stem.sbatch -----"
        printf '%s\n' "$script_text"
        exit 0
    fi
    command -v sbatch >/dev/null 2>&1 || die "sbatch not found: --slurm needs SLURM's commands on PATH"
    mkdir -p -- "$LOG_DIR/slurm" || die "cannot create $LOG_DIR/slurm"
    script_file=$LOG_DIR/slurm/$stem.sbatch
    printf '%s\n' "$script_text" >"$script_file.tmp" && mv -f -- "$script_file.tmp" "$script_file" ||
        die "cannot write $script_file"
    out=$(sbatch --parsable --array="$array" ${SBATCH_OPTS[@]+"${SBATCH_OPTS[@]}"} "$script_file" 2>&1)
    local rc=$?
    if (( rc != 0 )); then
        echo "$out" >&2
        die "sbatch refused the job array (exit $rc); the batch script is $script_file"
    fi
    id=${out##*$'\n'}
    id=${id%%;*}
    [[ $id =~ ^[0-9]+$ ]] || die "sbatch printed '$out', not a job id"
    k=0
    for i in "${submit[@]}"; do
        "$PY" "$TASK_PY" submitted "$LOG_DIR/${EXP_NAMES[i]}.task" "${id}_$k" "${EXP_NAMES[i]}" ||
            echo "$PROG: warning: cannot write $LOG_DIR/${EXP_NAMES[i]}.task" >&2
        echo "task ${id}_$k: ${EXP_NAMES[i]} (log $LOG_DIR/${EXP_NAMES[i]}.log)"
        k=$((k + 1))
    done
    echo "submitted job array $id ($array) from $script_file"
    echo "watch: squeue -j $id; when it is done: $hint  (and run this again to"
    echo "submit what did not finish; finished experiments are skipped)"
    exit 0
}

if (( SLURM )); then
    slurm_submit
fi

if [[ -z ${SLOT_GPU[0]} ]]; then
    slots_text="CPU, one experiment at a time ($GPU_SOURCE)"
else
    slots_text="$(IFS=,; echo "GPUs ${SLOT_GPU[*]}") ($GPU_SOURCE), one experiment per GPU at a time"
fi
echo "$PROG: $EXP_FILE: ${#EXP_NAMES[@]} experiments, ${#PENDING[@]} to run, $N_SKIPPED finished"
echo "$PROG: $slots_text"
echo "$PROG: python $PY, trainer $TRAINER ($TRAINER_SOURCE), logs in $LOG_DIR/"
(( ${#SKIP_LINES[@]} )) && printf '%s\n' "${SKIP_LINES[@]}"

command_line() {  # $1 slot, $2 experiment index -> the exact command, pasteable into a shell
    local gpu=${SLOT_GPU[$1]} name=${EXP_NAMES[$2]}
    exp_flags "$2"
    printf 'CUDA_VISIBLE_DEVICES=%s %s' "$(quote_words "$gpu")" \
        "$(quote_words "$PY" "$TRAINER" --name "$name" ${FLAGS[@]+"${FLAGS[@]}"})"
}

if (( DRY_RUN )); then
    echo "dry run: nothing is started. GPU shown as if all runs took equally long; in a real run"
    echo "each experiment takes the first GPU that frees."
    n=0
    for i in ${PENDING[@]+"${PENDING[@]}"}; do
        s=$(( n % ${#SLOT_GPU[@]} ))
        echo "[$(slot_label "$s")] ${EXP_NAMES[i]}  (line ${EXP_LINES[i]}, log $LOG_DIR/${EXP_NAMES[i]}.log)"
        echo "  $(command_line "$s" "$i")"
        n=$((n + 1))
    done
    exit 0
fi

# ---------------------------------------------------------------- queue

STATE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/run_experiments.XXXXXX") || die "cannot create a temp dir"

SLOT_PID=()      # wrapper pid (= its process group id) per slot, "" when free
SLOT_EXP=()      # experiment index per slot
SLOT_T0=()       # $SECONDS at start per slot
for s in "${!SLOT_GPU[@]}"; do SLOT_PID[s]=""; SLOT_EXP[s]=""; SLOT_T0[s]=0; done
RUNNING=0
STARTED=0
TICKER_PID=""
declare -A FAILED_CODE=()
N_FAILED=0

cleanup() {
    [[ -n $TICKER_PID ]] && kill "$TICKER_PID" 2>/dev/null
    [[ -n ${STATE_DIR:-} ]] && rm -rf -- "$STATE_DIR"
}
trap cleanup EXIT

start_experiment() {  # $1 slot, $2 experiment index
    local s=$1 i=$2 name=${EXP_NAMES[$2]} log rc_file cmd
    log=$LOG_DIR/$name.log
    rc_file=$STATE_DIR/$name.rc
    cmd=$(command_line "$s" "$i")
    exp_flags "$i"
    STARTED=$((STARTED + 1))
    printf '===== %s: %s, %s, started %(%Y-%m-%d %H:%M:%S)T =====\n%s\n' \
        "$PROG" "$name" "$(slot_label "$s")" -1 "$cmd" >>"$log"
    # Job control on for this fork only: the experiment gets its own process group, so a stop can
    # kill it with its DataLoader workers, and a Ctrl-C at the terminal reaches only this script.
    set -m
    (
        trap - INT TERM HUP
        exec 9>&-
        CUDA_VISIBLE_DEVICES=${SLOT_GPU[$s]} PYTHONUNBUFFERED=1 \
            "$PY" "$TRAINER" --name "$name" ${FLAGS[@]+"${FLAGS[@]}"} </dev/null >>"$log" 2>&1
        echo $? >"$rc_file"
    ) &
    SLOT_PID[s]=$!
    set +m
    SLOT_EXP[s]=$i
    SLOT_T0[s]=$SECONDS
    RUNNING=$((RUNNING + 1))
    say "start $name on $(slot_label "$s") ($STARTED/${#PENDING[@]}), log $log"
}

write_done() {  # $1 experiment index, $2 slot, $3 seconds; atomic: a crash leaves no half marker
    local i=$1 name=${EXP_NAMES[$1]} tmp
    exp_flags "$i"
    tmp=$(mktemp "$LOG_DIR/.$name.done.XXXXXX") || { say "warning: cannot write $LOG_DIR/$name.done"; return; }
    {
        echo "name: $name"
        echo "experiment_file: $EXP_FILE:${EXP_LINES[i]}"
        printf 'finished: %(%Y-%m-%d %H:%M:%S)T\n' -1
        echo "seconds: $3"
        echo "device: $(slot_label "$2")"
        echo "flags: $(quote_words ${FLAGS[@]+"${FLAGS[@]}"})"
    } >"$tmp"
    chmod "$(printf '%o' $(( 0666 & ~0$(umask) )))" "$tmp" 2>/dev/null   # mktemp made it 0600
    sync -- "$tmp" 2>/dev/null
    mv -f -- "$tmp" "$LOG_DIR/$name.done" || say "warning: cannot write $LOG_DIR/$name.done"
}

end_log() {  # $1 log, $2 text: the runner's closing line, on a line of its own after a progress bar
    [[ -n $(tail -c 1 -- "$1" 2>/dev/null) ]] && echo >>"$1"
    printf '===== %s: %s =====\n' "$PROG" "$2" >>"$1"
}

show_log_tail() {  # $1 log, $2 name: the last lines of this attempt, progress bars unrolled
    tr '\r' '\n' <"$1" 2>/dev/null | awk -v header="===== $PROG: $2, " '
        index($0, header) == 1 { n = 0; skip_command = 1; next }   # a new attempt starts
        skip_command { skip_command = 0; next }
        /^[[:space:]]*$/ { next }
        { last[n % 5] = substr($0, 1, 200); n++ }
        END { for (i = (n > 5 ? n - 5 : 0); i < n; i++) print "    | " last[i % 5] }'
}

finish_slot() {  # $1 slot whose experiment has exited
    local s=$1 i=${SLOT_EXP[$1]} name log rc_file rc wait_rc seconds
    name=${EXP_NAMES[i]}
    log=$LOG_DIR/$name.log
    rc_file=$STATE_DIR/$name.rc
    wait "${SLOT_PID[s]}" 2>/dev/null
    wait_rc=$?
    seconds=$((SECONDS - SLOT_T0[s]))
    if [[ -s $rc_file ]]; then
        rc=$(<"$rc_file")
    elif (( wait_rc != 127 )); then
        rc=$wait_rc   # the wrapper itself was killed from outside (e.g. 137 = SIGKILL)
    else
        rc="?"        # ... and its status was already consumed
    fi
    if [[ $rc == 0 ]]; then
        write_done "$i" "$s" "$seconds"
        OUTCOME[$name]="done"
        say "done $name on $(slot_label "$s") after $(duration "$seconds")"
    else
        OUTCOME[$name]=failed
        FAILED_CODE[$name]=$rc
        N_FAILED=$((N_FAILED + 1))
        say "FAILED $name: exit code $rc after $(duration "$seconds"), log $log"
        show_log_tail "$log" "$name"
    fi
    end_log "$log" "$name exit code $rc after $(duration "$seconds")"
    SLOT_PID[s]=""
    SLOT_EXP[s]=""
    RUNNING=$((RUNNING - 1))
}

reap_finished() {
    local s pid
    for s in "${!SLOT_GPU[@]}"; do
        pid=${SLOT_PID[s]}
        [[ -n $pid ]] || continue
        if [[ -e $STATE_DIR/${EXP_NAMES[${SLOT_EXP[s]}]}.rc ]] || ! kill -0 "$pid" 2>/dev/null; then
            finish_slot "$s"
        fi
    done
}

print_summary() {  # every experiment of the file, in file order
    local i name done_=() failed=() skipped=() interrupted=() not_started=() counts
    for i in "${!EXP_NAMES[@]}"; do
        name=${EXP_NAMES[i]}
        case ${OUTCOME[$name]:-} in
            done) done_+=("$name") ;;
            failed) failed+=("$name (exit ${FAILED_CODE[$name]}, log $LOG_DIR/$name.log)") ;;
            interrupted) interrupted+=("$name") ;;
            skipped) skipped+=("$name") ;;
            *) not_started+=("$name") ;;
        esac
    done
    counts="${#done_[@]} done, ${#failed[@]} failed, ${#skipped[@]} skipped (finished before)"
    if (( ${#interrupted[@]} + ${#not_started[@]} > 0 )); then
        counts+=", ${#interrupted[@]} interrupted, ${#not_started[@]} not started"
    fi
    echo
    echo "==== summary: $counts ===="
    (( ${#done_[@]} )) && echo "done:        ${done_[*]}"
    if (( ${#failed[@]} )); then
        echo "failed:      ${failed[0]}"
        for name in "${failed[@]:1}"; do echo "             $name"; done
    fi
    (( ${#skipped[@]} )) && echo "skipped:     ${skipped[*]}"
    (( ${#interrupted[@]} )) &&
        echo "interrupted: ${interrupted[*]} (no .done written; a re-launch runs them again)"
    (( ${#not_started[@]} )) && echo "not started: ${not_started[*]}"
    return 0
}

FORCE_KILL=0
stop_experiments() {
    local s pid alive deadline last killed=0 name
    set +u; last=$!; set -u   # $! is unset until the first fork
    # A signal can land between a fork and the line that records its pid: stop that one as well.
    if [[ -n $last && $last != "$TICKER_PID" && " ${SLOT_PID[*]} " != *" $last "* ]]; then
        kill -TERM -- "-$last" 2>/dev/null
    fi
    for s in "${!SLOT_GPU[@]}"; do
        pid=${SLOT_PID[s]}
        [[ -n $pid ]] && kill -TERM -- "-$pid" 2>/dev/null
    done
    # Wait for each process group to be gone; after the grace period (or a second Ctrl-C), KILL it.
    # Bounded: a process that is already a zombie under a non-reaping init still "exists".
    deadline=$((SECONDS + KILL_GRACE_S))
    while :; do
        alive=0
        for s in "${!SLOT_GPU[@]}"; do
            pid=${SLOT_PID[s]}
            [[ -n $pid ]] && kill -0 -- "-$pid" 2>/dev/null && alive=1
        done
        (( alive )) || break
        if (( killed )); then
            (( SECONDS < deadline )) || break
        elif (( FORCE_KILL || SECONDS >= deadline )); then
            for s in "${!SLOT_GPU[@]}"; do
                pid=${SLOT_PID[s]}
                [[ -n $pid ]] && kill -KILL -- "-$pid" 2>/dev/null
            done
            killed=1
            deadline=$((SECONDS + 3))
        fi
        sleep 0.1
    done
    for s in "${!SLOT_GPU[@]}"; do
        pid=${SLOT_PID[s]}
        [[ -n $pid ]] || continue
        wait "$pid" 2>/dev/null
        name=${EXP_NAMES[${SLOT_EXP[s]}]}
        # Unless it had finished already and the signal landed while we were booking it.
        [[ -n ${OUTCOME[$name]:-} ]] || OUTCOME[$name]=interrupted
        end_log "$LOG_DIR/$name.log" "$name interrupted after $(duration $((SECONDS - SLOT_T0[s])))"
        SLOT_PID[s]=""
    done
}

on_signal() {  # $1 signal name, $2 exit status
    trap 'FORCE_KILL=1' INT TERM HUP
    echo
    say "got SIG$1: stopping $RUNNING running experiment(s), waiting up to ${KILL_GRACE_S}s" \
        "(Ctrl-C again to kill at once)"
    stop_experiments
    print_summary
    exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP

next=0
while :; do
    for s in "${!SLOT_GPU[@]}"; do
        [[ -z ${SLOT_PID[s]} ]] || continue
        (( next < ${#PENDING[@]} )) || break
        start_experiment "$s" "${PENDING[next]}"
        next=$((next + 1))
    done
    (( RUNNING > 0 )) || break
    # wait -n returns when any child exits (or a trapped signal arrives). The ticker bounds the
    # wait in case a child's exit was consumed before we got here (it happens when one is killed
    # from outside), so a free GPU never idles for long.
    if [[ -z $TICKER_PID ]] || ! kill -0 "$TICKER_PID" 2>/dev/null; then
        sleep 5 &
        TICKER_PID=$!
    fi
    wait -n
    reap_finished
done
trap - INT TERM HUP

print_summary
if [[ -z $COLLECT ]]; then
    echo "note: collect_results.py not found in $SEARCHED; no results table"
else
    echo
    echo "==== results ($PY $COLLECT) ===="
    "$PY" "$COLLECT" </dev/null
    collect_rc=$?
    (( collect_rc == 0 )) || echo "note: $COLLECT failed (exit $collect_rc); no results table"
fi
(( N_FAILED == 0 ))
