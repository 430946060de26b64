"""run_experiments.sh and the shipped experiment files.

The experiment files are checked against the user's notes themselves (../shared/seeds), so a typo
in a flag - the kind that cost the user a night with `--no_multi_scale` - fails here, not on a GPU.
The queue is driven with a stub train_swin.py that records how it was called: what is tested is the
runner (order, GPUs, logs, markers, failures, re-launch, signals), in about a second per run.
"""
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'run_experiments.sh')
SEEDS = os.path.join(ROOT, '..', 'shared', 'seeds')
# The user's notes sit next to the repository in the project's workspace, not in a clone of it:
# the comparisons with them run where they are and are skipped, saying why, where they are not.
needs_seeds = pytest.mark.skipif(
    not os.path.isdir(SEEDS),
    reason=f"the user's notes are not here ({os.path.normpath(SEEDS)} does not exist: it is part of the "
           "project's workspace, not of a clone); the experiment files are checked against them there")
EXPERIMENTS = os.path.join(ROOT, 'experiments')

STAGE_FILES = {
    'stage1_core_ablations.txt': ['A1', 'A2', 'A3'],
    'stage2_ranking_alpha.txt': ['C1', 'C2', 'C3'],
    'stage3_model_size.txt': ['B1', 'B2'],
    'stage4_regularization.txt': ['D1', 'D2', 'D3', 'D4', 'D5', 'D6'],
    'stage5_learning_rate.txt': ['E1', 'E2', 'E3', 'E4', 'E5'],
}
ABLATION_FILE = 'ablations_lr5e7.txt'
ABLATION_NAMES = ['baseline_lr5e7', 'A1_lr5e7', 'A2_lr5e7', 'B1_lr5e7', 'B2_lr5e7']


# ------------------------------------------------------------------ reading files

def read_experiment_file(path):
    """[(name, flags, line_no)] the way the file format is documented: a trailing backslash joins
    lines, '#' lines are comments, words split like the shell's. Independent of the bash parser,
    so the two are checked against each other by the dry-run test."""
    experiments, text, start = [], None, 0
    with open(path, encoding='utf-8') as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip('\r\n')
            if text is None:
                if not line.strip() or line.lstrip().startswith('#'):
                    continue
                text, start = '', line_no
            if line.endswith('\\'):
                text += line[:-1]
                continue
            words = shlex.split(text + line, comments=True)
            text = None
            if words:
                experiments.append((words[0], words[1:], start))
    assert text is None, f'{path}: ends inside a continued line'
    return experiments


def seed_path(prefix):
    paths = glob.glob(os.path.join(SEEDS, f'{prefix}_*.md'))
    assert len(paths) == 1, f'expected one {prefix}_*.md in {SEEDS}, found {paths}'
    return paths[0]


def command_words(block):
    """The words of a ```bash command in the notes, continuation lines joined."""
    return shlex.split(block.replace('\\\n', ' '))


def seed_000_commands():
    """{'A1': [flags...], ...} from the '### A1: ...' sections of seeds/000 (E3 has no command)."""
    text = open(seed_path('000'), encoding='utf-8').read()
    commands = {}
    for section in re.split(r'^(?=#{2,3} )', text, flags=re.M):
        heading = re.match(r'### (\w+):', section)
        block = re.search(r'```bash\n(.*?)```', section, re.S)
        if heading and block:
            words = command_words(block.group(1))
            assert words[:2] == ['python', 'train_swin.py'], words[:2]
            commands[heading.group(1)] = words[2:]
    return commands


def seed_001_commands():
    """{'baseline': [...], 'A1': [...]}: the manual commands of seeds/001 (its other experiments
    are given only as configuration tables)."""
    text = open(seed_path('001'), encoding='utf-8').read()
    block = next(b for b in re.findall(r'```bash\n(.*?)```', text, re.S) if '# Baseline' in b)
    commands = {}
    for part in re.split(r'^# ', block, flags=re.M)[1:]:
        title, body = part.split('\n', 1)
        words = command_words(body)
        words = words[:words.index('2>&1')]  # drop `2>&1 | tee logs/...`
        assert re.fullmatch(r'CUDA_VISIBLE_DEVICES=\d', words[0]), words[0]
        assert words[1:3] == ['python', 'train_swin.py'], words[1:3]
        commands['baseline' if title.startswith('Baseline') else title.split()[0]] = words[3:]
    return commands


