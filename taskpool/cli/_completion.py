"""`taskpool completion bash|zsh`: a shell completion script, written from the parser
itself, so every command and option any module adds completes with nothing more.

It completes commands, each command's options (the global ones included), the
choices of options and arguments that have them (`--status`, `--log-format`, ...),
and file names for `--db` and `--cwd` and after `submit --`. Static: the script asks
nothing of taskpool while the operator types.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._options import Commands

SHELLS = ["bash", "zsh"]

#: Options whose value is a file name.
_FILE_OPTIONS = frozenset({"--db", "--cwd"})


def add_commands(commands: Commands) -> None:
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script",
        description='Print a completion script for the shell. bash: eval "$(taskpool'
        ' completion bash)" in ~/.bashrc, or save it as'
        " ~/.local/share/bash-completion/completions/taskpool. zsh (after compinit):"
        " source <(taskpool completion zsh), or save it as _taskpool in your $fpath.",
    )
    completion.set_defaults(run=cmd_completion)
    completion.add_argument("shell", choices=SHELLS, help="the shell")


async def cmd_completion(args: argparse.Namespace) -> None:
    from . import build_parser  # the whole parser, this command's own included

    grammar = Grammar.of(build_parser())
    print(bash_script(grammar) if args.shell == "bash" else zsh_script(grammar), end="")


@dataclass
class Grammar:
    """What completes where: the commands, each one's options and argument choices,
    the options taking a value (and the choices of those that have them)."""

    commands: list[str]
    global_options: list[str]
    options: dict[str, list[str]] = field(default_factory=dict)
    arguments: dict[str, list[str]] = field(default_factory=dict)
    valued: set[str] = field(default_factory=set)
    choices: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, parser: argparse.ArgumentParser) -> Grammar:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands: dict[str, argparse.ArgumentParser] = subparsers.choices
        grammar = cls(list(commands), _option_strings(parser))
        for command, subparser in [(None, parser), *commands.items()]:
            for action in subparser._actions:
                if action.option_strings and action.nargs != 0:
                    grammar.valued.update(action.option_strings)
                    if action.choices is not None:
                        for name in action.option_strings:
                            grammar.choices[name] = [str(c) for c in action.choices]
            if command is not None:
                grammar.options[command] = _option_strings(subparser)
                positional_choices = [
                    str(c)
                    for a in subparser._actions
                    if not a.option_strings and a.choices is not None
                    for c in a.choices
                ]
                if positional_choices:
                    grammar.arguments[command] = positional_choices
        return grammar


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def _words(items: list[str] | set[str]) -> str:
    return shlex.quote(" ".join(sorted(items) if isinstance(items, set) else items))


def _cases(table: dict[str, list[str]], assign: str, indent: str) -> str:
    return "\n".join(
        f"{indent}{shlex.quote(key)}) {assign}={_words(values)} ;;" for key, values in table.items()
    )


def _patterns(names: set[str] | frozenset[str]) -> str:
    return "|".join(sorted(names))


def bash_script(grammar: Grammar) -> str:
    valued = _patterns(grammar.valued)
    return f"""# taskpool completion for bash: eval "$(taskpool completion bash)"
_taskpool() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local command="" i words=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            --) compopt -o default 2>/dev/null; COMPREPLY=(); return 0 ;;
            {valued}) ((i++)) ;;
            -*) ;;
            *) [[ -z "$command" ]] && command="${{COMP_WORDS[i]}}" ;;
        esac
    done
    case "$prev" in
        {_patterns(_FILE_OPTIONS)}) compopt -o default 2>/dev/null; COMPREPLY=(); return 0 ;;
{_cases(grammar.choices, "words", " " * 8)}
        {valued}) COMPREPLY=(); return 0 ;;
    esac
    if [[ -z "$words" ]]; then
        if [[ "$cur" == -* ]]; then
            case "$command" in
{_cases(grammar.options, "words", " " * 16)}
                *) words={_words(grammar.global_options)} ;;
            esac
        elif [[ -z "$command" ]]; then
            words={_words(grammar.commands)}
        else
            case "$command" in
{_cases(grammar.arguments, "words", " " * 16)}
            esac
        fi
    fi
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _taskpool taskpool
"""


def zsh_script(grammar: Grammar) -> str:
    valued = _patterns(grammar.valued)
    return f"""#compdef taskpool
# taskpool completion for zsh (after compinit): source <(taskpool completion zsh)
_taskpool() {{
    local cur="${{words[CURRENT]}}" prev="${{words[CURRENT-1]}}"
    local command="" i choices=""
    for ((i = 2; i < CURRENT; i++)); do
        case "${{words[i]}}" in
            --) _files; return ;;
            {valued}) ((i++)) ;;
            -*) ;;
            *) [[ -z "$command" ]] && command="${{words[i]}}" ;;
        esac
    done
    case "$prev" in
        {_patterns(_FILE_OPTIONS)}) _files; return ;;
{_cases(grammar.choices, "choices", " " * 8)}
        {valued}) return ;;
    esac
    if [[ -z "$choices" ]]; then
        if [[ "$cur" == -* ]]; then
            case "$command" in
{_cases(grammar.options, "choices", " " * 16)}
                *) choices={_words(grammar.global_options)} ;;
            esac
        elif [[ -z "$command" ]]; then
            choices={_words(grammar.commands)}
        else
            case "$command" in
{_cases(grammar.arguments, "choices", " " * 16)}
            esac
        fi
    fi
    compadd -- ${{=choices}}
}}
compdef _taskpool taskpool
"""
