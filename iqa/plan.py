"""The experiment file of run_experiments.sh: one experiment per line, a name and then the
trainer's flags exactly as typed on a command line.

    # comments and blank lines are ignored
    # script: train_clip.py      (optional, before the first experiment: the training script)
    A1 --dataset koniq-10k --model_size base --lr 5e-6 \\
       --test_random_crop --no_spaq

A trailing backslash continues a line. Words split like the shell's:
'...' and "..." quote, a backslash escapes one character, a word starting with # starts a
comment. Nothing is expanded ($VAR, ~, globs stay as written), so nothing in a plan can run a
command. Names are unique; they name the log files.

Imports neither torch nor numpy: this runs on a login node.
"""
import re

NAME_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.+-]*')
SCRIPT_LINE_RE = re.compile(r'#\s*script:\s*(.*?)\s*$')


class PlanError(Exception):
    """A plan that cannot run; the message names the file and line."""


class Experiment:
    def __init__(self, name, flags, line):
        self.name, self.flags, self.line = name, flags, line

    def flag_value(self, flag, default=None):
        """The value of `flag` as the trainer would read it (the last one wins)."""
        value = default
        for k, word in enumerate(self.flags):
            if word == flag:
                value = self.flags[k + 1] if k + 1 < len(self.flags) else ''
            elif word.startswith(flag + '='):
                value = word[len(flag) + 1:]
        return value


class Plan:
    def __init__(self, path, experiments, script=None, script_line=None):
        self.path, self.experiments = path, experiments
        self.script, self.script_line = script, script_line


# Characters bash's printf %q escapes with a backslash anywhere in a word; '#' and '~' only at
# its start (where the shell would read a comment or a home folder).
_BASH_SPECIAL = set(' \t\'"\\|&;()<>!{}*[]?^$`,')
_BASH_C_ESCAPES = {'\a': 'a', '\b': 'b', '\x1b': 'E', '\f': 'f', '\n': 'n', '\r': 'r', '\t': 't',
                   '\v': 'v', '\\': '\\', "'": "'"}


def _c_escape(c):
    if c in _BASH_C_ESCAPES:
        return '\\' + _BASH_C_ESCAPES[c]
    return f'\\{ord(c):03o}' if ord(c) < 32 or ord(c) == 127 else c


def quote_word(word):
    """`word` quoted exactly as bash's printf %q does, so the .done markers written here and by
    the SLURM batch script (bash) record the same flags text, and old markers still compare equal."""
    if word == '':
        return "''"
    if any(ord(c) < 32 or ord(c) == 127 for c in word):
        return "$'" + ''.join(_c_escape(c) for c in word) + "'"
    out = ''.join('\\' + c if c in _BASH_SPECIAL else c for c in word)
    return '\\' + out if out[0] in '#~' else out


def quote_words(words):
    """One line that pastes back into a shell as `words`."""
    return ' '.join(quote_word(w) for w in words)


# One piece of a line, as the shell reads it: blanks, a '...' or "..." string, a backslash and
# the character it escapes, a '#', or a run of ordinary characters.
_PIECE = re.compile(r"""(\s+)|'([^']*)'|"((?:[^"\\]|\\.)*)"|\\(.?)|(#)|([^\s'"\\#]+)""", re.S)
_DOUBLE_QUOTE_ESCAPE = re.compile(r'\\([$`"\\\n])')