def value(flags, flag):
    return flags[flags.index(flag) + 1]


def with_values(flags, **values):
    flags = list(flags)
    for flag, v in values.items():
        flags[flags.index('--' + flag) + 1] = v
    return flags


def shipped_experiments():
    files = sorted(list(STAGE_FILES) + [ABLATION_FILE])
    # clip_*.txt are train_clip.py's plans (tests/test_train_clip.py checks them)
    assert sorted(f for f in os.listdir(EXPERIMENTS) if not f.startswith('clip_')) == files
    return [(f, exp) for f in files for exp in read_experiment_file(os.path.join(EXPERIMENTS, f))]


# ------------------------------------------------------------------ shipped experiment files

@needs_seeds
def test_stage_files_hold_the_19_experiments_of_the_notes_verbatim():
    notes = seed_000_commands()
    assert sorted(notes) == sorted(n for names in STAGE_FILES.values() for n in names if n != 'E3')
    for file_name, names in STAGE_FILES.items():
        path = os.path.join(EXPERIMENTS, file_name)
        experiments = read_experiment_file(path)
        assert [name for name, _, _ in experiments] == names, file_name
        header = open(path, encoding='utf-8').readline()
        assert header.startswith('# Stage'), f'{file_name}: header comment missing'
        for name, flags, line_no in experiments:
            if name != 'E3':
                assert flags == notes[name], f'{file_name}:{line_no}: {name} differs from the notes'

    # E3 is the baseline the notes mark "already done", with no command: the baseline's config,
    # which is E4's command at 1x the learning rate.
    stage5 = os.path.join(EXPERIMENTS, 'stage5_learning_rate.txt')
    e3 = dict((n, f) for n, f, _ in read_experiment_file(stage5))['E3']
    assert e3 == with_values(notes['E4'], lr='5e-6')
    assert (value(e3, '--model_size'), value(e3, '--ranking_loss_alpha'), value(e3, '--lr'),
            value(e3, '--weight_decay'), value(e3, '--drop_path_rate'),
            value(e3, '--dropout_rate')) == ('base', '0.3', '5e-6', '2e-4', '0.3', '0.4')
    assert '--attention_fusion' in e3 and '--no_multiscale' not in e3
    stage5_text = open(stage5, encoding='utf-8').read()
    assert 'ALREADY DONE' in stage5_text and 'E3.done' in stage5_text


@needs_seeds
def test_ablation_file_is_the_lr5e7_plan():
    notes = seed_001_commands()
    experiments = read_experiment_file(os.path.join(EXPERIMENTS, ABLATION_FILE))
    assert [name for name, _, _ in experiments] == ABLATION_NAMES
    got = {name: flags for name, flags, _ in experiments}
    baseline = notes['baseline']
    after_attention = baseline.index('--attention_fusion') + 1
    expected = {
        'baseline_lr5e7': baseline,
        'A1_lr5e7': notes['A1'],
        # The notes' tables: A2 = no multi-scale, attention kept; B1/B2 smaller models with
        # lighter regularization.
        'A2_lr5e7': baseline[:after_attention] + ['--no_multiscale'] + baseline[after_attention:],
        'B1_lr5e7': with_values(baseline, model_size='tiny', drop_path_rate='0.2', dropout_rate='0.3'),
        'B2_lr5e7': with_values(baseline, model_size='small', drop_path_rate='0.25',
                                dropout_rate='0.35'),
    }
    assert got == expected
    assert notes['A1'] == [w for w in baseline if w != '--attention_fusion']
    for name, flags in got.items():  # the settings the notes say all of them share
        for flag, v in [('--lr', '5e-7'), ('--epochs', '10'), ('--patience', '3'),
                        ('--train_test_num', '1'), ('--ranking_loss_alpha', '0'),
                        ('--batch_size', '32'), ('--weight_decay', '2e-4'),
                        ('--lr_scheduler', 'cosine')]:
            assert value(flags, flag) == v, (name, flag)
        assert {'--no_color_jitter', '--test_random_crop', '--no_spaq'} <= set(flags), name


