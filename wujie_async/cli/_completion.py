"""``wujie-async completion bash|zsh|fish``: shell completion scripts, generated from the parser.

Nothing is written by hand per command: the script is built from the argparse tree (commands,
subcommands, options and their choices), so it cannot fall behind the parser.

Install, e.g.: ``wujie-async completion bash > ~/.local/share/bash-completion/completions/
wujie-async``, or ``eval "$(wujie-async completion zsh)"`` in ``.zshrc``, or
``wujie-async completion fish > ~/.config/fish/completions/wujie-async.fish``.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

SHELLS = ("bash", "zsh", "fish")
PROG = "wujie-async"


@dataclass
class _Command:
    """One (sub)command: its path of names, options, option choices and subcommands."""

    path: tuple[str, ...]
    help: str = ""
    options: dict[str, str] = field(default_factory=dict)  # flag -> help
    choices: dict[str, list[str]] = field(default_factory=dict)  # flag -> its choices
    takes_value: set[str] = field(default_factory=set)
    words: list[str] = field(default_factory=list)  # choices of its positional arguments
    subcommands: list[_Command] = field(default_factory=list)


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...], text: str = "") -> _Command:
    command = _Command(path, text)
    for action in parser._actions:  # argparse has no public walk of its tree
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                command.subcommands.append(_walk(sub, (*path, name), helps.get(name, "")))
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if not action.option_strings and action.choices is not None:
            command.words += [str(choice) for choice in action.choices]
        for flag in action.option_strings:
            command.options[flag] = (action.help or "").replace("%%", "%")
            if action.nargs != 0:
                command.takes_value.add(flag)
            if action.choices is not None:
                command.choices[flag] = [str(choice) for choice in action.choices]
    return command


def _commands(root: _Command) -> list[_Command]:
    found = [root]
    for sub in root.subcommands:
        found += _commands(sub)
    return found


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (bash, zsh or fish).

    Raises:
        ValueError: an unknown shell.
    """
    root = _walk(parser, ())
    if shell == "bash":
        return _bash(root)
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + _bash(root)
    if shell == "fish":
        return _fish(root)
    raise ValueError(f"unknown shell {shell!r}; one of {', '.join(SHELLS)}")


def _bash(root: _Command) -> str:
    cases: list[str] = []
    for command in _commands(root):
        key = " ".join(command.path)
        words = [sub.path[-1] for sub in command.subcommands] + command.words
        words += sorted(command.options)
        value_cases = "".join(
            f"            {shlex.quote(flag)}) COMPREPLY=($(compgen -W "
            f'{shlex.quote(" ".join(choices))} -- "$cur")); return;;\n'
            for flag, choices in sorted(command.choices.items())
            if flag in command.takes_value
        )
        takes = " ".join(sorted(command.takes_value - set(command.choices)))
        cases.append(
            f"        {shlex.quote(key)})\n"
            f'            case "$prev" in\n{value_cases}'
            f"            esac\n"
            f"            takes={shlex.quote(takes)}\n"
            f"            words={shlex.quote(' '.join(words))};;\n"
        )
    names = " ".join(sorted({sub.path[-1] for c in _commands(root) for sub in c.subcommands}))
    return f"""# bash completion for {PROG} (generated from its parser: {PROG} completion bash)
_wujie_async() {{
    local cur prev path word takes words i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    path=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        case " {names} " in
            *" $word "*) path="${{path:+$path }}$word";;
        esac
    done
    case "$path" in
{"".join(cases)}    esac
    if [[ " $takes " == *" $prev "* ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    elif [[ "$cur" == -* || -z "$cur" ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$words" -- "$cur") $(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F _wujie_async {PROG}
"""


def _fish_text(text: str) -> str:
    return shlex.quote(text.split(";")[0].strip()[:80])


def _fish(root: _Command) -> str:
    lines = [f"# fish completion for {PROG} (generated from its parser: {PROG} completion fish)"]
    lines.append(f"complete -c {PROG} -f")
    for command in _commands(root):
        if command.path:
            condition = "; and ".join(f"__fish_seen_subcommand_from {n}" for n in command.path)
        else:
            condition = "__fish_use_subcommand"
        subs = {sub.path[-1] for sub in command.subcommands}
        if command.words:
            lines.append(
                f"complete -c {PROG} -n {shlex.quote(condition)} -a "
                f"{shlex.quote(' '.join(command.words))}"
            )
        for sub in command.subcommands:
            guard = condition if command.path else "__fish_use_subcommand"
            if command.path:
                guard += f"; and not __fish_seen_subcommand_from {' '.join(sorted(subs))}"
            lines.append(
                f"complete -c {PROG} -n {shlex.quote(guard)} -a {sub.path[-1]} "
                f"-d {_fish_text(sub.help)}"
            )
        if not command.path:
            condition = "not __fish_seen_subcommand_from " + " ".join(sorted(subs))
        for flag, text in sorted(command.options.items()):
            spec = f"-l {flag[2:]}" if flag.startswith("--") else f"-s {flag[1:]}"
            extra = ""
            if flag in command.choices:
                extra = f" -x -a {shlex.quote(' '.join(command.choices[flag]))}"
            elif flag in command.takes_value:
                extra = " -r -F"
            lines.append(
                f"complete -c {PROG} -n {shlex.quote(condition)} {spec}{extra} "
                f"-d {_fish_text(text)}"
            )
    return "\n".join(lines) + "\n"