def split_words(text):
    """The words of one logical line, split as bash splits them, with no expansion.

    Not shlex.split: in POSIX mode it reads '#' in the middle of a word (x#y) as a comment and
    keeps the backslash of \\$ and \\` inside double quotes, where the shell drops it; a plan
    line must mean what it means when pasted into a shell.
    """
    words, word, pos = [], None, 0
    while pos < len(text):
        m = _PIECE.match(text, pos)
        if not m:  # an opening quote without its closing one
            raise ValueError(f'unterminated {text[pos]} quote')
        pos = m.end()
        blank, single, double, escaped, hash_, plain = m.groups()
        if blank is not None:
            if word is not None:
                words.append(word)
            word = None
        elif hash_ is not None and word is None:
            break  # a word that starts with '#' starts a comment
        else:
            if double is not None:
                piece = _DOUBLE_QUOTE_ESCAPE.sub(r'\1', double)
            else:
                piece = next(g for g in (single, escaped, hash_, plain) if g is not None)
            word = (word or '') + piece
    if word is not None:
        words.append(word)
    return words


def _experiment(path, line_no, text, seen, prog):
    try:
        words = split_words(text)
    except ValueError as e:
        raise PlanError(f'{path}:{line_no}: {e}') from None
    if not words:
        return None
    name = words[0]
    if name.startswith('-'):
        raise PlanError(f"{path}:{line_no}: a line starts with the experiment's name, then its flags; "
                        f"got '{name}' first (e.g. 'A1 {name} ...')")
    if not NAME_RE.fullmatch(name):
        raise PlanError(f"{path}:{line_no}: experiment name '{name}' may only hold letters, digits and "
                        ". _ + - (it names the log file)")
    if name in seen:
        raise PlanError(f"{path}:{line_no}: duplicate experiment name '{name}' (first on line {seen[name]})")
    if len(words) > 1 and not words[1].startswith('-'):
        raise PlanError(f"{path}:{line_no}: '{name}' is followed by '{words[1]}', not a flag; one "
                        "experiment per line: NAME --flag value ... (names cannot hold spaces)")
    if any(w == '--name' or w.startswith('--name=') for w in words):
        raise PlanError(f"{path}:{line_no}: '{name}' sets --name; {prog} passes --name {name} itself, "
                        "remove it")
    seen[name] = line_no
    return Experiment(name, words[1:], line_no)


def read_plan(path, prog='run_experiments.sh'):
    """The experiments of `path` in file order; PlanError for anything that would not run."""
    try:
        with open(path, encoding='utf-8', newline='') as f:
            lines = f.read().split('\n')
    except FileNotFoundError:
        raise PlanError(f'experiment file not found: {path}') from None
    except (OSError, UnicodeDecodeError):
        raise PlanError(f'cannot read experiment file: {path}') from None
    if lines and lines[-1] == '':
        lines.pop()
    plan = Plan(path, [])
    seen = {}
    text, start = None, 0

    def add(line_no, text):
        experiment = _experiment(path, line_no, text, seen, prog)
        if experiment:
            plan.experiments.append(experiment)

    for line_no, line in enumerate(lines, 1):
        line = line[:-1] if line.endswith('\r') else line
        if text is None:
            trimmed = line.strip()
            match = SCRIPT_LINE_RE.fullmatch(trimmed)
            if match:
                script = match.group(1)
                if plan.experiments:
                    raise PlanError(f"{path}:{line_no}: '# script:' must come before the first experiment")
                if plan.script:
                    raise PlanError(f"{path}:{line_no}: a second '# script:' line (the first is on line "
                                    f"{plan.script_line})")
                if not re.fullmatch(r'\S+', script):
                    raise PlanError(f"{path}:{line_no}: '# script:' takes one file name, e.g. "
                                    "'# script: train_clip.py'")
                plan.script, plan.script_line = script, line_no
                continue
            # A comment line ends there even when it ends in a backslash, as in the shell.
            if not trimmed or trimmed.startswith('#'):
                continue
            text, start = '', line_no
        backslashes = len(line) - len(line.rstrip('\\'))
        if backslashes % 2 == 1:
            text += line[:-1]
            continue
        add(start, text + line)
        text = None
    if text is not None:
        add(start, text)
    if not plan.experiments:
        raise PlanError(f"{path}: no experiments (expected lines like 'A1 --lr 5e-6 ...')")
    return plan