def test_shipped_lines_parse_as_train_swin_flags():
    import train_swin

    parser = train_swin.build_parser()
    for file_name, (name, flags, line_no) in shipped_experiments():
        try:
            args = parser.parse_args(['--name', name] + flags)
        except SystemExit:
            pytest.fail(f'experiments/{file_name}:{line_no}: {name}: train_swin.py rejects its flags')
        assert args.name == name
        assert args.lr == float(value(flags, '--lr'))
        assert args.model_size == value(flags, '--model_size')
        assert args.ranking_loss_alpha == float(value(flags, '--ranking_loss_alpha'))
        assert bool(args.attention_fusion) == ('--attention_fusion' in flags)
        assert bool(args.no_multiscale) == ('--no_multiscale' in flags)


def test_dry_run_prints_each_shipped_experiment_as_the_exact_command(tmp_path):
    """The bash parser and the documented format agree, and GPUs alternate on two GPUs."""
    bin_dir = fake_nvidia_smi(tmp_path, GPU_LISTING)
    for file_name in sorted(list(STAGE_FILES) + [ABLATION_FILE]):
        path = os.path.join(EXPERIMENTS, file_name)
        out = run_script([path, '--dry-run', '--python', sys.executable], cwd=tmp_path,
                         bin_dir=bin_dir, script=SCRIPT)
        assert out.returncode == 0, out.stdout + out.stderr
        planned = dry_run_plan(out.stdout)
        experiments = read_experiment_file(path)
        assert [name for _, name, _ in planned] == [name for name, _, _ in experiments]
        for k, ((gpu, name, words), (_, flags, _)) in enumerate(zip(planned, experiments)):
            assert gpu == f'GPU {k % 2}'
            assert words[0] == f'CUDA_VISIBLE_DEVICES={k % 2}'
            assert words[1:] == [sys.executable, os.path.join(ROOT, 'train_swin.py'),
                                 '--name', name] + flags
    assert os.listdir(tmp_path) == ['bin'], 'a dry run must not create anything'


# ------------------------------------------------------------------ queue with a stub trainer

STUB_TRAINER = r'''
"""Stand-in for train_swin.py: records its call, then behaves as files named after it say."""
import json, os, subprocess, sys, time
argv = sys.argv[1:]
name = argv[argv.index('--name') + 1]
start = time.time()
print(f'training {name}', flush=True)
if os.path.exists(f'{name}.slow'):  # a long run with a child process, to be interrupted
    child = subprocess.Popen(['sleep', '60'])
    with open(f'{name}.pids.tmp', 'w') as f:
        f.write(f'{os.getpid()} {child.pid}')
    os.replace(f'{name}.pids.tmp', f'{name}.pids')
    child.wait()
time.sleep(float(os.environ.get('STUB_SECONDS', '0.2')))
record = {'who': WHO, 'argv': argv, 'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'),
          'unbuffered': os.environ.get('PYTHONUNBUFFERED'), 'start': start, 'end': time.time()}
with open('calls.jsonl', 'a') as f:
    f.write(json.dumps(record) + '\n')
if os.path.exists(f'{name}.fail'):
    print('boom: No space left on device', file=sys.stderr)
    sys.exit(3)
print('Best test SRCC 0.9000 PLCC 0.9100')
'''
NO_GPU = 'echo "No devices were found"\nexit 6\n'
GPU_LISTING = ('echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)"\n'
               'echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)"\n')


def fake_nvidia_smi(tmp_path, body):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / 'nvidia-smi'
    smi.write_text('#!/bin/sh\n' + body)
    smi.chmod(0o755)
    return bin_dir


