"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd from Debian's
slurm-wlm, with every file (key, config, state, spool, logs, sockets) in one temp folder.

    with one_node_cluster(tmp_dir) as env:      # env: os.environ plus SLURM_CONF
        subprocess.run(['sbatch', ...], env=env)

Needs root (slurmd starts jobs as their user) and the daemons on PATH or in /usr/sbin;
`unavailable()` says why not, so the SLURM tests can skip with the reason. .ci/run installs
slurm-wlm (apt-get) before `make test`.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

DAEMONS = ('munged', 'slurmctld', 'slurmd')
CLIENTS = ('sbatch', 'squeue', 'scontrol', 'scancel', 'sinfo')
SEARCH_PATH = os.pathsep.join([os.environ.get('PATH', ''), '/usr/sbin', '/usr/local/sbin'])


def unavailable():
    """Why a cluster cannot be started here (None when it can)."""
    if os.name != 'posix' or os.geteuid() != 0:
        return 'the one-node SLURM cluster runs as root (slurmd starts jobs as their user)'
    missing = [p for p in DAEMONS + CLIENTS if shutil.which(p, path=SEARCH_PATH) is None]
    if missing:
        return f'SLURM is not installed ({", ".join(missing)} not found; apt-get install slurm-wlm munge)'
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _write_config(root, host, cpus):
    ctld_port, slurmd_port = _free_port(), _free_port()
    conf = f"""\
ClusterName=iqatest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
InactiveLimit=0
MinJobAge=600
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
    path = os.path.join(root, 'slurm.conf')
    with open(path, 'w') as f:
        f.write(conf)
    return path


def _pid(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def one_node_cluster(root, cpus=2, timeout=30):
    """Start munged, slurmctld and slurmd in `root`; yield the environment for the clients; stop
    them (and every job) afterwards. Raises RuntimeError, with the daemons' log, if the node does
    not come up."""
    root = os.path.abspath(root)
    for sub in ('state', 'spool', 'log'):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    os.chmod(root, 0o755)  # munged wants its socket's folder reachable
    key = os.path.join(root, 'munge.key')
    with open(key, 'wb') as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    host = socket.gethostname().split('.')[0]
    conf = _write_config(root, host, cpus)
    env = dict(os.environ, SLURM_CONF=conf, PATH=SEARCH_PATH)
    env.pop('SLURM_JOB_ID', None)

    def run(*cmd):
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

    pid_files = [os.path.join(root, n) for n in ('slurmd.pid', 'slurmctld.pid', 'munged.pid')]
    try:
        started = run('munged', '--force', f'--key-file={key}', f'--socket={root}/munge.sock',
                      f'--log-file={root}/log/munged.log', f'--pid-file={root}/munged.pid',
                      f'--seed-file={root}/munged.seed')
        if started.returncode != 0:
            raise RuntimeError(f'munged did not start: {started.stderr.strip()}')
        for daemon in ('slurmctld', 'slurmd'):
            started = run(daemon, '-f', conf)
            if started.returncode != 0:
                raise RuntimeError(f'{daemon} did not start: {started.stderr.strip()}')
        deadline = time.time() + timeout
        state = ''
        while time.time() < deadline:
            state = run('sinfo', '-h', '-N', '-o', '%T').stdout.strip()
            if state in ('idle', 'mixed', 'allocated'):
                break
            time.sleep(0.5)
        else:
            logs = ''
            for name in ('slurmctld.log', 'slurmd.log'):
                with open(os.path.join(root, 'log', name), errors='replace') as f:
                    logs += f'--- {name}\n' + ''.join(f.readlines()[-15:])
            raise RuntimeError(f'the node did not come up (sinfo: {state!r})\n{logs}')
        yield env
    finally:
        if os.path.exists(conf):
            subprocess.run(['scancel', '--full', '--quiet', '-u', 'root'], env=env, capture_output=True,
                           timeout=timeout)
        for path in pid_files:
            pid = _pid(path)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.1)
                else:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def wait_until(predicate, timeout, what, interval=0.5):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for {what}')
        time.sleep(interval)