def write_stub(folder, who):
    (folder / 'train_swin.py').write_text(f'WHO = {who!r}\n' + STUB_TRAINER)


def copy_launcher(repo):
    """The launcher run_experiments.sh calls (python -m iqa.launch) lives in iqa/ next to it."""
    shutil.copytree(os.path.join(ROOT, 'iqa'), repo / 'iqa', ignore=shutil.ignore_patterns('__pycache__'))


@pytest.fixture
def sandbox(tmp_path):
    """repo/ holds a copy of the script (with its launcher, iqa/) and a stub trainer; work/ is
    where it is run from."""
    repo, work = tmp_path / 'repo', tmp_path / 'work'
    repo.mkdir()
    work.mkdir()
    shutil.copy(SCRIPT, repo / 'run_experiments.sh')
    copy_launcher(repo)
    write_stub(repo, 'script_dir')
    fake_nvidia_smi(tmp_path, NO_GPU)
    return tmp_path


def script_env(bin_dir, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ('CUDA_VISIBLE_DEVICES', 'PYTHON')}
    env['PATH'] = f'{bin_dir}{os.pathsep}{env.get("PATH", "")}'
    env.update(extra)
    return env


def run_script(args, cwd, bin_dir, script=None, timeout=60, **env):
    return subprocess.run(['bash', script or str(bin_dir.parent / 'repo' / 'run_experiments.sh')]
                          + [str(a) for a in args], cwd=cwd, env=script_env(bin_dir, **env),
                          capture_output=True, text=True, timeout=timeout)


def run_queue(sandbox, file_text, *args, **env):
    work = sandbox / 'work'
    (work / 'exps.txt').write_text(file_text)
    return run_script(['exps.txt', '--python', sys.executable, *args], cwd=work,
                      bin_dir=sandbox / 'bin', **env)


def calls(work):
    path = work / 'calls.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def dry_run_plan(stdout):
    """[(slot, name, command words)] from a dry run's output."""
    lines = stdout.splitlines()
    plan = []
    for k, line in enumerate(lines):
        m = re.match(r'\[(GPU \S+|CPU)\] (\S+)  \(line', line)
        if m:
            plan.append((m.group(1), m.group(2), shlex.split(lines[k + 1])))
    return plan


QUEUE = '''# three experiments, one flag value with spaces
OK1 --lr 5e-6 --data_root "dir with space" \\
    --no_spaq   # a trailing comment
FAIL1 --lr 1e-5

OK2 --model_size tiny
'''


def test_queue_on_cpu_logs_marks_reports_failure_and_skips_finished_on_relaunch(sandbox):
    work = sandbox / 'work'
    write_stub(work, 'cwd')  # the working directory's trainer wins over the script folder's
    (work / 'collect_results.py').write_text('print("RESULTS TABLE from collect_results")\n')
    (work / 'FAIL1.fail').touch()

    out = run_queue(sandbox, QUEUE)
    assert out.returncode == 1, out.stdout + out.stderr
    runs = calls(work)
    assert [r['argv'] for r in runs] == [
        ['--name', 'OK1', '--lr', '5e-6', '--data_root', 'dir with space', '--no_spaq'],
        ['--name', 'FAIL1', '--lr', '1e-5'],
        ['--name', 'OK2', '--model_size', 'tiny'],
    ]
    assert {r['who'] for r in runs} == {'cwd'}
    assert [r['cuda'] for r in runs] == ['', '', '']  # no GPU: the CPU, one at a time
    assert all(r['unbuffered'] == '1' for r in runs)
    assert runs[0]['end'] <= runs[1]['start'] and runs[1]['end'] <= runs[2]['start']

    logs = work / 'logs' / 'experiments'
    assert 'training OK1' in (logs / 'OK1.log').read_text()
    assert 'Best test SRCC 0.9000' in (logs / 'OK2.log').read_text()
    assert 'boom: No space left on device' in (logs / 'FAIL1.log').read_text()
    assert (logs / 'OK1.done').exists() and (logs / 'OK2.done').exists()
    assert not (logs / 'FAIL1.done').exists()
    assert r'flags: --lr 5e-6 --data_root dir\ with\ space --no_spaq' in (logs / 'OK1.done').read_text()
    # The failure is reported with its name, exit code and log, and the queue went on to OK2.
    assert 'FAILED FAIL1: exit code 3' in out.stdout
    assert 'logs/experiments/FAIL1.log' in out.stdout
    assert 'boom: No space left on device' in out.stdout  # the log's tail is shown
    assert 'summary: 2 done, 1 failed, 0 skipped' in out.stdout
    assert 'failed:      FAIL1 (exit 3, log logs/experiments/FAIL1.log)' in out.stdout
    assert out.stdout.index('summary:') < out.stdout.index('RESULTS TABLE from collect_results')

    # Re-launch: the finished ones are skipped, the failed one runs again (and fails again).
    out = run_queue(sandbox, QUEUE)
    assert out.returncode == 1
    assert 'skip OK1 (finished)' in out.stdout and 'skip OK2 (finished)' in out.stdout
    assert [r['argv'][1] for r in calls(work)] == ['OK1', 'FAIL1', 'OK2', 'FAIL1']
    assert 'summary: 0 done, 1 failed, 2 skipped' in out.stdout

    # Fixed: the last one finishes, the queue is all done, its log holds both attempts. A flag
    # edited after a run finished is pointed out, not silently ignored.
    (work / 'FAIL1.fail').unlink()
    out = run_queue(sandbox, QUEUE.replace('--model_size tiny', '--model_size small'))
    assert out.returncode == 0, out.stdout + out.stderr
    assert [r['argv'][1] for r in calls(work)] == ['OK1', 'FAIL1', 'OK2', 'FAIL1', 'FAIL1']
    assert "note: OK2's flags in exps.txt differ" in out.stdout
    assert 'summary: 1 done, 0 failed, 2 skipped' in out.stdout
    assert (logs / 'FAIL1.done').exists()
    assert (logs / 'FAIL1.log').read_text().count('FAIL1, CPU, started') == 3


def test_two_gpus_run_side_by_side_and_the_next_takes_the_freed_gpu(sandbox):
    work = sandbox / 'work'
    fake_nvidia_smi(sandbox, GPU_LISTING)
    out = run_queue(sandbox, 'P1 --lr 1e-6\nP2 --lr 2e-6\nP3 --lr 3e-6\n', STUB_SECONDS='1.0')
    assert out.returncode == 0, out.stdout + out.stderr
    runs = {r['argv'][1]: r for r in calls(work)}
    assert {r['who'] for r in runs.values()} == {'script_dir'}  # no trainer in work/
    assert (runs['P1']['cuda'], runs['P2']['cuda']) == ('0', '1')
    assert runs['P2']['start'] < runs['P1']['end'] and runs['P1']['start'] < runs['P2']['end']
    # P3 waited for a GPU, then took the one that freed.
    freed = runs['P1'] if runs['P3']['cuda'] == '0' else runs['P2']
    assert runs['P3']['start'] >= freed['end']
    assert 'start P3 on GPU' in out.stdout
    assert 'note: collect_results.py not found' in out.stdout
    assert sorted(os.listdir(work / 'logs' / 'experiments')) == [
        '.run_experiments.lock', 'P1.done', 'P1.log', 'P2.done', 'P2.log', 'P3.done', 'P3.log']


@pytest.mark.parametrize('args, env, slots', [
    ([], {}, ['CPU', 'CPU']),                                     # nvidia-smi finds no GPU
    (['--gpus', '0,1'], {}, ['GPU 0', 'GPU 1', 'GPU 0']),
    (['--gpus', '0,0'], {}, ['GPU 0', 'GPU 0']),                  # two runs on one GPU
    (['--gpus', 'cpu'], {'CUDA_VISIBLE_DEVICES': '3'}, ['CPU']),
    ([], {'CUDA_VISIBLE_DEVICES': '2,3'}, ['GPU 2', 'GPU 3']),
    ([], {'CUDA_VISIBLE_DEVICES': ''}, ['CPU']),
])
def test_dry_run_shows_assignment_and_runs_nothing(sandbox, args, env, slots):
    work = sandbox / 'work'
    out = run_queue(sandbox, 'X1 --lr 1e-6\nX2 --note "a b"\nX3\n', '--dry-run', *args, **env)
    assert out.returncode == 0, out.stdout + out.stderr
    plan = dry_run_plan(out.stdout)
    assert [p[0] for p in plan] == [slots[k % len(slots)] for k in range(3)]
    assert [p[1] for p in plan] == ['X1', 'X2', 'X3']
    gpu = '' if plan[1][0] == 'CPU' else plan[1][0].split()[1]
    assert plan[1][2] == [f'CUDA_VISIBLE_DEVICES={gpu}', sys.executable,
                          str(sandbox / 'repo' / 'train_swin.py'), '--name', 'X2', '--note', 'a b']
    assert not (work / 'logs').exists() and calls(work) == []


def test_words_split_like_the_shell_without_expanding_anything(sandbox):
    lines = {
        r"""Q1 --data_root "/data/my sets" --note 'it''s # not a comment' # comment""":
            ['--data_root', '/data/my sets', '--note', 'its # not a comment'],
        r"""Q2 --a a\ b --b "say \"hi\" \\ \$HOME" --c x#y --d=$HOME --e '*' ''""":
            ['--a', 'a b', '--b', 'say "hi" \\ $HOME', '--c', 'x#y', '--d=$HOME', '--e', '*', ''],
        'Q3 --lr 1e-6 \\\n  --epochs 2\\\n0 \\\n': ['--lr', '1e-6', '--epochs', '20'],
    }
    out = run_queue(sandbox, '\n'.join(lines) + '\nQ4\r\n', '--dry-run')
    assert out.returncode == 0, out.stdout + out.stderr
    plan = dry_run_plan(out.stdout)
    assert [name for _, name, _ in plan] == ['Q1', 'Q2', 'Q3', 'Q4']
    for (_, name, words), expected in zip(plan, list(lines.values()) + [[]]):
        assert words[3:5] == ['--name', name] and words[5:] == expected, name


def test_default_python_is_the_venv_next_to_the_script_unless_python_is_set(sandbox):
    repo = sandbox / 'repo'
    (repo / '.venv' / 'bin').mkdir(parents=True)
    os.symlink(sys.executable, repo / '.venv' / 'bin' / 'python')
    (repo / 'exps.txt').write_text('X1 --lr 1e-6\n')
    out = run_script(['exps.txt', '--dry-run'], cwd=repo, bin_dir=sandbox / 'bin')
    assert dry_run_plan(out.stdout)[0][2][1:3] == ['.venv/bin/python', 'train_swin.py']
    out = run_script(['exps.txt', '--dry-run'], cwd=repo, bin_dir=sandbox / 'bin',
                     PYTHON=sys.executable)
    assert dry_run_plan(out.stdout)[0][2][1] == sys.executable


@pytest.mark.parametrize('file_text, message', [
    ('A1 --lr 1e-6\nB1 --lr 2e-6 \\\n  --epochs 5\nA1 --lr 3e-6\n',
     "exps.txt:4: duplicate experiment name 'A1' (first on line 1)"),
    ('A1 --lr 1e-6\n# A1 --lr 3e-6\nB1 --data_root "unclosed\n', 'exps.txt:3: unterminated " quote'),
    ('--lr 1e-6 --epochs 5\n', "exps.txt:1: a line starts with the experiment's name"),
    ('A1 B1 --lr 1e-6\n', "exps.txt:1: 'A1' is followed by 'B1', not a flag"),
    ('A1 --name other --lr 1e-6\n', "exps.txt:1: 'A1' sets --name"),
    ('A/1 --lr 1e-6\n', "exps.txt:1: experiment name 'A/1' may only hold"),
    ('# nothing but comments\n\n', 'exps.txt: no experiments'),
])
def test_bad_experiment_file_is_refused_before_anything_runs(sandbox, file_text, message):
    out = run_queue(sandbox, file_text)
    assert out.returncode == 2
    assert message in out.stderr
    assert calls(sandbox / 'work') == [] and not (sandbox / 'work' / 'logs').exists()


def process_alive(pid):
    """True while pid runs; a zombie left to a non-reaping init counts as gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


@pytest.mark.parametrize('sig, status', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_running_experiments_and_their_children(sandbox, sig, status):
    work = sandbox / 'work'
    (work / 'exps.txt').write_text('SLOW1 --lr 1e-6\nNEXT --lr 2e-6\n')
    (work / 'SLOW1.slow').touch()
    runner = subprocess.Popen(
        ['bash', str(sandbox / 'repo' / 'run_experiments.sh'), 'exps.txt', '--python', sys.executable],
        cwd=work, env=script_env(sandbox / 'bin'), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
        # A CI shell may start us with SIGINT ignored, which bash could then not trap.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 30
        while not (work / 'SLOW1.pids').exists():
            assert runner.poll() is None and time.time() < deadline, 'the stub never started'
            time.sleep(0.05)
        pids = [int(p) for p in (work / 'SLOW1.pids').read_text().split()]
        assert all(process_alive(p) for p in pids)

        # A second runner on the same log dir is refused while the first one runs.
        second = run_script(['exps.txt', '--python', sys.executable], cwd=work, bin_dir=sandbox / 'bin')
        assert second.returncode == 2
        assert f'another run_experiments.sh (pid {runner.pid}) is running' in second.stderr

        runner.send_signal(sig)
        stdout, stderr = runner.communicate(timeout=30)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert runner.returncode == status, stdout + stderr
    deadline = time.time() + 5
    while any(process_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(process_alive(p) for p in pids), 'the trainer or its child outlived the runner'
    logs = work / 'logs' / 'experiments'
    assert not (logs / 'SLOW1.done').exists()
    assert (logs / 'SLOW1.log').read_text().rstrip().endswith('=====')
    assert 'SLOW1 interrupted after' in (logs / 'SLOW1.log').read_text()
    assert calls(work) == []  # NEXT never started
    assert 'interrupted: SLOW1' in stdout and 'not started: NEXT' in stdout


def test_real_tiny_cpu_queue_with_train_swin_and_skip_on_relaunch(tmp_path):
    """Three real (tiny) trainings through the queue, the results table, then a re-launch."""
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
    from dataset_fixtures import make_koniq
    data = tmp_path / 'koniq'
    make_koniq(data, sets=('training',) * 6 + ('validation',) * 2 + ('test',) * 3, hw=(64, 64))
    common = (f'--dataset koniq-10k --data_root {data} --model_size nano --no_pretrained --epochs 1 '
              '--batch_size 4 --train_patch_num 1 --test_patch_num 1 --resize 224 224 --cache_dir none '
              '--num_workers 1 --no_spaq --output_dir checkpoints --log_dir logs')
    (tmp_path / 'tiny.txt').write_text(f'T1 {common}\nT2 {common} --lr 1e-4\nT3 {common} --ranking_loss_alpha 0.3\n')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = ['bash', SCRIPT, 'tiny.txt', '--gpus', 'cpu', '--python', sys.executable]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ('T1', 'T2', 'T3'):
        assert (tmp_path / 'logs' / 'experiments' / f'{name}.done').exists()
        assert 'Best test SRCC' in (tmp_path / 'logs' / 'experiments' / f'{name}.log').read_text()
    configs = [json.load(open(p)) for p in sorted((tmp_path / 'checkpoints').glob('*/config.json'))]
    assert sorted(c['name'] for c in configs) == ['T1', 'T2', 'T3']
    assert '| T2 |' in done.stdout and 'lr=0.0001' in done.stdout  # the results table, differences named

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    for name in ('T1', 'T2', 'T3'):
        assert f'skip {name} (finished)' in again.stdout
    assert len(list((tmp_path / 'checkpoints').glob('*/config.json'))) == 3  # nothing ran twice
